/* fork() with a connected socket used by the child: a child can write
 * through an inherited socket and read from it; shutdown() in a child acts
 * on the shared connection. */
#define _GNU_SOURCE
#include "conf.h"

int main(void)
{
	char buf[64];
	int c, s, st;
	pid_t k;

	conf_init();
	tcp_pair(&c, &s);
	/* A child writes through the inherited socket. */
	k = CHK(fork());
	if (k == 0) {
		alarm(10);
		write_all(c, "from child", 10);
		_exit(0);
	}
	CHK(waitpid(k, &st, 0));
	read_exact(s, buf, 10, 2000);
	say("the child wrote: %.10s, status %d", buf, WEXITSTATUS(st));

	/* A child reads from the inherited socket what the parent's peer sent. */
	CHK(write(s, "to child", 8));
	k = CHK(fork());
	if (k == 0) {
		alarm(10);
		read_exact(c, buf, 8, 2000);
		_exit(memcmp(buf, "to child", 8) == 0 ? 7 : 1);
	}
	CHK(waitpid(k, &st, 0));
	say("the child read the data: %s", yesno(WIFEXITED(st) && WEXITSTATUS(st) == 7));
	say("nothing left for the parent: %s", rs(recv(c, buf, sizeof buf, MSG_DONTWAIT)));

	/* shutdown() in a child acts on the shared connection. */
	k = CHK(fork());
	if (k == 0) {
		shutdown(c, SHUT_WR);
		_exit(0);
	}
	CHK(waitpid(k, &st, 0));
	wait_fd(s, POLLRDHUP, 2000);
	say("peer after the child's shutdown: %s", rs(read(s, buf, sizeof buf)));
	say("parent write after the child's shutdown: %s", rs(send(c, "x", 1, MSG_NOSIGNAL)));
	CHK(write(s, "back", 4));
	read_exact(c, buf, 4, 2000);
	say("reverse direction still open: %.4s", buf);
	close(c);
	close(s);
	say("done");
	return 0;
}
