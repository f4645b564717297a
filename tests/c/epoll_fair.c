// An epoll set with a socket that stays readable (its data is never read)
// and a kernel pipe that becomes readable: the pipe must be reported within
// a few waits. Under the shim the socket is a hoststack (cut-through)
// connection, whose readiness is always at hand; the shim looks at the
// kernel side of the set only every few waits while that lasts.
// Prints "pipe after N waits".
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4) ||
        getsockname(l, (struct sockaddr *)&a, &al)) {
        perror("listen");
        return 2;
    }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a)) {
        perror("connect");
        return 2;
    }
    int s = accept(l, NULL, NULL);
    if (s < 0 || write(c, "x", 1) != 1) {
        perror("accept/write");
        return 2;
    }
    int p[2];
    int ep = epoll_create1(0);
    if (pipe(p) || ep < 0) {
        perror("pipe/epoll");
        return 2;
    }
    struct epoll_event e = {.events = EPOLLIN, .data.fd = s};
    struct epoll_event f = {.events = EPOLLIN, .data.fd = p[0]};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &e) || epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &f)) {
        perror("epoll_ctl");
        return 2;
    }
    struct epoll_event ev[8];
    int seen = 0;
    for (int i = 0; i < 100 && !seen; i++) {
        int n = epoll_wait(ep, ev, 8, 1000);
        for (int k = 0; k < n; k++)
            seen |= ev[k].data.fd == s;
    }
    if (!seen) {
        printf("socket never readable\n");
        return 1;
    }
    // Make sure the shim has just looked at the kernel side, so the next
    // waits may skip it.
    for (int i = 0; i < 3; i++)
        epoll_wait(ep, ev, 8, 0);
    if (write(p[1], "y", 1) != 1) {
        perror("write pipe");
        return 2;
    }
    for (int i = 1; i <= 100; i++) {
        int n = epoll_wait(ep, ev, 8, 1000);
        for (int k = 0; k < n; k++) {
            if (ev[k].data.fd == p[0]) {
                printf("pipe after %d waits\n", i);
                return 0;
            }
        }
    }
    printf("pipe not reported in 100 waits\n");
    return 1;
}
