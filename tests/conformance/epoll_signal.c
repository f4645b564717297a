/* Signals interrupting blocked calls: epoll_wait, poll and select return
 * EINTR whether or not SA_RESTART is set; blocking read and accept return
 * EINTR without SA_RESTART and are restarted with it; epoll_pwait, ppoll
 * and pselect apply their signal mask for the duration of the wait. */
#define _GNU_SOURCE
#include "conf.h"
#include <pthread.h>
#include <sys/select.h>
#include <sys/time.h>

static volatile sig_atomic_t hits;
static void on_alarm(int sig) { (void)sig; hits++; }

static void handler(int flags)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	CHK(sigaction(SIGALRM, &sa, NULL));
	hits = 0;
}

static void arm(int ms)
{
	struct itimerval it = { { 0, 0 }, { ms / 1000, (ms % 1000) * 1000 } };
	CHK(setitimer(ITIMER_REAL, &it, NULL));
}

static void *watchdog(void *arg)
{
	(void)arg;
	sleep_ms(10000);
	fail("watchdog: still running after 10 s");
}

struct late { int fd; struct sockaddr_in addr; int connect; };

/* After 500 ms: write 4 bytes to fd, or connect to addr. */
static void *late_peer(void *arg)
{
	struct late *l = arg;
	sleep_ms(500);
	if (l->connect)
		l->fd = connect4(&l->addr);
	else
		CHK(write(l->fd, "late", 4));
	return NULL;
}

static void run_waits(const char *label, int c, int s)
{
	struct epoll_event e = { .events = EPOLLIN };
	int ep = CHK(epoll_create1(0));
	CHK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e));
	arm(100);
	int r = epoll_wait(ep, &e, 1, 5000);
	say("%s epoll_wait: %s, handler ran: %d", label, rs(r), hits);
	hits = 0;
	struct pollfd p[2] = { { s, POLLIN, 0 }, { c, POLLIN, 0 } };
	arm(100);
	r = poll(p, 2, 5000);
	say("%s poll: %s, handler ran: %d", label, rs(r), hits);
	hits = 0;
	fd_set rd;
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	FD_SET(c, &rd);
	struct timeval tv = { 5, 0 };
	arm(100);
	r = select((s > c ? s : c) + 1, &rd, NULL, NULL, &tv);
	say("%s select: %s, handler ran: %d", label, rs(r), hits);
	hits = 0;
	close(ep);
}

int main(void)
{
	int c, s;
	char buf[16];
	pthread_t wd, th;
	sigset_t alrm, none;

	conf_init();
	alarm(0);
	sigemptyset(&none);
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	/* Helper threads never take SIGALRM: they start with it blocked. */
	CHK(sigprocmask(SIG_BLOCK, &alrm, NULL));
	if (pthread_create(&wd, NULL, watchdog, NULL))
		fail("pthread_create");
	pthread_detach(wd);
	CHK(sigprocmask(SIG_UNBLOCK, &alrm, NULL));

	tcp_pair(&c, &s);

	handler(0);
	run_waits("no SA_RESTART", c, s);
	handler(SA_RESTART);
	run_waits("SA_RESTART", c, s);

	/* Blocking read. */
	handler(0);
	arm(100);
	ssize_t n = read(s, buf, sizeof buf);
	say("read, no SA_RESTART: %s, handler ran: %d", rs(n), hits);
	handler(SA_RESTART);
	struct late lt = { .fd = c };
	CHK(sigprocmask(SIG_BLOCK, &alrm, NULL));
	if (pthread_create(&th, NULL, late_peer, &lt))
		fail("pthread_create");
	CHK(sigprocmask(SIG_UNBLOCK, &alrm, NULL));
	arm(100);
	n = read(s, buf, sizeof buf);
	say("read, SA_RESTART: %s, handler ran: %d", rs(n), hits);
	pthread_join(th, NULL);

	/* Blocking accept. */
	struct sockaddr_in a;
	int l = listener4(&a, 4);
	handler(0);
	arm(100);
	int a1 = accept(l, NULL, NULL);
	say("accept, no SA_RESTART: %s, handler ran: %d", rs(a1), hits);
	handler(SA_RESTART);
	struct late la = { .fd = -1, .addr = a, .connect = 1 };
	CHK(sigprocmask(SIG_BLOCK, &alrm, NULL));
	if (pthread_create(&th, NULL, late_peer, &la))
		fail("pthread_create");
	CHK(sigprocmask(SIG_UNBLOCK, &alrm, NULL));
	arm(100);
	int a2 = accept(l, NULL, NULL);
	say("accept, SA_RESTART: %s, handler ran: %d", a2 < 0 ? rs(a2) : "ok", hits);
	pthread_join(th, NULL);
	close(a2);
	close(la.fd);
	close(l);

	/* The masks of epoll_pwait/ppoll/pselect. */
	handler(0);
	struct epoll_event e = { .events = EPOLLIN };
	int ep = CHK(epoll_create1(0));
	CHK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e));
	arm(100);
	int r = epoll_pwait(ep, &e, 1, 300, &alrm);
	say("epoll_pwait with SIGALRM masked: %s, handler ran after: %d", rs(r), hits);
	close(ep);

	CHK(sigprocmask(SIG_BLOCK, &alrm, NULL));
	handler(0);
	arm(100);
	struct pollfd p = { s, POLLIN, 0 };
	struct timespec ts = { 5, 0 };
	r = ppoll(&p, 1, &ts, &none);
	say("ppoll unmasking SIGALRM: %s, handler ran: %d", rs(r), hits);
	handler(0);
	arm(100);
	fd_set rd;
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	r = pselect(s + 1, &rd, NULL, NULL, &ts, &none);
	say("pselect unmasking SIGALRM: %s, handler ran: %d", rs(r), hits);
	handler(0);
	arm(100);
	struct timespec shortts = { 0, 300000000 };
	r = ppoll(&p, 1, &shortts, NULL);
	say("ppoll keeping the mask: %s, handler ran: %d", rs(r), hits);
	CHK(sigprocmask(SIG_UNBLOCK, &alrm, NULL));
	say("handler ran after unblock: %d", hits);

	close(s);
	close(c);
	say("done");
	return 0;
}
