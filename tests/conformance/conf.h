/* Shared helpers for the conformance programs (header-only, static).
 *
 * Every program prints stable facts only (errno names, byte counts, flag
 * names, yes/no), never addresses, ports, fds, pids or timings, so that its
 * stdout on kernel sockets and under the LD_PRELOAD shim can be compared
 * byte for byte. Failures of the harness itself go to stderr as "FAIL: ..."
 * with exit status 1. */
#ifndef CONF_H
#define CONF_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CF static __attribute__((unused))

/* Print one line (one write, so lines of threads and children never mix). */
CF __attribute__((format(printf, 1, 2))) void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof buf - 2)
		n = (int)sizeof buf - 2;
	buf[n++] = '\n';
	fflush(stdout);
	if (write(1, buf, (size_t)n) != n)
		exit(3);
}

CF const char *ename(int e)
{
	static char buf[32];
	switch (e) {
	case 0: return "0";
	case EAGAIN: return "EAGAIN";
	case EINPROGRESS: return "EINPROGRESS";
	case EALREADY: return "EALREADY";
	case ECONNREFUSED: return "ECONNREFUSED";
	case ECONNRESET: return "ECONNRESET";
	case ECONNABORTED: return "ECONNABORTED";
	case EPIPE: return "EPIPE";
	case EBADF: return "EBADF";
	case EINVAL: return "EINVAL";
	case EEXIST: return "EEXIST";
	case ENOENT: return "ENOENT";
	case EINTR: return "EINTR";
	case EISCONN: return "EISCONN";
	case ENOTCONN: return "ENOTCONN";
	case EADDRINUSE: return "EADDRINUSE";
	case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
	case EAFNOSUPPORT: return "EAFNOSUPPORT";
	case ENOTSOCK: return "ENOTSOCK";
	case ENOPROTOOPT: return "ENOPROTOOPT";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EPERM: return "EPERM";
	case EFAULT: return "EFAULT";
	case EMSGSIZE: return "EMSGSIZE";
	case EDESTADDRREQ: return "EDESTADDRREQ";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EHOSTUNREACH: return "EHOSTUNREACH";
	case ENETUNREACH: return "ENETUNREACH";
	case ENOTTY: return "ENOTTY";
	case ESPIPE: return "ESPIPE";
	case EMFILE: return "EMFILE";
	case ENOSYS: return "ENOSYS";
	}
	snprintf(buf, sizeof buf, "errno%d", e);
	return buf;
}

CF __attribute__((noreturn)) void fail(const char *fmt, ...)
{
	va_list ap;
	fflush(stdout);
	fputs("FAIL: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

/* A call that must succeed; fails the program with the errno name. */
#define CHK(x)                                                                 \
	({                                                                     \
		__typeof__(x) chk_r_ = (x);                                    \
		if (chk_r_ < 0)                                                \
			fail("%s:%d: %s: %s", __FILE__, __LINE__, #x,           \
			     ename(errno));                                     \
		chk_r_;                                                        \
	})

/* "-1 ENAME" or the non-negative return value, as a string. */
CF const char *rs(long r)
{
	static char bufs[4][48];
	static int i;
	char *b = bufs[i++ & 3];
	if (r < 0)
		snprintf(b, 48, "-1 %s", ename(errno));
	else
		snprintf(b, 48, "%ld", r);
	return b;
}

CF void conf_watchdog(int sig)
{
	static const char m[] = "FAIL: watchdog: still running after 10 s (a step blocked)\n";
	(void)sig;
	if (write(2, m, sizeof m - 1) < 0)
		_exit(2);
	_exit(2);
}

/* Unbuffered stdout and a 10 s watchdog (SIGALRM; children that fork
 * re-arm it with alarm(10)). */
CF void conf_init(void)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	signal(SIGALRM, conf_watchdog);
	alarm(10);
}

CF double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

CF void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* poll flags in a fixed order; unknown bits in hex. */
CF const char *pflags(int ev)
{
	static char bufs[4][96];
	static int i;
	char *b = bufs[i++ & 3];
	static const struct { int bit; const char *n; } t[] = {
		{ POLLIN, "IN" }, { POLLPRI, "PRI" }, { POLLOUT, "OUT" },
		{ POLLRDHUP, "RDHUP" }, { POLLERR, "ERR" }, { POLLHUP, "HUP" },
		{ POLLNVAL, "NVAL" }, { POLLRDNORM, "RDNORM" },
		{ POLLWRNORM, "WRNORM" }, { POLLRDBAND, "RDBAND" },
		{ POLLWRBAND, "WRBAND" },
	};
	b[0] = 0;
	for (size_t k = 0; k < sizeof t / sizeof t[0]; k++)
		if (ev & t[k].bit) {
			if (b[0])
				strcat(b, "|");
			strcat(b, t[k].n);
			ev &= ~t[k].bit;
		}
	if (ev)
		snprintf(b + strlen(b), 24, "%s0x%x", b[0] ? "|" : "", ev);
	if (!b[0])
		strcpy(b, "none");
	return b;
}

/* epoll flags use the same bit values as poll for these names. */
CF const char *eflags(uint32_t ev)
{
	if (ev & EPOLLET)
		return "ET?"; /* never reported by the kernel */
	return pflags((int)ev);
}

/* Wait for `ev` on fd; returns revents (0 on timeout). */
CF int wait_fd(int fd, short ev, int ms)
{
	struct pollfd p = { fd, ev, 0 };
	double end = now_ms() + ms;
	for (;;) {
		int left = (int)(end - now_ms());
		int r = poll(&p, 1, left < 0 ? 0 : left);
		if (r > 0)
			return p.revents;
		if (r == 0)
			return 0;
		if (errno != EINTR)
			fail("poll: %s", ename(errno));
	}
}

/* Wait until FIONREAD on fd reaches n bytes (data has fully arrived). */
CF void wait_bytes(int fd, int n, int ms)
{
	double end = now_ms() + ms;
	int avail = 0;
	while (now_ms() < end) {
		CHK(ioctl(fd, FIONREAD, &avail));
		if (avail >= n)
			return;
		wait_fd(fd, POLLIN, 10);
		if (avail > 0)
			sleep_ms(1);
	}
	fail("waiting for %d bytes, have %d", n, avail);
}

CF struct sockaddr_in lo4(int port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* A TCP listener on 127.0.0.1:0; its address in *a. */
CF int listener4(struct sockaddr_in *a, int backlog)
{
	int l = CHK(socket(AF_INET, SOCK_STREAM, 0));
	struct sockaddr_in b = lo4(0);
	socklen_t len = sizeof b;
	CHK(bind(l, (struct sockaddr *)&b, sizeof b));
	CHK(listen(l, backlog));
	CHK(getsockname(l, (struct sockaddr *)&b, &len));
	if (a)
		*a = b;
	return l;
}

CF int connect4(const struct sockaddr_in *a)
{
	int c = CHK(socket(AF_INET, SOCK_STREAM, 0));
	CHK(connect(c, (const struct sockaddr *)a, sizeof *a));
	return c;
}

/* accept with a bound: waits up to ms for a pending connection. */
CF int accept_to(int l, int ms)
{
	if (!(wait_fd(l, POLLIN, ms) & POLLIN))
		fail("accept: nothing pending after %d ms", ms);
	return CHK(accept(l, NULL, NULL));
}

/* A connected TCP pair over 127.0.0.1: *c connected, *s accepted. */
CF void tcp_pair(int *c, int *s)
{
	struct sockaddr_in a;
	int l = listener4(&a, 4);
	*c = connect4(&a);
	*s = accept_to(l, 3000);
	close(l);
}

/* Read exactly n bytes (blocking fd), bounded by ms. */
CF void read_exact(int fd, void *buf, size_t n, int ms)
{
	size_t got = 0;
	double end = now_ms() + ms;
	while (got < n) {
		int left = (int)(end - now_ms());
		if (left <= 0 || !(wait_fd(fd, POLLIN, left) & (POLLIN | POLLHUP | POLLERR)))
			fail("read_exact: %zu of %zu bytes after %d ms", got, n, ms);
		ssize_t r = read(fd, (char *)buf + got, n - got);
		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (r <= 0)
			fail("read_exact: %s after %zu of %zu bytes", rs(r), got, n);
		got += (size_t)r;
	}
}

CF void write_all(int fd, const void *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t r = write(fd, (const char *)buf + done, n - done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN) {
			wait_fd(fd, POLLOUT, 1000);
			continue;
		}
		if (r <= 0)
			fail("write_all: %s", rs(r));
		done += (size_t)r;
	}
}

CF int set_nonblock(int fd, int on)
{
	int fl = CHK(fcntl(fd, F_GETFL));
	return CHK(fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK));
}

CF uint32_t fnv1a(uint32_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 16777619u;
	}
	return h;
}
#define FNV_INIT 2166136261u

CF const char *yesno(int b) { return b ? "yes" : "no"; }

#endif
