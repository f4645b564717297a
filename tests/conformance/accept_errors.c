/* accept() and listen() edge cases: non-listening sockets, EAGAIN,
 * several connections pending in the backlog (accepted in order), the
 * listener closed with connections pending, shutdown() of a listener
 * waking a blocked accept, listen on a connected socket. */
#define _GNU_SOURCE
#include "conf.h"
#include <pthread.h>

static int blocked_accept = 0, blocked_errno = 0;
static void *t_accept(void *arg)
{
	blocked_accept = accept(*(int *)arg, NULL, NULL);
	blocked_errno = errno;
	return NULL;
}

int main(void)
{
	struct sockaddr_in a;
	char buf[16];

	conf_init();
	signal(SIGPIPE, SIG_IGN);

	/* Not listening. */
	int x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("accept unbound: %s", rs(accept(x, NULL, NULL)));
	struct sockaddr_in b = lo4(0);
	CHK(bind(x, (struct sockaddr *)&b, sizeof b));
	say("accept bound, not listening: %s", rs(accept(x, NULL, NULL)));
	close(x);
	int u = CHK(socket(AF_INET, SOCK_DGRAM, 0));
	say("listen on udp: %s", rs(listen(u, 1)));
	say("accept on udp: %s", rs(accept(u, NULL, NULL)));
	close(u);
	int p[2];
	CHK(pipe(p));
	say("accept on a pipe: %s", rs(accept(p[0], NULL, NULL)));
	say("listen on a pipe: %s", rs(listen(p[0], 1)));
	close(p[0]);
	close(p[1]);
	say("accept on a closed fd: %s", rs(accept(p[0], NULL, NULL)));

	/* Non-blocking listener with nothing pending. */
	int l = listener4(&a, 8);
	set_nonblock(l, 1);
	say("accept nothing pending: %s", rs(accept(l, NULL, NULL)));
	say("listen again (new backlog): %s", rs(listen(l, 16)));

	/* Five connections pending before the first accept: FIFO order. */
	int c[5];
	for (int i = 0; i < 5; i++) {
		c[i] = connect4(&a);
		buf[0] = (char)('0' + i);
		CHK(write(c[i], buf, 1));
	}
	char order[8] = "";
	for (int i = 0; i < 5; i++) {
		int s = accept_to(l, 2000);
		read_exact(s, buf, 1, 2000);
		order[i] = buf[0];
		close(s);
	}
	say("accept order: %s", order);
	say("then: %s", rs(accept(l, NULL, NULL)));
	for (int i = 0; i < 5; i++)
		close(c[i]);

	/* accept's address length handling. */
	int cc = connect4(&a);
	wait_fd(l, POLLIN, 2000);
	struct sockaddr_in pa;
	socklen_t len = 4;
	memset(&pa, 0xff, sizeof pa);
	int s = CHK(accept(l, (struct sockaddr *)&pa, &len));
	say("accept with short addrlen: len %u, family copied %s", len, yesno(pa.sin_family == AF_INET));
	say("listen on a connected socket: %s", rs(listen(s, 1)));
	close(s);
	close(cc);

	/* Listener closed with an established connection pending: reset. */
	close(l);
	l = listener4(&a, 8);
	cc = connect4(&a);
	CHK(write(cc, "lost", 4));
	close(l);
	int rev = wait_fd(cc, POLLERR, 2000);
	say("pending connection after the listener closed: %s", pflags(rev));
	say("recv: %s", rs(recv(cc, buf, sizeof buf, MSG_DONTWAIT)));
	close(cc);

	/* shutdown() of a listener wakes a blocked accept. */
	l = listener4(&a, 8);
	pthread_t th;
	if (pthread_create(&th, NULL, t_accept, &l))
		fail("pthread_create");
	sleep_ms(100);
	say("shutdown listener: %s", rs(shutdown(l, SHUT_RDWR)));
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 2;
	if (pthread_timedjoin_np(th, NULL, &dl))
		say("blocked accept after shutdown: still blocked after 2 s");
	else
		say("blocked accept after shutdown: %s", blocked_accept < 0 ? ename(blocked_errno) : "accepted");
	x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("connect to the shut listener: %s", rs(connect(x, (struct sockaddr *)&a, sizeof a)));
	close(x);
	/* The listener can listen again (a port-0 bound one may get a new port). */
	say("listen again after shutdown: %s", rs(listen(l, 4)));
	len = sizeof a;
	CHK(getsockname(l, (struct sockaddr *)&a, &len));
	if (a.sin_addr.s_addr == htonl(INADDR_ANY))
		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	x = connect4(&a);
	s = accept_to(l, 2000);
	say("accept after listening again: ok");
	close(s);
	close(x);
	close(l);
	say("done");
	return 0;
}
