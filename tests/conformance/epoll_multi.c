/* epoll with several sets and fd kinds: one socket in two sets, an epoll
 * fd nested in another, a listening socket, a pipe next to a TCP socket,
 * a fresh unconnected socket, and a registered fd closed while a dup of it
 * stays open. */
#define _GNU_SOURCE
#include "conf.h"

static void add(int ep, int fd, uint32_t events, uint32_t tag)
{
	struct epoll_event e = { .events = events, .data.u32 = tag };
	CHK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e));
}

/* Waits up to ms, returns the count; the events' tags are printed sorted. */
static int ewait(int ep, int ms, char *out, size_t outlen)
{
	struct epoll_event e[8];
	int n;
	do
		n = epoll_wait(ep, e, 8, ms);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		fail("epoll_wait: %s", ename(errno));
	/* Sort by tag: the kernel's ready-list order is not part of the API. */
	for (int i = 0; i < n; i++)
		for (int j = i + 1; j < n; j++)
			if (e[j].data.u32 < e[i].data.u32) {
				struct epoll_event t = e[i];
				e[i] = e[j];
				e[j] = t;
			}
	out[0] = 0;
	for (int i = 0; i < n; i++)
		snprintf(out + strlen(out), outlen - strlen(out), "%s%u:%s",
			 i ? " " : "", e[i].data.u32, eflags(e[i].events));
	if (!n)
		snprintf(out, outlen, "none");
	return n;
}

int main(void)
{
	int c, s, ep1, ep2, n;
	char o1[256], o2[256], buf[64];

	conf_init();

	/* One socket in two sets: both report it (LT and ET). */
	tcp_pair(&c, &s);
	ep1 = CHK(epoll_create1(0));
	ep2 = CHK(epoll_create1(0));
	add(ep1, s, EPOLLIN, 1);
	add(ep2, s, EPOLLIN | EPOLLET, 2);
	n = ewait(ep1, 0, o1, sizeof o1);
	say("two sets idle: %d %s", n, o1);
	CHK(write(c, "ping", 4));
	wait_bytes(s, 4, 2000);
	ewait(ep1, 1000, o1, sizeof o1);
	ewait(ep2, 1000, o2, sizeof o2);
	say("two sets: set1 %s, set2 %s", o1, o2);
	ewait(ep1, 0, o1, sizeof o1);
	ewait(ep2, 50, o2, sizeof o2);
	say("two sets again: set1 %s, set2 %s", o1, o2);
	say("read: %s", rs(read(s, buf, sizeof buf)));
	close(ep2);

	/* Nested: the outer set reports the inner epoll fd as readable. */
	int outer = CHK(epoll_create1(0));
	int inner = ep1;
	add(outer, inner, EPOLLIN, 9);
	n = ewait(outer, 50, o1, sizeof o1);
	say("outer idle: %d %s", n, o1);
	CHK(write(c, "pong", 4));
	n = ewait(outer, 2000, o1, sizeof o1);
	say("outer with data: %d %s", n, o1);
	n = ewait(inner, 0, o2, sizeof o2);
	say("inner with data: %d %s", n, o2);
	wait_bytes(s, 4, 1000);
	say("read: %s", rs(read(s, buf, sizeof buf)));
	n = ewait(outer, 50, o1, sizeof o1);
	say("outer drained: %d %s", n, o1);
	close(outer);

	/* A listening socket reports IN when a connection is pending, never OUT. */
	struct sockaddr_in a;
	int l = listener4(&a, 4);
	int ep = CHK(epoll_create1(0));
	add(ep, l, EPOLLIN | EPOLLOUT, 3);
	n = ewait(ep, 50, o1, sizeof o1);
	say("listener idle: %d %s", n, o1);
	int c2 = connect4(&a);
	n = ewait(ep, 2000, o1, sizeof o1);
	say("listener pending: %d %s", n, o1);
	int s2 = CHK(accept(l, NULL, NULL));
	n = ewait(ep, 50, o1, sizeof o1);
	say("listener after accept: %d %s", n, o1);
	close(s2);
	close(c2);
	close(l);
	close(ep);

	/* A pipe and a TCP socket in one set. */
	int p[2];
	CHK(pipe(p));
	ep = CHK(epoll_create1(0));
	add(ep, p[0], EPOLLIN, 1);
	add(ep, s, EPOLLIN, 2);
	add(ep, p[1], EPOLLOUT, 3);
	add(ep, c, EPOLLOUT, 4);
	n = ewait(ep, 0, o1, sizeof o1);
	say("mixed idle: %d %s", n, o1);
	CHK(write(p[1], "p", 1));
	n = ewait(ep, 0, o1, sizeof o1);
	say("mixed pipe data: %d %s", n, o1);
	CHK(write(c, "t", 1));
	wait_bytes(s, 1, 2000);
	n = ewait(ep, 0, o1, sizeof o1);
	say("mixed both: %d %s", n, o1);
	CHK(read(p[0], buf, sizeof buf));
	CHK(read(s, buf, sizeof buf));
	n = ewait(ep, 0, o1, sizeof o1);
	say("mixed drained: %d %s", n, o1);
	close(p[1]);
	n = ewait(ep, 0, o1, sizeof o1);
	say("pipe writer closed: %d %s", n, o1);
	close(p[0]);
	close(ep);

	/* A fresh, never connected TCP socket. */
	int f = CHK(socket(AF_INET, SOCK_STREAM, 0));
	ep = CHK(epoll_create1(0));
	add(ep, f, EPOLLIN | EPOLLOUT, 5);
	n = ewait(ep, 0, o1, sizeof o1);
	say("fresh socket: %d %s", n, o1);
	close(f);
	close(ep);

	/* The registration belongs to the open socket, not the fd number: after
	 * close(fd) a dup keeps it alive and it still reports events. */
	ep = CHK(epoll_create1(0));
	add(ep, s, EPOLLIN, 6);
	int d = CHK(dup(s));
	close(s);
	CHK(write(c, "d", 1));
	wait_bytes(d, 1, 2000);
	n = ewait(ep, 0, o1, sizeof o1);
	say("closed fd with live dup: %d %s", n, o1);
	struct epoll_event e = { .events = EPOLLIN };
	say("del via dup: %s", rs(epoll_ctl(ep, EPOLL_CTL_DEL, d, &e)));
	CHK(read(d, buf, sizeof buf));
	close(d);
	n = ewait(ep, 50, o1, sizeof o1);
	say("after last close: %d %s", n, o1);
	close(ep);
	close(c);
	say("done");
	return 0;
}
