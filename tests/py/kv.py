#!/usr/bin/env python3
"""Kernel-socket clients that check what redis and memcached store and return.

`kv.py redis HOST PORT N` and `kv.py memcached HOST PORT N` store N values
of deterministic pseudo-random sizes (1 B to 1 MiB for redis, to 512 KiB for
memcached) and contents, pipelined, read them all back and compare byte for
byte; memcached is also asked over UDP (its 8-byte frame header). `kv.py
redis-get HOST PORT KEY` prints one value. Every socket has a timeout; each
mode prints one result line ("ok ...") or exits non-zero saying what
differed.
"""
import random, socket, sys

TIMEOUT = 60


def values(n, biggest):
    rng = random.Random(7)
    out = []
    for i in range(n):
        # Mostly small, some large: sizes spread over six orders of magnitude.
        size = min(biggest, int(2 ** rng.uniform(0, 20)))
        out.append((f"key:{i}".encode(), rng.randbytes(size)))
    return out


class Conn:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buf = b""

    def send(self, b):
        self.s.sendall(b)

    def fill(self):
        d = self.s.recv(1 << 20)
        if not d:
            sys.exit("server closed the connection")
        self.buf += d

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        l, self.buf = self.buf.split(b"\r\n", 1)
        return l

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        b, self.buf = self.buf[:n], self.buf[n:]
        return b


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def resp_reply(c):
    l = c.line()
    kind, rest = l[:1], l[1:]
    if kind in (b"+", b":"):
        return rest
    if kind == b"-":
        sys.exit(f"redis error: {rest!r}")
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        v = c.exact(n + 2)
        return v[:-2]
    if kind == b"*":
        return [resp_reply(c) for _ in range(int(rest))]
    sys.exit(f"bad redis reply {l[:80]!r}")


def redis(host, port, n):
    vals = values(n, 1 << 20)
    c = Conn(host, port)
    c.send(b"".join(resp("SET", k, v) for k, v in vals))
    for k, _ in vals:
        if resp_reply(c) != b"OK":
            sys.exit(f"SET {k!r} not OK")
    # Half one GET each, half in one MGET.
    half = n // 2
    c.send(b"".join(resp("GET", k) for k, _ in vals[:half]))
    got = [resp_reply(c) for _ in vals[:half]]
    c.send(resp("MGET", *[k for k, _ in vals[half:]]))
    got += resp_reply(c)
    for (k, v), g in zip(vals, got):
        if g != v:
            sys.exit(f"{k!r}: stored {len(v)} bytes, got {None if g is None else len(g)}")
    c.send(resp("DEL", *[k for k, _ in vals]))
    deleted = int(resp_reply(c))
    if deleted != n:
        sys.exit(f"DEL removed {deleted} of {n} keys")
    print(f"ok redis {n} values {sum(len(v) for _, v in vals)} bytes", flush=True)


def redis_get(host, port, key):
    c = Conn(host, port)
    c.send(resp("GET", key))
    v = resp_reply(c)
    print("none" if v is None else v.decode(errors="replace"), flush=True)


def memcached(host, port, n):
    vals = values(n, 512 << 10)
    c = Conn(host, port)
    c.send(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v) for k, v in vals))
    for k, _ in vals:
        l = c.line()
        if l != b"STORED":
            sys.exit(f"set {k!r}: {l!r}")
    # One multi-key get for all.
    c.send(b"get " + b" ".join(k for k, _ in vals) + b"\r\n")
    got = {}
    while True:
        l = c.line()
        if l == b"END":
            break
        _, k, _, size = l.split(b" ")
        got[k] = c.exact(int(size) + 2)[:-2]
    for k, v in vals:
        if got.get(k) != v:
            sys.exit(f"{k!r}: stored {len(v)} bytes, got {len(got.get(k, b''))}")
    # UDP: request id, sequence 0, one datagram, reserved; a small value.
    k, v = b"udpkey", b"hello over udp"
    c.send(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v))
    if c.line() != b"STORED":
        sys.exit("set udpkey failed")
    u = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    want = b"\x12\x34\x00\x00\x00\x01\x00\x00VALUE udpkey 0 14\r\nhello over udp\r\nEND\r\n"
    for attempt in range(3):  # UDP: a lost datagram is retried
        u.sendto(b"\x12\x34\x00\x00\x00\x01\x00\x00get udpkey\r\n", (host, port))
        try:
            d, _ = u.recvfrom(2048)
            break
        except socket.timeout:
            d = None
    if d != want:
        sys.exit(f"memcached over UDP answered {d!r}")
    c.send(b"stats\r\n")
    stats = {}
    while True:
        l = c.line()
        if l == b"END":
            break
        _, name, val = l.split(b" ", 2)
        stats[name.decode()] = val.decode()
    print(
        f"ok memcached {n} values {sum(len(v) for _, v in vals)} bytes"
        f" cmd_set {stats.get('cmd_set')} get_hits {stats.get('get_hits')}",
        flush=True,
    )


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "redis":
        redis(host, port, int(sys.argv[4]))
    elif mode == "redis-get":
        redis_get(host, port, sys.argv[4])
    elif mode == "memcached":
        memcached(host, port, int(sys.argv[4]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
