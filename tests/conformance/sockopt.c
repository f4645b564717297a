/* getsockopt/setsockopt and socket names: SO_TYPE/DOMAIN/PROTOCOL,
 * SO_ACCEPTCONN, SO_ERROR, boolean options, keepalive tuning, buffer
 * sizes (doubled), SO_LINGER, SO_RCVTIMEO, getsockname/getpeername, bind
 * conflicts and listen on an unbound socket. */
#define _GNU_SOURCE
#include "conf.h"

static int geti(int fd, int level, int opt)
{
	int v = -12345;
	socklen_t len = sizeof v;
	if (getsockopt(fd, level, opt, &v, &len) < 0)
		return -(1000 + errno);
	if (len != sizeof v)
		return -999;
	return v;
}

static const char *gs(int fd, int level, int opt)
{
	static char b[4][32];
	static int i;
	char *o = b[i++ & 3];
	int v = geti(fd, level, opt);
	if (v <= -1000)
		snprintf(o, 32, "-1 %s", ename(-v - 1000));
	else
		snprintf(o, 32, "%d", v);
	return o;
}

static const char *gbool(int fd, int level, int opt)
{
	int v = geti(fd, level, opt);
	return v < 0 ? gs(fd, level, opt) : v ? "!=0" : "0";
}

static int seti(int fd, int level, int opt, int v)
{
	return setsockopt(fd, level, opt, &v, sizeof v);
}

static int same(const struct sockaddr_in *x, const struct sockaddr_in *y)
{
	return x->sin_family == y->sin_family && x->sin_port == y->sin_port &&
	       x->sin_addr.s_addr == y->sin_addr.s_addr;
}

int main(void)
{
	conf_init();
	int t = CHK(socket(AF_INET, SOCK_STREAM, 0));
	int u = CHK(socket(AF_INET, SOCK_DGRAM, 0));
	say("tcp SO_TYPE stream: %s", yesno(geti(t, SOL_SOCKET, SO_TYPE) == SOCK_STREAM));
	say("udp SO_TYPE dgram: %s", yesno(geti(u, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM));
	say("SO_DOMAIN inet: %s", yesno(geti(t, SOL_SOCKET, SO_DOMAIN) == AF_INET));
	say("SO_PROTOCOL tcp: %s, udp: %s", yesno(geti(t, SOL_SOCKET, SO_PROTOCOL) == IPPROTO_TCP),
	    yesno(geti(u, SOL_SOCKET, SO_PROTOCOL) == IPPROTO_UDP));
	say("SO_ERROR: %s", gs(t, SOL_SOCKET, SO_ERROR));
	say("SO_ACCEPTCONN before listen: %s", gs(t, SOL_SOCKET, SO_ACCEPTCONN));

	/* Booleans. */
	say("SO_REUSEADDR default: %s", gbool(t, SOL_SOCKET, SO_REUSEADDR));
	say("SO_KEEPALIVE default: %s", gbool(t, SOL_SOCKET, SO_KEEPALIVE));
	say("TCP_NODELAY default: %s", gbool(t, IPPROTO_TCP, TCP_NODELAY));
	say("SO_REUSEPORT default: %s", gbool(t, SOL_SOCKET, SO_REUSEPORT));
	CHK(seti(t, SOL_SOCKET, SO_REUSEADDR, 1));
	CHK(seti(t, SOL_SOCKET, SO_KEEPALIVE, 5));
	CHK(seti(t, IPPROTO_TCP, TCP_NODELAY, 1));
	say("set: SO_REUSEADDR %s, SO_KEEPALIVE %s, TCP_NODELAY %s", gbool(t, SOL_SOCKET, SO_REUSEADDR),
	    gbool(t, SOL_SOCKET, SO_KEEPALIVE), gbool(t, IPPROTO_TCP, TCP_NODELAY));
	CHK(seti(t, IPPROTO_TCP, TCP_NODELAY, 0));
	say("TCP_NODELAY cleared: %s", gbool(t, IPPROTO_TCP, TCP_NODELAY));

	/* Keepalive tuning. */
	say("keepalive defaults: idle %s intvl %s cnt %s", gs(t, IPPROTO_TCP, TCP_KEEPIDLE),
	    gs(t, IPPROTO_TCP, TCP_KEEPINTVL), gs(t, IPPROTO_TCP, TCP_KEEPCNT));
	CHK(seti(t, IPPROTO_TCP, TCP_KEEPIDLE, 30));
	CHK(seti(t, IPPROTO_TCP, TCP_KEEPINTVL, 5));
	CHK(seti(t, IPPROTO_TCP, TCP_KEEPCNT, 3));
	say("keepalive set: idle %s intvl %s cnt %s", gs(t, IPPROTO_TCP, TCP_KEEPIDLE),
	    gs(t, IPPROTO_TCP, TCP_KEEPINTVL), gs(t, IPPROTO_TCP, TCP_KEEPCNT));
	say("TCP_KEEPIDLE 0: %s", rs(seti(t, IPPROTO_TCP, TCP_KEEPIDLE, 0)));
	say("TCP_KEEPCNT -1: %s", rs(seti(t, IPPROTO_TCP, TCP_KEEPCNT, -1)));

	/* Buffer sizes are doubled on set. */
	CHK(seti(t, SOL_SOCKET, SO_RCVBUF, 65536));
	CHK(seti(t, SOL_SOCKET, SO_SNDBUF, 65536));
	say("SO_RCVBUF set 65536: %s, SO_SNDBUF set 65536: %s", gs(t, SOL_SOCKET, SO_RCVBUF),
	    gs(t, SOL_SOCKET, SO_SNDBUF));

	/* SO_LINGER, timeouts. */
	struct linger lg = { 1, 5 };
	CHK(setsockopt(t, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
	memset(&lg, 0, sizeof lg);
	socklen_t len = sizeof lg;
	CHK(getsockopt(t, SOL_SOCKET, SO_LINGER, &lg, &len));
	say("SO_LINGER: onoff %s linger %d len ok %s", lg.l_onoff ? "!=0" : "0", lg.l_linger,
	    yesno(len == sizeof lg));
	struct timeval tv = { 0, 200000 };
	CHK(setsockopt(t, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
	memset(&tv, 0, sizeof tv);
	len = sizeof tv;
	CHK(getsockopt(t, SOL_SOCKET, SO_RCVTIMEO, &tv, &len));
	say("SO_RCVTIMEO: %ld.%06ld", (long)tv.tv_sec, (long)tv.tv_usec);

	/* Errors. */
	say("unknown option: %s", rs(seti(t, SOL_SOCKET, 9999, 1)));
	say("get unknown option: %s", gs(t, SOL_SOCKET, 9999));
	short sh = 1;
	say("short optlen: %s", rs(setsockopt(t, SOL_SOCKET, SO_KEEPALIVE, &sh, sizeof sh)));
	int p[2];
	CHK(pipe(p));
	say("setsockopt on a pipe: %s", rs(seti(p[0], SOL_SOCKET, SO_KEEPALIVE, 1)));
	close(p[0]);
	close(p[1]);
	say("TCP option on udp: %s", gs(u, IPPROTO_TCP, TCP_NODELAY));

	/* Names. */
	struct sockaddr_in n, m, a;
	len = sizeof n;
	CHK(getsockname(u, (struct sockaddr *)&n, &len));
	say("unbound getsockname: family inet %s, any %s, port 0 %s, len %u", yesno(n.sin_family == AF_INET),
	    yesno(n.sin_addr.s_addr == htonl(INADDR_ANY)), yesno(n.sin_port == 0), len);
	int l = listener4(&a, 4);
	say("SO_ACCEPTCONN after listen: %s", gs(l, SOL_SOCKET, SO_ACCEPTCONN));
	say("listener bound to 127.0.0.1, nonzero port: %s",
	    yesno(a.sin_addr.s_addr == htonl(INADDR_LOOPBACK) && a.sin_port != 0));
	int c = connect4(&a);
	int s = accept_to(l, 2000);
	len = sizeof n;
	CHK(getpeername(c, (struct sockaddr *)&n, &len));
	say("client peer == listener address: %s", yesno(same(&n, &a) && len == sizeof n));
	len = sizeof n;
	CHK(getsockname(s, (struct sockaddr *)&n, &len));
	say("accepted local == listener address: %s", yesno(same(&n, &a)));
	len = sizeof n;
	CHK(getsockname(c, (struct sockaddr *)&n, &len));
	len = sizeof m;
	CHK(getpeername(s, (struct sockaddr *)&m, &len));
	say("accepted peer == client local: %s, loopback %s, port differs from listener: %s",
	    yesno(same(&n, &m)), yesno(m.sin_addr.s_addr == htonl(INADDR_LOOPBACK)),
	    yesno(m.sin_port != a.sin_port));
	len = 4;
	memset(&m, 0xff, sizeof m);
	CHK(getsockname(c, (struct sockaddr *)&m, &len));
	say("short getsockname: len %u, family copied %s, rest untouched %s", len,
	    yesno(m.sin_family == AF_INET), yesno(m.sin_addr.s_addr == 0xffffffff));
	say("SO_ACCEPTCONN on accepted: %s", gs(s, SOL_SOCKET, SO_ACCEPTCONN));
	say("accepted inherits TCP_NODELAY 0: %s", gbool(s, IPPROTO_TCP, TCP_NODELAY));
	/* nginx's tcp_nopush: cork around a response, nodelay set on every
	 * keep-alive turn; the bytes still arrive once uncorked. */
	CHK(seti(s, IPPROTO_TCP, TCP_CORK, 1));
	say("TCP_CORK set: %s", gbool(s, IPPROTO_TCP, TCP_CORK));
	CHK(write(s, "cork", 4));
	CHK(seti(s, IPPROTO_TCP, TCP_CORK, 0));
	CHK(seti(s, IPPROTO_TCP, TCP_NODELAY, 1));
	CHK(seti(s, IPPROTO_TCP, TCP_NODELAY, 1));
	char cb[8] = {0};
	read_exact(c, cb, 4, 2000);
	say("TCP_CORK cleared: %s, TCP_NODELAY twice: %s, corked bytes: %s", gbool(s, IPPROTO_TCP, TCP_CORK),
	    gbool(s, IPPROTO_TCP, TCP_NODELAY), cb);
	struct sockaddr_in pa;
	len = sizeof pa;
	int s2c = connect4(&a);
	int s2 = CHK(accept(l, (struct sockaddr *)&pa, &len));
	len = sizeof n;
	CHK(getsockname(s2c, (struct sockaddr *)&n, &len));
	say("accept fills the peer address: %s", yesno(same(&pa, &n)));
	close(s2);
	close(s2c);

	/* SO_RCVTIMEO: a blocking read times out with EAGAIN. */
	tv.tv_sec = 0;
	tv.tv_usec = 150000;
	CHK(setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
	char buf[8];
	double t0 = now_ms();
	ssize_t r = read(s, buf, sizeof buf);
	say("read with SO_RCVTIMEO: %s, %s", rs(r), now_ms() - t0 >= 140 ? "timeout ok" : "too early");
	close(c);
	close(s);

	/* bind conflicts. */
	int b = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("bind to a listening port: %s", rs(bind(b, (struct sockaddr *)&a, sizeof a)));
	CHK(seti(b, SOL_SOCKET, SO_REUSEADDR, 1));
	CHK(seti(l, SOL_SOCKET, SO_REUSEADDR, 1));
	say("bind to a listening port, both SO_REUSEADDR: %s", rs(bind(b, (struct sockaddr *)&a, sizeof a)));
	close(b);
	close(l);
	int x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	int y = CHK(socket(AF_INET, SOCK_STREAM, 0));
	struct sockaddr_in z = lo4(0);
	CHK(bind(x, (struct sockaddr *)&z, sizeof z));
	len = sizeof z;
	CHK(getsockname(x, (struct sockaddr *)&z, &len));
	/* The port is chosen at bind() time (Python's socketserver reads it
	 * before listen()), and listen() keeps it. */
	say("bound to port 0: port known before listen %s", yesno(z.sin_port != 0));
	say("bind to a bound (not listening) port: %s", rs(bind(y, (struct sockaddr *)&z, sizeof z)));
	say("bind twice: %s", rs(bind(x, (struct sockaddr *)&z, sizeof z)));
	{
		int w = CHK(socket(AF_INET, SOCK_STREAM, 0));
		struct sockaddr_in p = lo4(0), q;
		CHK(bind(w, (struct sockaddr *)&p, sizeof p));
		len = sizeof p;
		CHK(getsockname(w, (struct sockaddr *)&p, &len));
		CHK(listen(w, 1));
		len = sizeof q;
		CHK(getsockname(w, (struct sockaddr *)&q, &len));
		say("listen keeps the port bound to: %s", yesno(p.sin_port == q.sin_port && p.sin_port != 0));
		int c2 = CHK(socket(AF_INET, SOCK_STREAM, 0));
		say("connect to that port: %s", rs(connect(c2, (struct sockaddr *)&p, sizeof p)));
		close(c2);
		close(w);
	}
	close(x);
	close(y);
	x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("bind the port of a closed bound socket: %s", rs(bind(x, (struct sockaddr *)&z, sizeof z)));
	close(x);
	x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	y = CHK(socket(AF_INET, SOCK_STREAM, 0));
	CHK(seti(x, SOL_SOCKET, SO_REUSEADDR, 1));
	CHK(seti(y, SOL_SOCKET, SO_REUSEADDR, 1));
	z = lo4(0);
	CHK(bind(x, (struct sockaddr *)&z, sizeof z));
	len = sizeof z;
	CHK(getsockname(x, (struct sockaddr *)&z, &len));
	say("both SO_REUSEADDR, none listening: %s", rs(bind(y, (struct sockaddr *)&z, sizeof z)));
	say("listen on the first: %s", rs(listen(x, 1)));
	say("listen on the second: %s", rs(listen(y, 1)));
	close(x);
	close(y);
	struct sockaddr_in bad = lo4(0);
	bad.sin_addr.s_addr = inet_addr("192.0.2.1");
	x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("bind to a foreign address: %s", rs(bind(x, (struct sockaddr *)&bad, sizeof bad)));
	say("bind short addrlen: %s", rs(bind(x, (struct sockaddr *)&bad, 4)));

	/* listen on an unbound socket binds an ephemeral port on any. */
	say("listen unbound: %s", rs(listen(x, 1)));
	len = sizeof z;
	CHK(getsockname(x, (struct sockaddr *)&z, &len));
	say("autobound: any %s, port nonzero %s", yesno(z.sin_addr.s_addr == htonl(INADDR_ANY)),
	    yesno(z.sin_port != 0));
	close(x);
	close(t);
	close(u);
	say("done");
	return 0;
}
