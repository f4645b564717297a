/* connect(): non-blocking to a listener and to a closed port, blocking to
 * a closed port, connect on a connected socket, and what an unconnected
 * socket says to read/write/shutdown/getpeername. */
#define _GNU_SOURCE
#include "conf.h"

/* A port with nothing listening: a bound, non-listening socket holds it. */
static int closed_port(struct sockaddr_in *a)
{
	int h = CHK(socket(AF_INET, SOCK_STREAM, 0));
	struct sockaddr_in b = lo4(0);
	socklen_t len = sizeof b;
	CHK(bind(h, (struct sockaddr *)&b, sizeof b));
	CHK(getsockname(h, (struct sockaddr *)&b, &len));
	*a = b;
	return h;
}

static int soerr(int fd)
{
	int e = -1;
	socklen_t len = sizeof e;
	CHK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len));
	return e;
}

int main(void)
{
	struct sockaddr_in a, dead;
	char buf[16];
	int r, e;

	conf_init();
	signal(SIGPIPE, SIG_IGN);
	int l = listener4(&a, 8);

	/* Non-blocking connect to a listener. */
	int c = CHK(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
	r = connect(c, (struct sockaddr *)&a, sizeof a);
	e = errno;
	say("nb connect: %s", r == 0 || e == EINPROGRESS ? "0 or EINPROGRESS" : rs(r));
	int rev = wait_fd(c, POLLOUT, 3000);
	say("poll: %s", pflags(rev));
	say("so_error: %s", ename(soerr(c)));
	/* A second connect after completion: 0 if the first said EINPROGRESS
	 * (it completes the connect), EISCONN if the first said 0. */
	int r2 = connect(c, (struct sockaddr *)&a, sizeof a);
	int e2 = errno;
	if ((r < 0 && r2 == 0) || (r == 0 && r2 < 0 && e2 == EISCONN))
		say("second connect: as the kernel");
	else
		say("second connect: %d %s after %d %s", r2, ename(r2 < 0 ? e2 : 0), r, ename(r < 0 ? e : 0));
	say("third connect: %s", rs(connect(c, (struct sockaddr *)&a, sizeof a)));
	int s = accept_to(l, 2000);
	CHK(write(c, "hi", 2));
	read_exact(s, buf, 2, 2000);
	say("data after nb connect: %.2s", buf);
	close(s);
	close(c);

	/* Non-blocking connect to a closed port. */
	int hold = closed_port(&dead);
	c = CHK(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
	r = connect(c, (struct sockaddr *)&dead, sizeof dead);
	e = errno;
	if (r == 0)
		say("nb connect to closed port: unexpected 0");
	else if (e == ECONNREFUSED)
		say("nb connect to closed port: refused");
	else if (e == EINPROGRESS) {
		rev = wait_fd(c, POLLOUT, 3000);
		int se = soerr(c);
		say("nb connect to closed port: %s", se == ECONNREFUSED ? "refused" : ename(se));
		if (!(rev & POLLERR))
			say("no POLLERR while the error was pending: %s", pflags(rev));
	} else
		say("nb connect to closed port: %s", ename(e));
	say("so_error after refused: %s", ename(soerr(c)));
	rev = wait_fd(c, POLLIN | POLLOUT, 0);
	say("poll after refused: %s", pflags(rev));
	say("read after refused: %s", rs(read(c, buf, sizeof buf)));
	say("write after refused: %s", rs(write(c, "x", 1)));
	say("getpeername after refused: %s", rs(getpeername(c, (struct sockaddr *)&a, &(socklen_t){ sizeof a })));
	close(c);

	/* Blocking connect to a closed port. */
	c = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("blocking connect to closed port: %s", rs(connect(c, (struct sockaddr *)&dead, sizeof dead)));
	say("so_error after blocking refusal: %s", ename(soerr(c)));
	close(c);
	close(hold);

	/* Blocking connect, then connect again. */
	c = connect4(&a);
	say("connect on connected: %s", rs(connect(c, (struct sockaddr *)&a, sizeof a)));
	struct sockaddr_in other = lo4(9);
	say("connect connected elsewhere: %s", rs(connect(c, (struct sockaddr *)&other, sizeof other)));
	s = accept_to(l, 2000);
	close(s);
	close(c);

	/* Bad arguments. */
	c = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("connect short addrlen: %s", rs(connect(c, (struct sockaddr *)&a, 8)));
	struct sockaddr_in6 six;
	memset(&six, 0, sizeof six);
	six.sin6_family = AF_INET6;
	six.sin6_port = a.sin_port;
	six.sin6_addr = in6addr_loopback;
	say("connect v6 address on v4 socket: %s", rs(connect(c, (struct sockaddr *)&six, sizeof six)));

	/* An unconnected socket. */
	say("unconnected read: %s", rs(read(c, buf, sizeof buf)));
	say("unconnected send MSG_NOSIGNAL: %s", rs(send(c, "x", 1, MSG_NOSIGNAL)));
	say("unconnected getpeername: %s", rs(getpeername(c, (struct sockaddr *)&a, &(socklen_t){ sizeof a })));
	say("unconnected shutdown: %s", rs(shutdown(c, SHUT_RDWR)));
	say("unconnected so_error: %s", ename(soerr(c)));
	close(c);
	say("connect on a pipe: %s", rs(({ int p[2]; CHK(pipe(p)); int rr = connect(p[0], (struct sockaddr *)&a, sizeof a); close(p[0]); close(p[1]); rr; })));
	close(l);
	say("done");
	return 0;
}
