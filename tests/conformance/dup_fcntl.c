/* dup/dup2/dup3/F_DUPFD of sockets, status flags shared between dups and
 * fd flags not, O_NONBLOCK via fcntl and FIONBIO, FIONREAD, accept4 and
 * socket() flags, EBADF on closed fds. */
#define _GNU_SOURCE
#include "conf.h"

static const char *fl(int fd)
{
	static char b[4][64];
	static int i;
	char *o = b[i++ & 3];
	int f = fcntl(fd, F_GETFL);
	int d = fcntl(fd, F_GETFD);
	if (f < 0 || d < 0)
		return rs(-1);
	snprintf(o, 64, "%s%s%s", (f & O_ACCMODE) == O_RDWR ? "rdwr" : "not-rdwr",
		 f & O_NONBLOCK ? " nonblock" : "", d & FD_CLOEXEC ? " cloexec" : "");
	return o;
}

int main(void)
{
	int c, s, d, r;
	char buf[64];

	conf_init();
	tcp_pair(&c, &s);
	say("socket flags: %s", fl(c));

	/* dup: same connection; survives closing the original. */
	d = CHK(dup(c));
	say("dup flags (no cloexec): %s", fl(d));
	say("write via dup: %s", rs(write(d, "dup", 3)));
	read_exact(s, buf, 3, 2000);
	say("peer read: %.3s", buf);
	CHK(close(c));
	say("write via dup after closing original: %s", rs(write(d, "still", 5)));
	read_exact(s, buf, 5, 2000);
	say("peer read: %.5s", buf);
	say("original fd now: %s", rs(fcntl(c, F_GETFD)));
	c = d;

	/* dup2 onto an open fd replaces it; dup2(fd, fd) is a no-op. */
	int spare = CHK(open("/dev/null", O_RDONLY));
	r = dup2(c, spare);
	say("dup2 onto open fd: %s, flags %s", r == spare ? "target" : rs(r), fl(spare));
	say("write via dup2: %s", rs(write(spare, "2", 1)));
	read_exact(s, buf, 1, 2000);
	say("dup2 same fd: %s", dup2(c, c) == c ? "same fd" : "other");
	say("dup3 same fd: %s", rs(dup3(c, c, 0)));
	say("dup3 bad flags: %s", rs(dup3(c, spare, O_NONBLOCK)));
	r = dup3(c, spare, O_CLOEXEC);
	say("dup3 O_CLOEXEC: %s, flags %s", r == spare ? "target" : rs(r), fl(spare));
	close(spare);

	/* F_DUPFD with a minimum; F_DUPFD_CLOEXEC. */
	r = CHK(fcntl(c, F_DUPFD, 100));
	say("F_DUPFD 100: %s, flags %s", r >= 100 ? ">= 100" : "below", fl(r));
	close(r);
	r = CHK(fcntl(c, F_DUPFD_CLOEXEC, 50));
	say("F_DUPFD_CLOEXEC 50: %s, flags %s", r >= 50 ? ">= 50" : "below", fl(r));

	/* O_NONBLOCK is shared by dups (file status flag), FD_CLOEXEC is not. */
	set_nonblock(r, 1);
	CHK(fcntl(r, F_SETFD, 0));
	CHK(fcntl(c, F_SETFD, FD_CLOEXEC));
	say("after F_SETFL on dup: original %s, dup %s", fl(c), fl(r));
	say("read empty non-blocking: %s", rs(read(c, buf, sizeof buf)));
	say("recv empty non-blocking: %s", rs(recv(r, buf, sizeof buf, 0)));
	set_nonblock(c, 0);
	say("after clearing: original %s, dup %s", fl(c), fl(r));
	close(r);
	CHK(fcntl(c, F_SETFD, 0));

	/* F_SETFL ignores access mode bits. */
	CHK(fcntl(c, F_SETFL, O_RDONLY | O_NONBLOCK));
	say("F_SETFL O_RDONLY|O_NONBLOCK: %s", fl(c));
	CHK(fcntl(c, F_SETFL, 0));

	/* FIONBIO and FIONREAD. */
	int on = 1;
	r = ioctl(c, FIONBIO, &on);
	say("FIONBIO on: %s, flags %s", rs(r), fl(c));
	on = 0;
	r = ioctl(c, FIONBIO, &on);
	say("FIONBIO off: %s, flags %s", rs(r), fl(c));
	int avail = -1;
	CHK(ioctl(c, FIONREAD, &avail));
	say("FIONREAD empty: %d", avail);
	CHK(write(s, "seven!!", 7));
	wait_bytes(c, 7, 2000);
	CHK(ioctl(c, FIONREAD, &avail));
	say("FIONREAD after 7 bytes: %d", avail);
	CHK(read(c, buf, 3));
	CHK(ioctl(c, FIONREAD, &avail));
	say("FIONREAD after reading 3: %d", avail);
	CHK(read(c, buf, 4));
	say("ioctl unknown request: %s", rs(ioctl(c, 0x7fff, &avail)));

	/* Closed fds. */
	int dead = CHK(dup(c));
	close(dead);
	say("fcntl closed fd: %s", rs(fcntl(dead, F_GETFL)));
	say("close closed fd: %s", rs(close(dead)));
	say("dup closed fd: %s", rs(dup(dead)));
	say("write closed fd: %s", rs(write(dead, "x", 1)));
	say("getsockopt closed fd: %s", rs(getsockopt(dead, SOL_SOCKET, SO_ERROR, &avail, &(socklen_t){ sizeof avail })));
	close(c);
	close(s);

	/* socket() and accept4() flags; accept() never inherits O_NONBLOCK. */
	int x = CHK(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
	say("socket NONBLOCK|CLOEXEC: %s", fl(x));
	close(x);
	x = CHK(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
	say("socket NONBLOCK: %s", fl(x));
	close(x);
	say("socket bad flag: %s", rs(socket(AF_INET, SOCK_STREAM | 0x40000000, 0)));
	struct sockaddr_in a;
	int l = listener4(&a, 4);
	set_nonblock(l, 1);
	say("accept4 nothing pending: %s", rs(accept4(l, NULL, NULL, SOCK_NONBLOCK)));
	c = connect4(&a);
	wait_fd(l, POLLIN, 2000);
	s = CHK(accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC));
	say("accept4 NONBLOCK|CLOEXEC: %s", fl(s));
	close(s);
	close(c);
	c = connect4(&a);
	wait_fd(l, POLLIN, 2000);
	s = CHK(accept(l, NULL, NULL));
	say("accept from a non-blocking listener: %s", fl(s));
	close(s);
	close(c);
	c = connect4(&a);
	wait_fd(l, POLLIN, 2000);
	say("accept4 bad flags: %s", rs(accept4(l, NULL, NULL, O_APPEND)));
	s = accept_to(l, 2000);
	close(s);
	close(c);
	close(l);
	say("done");
	return 0;
}
