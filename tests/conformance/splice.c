/* splice(2) between TCP sockets and pipes (HAProxy's kernel splicing):
 * socket -> pipe and pipe -> socket (256 KiB each way, FNV-1a), a blocking
 * splice woken by data, EAGAIN from a non-blocking socket and from a full
 * pipe (data stays in the socket), EOF after the peer's shutdown, an
 * empty pipe with and without writers, and the argument errors (offsets,
 * two sockets, no pipe, wrong pipe end, bad flags, zero length). */
#define _GNU_SOURCE
#include "conf.h"
#include <pthread.h>

#define TOTAL (256 << 10)

static void pattern(char *b, size_t n, size_t off)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (char)((off + i) * 131u + 7u);
}

static uint32_t pattern_sum(size_t n)
{
	static char b[TOTAL];
	pattern(b, n, 0);
	return fnv1a(FNV_INIT, b, n);
}

struct io { int fd; size_t n; uint32_t sum; };

static void *t_writer(void *arg)
{
	struct io *w = arg;
	static char b[TOTAL];
	pattern(b, w->n, 0);
	write_all(w->fd, b, w->n);
	return NULL;
}

static void *t_reader(void *arg)
{
	struct io *r = arg;
	static char b[TOTAL];
	read_exact(r->fd, b, r->n, 5000);
	r->sum = fnv1a(FNV_INIT, b, r->n);
	return NULL;
}

struct late { int fd; };
static void *t_late(void *arg)
{
	struct late *l = arg;
	sleep_ms(100);
	CHK(write(l->fd, "late!", 5));
	return NULL;
}

/* Fill a non-blocking pipe until the kernel refuses more. */
static void fill_pipe(int w)
{
	char b[4096];
	memset(b, 'p', sizeof b);
	while (write(w, b, sizeof b) > 0)
		;
	if (errno != EAGAIN)
		fail("fill pipe: %s", ename(errno));
}

static void drain_pipe(int r)
{
	char b[4096];
	for (;;) {
		if (!(wait_fd(r, POLLIN, 0) & POLLIN))
			return;
		if (read(r, b, sizeof b) <= 0)
			return;
	}
}

int main(void)
{
	int c, s, p[2];
	char buf[TOTAL];
	ssize_t n;
	pthread_t t;

	conf_init();
	signal(SIGPIPE, SIG_IGN);
	tcp_pair(&c, &s);
	CHK(pipe(p));

	/* socket -> pipe, blocking, 64 KiB at a time. */
	struct io w = { c, TOTAL, 0 };
	pthread_create(&t, NULL, t_writer, &w);
	size_t got = 0;
	uint32_t sum = FNV_INIT;
	int bad = 0;
	while (got < TOTAL) {
		n = splice(s, NULL, p[1], NULL, 65536, 0);
		if (n <= 0) {
			say("socket -> pipe: %s after %zu bytes", rs(n), got);
			bad = 1;
			break;
		}
		read_exact(p[0], buf, (size_t)n, 2000);
		sum = fnv1a(sum, buf, (size_t)n);
		got += (size_t)n;
	}
	pthread_join(t, NULL);
	say("socket -> pipe: %zu bytes, intact %s", got, yesno(!bad && sum == pattern_sum(TOTAL)));

	/* pipe -> socket: the pipe is refilled 48 KiB at a time and spliced
	 * out until empty (a splice may move less than the pipe holds). */
	struct io r = { c, TOTAL, 0 };
	pthread_create(&t, NULL, t_reader, &r);
	size_t put = 0;
	bad = 0;
	while (put < TOTAL && !bad) {
		size_t k = TOTAL - put < 49152 ? TOTAL - put : 49152;
		pattern(buf, k, put);
		write_all(p[1], buf, k);
		size_t left = k;
		while (left > 0) {
			n = splice(p[0], NULL, s, NULL, left, 0);
			if (n <= 0) {
				say("pipe -> socket: %s after %zu bytes", rs(n), put);
				bad = 1;
				break;
			}
			left -= (size_t)n;
			put += (size_t)n;
		}
	}
	pthread_join(t, NULL);
	say("pipe -> socket: %zu bytes, intact %s", put, yesno(!bad && r.sum == pattern_sum(TOTAL)));

	/* A blocking splice waits for data. */
	struct late l = { c };
	pthread_create(&t, NULL, t_late, &l);
	n = splice(s, NULL, p[1], NULL, 100, 0);
	pthread_join(t, NULL);
	say("blocking splice woken by data: %s", rs(n));
	read_exact(p[0], buf, 5, 1000);

	/* Non-blocking socket with nothing to read. */
	set_nonblock(s, 1);
	say("empty non-blocking socket: %s", rs(splice(s, NULL, p[1], NULL, 100, 0)));
	say("empty non-blocking socket, SPLICE_F_NONBLOCK: %s",
	    rs(splice(s, NULL, p[1], NULL, 100, SPLICE_F_NONBLOCK)));
	set_nonblock(s, 0);

	/* A full pipe: SPLICE_F_NONBLOCK (or the pipe's O_NONBLOCK) says
	 * EAGAIN and the data stays in the socket. */
	set_nonblock(p[1], 1);
	fill_pipe(p[1]);
	pattern(buf, 1000, 0);
	write_all(c, buf, 1000);
	wait_bytes(s, 1000, 2000);
	say("full pipe, SPLICE_F_NONBLOCK: %s", rs(splice(s, NULL, p[1], NULL, 1000, SPLICE_F_NONBLOCK)));
	say("full non-blocking pipe: %s", rs(splice(s, NULL, p[1], NULL, 1000, 0)));
	drain_pipe(p[0]);
	set_nonblock(p[1], 0);
	n = splice(s, NULL, p[1], NULL, 1000, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	say("after draining: %s", rs(n));
	read_exact(p[0], buf + 1000, 1000, 1000);
	say("the bytes kept in the socket: intact %s", yesno(n == 1000 && memcmp(buf, buf + 1000, 1000) == 0));

	/* An empty pipe: EAGAIN with SPLICE_F_NONBLOCK; 0 once no writer is left. */
	say("empty pipe, SPLICE_F_NONBLOCK: %s", rs(splice(p[0], NULL, s, NULL, 100, SPLICE_F_NONBLOCK)));

	/* Argument errors. */
	loff_t off = 0;
	say("offset on the socket side: %s", rs(splice(s, &off, p[1], NULL, 10, 0)));
	say("offset on the pipe side: %s", rs(splice(p[0], &off, s, NULL, 10, 0)));
	say("two sockets: %s", rs(splice(s, NULL, c, NULL, 10, 0)));
	int devnull = CHK(open("/dev/null", O_WRONLY));
	say("socket to a file: %s", rs(splice(s, NULL, devnull, NULL, 10, 0)));
	say("into the pipe's read end: %s", rs(splice(s, NULL, p[0], NULL, 10, 0)));
	say("from the pipe's write end: %s", rs(splice(p[1], NULL, s, NULL, 10, 0)));
	say("unknown flag: %s", rs(splice(s, NULL, p[1], NULL, 10, 0x100)));
	say("zero length: %s", rs(splice(s, NULL, p[1], NULL, 0, 0)));
	int u = CHK(socket(AF_INET, SOCK_STREAM, 0));
	int q[2];
	CHK(pipe(q));
	CHK(write(q[1], "x", 1));
	say("unconnected socket -> pipe: %s", rs(splice(u, NULL, q[1], NULL, 10, SPLICE_F_NONBLOCK)));
	say("pipe -> unconnected socket: %s", rs(splice(q[0], NULL, u, NULL, 10, SPLICE_F_NONBLOCK)));
	int e[2];
	CHK(pipe(e));
	close(e[1]);
	say("empty pipe without writers -> unconnected socket: %s", rs(splice(e[0], NULL, u, NULL, 10, 0)));
	close(e[0]);
	close(u);

	/* EOF: the peer sends 10 bytes and shuts down. */
	CHK(write(c, "0123456789", 10));
	CHK(shutdown(c, SHUT_WR));
	wait_bytes(s, 10, 2000);
	say("before EOF: %s", rs(splice(s, NULL, p[1], NULL, 100, 0)));
	say("at EOF: %s", rs(splice(s, NULL, p[1], NULL, 100, 0)));
	read_exact(p[0], buf, 10, 1000);

	/* Pipe with no writer left. */
	close(p[1]);
	say("empty pipe without writers: %s", rs(splice(p[0], NULL, s, NULL, 100, 0)));

	/* Writing into a socket shut down for writing: EPIPE. */
	CHK(shutdown(s, SHUT_WR));
	say("into a shut-down socket: %s", rs(splice(q[0], NULL, s, NULL, 1, 0)));
	close(c);
	close(s);
	return 0;
}
