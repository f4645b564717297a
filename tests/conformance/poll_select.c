/* poll, ppoll, select and pselect over a pipe and TCP sockets: readiness,
 * HUP/RDHUP, timeouts, POLLNVAL, negative fds, EBADF in select. */
#define _GNU_SOURCE
#include "conf.h"
#include <sys/select.h>

static void show(const char *label, int r, struct pollfd *p, int n)
{
	char out[256] = "";
	for (int i = 0; i < n; i++)
		snprintf(out + strlen(out), sizeof out - strlen(out), " %s", pflags(p[i].revents));
	say("%s: %d ->%s", label, r, out);
}

int main(void)
{
	int c, s, p[2], r;
	char buf[64];

	conf_init();
	tcp_pair(&c, &s);
	CHK(pipe(p));

	/* Idle: only the writable ends. */
	struct pollfd f[4] = {
		{ p[0], POLLIN, 0 }, { s, POLLIN, 0 }, { c, POLLOUT, 0 }, { p[1], POLLOUT, 0 },
	};
	r = poll(f, 4, 0);
	show("idle", r, f, 4);

	CHK(write(p[1], "abc", 3));
	CHK(write(c, "defg", 4));
	wait_bytes(s, 4, 2000);
	r = poll(f, 4, 0);
	show("data", r, f, 4);

	/* Everything requested at once on a connected socket with data. */
	struct pollfd all = { s, POLLIN | POLLOUT | POLLRDHUP | POLLPRI | POLLRDNORM | POLLWRNORM, 0 };
	r = poll(&all, 1, 0);
	show("all bits requested", r, &all, 1);

	/* select over the same fds. */
	fd_set rd, wr;
	FD_ZERO(&rd);
	FD_ZERO(&wr);
	FD_SET(p[0], &rd);
	FD_SET(s, &rd);
	FD_SET(c, &rd);
	FD_SET(c, &wr);
	int maxfd = p[0];
	for (int i = 0; i < 4; i++)
		if (f[i].fd > maxfd)
			maxfd = f[i].fd;
	struct timeval tv = { 1, 0 };
	r = select(maxfd + 1, &rd, &wr, NULL, &tv);
	say("select: %d, pipe r %d, s r %d, c r %d, c w %d", r, FD_ISSET(p[0], &rd),
	    FD_ISSET(s, &rd), FD_ISSET(c, &rd), FD_ISSET(c, &wr));

	CHK(read(p[0], buf, sizeof buf));
	CHK(read(s, buf, sizeof buf));
	r = poll(f, 2, 0);
	show("drained", r, f, 2);

	/* Timeouts: return 0 after at least the timeout. */
	double t0 = now_ms();
	r = poll(f, 2, 100);
	say("poll timeout: %d, %s", r, now_ms() - t0 >= 90 ? "timeout ok" : "too early");
	t0 = now_ms();
	r = poll(NULL, 0, 100);
	say("poll no fds: %d, %s", r, now_ms() - t0 >= 90 ? "timeout ok" : "too early");
	struct timespec ts = { 0, 100000000 };
	t0 = now_ms();
	r = ppoll(f, 2, &ts, NULL);
	say("ppoll timeout: %d, %s, ts unchanged: %s", r,
	    now_ms() - t0 >= 90 ? "timeout ok" : "too early",
	    yesno(ts.tv_sec == 0 && ts.tv_nsec == 100000000));
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	FD_SET(p[0], &rd);
	tv.tv_sec = 0;
	tv.tv_usec = 100000;
	t0 = now_ms();
	r = select(maxfd + 1, &rd, NULL, NULL, &tv);
	say("select timeout: %d, %s, set cleared: %s, tv left zero: %s", r,
	    now_ms() - t0 >= 90 ? "timeout ok" : "too early",
	    yesno(!FD_ISSET(s, &rd) && !FD_ISSET(p[0], &rd)),
	    yesno(tv.tv_sec == 0 && tv.tv_usec == 0));
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	t0 = now_ms();
	r = pselect(s + 1, &rd, NULL, NULL, &ts, NULL);
	say("pselect timeout: %d, %s, ts unchanged: %s", r,
	    now_ms() - t0 >= 90 ? "timeout ok" : "too early",
	    yesno(ts.tv_sec == 0 && ts.tv_nsec == 100000000));
	/* select with a remaining time: tv is updated to what is left. */
	CHK(write(c, "x", 1));
	wait_bytes(s, 1, 2000);
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	tv.tv_sec = 5;
	tv.tv_usec = 0;
	r = select(s + 1, &rd, NULL, NULL, &tv);
	say("select ready: %d, tv decreased but not zero: %s", r,
	    yesno(tv.tv_sec >= 4 && (tv.tv_sec < 5 || tv.tv_usec < 1000000) && (tv.tv_sec > 0 || tv.tv_usec > 0)));
	CHK(read(s, buf, sizeof buf));

	/* POLLNVAL for a closed fd, negative fds ignored, EBADF in select. */
	int dead = CHK(socket(AF_INET, SOCK_STREAM, 0));
	close(dead);
	struct pollfd nv[3] = { { dead, POLLIN, 0 }, { -1, POLLIN, 0 }, { c, POLLOUT, 0 } };
	r = poll(nv, 3, 0);
	show("closed, negative, live", r, nv, 3);
	FD_ZERO(&rd);
	FD_SET(dead, &rd);
	tv.tv_sec = 0;
	tv.tv_usec = 0;
	r = select(dead + 1, &rd, NULL, NULL, &tv);
	say("select closed fd: %s", rs(r));
	struct pollfd zero = { s, 0, 0 };
	r = poll(&zero, 1, 0);
	show("no events requested", r, &zero, 1);

	/* HUP: pipe writer closed; TCP peer shut down, then closed. */
	close(p[1]);
	struct pollfd h[2] = { { p[0], POLLIN, 0 }, { s, POLLIN | POLLRDHUP, 0 } };
	r = poll(h, 2, 0);
	show("pipe writer closed", r, h, 2);
	CHK(shutdown(c, SHUT_WR));
	wait_fd(s, POLLRDHUP, 2000);
	r = poll(h, 2, 0);
	show("peer shut_wr", r, h, 2);
	struct pollfd in_only = { s, POLLIN, 0 };
	r = poll(&in_only, 1, 0);
	show("peer shut_wr, IN only", r, &in_only, 1);
	close(c);
	CHK(shutdown(s, SHUT_WR));
	wait_fd(s, POLLHUP, 2000);
	r = poll(h, 2, 0);
	show("both shut", r, h, 2);
	FD_ZERO(&rd);
	FD_ZERO(&wr);
	FD_SET(s, &rd);
	FD_SET(s, &wr);
	tv.tv_sec = 0;
	tv.tv_usec = 0;
	r = select(s + 1, &rd, &wr, NULL, &tv);
	say("select both shut: %d, r %d, w %d", r, FD_ISSET(s, &rd), FD_ISSET(s, &wr));
	close(s);
	close(p[0]);

	/* A fresh socket and a listener. */
	int fresh = CHK(socket(AF_INET, SOCK_STREAM, 0));
	struct pollfd fr = { fresh, POLLIN | POLLOUT, 0 };
	r = poll(&fr, 1, 0);
	show("fresh socket", r, &fr, 1);
	int l = listener4(NULL, 1);
	struct pollfd lp = { l, POLLIN | POLLOUT, 0 };
	r = poll(&lp, 1, 0);
	show("idle listener", r, &lp, 1);
	close(l);
	close(fresh);
	say("done");
	return 0;
}
