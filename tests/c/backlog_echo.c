/* listen(fd, -1) (as Envoy does), wait a second without accepting so the
 * connections pile up in the backlog, then accept N and echo one 88-byte
 * message on each. Usage: backlog_echo ADDR PORT N */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	alarm(60);
	int n = atoi(argv[3]);
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	inet_pton(AF_INET, argv[1], &a.sin_addr);
	if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, -1)) {
		perror("listen");
		return 1;
	}
	printf("listening\n");
	fflush(stdout);
	sleep(1);
	int *c = calloc(n, sizeof *c);
	for (int i = 0; i < n; i++)
		if ((c[i] = accept(l, NULL, NULL)) < 0) {
			perror("accept");
			return 1;
		}
	for (int i = 0; i < n; i++) {
		char buf[88];
		size_t got = 0;
		while (got < sizeof buf) {
			ssize_t r = read(c[i], buf + got, sizeof buf - got);
			if (r <= 0) {
				perror("read");
				return 1;
			}
			got += r;
		}
		if (write(c[i], buf, sizeof buf) != (ssize_t)sizeof buf)
			return 1;
	}
	printf("echoed %d\n", n);
	for (int i = 0; i < n; i++)
		close(c[i]);
	return 0;
}
