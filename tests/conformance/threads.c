/* Threads: one socket created, bound/listened and accepted on by three
 * different threads; close from a thread other than the creator; two
 * concurrent blocking transfers; a full-duplex echo with a thread per
 * direction; shutdown(SHUT_RD) waking a reader blocked in another thread;
 * threads each waiting in their own epoll set (as Envoy's do). */
#define _GNU_SOURCE
#include "conf.h"
#include <pthread.h>

static void run(void *(*fn)(void *), void *arg)
{
	pthread_t t;
	if (pthread_create(&t, NULL, fn, arg))
		fail("pthread_create");
	pthread_join(t, NULL);
}

static int lfd = -1, afd = -1;
static struct sockaddr_in addr;

static void *t_create(void *arg) { (void)arg; lfd = CHK(socket(AF_INET, SOCK_STREAM, 0)); return NULL; }

static void *t_bind_listen(void *arg)
{
	(void)arg;
	struct sockaddr_in b = lo4(0);
	socklen_t len = sizeof b;
	CHK(bind(lfd, (struct sockaddr *)&b, sizeof b));
	CHK(listen(lfd, 4));
	CHK(getsockname(lfd, (struct sockaddr *)&addr, &len));
	return NULL;
}

static void *t_accept(void *arg) { (void)arg; afd = accept(lfd, NULL, NULL); return NULL; }

static void *t_close(void *arg) { close(*(int *)arg); return NULL; }

#define BULK (1 << 20)
struct xfer { int fd; int send; uint32_t sum; size_t bytes; };

static void *t_xfer(void *arg)
{
	struct xfer *x = arg;
	char buf[8192];
	x->sum = FNV_INIT;
	if (x->send) {
		for (size_t off = 0; off < BULK; off += sizeof buf) {
			for (size_t i = 0; i < sizeof buf; i++)
				buf[i] = (char)((off + i) * 7 + (size_t)x->send);
			write_all(x->fd, buf, sizeof buf);
			x->sum = fnv1a(x->sum, buf, sizeof buf);
			x->bytes += sizeof buf;
		}
		CHK(shutdown(x->fd, SHUT_WR));
	} else {
		ssize_t n;
		while ((n = read(x->fd, buf, sizeof buf)) > 0) {
			x->sum = fnv1a(x->sum, buf, (size_t)n);
			x->bytes += (size_t)n;
		}
		if (n < 0)
			fail("xfer read: %s", ename(errno));
	}
	return NULL;
}

/* Echo every byte back until EOF, then shut down. */
static void *t_echo(void *arg)
{
	int fd = *(int *)arg;
	char buf[4096];
	ssize_t n;
	while ((n = read(fd, buf, sizeof buf)) > 0)
		write_all(fd, buf, (size_t)n);
	shutdown(fd, SHUT_WR);
	return NULL;
}

static ssize_t blocked_result;
static void *t_blocked_read(void *arg)
{
	char b[8];
	blocked_result = read(*(int *)arg, b, sizeof b);
	if (blocked_result < 0)
		blocked_result = -errno;
	return NULL;
}

/* Waits in its own epoll set until `want` bytes came on `fd` (non-blocking)
 * or `ms` passed; one read per wake-up. */
struct epw {
	int ep, fd, want, ms, got;
};
static void *t_ep_reader(void *arg)
{
	struct epw *w = arg;
	double end = now_ms() + w->ms;
	while (w->got < w->want) {
		int left = (int)(end - now_ms());
		if (left <= 0)
			break;
		struct epoll_event e;
		int n = epoll_wait(w->ep, &e, 1, left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("epoll_wait: %s", ename(errno));
		if (n == 0)
			break;
		char b[64];
		ssize_t r = read(w->fd, b, sizeof b);
		if (r > 0)
			w->got += (int)r;
	}
	return NULL;
}

static pthread_t start(void *(*fn)(void *), void *arg)
{
	pthread_t t;
	if (pthread_create(&t, NULL, fn, arg))
		fail("pthread_create");
	return t;
}

int main(void)
{
	char buf[64];
	conf_init();

	/* Create in A, bind+listen in B, accept in C while main connects. */
	run(t_create, NULL);
	run(t_bind_listen, NULL);
	pthread_t tc;
	if (pthread_create(&tc, NULL, t_accept, NULL))
		fail("pthread_create");
	int c = connect4(&addr);
	pthread_join(tc, NULL);
	say("accept in another thread: %s", afd >= 0 ? "ok" : rs(afd));
	CHK(write(c, "threads", 7));
	read_exact(afd, buf, 7, 2000);
	say("read in main: %.7s", buf);

	/* Close in a thread other than the creator. */
	run(t_close, &afd);
	say("fd after close in another thread: %s", rs(fcntl(afd, F_GETFD)));
	wait_fd(c, POLLIN, 2000);
	say("peer sees: %s", rs(read(c, buf, sizeof buf)));
	close(c);
	run(t_close, &lfd);
	say("listener closed in another thread: %s", rs(fcntl(lfd, F_GETFD)));

	/* Two concurrent blocking transfers on two connections. */
	int c1, s1, c2, s2;
	tcp_pair(&c1, &s1);
	tcp_pair(&c2, &s2);
	struct xfer x[4] = { { c1, 1, 0, 0 }, { s1, 0, 0, 0 }, { c2, 2, 0, 0 }, { s2, 0, 0, 0 } };
	pthread_t t[4];
	for (int i = 0; i < 4; i++)
		if (pthread_create(&t[i], NULL, t_xfer, &x[i]))
			fail("pthread_create");
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	say("pair 1: %zu bytes, checksum %s", x[1].bytes, x[0].sum == x[1].sum ? "match" : "differs");
	say("pair 2: %zu bytes, checksum %s", x[3].bytes, x[2].sum == x[3].sum ? "match" : "differs");
	close(c1);
	close(s1);
	close(c2);
	close(s2);

	/* Full duplex: a writer thread and a reader (main) on one socket, the
	 * other end echoes from its own thread. */
	tcp_pair(&c1, &s1);
	pthread_t te;
	if (pthread_create(&te, NULL, t_echo, &s1))
		fail("pthread_create");
	struct xfer w = { c1, 3, 0, 0 };
	pthread_t tw;
	if (pthread_create(&tw, NULL, t_xfer, &w))
		fail("pthread_create");
	struct xfer r = { c1, 0, 0, 0 };
	t_xfer(&r);
	pthread_join(tw, NULL);
	pthread_join(te, NULL);
	say("full duplex echo: %zu bytes, checksum %s", r.bytes, r.sum == w.sum ? "match" : "differs");
	close(c1);
	close(s1);

	/* shutdown(SHUT_RD) from another thread wakes a blocked reader with 0. */
	tcp_pair(&c1, &s1);
	pthread_t tr;
	if (pthread_create(&tr, NULL, t_blocked_read, &s1))
		fail("pthread_create");
	sleep_ms(100);
	CHK(shutdown(s1, SHUT_RD));
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 2;
	if (pthread_timedjoin_np(tr, NULL, &dl)) {
		say("blocked read after shut_rd: still blocked after 2 s");
		CHK(write(c1, "unblock", 7)); /* let the reader go */
		pthread_join(tr, NULL);
	} else
		say("blocked read after shut_rd: %s", blocked_result < 0 ? ename((int)-blocked_result) : rs(blocked_result));
	/* Data from the peer wakes a reader blocked in another thread. */
	close(s1);
	close(c1);
	tcp_pair(&c1, &s1);
	if (pthread_create(&tr, NULL, t_blocked_read, &s1))
		fail("pthread_create");
	sleep_ms(100);
	CHK(write(c1, "wake", 4));
	pthread_join(tr, NULL);
	say("blocked read woken by data: %s", rs(blocked_result));
	close(s1);
	close(c1);

	/* Two threads, each waiting in its own epoll set: data for a socket
	 * wakes the thread whose set holds it, whatever the other does. */
	tcp_pair(&c1, &s1);
	tcp_pair(&c2, &s2);
	set_nonblock(s1, 1);
	set_nonblock(s2, 1);
	int ea = CHK(epoll_create1(0)), eb = CHK(epoll_create1(0));
	struct epoll_event ev = { .events = EPOLLIN };
	CHK(epoll_ctl(ea, EPOLL_CTL_ADD, s1, &ev));
	CHK(epoll_ctl(eb, EPOLL_CTL_ADD, s2, &ev));
	struct epw wa = { ea, s1, 12, 3000, 0 }, wb = { eb, s2, 12, 3000, 0 };
	pthread_t ta = start(t_ep_reader, &wa), tb = start(t_ep_reader, &wb);
	for (int i = 0; i < 3; i++) {
		sleep_ms(30);
		CHK(write(c2, "bbbb", 4));
		sleep_ms(30);
		CHK(write(c1, "aaaa", 4));
	}
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	say("own epoll sets: first got %d, second got %d", wa.got, wb.got);
	/* A socket moved from one set to the other wakes the new set's thread
	 * and not the old one's. */
	CHK(epoll_ctl(ea, EPOLL_CTL_DEL, s1, NULL));
	CHK(epoll_ctl(eb, EPOLL_CTL_ADD, s1, &ev));
	struct epw wold = { ea, s1, 1, 400, 0 }, wnew = { eb, s1, 8, 3000, 0 };
	ta = start(t_ep_reader, &wold);
	tb = start(t_ep_reader, &wnew);
	sleep_ms(50);
	CHK(write(c1, "mmmm", 4));
	sleep_ms(50);
	CHK(write(c1, "mmmm", 4));
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	say("moved socket: old set got %d, new set got %d", wold.got, wnew.got);
	close(ea);
	close(eb);
	close(s1);
	close(c1);
	close(s2);
	close(c2);
	say("done");
	return 0;
}
