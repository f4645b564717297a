/* Half-close: shutdown(SHUT_WR) delivers EOF after all data while the other
 * direction keeps working; writes after SHUT_WR fail with EPIPE (and raise
 * SIGPIPE unless MSG_NOSIGNAL); reads after the peer closed return 0
 * again and again; SHUT_RD; bulk data followed by EOF. */
#define _GNU_SOURCE
#include "conf.h"

static volatile sig_atomic_t pipes;
static void on_pipe(int sig) { (void)sig; pipes++; }

int main(void)
{
	int c, s;
	char buf[256];
	ssize_t n;

	conf_init();

	/* Data, then EOF; the reverse direction still works. */
	tcp_pair(&c, &s);
	CHK(write(c, "hello", 5));
	CHK(shutdown(c, SHUT_WR));
	wait_fd(s, POLLRDHUP, 2000);
	n = read(s, buf, sizeof buf);
	say("read before eof: %s", rs(n));
	say("read at eof: %s", rs(read(s, buf, sizeof buf)));
	say("read at eof again: %s", rs(read(s, buf, sizeof buf)));
	say("recv MSG_DONTWAIT at eof: %s", rs(recv(s, buf, sizeof buf, MSG_DONTWAIT)));
	say("reverse write: %s", rs(write(s, "world", 5)));
	read_exact(c, buf, 5, 2000);
	say("reverse read: %.5s", buf);
	say("shut_wr twice: %s", rs(shutdown(c, SHUT_WR)));

	/* Writing after SHUT_WR: EPIPE, with SIGPIPE unless MSG_NOSIGNAL. */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_pipe;
	CHK(sigaction(SIGPIPE, &sa, NULL));
	n = write(c, "x", 1);
	say("write after shut_wr: %s, SIGPIPE: %d", rs(n), pipes);
	pipes = 0;
	n = send(c, "x", 1, MSG_NOSIGNAL);
	say("send MSG_NOSIGNAL after shut_wr: %s, SIGPIPE: %d", rs(n), pipes);
	pipes = 0;
	signal(SIGPIPE, SIG_IGN);
	say("write with SIGPIPE ignored: %s", rs(write(c, "x", 1)));
	struct iovec iov = { "xy", 2 };
	say("writev after shut_wr: %s", rs(writev(c, &iov, 1)));
	say("sendto after shut_wr: %s", rs(sendto(c, "x", 1, MSG_NOSIGNAL, NULL, 0)));

	/* Peer closes: 0 forever. */
	close(c);
	wait_fd(s, POLLIN, 2000);
	say("read after peer close: %s %s %s", rs(read(s, buf, sizeof buf)),
	    rs(read(s, buf, sizeof buf)), rs(read(s, buf, sizeof buf)));
	close(s);

	/* SHUT_RD: reads return 0 at once without blocking. */
	tcp_pair(&c, &s);
	CHK(shutdown(s, SHUT_RD));
	say("read after own shut_rd: %s", rs(read(s, buf, sizeof buf)));
	struct pollfd p = { s, POLLIN | POLLOUT | POLLRDHUP, 0 };
	int pr = poll(&p, 1, 0);
	say("poll after own shut_rd: %d %s", pr, pflags(p.revents));
	say("write after own shut_rd: %s", rs(write(s, "ok", 2)));
	read_exact(c, buf, 2, 2000);
	say("peer got: %.2s", buf);
	say("shutdown bad how: %s", rs(shutdown(s, 7)));
	close(c);
	close(s);

	/* SHUT_RDWR: both. */
	tcp_pair(&c, &s);
	CHK(shutdown(c, SHUT_RDWR));
	say("read after shut_rdwr: %s", rs(read(c, buf, sizeof buf)));
	say("send after shut_rdwr: %s", rs(send(c, "x", 1, MSG_NOSIGNAL)));
	wait_fd(s, POLLRDHUP, 2000);
	say("peer read: %s", rs(read(s, buf, sizeof buf)));
	close(c);
	close(s);

	/* 200 KB then EOF: every byte arrives before the 0. */
	tcp_pair(&c, &s);
	set_nonblock(c, 1);
	set_nonblock(s, 1);
	size_t total = 200000, sent = 0, got = 0;
	uint32_t hs = FNV_INIT, hr = FNV_INIT;
	int eof = 0;
	double end = now_ms() + 5000;
	while (!eof && now_ms() < end) {
		if (sent < total) {
			size_t k = total - sent < sizeof buf ? total - sent : sizeof buf;
			for (size_t i = 0; i < k; i++)
				buf[i] = (char)((sent + i) * 31 % 251);
			n = write(c, buf, k);
			if (n > 0) {
				hs = fnv1a(hs, buf, (size_t)n);
				sent += (size_t)n;
				if (sent == total)
					CHK(shutdown(c, SHUT_WR));
			} else if (n < 0 && errno != EAGAIN)
				fail("bulk write: %s", ename(errno));
		}
		char rb[4096];
		n = read(s, rb, sizeof rb);
		if (n > 0) {
			hr = fnv1a(hr, rb, (size_t)n);
			got += (size_t)n;
		} else if (n == 0)
			eof = 1;
		else if (errno != EAGAIN)
			fail("bulk read: %s", ename(errno));
		else if (sent == total) {
			struct pollfd q = { s, POLLIN, 0 };
			poll(&q, 1, 100);
		}
	}
	say("bulk: %zu bytes then %s, checksum %s", got, eof ? "eof" : "no eof",
	    hs == hr ? "match" : "differs");
	close(c);
	close(s);
	say("done");
	return 0;
}
