/* UDP over 127.0.0.1: datagram boundaries and source addresses, connect()
 * filtering, truncation, MSG_PEEK/MSG_TRUNC, zero-length datagrams,
 * sendmsg/recvmsg with iovecs, sendmmsg/recvmmsg, FIONREAD, autobind and
 * the ICMP error on a connected socket. */
#define _GNU_SOURCE
#include "conf.h"

static int udp4(struct sockaddr_in *a)
{
	int u = CHK(socket(AF_INET, SOCK_DGRAM, 0));
	struct sockaddr_in b = lo4(0);
	socklen_t len = sizeof b;
	CHK(bind(u, (struct sockaddr *)&b, sizeof b));
	CHK(getsockname(u, (struct sockaddr *)&b, &len));
	if (a)
		*a = b;
	return u;
}

static int same(const struct sockaddr_in *x, const struct sockaddr_in *y)
{
	return x->sin_family == y->sin_family && x->sin_port == y->sin_port &&
	       x->sin_addr.s_addr == y->sin_addr.s_addr;
}

/* recvfrom after waiting for a datagram. */
static ssize_t rx(int fd, void *buf, size_t len, int flags, struct sockaddr_in *from)
{
	socklen_t fl = sizeof *from;
	if (!(wait_fd(fd, POLLIN, 2000) & POLLIN))
		fail("no datagram within 2 s");
	return recvfrom(fd, buf, len, flags, (struct sockaddr *)from, from ? &fl : NULL);
}

int main(void)
{
	struct sockaddr_in aa, ba, from;
	char buf[256];
	ssize_t n;

	conf_init();
	int a = udp4(&aa), b = udp4(&ba);

	/* Boundaries and source. */
	const char *msgs[] = { "one", "two!", "three" };
	for (int i = 0; i < 3; i++)
		CHK(sendto(a, msgs[i], strlen(msgs[i]), 0, (struct sockaddr *)&ba, sizeof ba));
	for (int i = 0; i < 3; i++) {
		n = rx(b, buf, sizeof buf, 0, &from);
		say("datagram %d: %s bytes \"%.*s\", source matches %s", i, rs(n), (int)(n > 0 ? n : 0), buf,
		    yesno(same(&from, &aa)));
	}
	say("empty queue: %s", rs(recv(b, buf, sizeof buf, MSG_DONTWAIT)));

	/* Truncation: the rest of the datagram is gone. */
	memset(buf, 'z', 100);
	CHK(sendto(a, buf, 100, 0, (struct sockaddr *)&ba, sizeof ba));
	CHK(sendto(a, "next", 4, 0, (struct sockaddr *)&ba, sizeof ba));
	n = rx(b, buf, 10, 0, NULL);
	say("100-byte datagram into 10 bytes: %s", rs(n));
	n = rx(b, buf, sizeof buf, 0, NULL);
	say("then: %s \"%.4s\"", rs(n), buf);
	CHK(sendto(a, buf, 100, 0, (struct sockaddr *)&ba, sizeof ba));
	n = rx(b, buf, 10, MSG_TRUNC, NULL);
	say("recv MSG_TRUNC into 10 bytes: %s", rs(n));
	CHK(sendto(a, "abcdefgh", 8, 0, (struct sockaddr *)&ba, sizeof ba));
	struct iovec iv = { buf, 3 };
	struct msghdr mh = { .msg_iov = &iv, .msg_iovlen = 1 };
	wait_fd(b, POLLIN, 2000);
	n = recvmsg(b, &mh, 0);
	say("recvmsg 8 into 3: %s, MSG_TRUNC flag %s", rs(n), yesno(mh.msg_flags & MSG_TRUNC));

	/* Peek, zero-length, FIONREAD (size of the next datagram). */
	CHK(sendto(a, "peek", 4, 0, (struct sockaddr *)&ba, sizeof ba));
	CHK(sendto(a, "", 0, 0, (struct sockaddr *)&ba, sizeof ba));
	CHK(sendto(a, "last", 4, 0, (struct sockaddr *)&ba, sizeof ba));
	n = rx(b, buf, sizeof buf, MSG_PEEK, NULL);
	say("peek: %s", rs(n));
	sleep_ms(20);
	int avail = -1;
	CHK(ioctl(b, FIONREAD, &avail));
	say("FIONREAD with 3 queued: %d", avail);
	say("recv after peek: %s", rs(rx(b, buf, sizeof buf, 0, NULL)));
	say("zero-length datagram: %s", rs(rx(b, buf, sizeof buf, 0, &from)));
	say("next: %s", rs(rx(b, buf, sizeof buf, 0, NULL)));

	/* sendmsg with 3 iovecs is one datagram; recvmsg scatters it. */
	struct iovec out[3] = { { "ab", 2 }, { "cde", 3 }, { "f", 1 } };
	struct msghdr om = { .msg_name = &ba, .msg_namelen = sizeof ba, .msg_iov = out, .msg_iovlen = 3 };
	say("sendmsg 3 iovecs: %s", rs(sendmsg(a, &om, 0)));
	char p1[4], p2[4];
	struct iovec in[2] = { { p1, 4 }, { p2, 4 } };
	struct msghdr im = { .msg_name = &from, .msg_namelen = sizeof from, .msg_iov = in, .msg_iovlen = 2 };
	wait_fd(b, POLLIN, 2000);
	n = recvmsg(b, &im, 0);
	say("recvmsg 2 iovecs: %s, \"%.4s\" \"%.2s\", flags %d, name %s", rs(n), p1, p2, im.msg_flags,
	    yesno(im.msg_namelen == sizeof from && same(&from, &aa)));

	/* sendmmsg/recvmmsg. */
	char mb[4][16];
	struct iovec miov[4];
	struct mmsghdr mm[4];
	memset(mm, 0, sizeof mm);
	for (int i = 0; i < 4; i++) {
		snprintf(mb[i], sizeof mb[i], "msg%d%.*s", i, i, "xxxx");
		miov[i].iov_base = mb[i];
		miov[i].iov_len = strlen(mb[i]);
		mm[i].msg_hdr.msg_iov = &miov[i];
		mm[i].msg_hdr.msg_iovlen = 1;
		mm[i].msg_hdr.msg_name = &ba;
		mm[i].msg_hdr.msg_namelen = sizeof ba;
	}
	say("sendmmsg 4: %s", rs(sendmmsg(a, mm, 4, 0)));
	char rb[4][16];
	int got = 0;
	char lens[64] = "";
	double end = now_ms() + 2000;
	while (got < 4 && now_ms() < end) {
		memset(mm, 0, sizeof mm);
		for (int i = 0; i < 4; i++) {
			miov[i].iov_base = rb[i];
			miov[i].iov_len = sizeof rb[i];
			mm[i].msg_hdr.msg_iov = &miov[i];
			mm[i].msg_hdr.msg_iovlen = 1;
		}
		wait_fd(b, POLLIN, 100);
		int r = recvmmsg(b, mm, (unsigned)(4 - got), MSG_DONTWAIT, NULL);
		for (int i = 0; i < r; i++)
			snprintf(lens + strlen(lens), sizeof lens - strlen(lens), " %.*s", (int)mm[i].msg_len, rb[i]);
		if (r > 0)
			got += r;
	}
	say("recvmmsg: %d datagrams:%s", got, lens);

	/* connect(): sends go to the peer, other sources are filtered. */
	int c = udp4(NULL);
	CHK(connect(a, (struct sockaddr *)&ba, sizeof ba));
	say("send on connected: %s", rs(send(a, "conn", 4, 0)));
	n = rx(b, buf, sizeof buf, 0, &from);
	say("peer got: %s from connected %s", rs(n), yesno(same(&from, &aa)));
	CHK(sendto(c, "stranger", 8, 0, (struct sockaddr *)&aa, sizeof aa));
	CHK(sendto(b, "friend", 6, 0, (struct sockaddr *)&aa, sizeof aa));
	n = rx(a, buf, sizeof buf, 0, NULL);
	say("connected socket receives: \"%.*s\"", (int)(n > 0 ? n : 0), buf);
	say("then: %s", rs(recv(a, buf, sizeof buf, MSG_DONTWAIT)));
	struct sockaddr_in pn;
	socklen_t pl = sizeof pn;
	CHK(getpeername(a, (struct sockaddr *)&pn, &pl));
	say("getpeername connected: %s", yesno(same(&pn, &ba)));
	say("send unconnected without address: %s", rs(send(c, "x", 1, 0)));
	say("getpeername unconnected: %s", rs(getpeername(c, (struct sockaddr *)&pn, &pl)));
	struct sockaddr_in un = { .sin_family = AF_UNSPEC };
	say("disconnect (AF_UNSPEC): %s", rs(connect(a, (struct sockaddr *)&un, sizeof un)));
	pl = sizeof pn;
	say("getpeername after disconnect: %s", rs(getpeername(a, (struct sockaddr *)&pn, &pl)));
	/* Bound to port 0 (no explicit port): disconnect releases the port. */
	pl = sizeof pn;
	CHK(getsockname(a, (struct sockaddr *)&pn, &pl));
	say("port-0 bound socket after disconnect: port %s, address %s", pn.sin_port ? "kept" : "zero",
	    pn.sin_addr.s_addr == aa.sin_addr.s_addr ? "kept" : "any");
	/* Bound to an explicit port: kept, and datagrams from anyone arrive. */
	int e = CHK(socket(AF_INET, SOCK_DGRAM, 0));
	struct sockaddr_in ea = lo4(0);
	close(a);
	a = -1;
	ea.sin_port = aa.sin_port;
	CHK(bind(e, (struct sockaddr *)&ea, sizeof ea));
	CHK(connect(e, (struct sockaddr *)&ba, sizeof ba));
	CHK(connect(e, (struct sockaddr *)&un, sizeof un));
	pl = sizeof pn;
	CHK(getsockname(e, (struct sockaddr *)&pn, &pl));
	say("explicit port after disconnect: port %s", pn.sin_port == aa.sin_port ? "kept" : "changed");
	CHK(sendto(c, "open again", 10, 0, (struct sockaddr *)&aa, sizeof aa));
	n = rx(e, buf, sizeof buf, 0, NULL);
	say("after disconnect receives from anyone: %s", rs(n));
	close(e);

	/* Autobind on first send. */
	int d = CHK(socket(AF_INET, SOCK_DGRAM, 0));
	CHK(sendto(d, "auto", 4, 0, (struct sockaddr *)&ba, sizeof ba));
	struct sockaddr_in dn;
	socklen_t dl = sizeof dn;
	CHK(getsockname(d, (struct sockaddr *)&dn, &dl));
	n = rx(b, buf, sizeof buf, 0, &from);
	say("autobound: port nonzero %s, source port matches %s", yesno(dn.sin_port != 0),
	    yesno(from.sin_port == dn.sin_port));

	/* A connected socket learns about an unreachable port. */
	struct sockaddr_in gone;
	int g = udp4(&gone);
	close(g);
	CHK(connect(d, (struct sockaddr *)&gone, sizeof gone));
	say("send to a closed port: %s", rs(send(d, "x", 1, 0)));
	int rev = wait_fd(d, POLLERR, 2000);
	say("poll: %s", pflags(rev));
	say("recv: %s", rs(recv(d, buf, sizeof buf, MSG_DONTWAIT)));
	say("recv again: %s", rs(recv(d, buf, sizeof buf, MSG_DONTWAIT)));
	close(d);
	close(b);
	close(c);
	say("done");
	return 0;
}
