/* fork(): two children accept on an inherited listener and echo 20
 * connections between them; connections survive a child that closes its
 * copy or just exits. (Using a connected socket in the child: fork_share.c.) */
#define _GNU_SOURCE
#include "conf.h"

#define CONNS 20

/* Child: accept and echo until the parent closes the control pipe; exit
 * status = number of connections served. */
static void child_server(int l, int ctl)
{
	int served = 0;
	alarm(10);
	for (;;) {
		struct pollfd p[2] = { { l, POLLIN, 0 }, { ctl, POLLIN, 0 } };
		int r = poll(p, 2, 5000);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			fail("child: poll %s", rs(r));
		if (p[0].revents & POLLIN) {
			int s = accept(l, NULL, NULL);
			if (s < 0) {
				if (errno == EAGAIN)
					continue; /* the other child took it */
				fail("child: accept %s", ename(errno));
			}
			set_nonblock(s, 0);
			char buf[64];
			ssize_t n;
			while ((n = read(s, buf, sizeof buf)) > 0)
				write_all(s, buf, (size_t)n);
			close(s);
			served++;
			continue;
		}
		if (p[1].revents)
			break;
	}
	_exit(served);
}

int main(void)
{
	struct sockaddr_in a;
	char buf[64];
	int ctl[2];

	conf_init();
	int l = listener4(&a, 32);
	set_nonblock(l, 1);
	CHK(pipe(ctl));
	pid_t kids[2];
	for (int i = 0; i < 2; i++) {
		kids[i] = CHK(fork());
		if (kids[i] == 0) {
			close(ctl[1]);
			child_server(l, ctl[0]);
		}
	}
	close(ctl[0]);
	close(l);

	int ok = 0;
	for (int i = 0; i < CONNS; i++) {
		int c = connect4(&a);
		int len = snprintf(buf, sizeof buf, "ping %d", i);
		write_all(c, buf, (size_t)len);
		CHK(shutdown(c, SHUT_WR));
		char got[64];
		read_exact(c, got, (size_t)len, 3000);
		if (!memcmp(got, buf, (size_t)len) && read(c, got, 1) == 0)
			ok++;
		close(c);
	}
	say("echoed: %d of %d", ok, CONNS);
	close(ctl[1]);
	int total = 0, exited = 0;
	for (int i = 0; i < 2; i++) {
		int st;
		if (waitpid(kids[i], &st, 0) == kids[i] && WIFEXITED(st)) {
			exited++;
			total += WEXITSTATUS(st);
		}
	}
	say("children exited: %d, connections served: %d", exited, total);

	/* A child closes its copy of a connection and exits. */
	int c, s, st;
	tcp_pair(&c, &s);
	pid_t k = CHK(fork());
	if (k == 0) {
		close(c);
		close(s);
		_exit(0);
	}
	CHK(waitpid(k, &st, 0));
	CHK(write(c, "after close in child", 20));
	read_exact(s, buf, 20, 2000);
	say("after the child closed its copies: %.20s", buf);

	/* A child exits without closing. */
	k = CHK(fork());
	if (k == 0)
		_exit(0);
	CHK(waitpid(k, &st, 0));
	CHK(write(s, "after exit", 10));
	read_exact(c, buf, 10, 2000);
	say("after the child exited: %.10s", buf);

	close(c);
	close(s);
	say("done");
	return 0;
}
