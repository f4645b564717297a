/* AF_INET6 over ::1: TCP and UDP, dual-stack listeners that accept IPv4
 * clients as v4-mapped addresses, IPV6_V6ONLY, v4-mapped connects, and
 * port sharing between v4 and v6. */
#define _GNU_SOURCE
#include "conf.h"

static struct sockaddr_in6 six(const struct in6_addr *ad, in_port_t port)
{
	struct sockaddr_in6 a;
	memset(&a, 0, sizeof a);
	a.sin6_family = AF_INET6;
	a.sin6_addr = *ad;
	a.sin6_port = port;
	return a;
}

static int listen6(const struct in6_addr *ad, int v6only, struct sockaddr_in6 *out)
{
	int l = CHK(socket(AF_INET6, SOCK_STREAM, 0));
	if (v6only >= 0)
		CHK(setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only));
	struct sockaddr_in6 a = six(ad, 0);
	socklen_t len = sizeof a;
	CHK(bind(l, (struct sockaddr *)&a, sizeof a));
	CHK(listen(l, 8));
	CHK(getsockname(l, (struct sockaddr *)&a, &len));
	*out = a;
	return l;
}

static int is_mapped_lo(const struct sockaddr_in6 *a)
{
	static const unsigned char m[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1 };
	return a->sin6_family == AF_INET6 && !memcmp(&a->sin6_addr, m, 16);
}

int main(void)
{
	struct sockaddr_in6 la, n;
	socklen_t len;
	char buf[64];
	int v = -1;

	conf_init();

	/* TCP over ::1. */
	int f = CHK(socket(AF_INET6, SOCK_STREAM, 0));
	len = sizeof v;
	CHK(getsockopt(f, IPPROTO_IPV6, IPV6_V6ONLY, &v, &len));
	say("IPV6_V6ONLY on a fresh socket: %d", v);
	close(f);
	int l = listen6(&in6addr_loopback, -1, &la);
	len = sizeof v;
	CHK(getsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &v, &len));
	say("IPV6_V6ONLY after binding ::1: %d", v);
	int c = CHK(socket(AF_INET6, SOCK_STREAM, 0));
	say("connect [::1]: %s", rs(connect(c, (struct sockaddr *)&la, sizeof la)));
	int s = accept_to(l, 2000);
	CHK(write(c, "six", 3));
	read_exact(s, buf, 3, 2000);
	say("data: %.3s", buf);
	len = sizeof n;
	CHK(getpeername(s, (struct sockaddr *)&n, &len));
	say("accepted peer: family inet6 %s, ::1 %s, len %u", yesno(n.sin6_family == AF_INET6),
	    yesno(IN6_IS_ADDR_LOOPBACK(&n.sin6_addr)), len);
	len = sizeof n;
	CHK(getpeername(c, (struct sockaddr *)&n, &len));
	say("client peer == listener: %s", yesno(n.sin6_port == la.sin6_port && IN6_IS_ADDR_LOOPBACK(&n.sin6_addr)));
	v = 1;
	say("IPV6_V6ONLY after connect: %s", rs(setsockopt(c, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof v)));
	close(s);
	close(c);
	close(l);

	/* A dual-stack listener on :: accepts an IPv4 client as ::ffff:127.0.0.1. */
	l = listen6(&in6addr_any, 0, &la);
	struct sockaddr_in a4 = lo4(ntohs(la.sin6_port));
	c = connect4(&a4);
	s = accept_to(l, 2000);
	len = sizeof n;
	CHK(getpeername(s, (struct sockaddr *)&n, &len));
	say("v4 client on dual-stack listener: v4-mapped %s", yesno(is_mapped_lo(&n)));
	len = sizeof n;
	CHK(getsockname(s, (struct sockaddr *)&n, &len));
	say("accepted local: v4-mapped %s, port matches %s", yesno(is_mapped_lo(&n)), yesno(n.sin6_port == la.sin6_port));
	CHK(write(s, "mapped", 6));
	read_exact(c, buf, 6, 2000);
	say("data to the v4 client: %.6s", buf);
	close(s);
	close(c);
	int x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	struct sockaddr_in any4 = lo4(ntohs(la.sin6_port));
	any4.sin_addr.s_addr = htonl(INADDR_ANY);
	say("v4 bind to the dual-stack port: %s", rs(bind(x, (struct sockaddr *)&any4, sizeof any4)));
	close(x);
	close(l);

	/* A v6-only listener: IPv4 clients are refused and v4 can share the port. */
	l = listen6(&in6addr_any, 1, &la);
	a4 = lo4(ntohs(la.sin6_port));
	c = CHK(socket(AF_INET, SOCK_STREAM, 0));
	say("v4 connect to a v6-only listener: %s", rs(connect(c, (struct sockaddr *)&a4, sizeof a4)));
	close(c);
	x = CHK(socket(AF_INET, SOCK_STREAM, 0));
	any4 = lo4(ntohs(la.sin6_port));
	any4.sin_addr.s_addr = htonl(INADDR_ANY);
	say("v4 bind to the v6-only port: %s", rs(bind(x, (struct sockaddr *)&any4, sizeof any4)));
	say("v4 listen there: %s", rs(listen(x, 4)));
	c = connect4(&a4);
	s = accept_to(x, 2000);
	say("v4 client reaches the v4 listener: ok");
	close(s);
	close(c);
	close(x);
	close(l);

	/* A v6 socket connecting to a v4 listener through a v4-mapped address. */
	l = listener4(&a4, 4);
	struct in6_addr m;
	CHK(inet_pton(AF_INET6, "::ffff:127.0.0.1", &m));
	struct sockaddr_in6 ma = six(&m, a4.sin_port);
	c = CHK(socket(AF_INET6, SOCK_STREAM, 0));
	say("v6 socket to a v4-mapped address: %s", rs(connect(c, (struct sockaddr *)&ma, sizeof ma)));
	s = accept_to(l, 2000);
	CHK(write(c, "m", 1));
	read_exact(s, buf, 1, 2000);
	len = sizeof n;
	CHK(getsockname(c, (struct sockaddr *)&n, &len));
	say("its local address: v4-mapped %s", yesno(is_mapped_lo(&n)));
	close(s);
	close(c);
	close(l);
	c = CHK(socket(AF_INET6, SOCK_STREAM, 0));
	v = 1;
	CHK(setsockopt(c, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof v));
	say("v6-only socket to a v4-mapped address: %s", rs(connect(c, (struct sockaddr *)&ma, sizeof ma)));
	close(c);

	/* UDP over ::1. */
	int u1 = CHK(socket(AF_INET6, SOCK_DGRAM, 0)), u2 = CHK(socket(AF_INET6, SOCK_DGRAM, 0));
	struct sockaddr_in6 b1 = six(&in6addr_loopback, 0), b2 = b1, from;
	CHK(bind(u1, (struct sockaddr *)&b1, sizeof b1));
	CHK(bind(u2, (struct sockaddr *)&b2, sizeof b2));
	len = sizeof b1;
	CHK(getsockname(u1, (struct sockaddr *)&b1, &len));
	len = sizeof b2;
	CHK(getsockname(u2, (struct sockaddr *)&b2, &len));
	CHK(sendto(u1, "dgram6", 6, 0, (struct sockaddr *)&b2, sizeof b2));
	wait_fd(u2, POLLIN, 2000);
	len = sizeof from;
	ssize_t r = recvfrom(u2, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &len);
	say("udp6: %s bytes, source matches %s, len %u", rs(r),
	    yesno(from.sin6_port == b1.sin6_port && IN6_IS_ADDR_LOOPBACK(&from.sin6_addr)), len);
	close(u1);
	close(u2);
	say("done");
	return 0;
}
