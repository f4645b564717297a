/* Resets: SO_LINGER {1,0} + close aborts the connection; the peer sees
 * POLLERR/POLLHUP, ECONNRESET once, then EOF/EPIPE; close with unread data
 * resets too; data received before the reset is still readable; a reset
 * before accept. */
#define _GNU_SOURCE
#include "conf.h"

static void abort_close(int fd)
{
	struct linger lg = { 1, 0 };
	CHK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
	CHK(close(fd));
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
	int c, s, rev;
	char buf[64];
	ssize_t n;

	conf_init();
	signal(SIGPIPE, SIG_IGN);

	/* Abort, then the peer reads. */
	tcp_pair(&c, &s);
	abort_close(c);
	rev = wait_fd(s, POLLIN | POLLOUT | POLLRDHUP, 2000);
	wait_fd(s, POLLERR, 2000);
	rev = wait_fd(s, POLLIN | POLLOUT | POLLRDHUP, 0);
	say("poll after rst: %s", pflags(rev));
	say("poll IN|ERR|HUP bits: %s", pflags(rev & (POLLIN | POLLERR | POLLHUP)));
	say("read after rst: %s", rs(read(s, buf, sizeof buf)));
	say("read again: %s", rs(read(s, buf, sizeof buf)));
	rev = wait_fd(s, POLLIN | POLLOUT, 0);
	say("poll after error consumed: %s", pflags(rev));
	say("write after rst: %s", rs(write(s, "x", 1)));
	say("so_error: %s", ename(soerr(s)));
	say("getpeername after rst: %s", rs(getpeername(s, (struct sockaddr *)buf, &(socklen_t){ sizeof buf })));
	say("shutdown after rst: %s", rs(shutdown(s, SHUT_RDWR)));
	close(s);

	/* Abort, then the peer writes first. */
	tcp_pair(&c, &s);
	abort_close(c);
	wait_fd(s, POLLERR, 2000);
	say("write after rst: %s", rs(write(s, "x", 1)));
	say("write again: %s", rs(write(s, "x", 1)));
	say("read: %s", rs(read(s, buf, sizeof buf)));
	close(s);

	/* Abort, then SO_ERROR first. */
	tcp_pair(&c, &s);
	abort_close(c);
	wait_fd(s, POLLERR, 2000);
	say("so_error after rst: %s", ename(soerr(s)));
	say("so_error again: %s", ename(soerr(s)));
	say("read: %s", rs(read(s, buf, sizeof buf)));
	close(s);

	/* Data received before the reset is read first. */
	tcp_pair(&c, &s);
	CHK(write(c, "before", 6));
	wait_bytes(s, 6, 2000);
	abort_close(c);
	wait_fd(s, POLLERR, 2000);
	n = read(s, buf, sizeof buf);
	say("read queued data after rst: %s", rs(n));
	say("then: %s", rs(read(s, buf, sizeof buf)));
	close(s);

	/* close() with unread received data sends a reset instead of FIN. */
	tcp_pair(&c, &s);
	CHK(write(s, "unread", 6));
	wait_bytes(c, 6, 2000);
	close(c);
	rev = wait_fd(s, POLLERR, 2000);
	say("close with unread data, peer poll: %s", pflags(rev));
	say("peer recv: %s", rs(recv(s, buf, sizeof buf, MSG_DONTWAIT)));
	close(s);

	/* Plain close, the peer writes, the reset comes back. */
	tcp_pair(&c, &s);
	close(c);
	wait_fd(s, POLLRDHUP, 2000);
	say("write to closed peer: %s", rs(write(s, "one", 3)));
	rev = wait_fd(s, POLLERR, 2000);
	say("poll after the peer's reset: %s", pflags(rev));
	say("write again: %s", rs(write(s, "two", 3)));
	say("write third: %s", rs(write(s, "three", 5)));
	close(s);

	/* Reset before accept: the connection is still accepted. */
	struct sockaddr_in a;
	int l = listener4(&a, 4);
	c = connect4(&a);
	abort_close(c);
	sleep_ms(50);
	s = accept_to(l, 2000);
	rev = wait_fd(s, POLLERR, 2000);
	say("reset before accept, poll: %s", pflags(rev));
	say("reset before accept, recv: %s", rs(recv(s, buf, sizeof buf, MSG_DONTWAIT)));
	close(s);
	close(l);
	say("done");
	return 0;
}
