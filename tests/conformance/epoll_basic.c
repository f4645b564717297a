/* epoll on a connected TCP pair: level and edge triggering, one-shot,
 * EPOLL_CTL_* errors, RDHUP/HUP after the peer shuts down or closes, and
 * the wait timeout. */
#define _GNU_SOURCE
#include "conf.h"

/* Waits up to ms for events; returns the count, *ev the first one's flags. */
static int ewait(int ep, int ms, uint32_t *ev)
{
	struct epoll_event e[4];
	int n;
	do
		n = epoll_wait(ep, e, 4, ms);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		fail("epoll_wait: %s", ename(errno));
	if (ev)
		*ev = n > 0 ? e[0].events : 0;
	return n;
}

/* Waits until the reported flags contain `want` (level-triggered sets whose
 * other flags are already ready return at once). */
static uint32_t ewait_for(int ep, uint32_t want, int ms)
{
	double end = now_ms() + ms;
	uint32_t ev = 0;
	while (now_ms() < end) {
		if (ewait(ep, 20, &ev) > 0 && (ev & want) == want)
			return ev;
	}
	return ev;
}

static void add(int ep, int fd, uint32_t events)
{
	struct epoll_event e = { .events = events, .data.fd = fd };
	CHK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e));
}

static void mod(int ep, int fd, uint32_t events)
{
	struct epoll_event e = { .events = events, .data.fd = fd };
	CHK(epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e));
}

int main(void)
{
	int c, s, ep, n;
	uint32_t ev;
	char buf[64];

	conf_init();

	/* Level-triggered IN|OUT. */
	tcp_pair(&c, &s);
	ep = CHK(epoll_create1(EPOLL_CLOEXEC));
	add(ep, s, EPOLLIN | EPOLLOUT);
	n = ewait(ep, 0, &ev);
	say("lt idle: %d %s", n, eflags(ev));
	CHK(write(c, "hello", 5));
	ev = ewait_for(ep, EPOLLIN, 2000);
	say("lt data: %s", eflags(ev));
	n = ewait(ep, 0, &ev);
	say("lt again: %d %s", n, eflags(ev));
	say("read: %s", rs(read(s, buf, sizeof buf)));
	n = ewait(ep, 0, &ev);
	say("lt drained: %d %s", n, eflags(ev));

	/* Edge-triggered: one report per arrival. */
	mod(ep, s, EPOLLIN | EPOLLET);
	n = ewait(ep, 50, &ev);
	say("et after mod, nothing new: %d", n);
	CHK(write(c, "a", 1));
	n = ewait(ep, 2000, &ev);
	say("et first byte: %d %s", n, eflags(ev));
	n = ewait(ep, 50, &ev);
	say("et no new data: %d", n);
	CHK(write(c, "b", 1));
	n = ewait(ep, 2000, &ev);
	say("et second byte (first unread): %d %s", n, eflags(ev));
	n = ewait(ep, 50, &ev);
	say("et quiet again: %d", n);

	/* EPOLL_CTL_MOD after edge-triggered use re-evaluates readiness. */
	mod(ep, s, EPOLLIN | EPOLLET);
	n = ewait(ep, 1000, &ev);
	say("et re-armed by mod: %d %s", n, eflags(ev));
	n = ewait(ep, 50, &ev);
	say("et after re-arm: %d", n);
	mod(ep, s, EPOLLIN);
	n = ewait(ep, 1000, &ev);
	say("mod to lt: %d %s", n, eflags(ev));
	n = ewait(ep, 0, &ev);
	say("lt repeats: %d %s", n, eflags(ev));
	wait_bytes(s, 2, 1000);
	say("read: %s", rs(read(s, buf, sizeof buf)));

	/* One-shot, re-armed with MOD. */
	mod(ep, s, EPOLLIN | EPOLLONESHOT);
	CHK(write(c, "x", 1));
	n = ewait(ep, 2000, &ev);
	say("oneshot first: %d %s", n, eflags(ev));
	CHK(write(c, "y", 1));
	n = ewait(ep, 50, &ev);
	say("oneshot disarmed: %d", n);
	mod(ep, s, EPOLLIN | EPOLLONESHOT);
	n = ewait(ep, 1000, &ev);
	say("oneshot re-armed: %d %s", n, eflags(ev));
	n = ewait(ep, 50, &ev);
	say("oneshot disarmed again: %d", n);

	/* EPOLL_CTL errors. */
	struct epoll_event e = { .events = EPOLLIN };
	say("add twice: %s", rs(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e)));
	say("del unregistered: %s", rs(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL)));
	say("mod unregistered: %s", rs(epoll_ctl(ep, EPOLL_CTL_MOD, c, &e)));
	say("add self: %s", rs(epoll_ctl(ep, EPOLL_CTL_ADD, ep, &e)));
	say("bad op: %s", rs(epoll_ctl(ep, 99, c, &e)));
	FILE *tf = tmpfile();
	if (!tf)
		fail("tmpfile");
	say("add regular file: %s", rs(epoll_ctl(ep, EPOLL_CTL_ADD, fileno(tf), &e)));
	fclose(tf);
	int dead = CHK(socket(AF_INET, SOCK_STREAM, 0));
	close(dead);
	say("add closed fd: %s", rs(epoll_ctl(ep, EPOLL_CTL_ADD, dead, &e)));
	say("ctl on a non-epoll fd: %s", rs(epoll_ctl(c, EPOLL_CTL_ADD, s, &e)));
	say("wait maxevents 0: %s", rs(epoll_wait(ep, &e, 0, 0)));
	say("del registered: %s", rs(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL)));
	n = ewait(ep, 0, &ev);
	say("after del: %d", n);
	say("epoll_create(0): %s", rs(epoll_create(0)));
	say("epoll_create1(bad flag): %s", rs(epoll_create1(1)));

	/* Closing a registered socket removes it from the set. */
	add(ep, s, EPOLLIN);
	close(s);
	n = ewait(ep, 50, &ev);
	say("closed fd reported: %d", n);
	close(c);

	/* Peer shutdown(SHUT_WR): RDHUP and IN, no HUP. */
	tcp_pair(&c, &s);
	add(ep, s, EPOLLIN | EPOLLOUT | EPOLLRDHUP);
	CHK(shutdown(c, SHUT_WR));
	ev = ewait_for(ep, EPOLLIN | EPOLLRDHUP, 2000);
	say("peer shut_wr: %s", eflags(ev));
	say("read at eof: %s", rs(read(s, buf, sizeof buf)));
	CHK(shutdown(s, SHUT_WR));
	ev = ewait_for(ep, EPOLLHUP, 2000);
	say("both shut: %s", eflags(ev));
	CHK(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL));
	close(s);
	close(c);

	/* Peer close: IN|RDHUP; after our write is answered by RST, ERR|HUP. */
	signal(SIGPIPE, SIG_IGN);
	tcp_pair(&c, &s);
	add(ep, s, EPOLLIN | EPOLLRDHUP);
	close(c);
	ev = ewait_for(ep, EPOLLIN | EPOLLRDHUP, 2000);
	say("peer closed: %s", eflags(ev));
	say("write to closed peer: %s", rs(write(s, "zz", 2)));
	ev = ewait_for(ep, EPOLLHUP | EPOLLERR, 2000);
	say("after rst: %s", eflags(ev));
	CHK(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL));
	close(s);

	/* Timeout. */
	tcp_pair(&c, &s);
	add(ep, s, EPOLLIN);
	double t0 = now_ms();
	n = ewait(ep, 100, &ev);
	say("timeout: %d, %s", n, now_ms() - t0 >= 90 ? "timeout ok" : "too early");
	t0 = now_ms();
	n = epoll_pwait(ep, &e, 1, 100, NULL);
	say("pwait timeout: %d, %s", n, now_ms() - t0 >= 90 ? "timeout ok" : "too early");
	close(s);
	close(c);
	close(ep);
	say("done");
	return 0;
}
