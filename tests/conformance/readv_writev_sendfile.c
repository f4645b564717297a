/* Vectored and file I/O on TCP sockets: writev/readv, sendmsg/recvmsg,
 * sendfile of 1 MiB from a file (with an offset pointer and with the file
 * position), MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL, zero-length I/O. */
#define _GNU_SOURCE
#include "conf.h"
#include <pthread.h>
#include <sys/sendfile.h>

#define FSIZE (1 << 20)

struct sink { int fd; size_t want; size_t got; uint32_t sum; };

static void *t_sink(void *arg)
{
	struct sink *k = arg;
	char buf[16384];
	k->sum = FNV_INIT;
	while (k->got < k->want) {
		size_t w = k->want - k->got < sizeof buf ? k->want - k->got : sizeof buf;
		ssize_t n = read(k->fd, buf, w);
		if (n <= 0)
			fail("sink read: %s", rs(n));
		k->sum = fnv1a(k->sum, buf, (size_t)n);
		k->got += (size_t)n;
	}
	return NULL;
}

struct late { int fd; };
static void *t_late(void *arg)
{
	struct late *l = arg;
	sleep_ms(100);
	CHK(write(l->fd, "World", 5));
	return NULL;
}

int main(void)
{
	int c, s;
	char buf[64];
	ssize_t n;

	conf_init();
	tcp_pair(&c, &s);

	/* writev / readv. */
	struct iovec w[3] = { { "hello", 5 }, { " world", 6 }, { "foo-bar", 7 } };
	say("writev 3 iovecs: %s", rs(writev(c, w, 3)));
	wait_bytes(s, 18, 2000);
	char a1[4], a2[10], a3[8];
	struct iovec r[3] = { { a1, 4 }, { a2, 10 }, { a3, 8 } };
	n = readv(s, r, 3);
	say("readv 4+10+8: %s: \"%.4s\" \"%.10s\" \"%.4s\"", rs(n), a1, a2, a3);
	say("writev 0 iovecs: %s", rs(writev(c, w, 0)));
	say("writev 2000 iovecs (over IOV_MAX): %s", rs(writev(c, (struct iovec[2000]){ { "x", 1 } }, 2000)));

	/* sendmsg / recvmsg on TCP. */
	struct iovec sv[2] = { { "msg", 3 }, { "hdr", 3 } };
	struct msghdr sm = { .msg_iov = sv, .msg_iovlen = 2 };
	say("sendmsg: %s", rs(sendmsg(c, &sm, 0)));
	wait_bytes(s, 6, 2000);
	struct sockaddr_in from;
	memset(&from, 0xab, sizeof from);
	char b1[2], b2[8];
	struct iovec rv[2] = { { b1, 2 }, { b2, 8 } };
	struct msghdr rm = { .msg_name = &from, .msg_namelen = sizeof from, .msg_iov = rv, .msg_iovlen = 2 };
	n = recvmsg(s, &rm, 0);
	say("recvmsg: %s \"%.2s\" \"%.4s\", flags %d, namelen %u", rs(n), b1, b2, rm.msg_flags, rm.msg_namelen);

	/* MSG_PEEK, MSG_DONTWAIT, zero-length. */
	say("MSG_DONTWAIT on empty: %s", rs(recv(s, buf, sizeof buf, MSG_DONTWAIT)));
	CHK(write(c, "peekaboo", 8));
	wait_bytes(s, 8, 2000);
	n = recv(s, buf, 4, MSG_PEEK);
	say("peek 4: %s \"%.4s\"", rs(n), buf);
	n = recv(s, buf, sizeof buf, MSG_PEEK);
	say("peek all: %s", rs(n));
	n = recv(s, buf, sizeof buf, 0);
	say("recv after peek: %s \"%.8s\"", rs(n), buf);
	/* Zero-length reads: recv() says EAGAIN on an empty socket with
	 * MSG_DONTWAIT (a blocking recv would wait for data) and 0 once data is
	 * queued; read() of 0 bytes returns 0 at once. */
	say("recv len 0 MSG_DONTWAIT, empty: %s", rs(recv(s, buf, 0, MSG_DONTWAIT)));
	say("read len 0, empty: %s", rs(read(s, buf, 0)));
	say("send len 0: %s", rs(send(c, buf, 0, 0)));
	CHK(write(c, "z", 1));
	wait_bytes(s, 1, 2000);
	say("recv len 0 with data: %s", rs(recv(s, buf, 0, 0)));
	say("read len 0 with data: %s", rs(read(s, buf, 0)));
	say("data still there: %s", rs(read(s, buf, sizeof buf)));

	/* MSG_WAITALL waits for the whole length. */
	CHK(write(c, "Hello", 5));
	pthread_t th;
	struct late lt = { c };
	if (pthread_create(&th, NULL, t_late, &lt))
		fail("pthread_create");
	n = recv(s, buf, 10, MSG_WAITALL);
	pthread_join(th, NULL);
	say("MSG_WAITALL 10: %s \"%.10s\"", rs(n), buf);

	/* sendfile of 1 MiB with an offset pointer. */
	char path[] = "/tmp/conf-sendfile-XXXXXX";
	int f = CHK(mkstemp(path));
	unlink(path);
	uint32_t fsum = FNV_INIT;
	static unsigned char chunk[65536];
	for (size_t off = 0; off < FSIZE; off += sizeof chunk) {
		for (size_t i = 0; i < sizeof chunk; i++)
			chunk[i] = (unsigned char)(((off + i) * 2654435761u) >> 13);
		write_all(f, chunk, sizeof chunk);
		fsum = fnv1a(fsum, chunk, sizeof chunk);
	}
	struct sink k = { s, FSIZE, 0, 0 };
	if (pthread_create(&th, NULL, t_sink, &k))
		fail("pthread_create");
	off_t off = 0;
	size_t sent = 0;
	while (sent < FSIZE) {
		n = sendfile(c, f, &off, FSIZE - sent);
		if (n <= 0)
			fail("sendfile: %s", rs(n));
		sent += (size_t)n;
	}
	pthread_join(th, NULL);
	say("sendfile: %zu bytes, offset %s, file position unchanged %s, checksum %s", sent,
	    off == FSIZE ? "advanced to the end" : "wrong", yesno(lseek(f, 0, SEEK_CUR) == FSIZE),
	    k.sum == fsum ? "match" : "differs");

	/* sendfile with the file position. */
	CHK(lseek(f, 100, SEEK_SET));
	n = sendfile(c, f, NULL, 1000);
	say("sendfile NULL offset: %s, file position now %ld", rs(n), (long)lseek(f, 0, SEEK_CUR));
	static char rb[1000];
	read_exact(s, rb, 1000, 2000);
	CHK(pread(f, chunk, 1000, 100));
	say("data from position 100: %s", memcmp(rb, chunk, 1000) == 0 ? "match" : "differs");
	off = FSIZE;
	say("sendfile at EOF: %s", rs(sendfile(c, f, &off, 100)));
	say("sendfile from a socket: %s", rs(sendfile(f, s, NULL, 10)));
	close(f);
	close(c);
	close(s);
	say("done");
	return 0;
}
