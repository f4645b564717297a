#!/usr/bin/env python3
"""Kernel-socket peer for hoststack integration tests (runs in the peer netns).

Every mode is bounded in time (socket timeouts) and prints one result line.
"""
import argparse, hashlib, os, resource, selectors, socket, sys, time

TIMEOUT = 60


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def echo_client(a):
    s = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    s.settimeout(TIMEOUT)
    for i in range(a.count):
        msg = bytes((i + j) % 256 for j in range(a.size))
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(len(msg) - len(got))
            if not d:
                sys.exit("EOF before echo")
            got += d
        if got != msg:
            sys.exit(f"echo mismatch at message {i}")
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"":
        sys.exit("expected EOF after shutdown")
    print(f"ok echoed {a.count} x {a.size}")


def echo_server(a):
    l = socket.socket(family(a.host), socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((a.host, a.port))
    l.listen(128)
    l.settimeout(TIMEOUT)
    print("listening", flush=True)
    for _ in range(a.count):
        c, _ = l.accept()
        c.settimeout(TIMEOUT)
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.close()


def send_file(a):
    s = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    s.settimeout(TIMEOUT)
    h = hashlib.sha256()
    with open(a.file, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    tail = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        tail += d
    print(f"sent sha256={h.hexdigest()}")
    if tail:
        print("reply " + tail.decode().strip())


def recv_hash(a):
    l = socket.socket(family(a.host), socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((a.host, a.port))
    l.listen(16)
    l.settimeout(TIMEOUT)
    print("listening", flush=True)
    c, _ = l.accept()
    c.settimeout(TIMEOUT)
    h = hashlib.sha256()
    n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        h.update(d)
        n += len(d)
    c.close()
    print(f"received bytes={n} sha256={h.hexdigest()}", flush=True)


def many(a):
    """Open N connections at once, then echo a unique message on each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, a.count + 64), max(hard, a.count + 64)))
    socks = []
    deadline = time.time() + TIMEOUT
    for i in range(a.count):
        s = socket.socket(family(a.host), socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((a.host, a.port))
        socks.append(s)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_WRITE, i)
    pending = {i: f"conn-{i:05d}-".encode() * 8 for i in range(a.count)}
    got = {i: b"" for i in range(a.count)}
    is_connected = set()
    done = 0
    # Every socket stays open until all have been echoed, so all N
    # connections exist at the same time.
    while done < a.count:
        if time.time() > deadline:
            sys.exit(f"{len(is_connected)} of {a.count} connected, {done} echoed")
        for key, mask in sel.select(timeout=1):
            s, i = key.fileobj, key.data
            if i not in is_connected:
                if not mask & selectors.EVENT_WRITE:
                    continue
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sys.exit(f"connection {i} failed: {os.strerror(err)}")
                s.send(pending[i])
                is_connected.add(i)
                sel.modify(s, selectors.EVENT_READ, i)
                continue
            try:
                d = s.recv(4096)
            except BlockingIOError:
                continue
            if not d:
                sys.exit(f"connection {i} closed early")
            got[i] += d
            if len(got[i]) >= len(pending[i]):
                if got[i] != pending[i]:
                    sys.exit(f"connection {i}: wrong echo")
                sel.unregister(s)
                done += 1
    for s in socks:
        s.close()
    print(f"ok {a.count} concurrent connections echoed")


def hold(a):
    """Connect, then wait for the server to die: expect RST (or FIN) soon."""
    s = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    s.settimeout(a.wait)
    s.sendall(b"hello")
    print("connected", flush=True)
    t0 = time.time()
    try:
        while True:
            d = s.recv(4096)
            if not d:
                print(f"eof after {time.time() - t0:.2f}s")
                return
    except ConnectionResetError:
        print(f"reset after {time.time() - t0:.2f}s")
    except socket.timeout:
        print("timeout")


def udp_echo_client(a):
    s = socket.socket(family(a.host), socket.SOCK_DGRAM)
    s.settimeout(5)
    for i in range(a.count):
        msg = bytes((i * 3 + j) % 256 for j in range(a.size))
        s.sendto(msg, (a.host, a.port))
        d, src = s.recvfrom(65536)
        if d != msg:
            sys.exit(f"udp echo mismatch at {i}")
    print(f"ok udp echoed {a.count} x {a.size}")


def ping(a):
    """ICMP echo with a raw socket (no ping binary needed)."""
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(3)
    def csum(b):
        if len(b) % 2:
            b += b"\0"
        t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        t = (t >> 16) + (t & 0xFFFF)
        t += t >> 16
        return ~t & 0xFFFF
    for seq in range(a.count):
        payload = b"hoststack-ping-%d" % seq
        hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4853, seq)
        pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), 0x4853, seq) + payload
        s.sendto(pkt, (a.host, 0))
        while True:
            d, src = s.recvfrom(2048)
            ihl = (d[0] & 0xF) * 4
            typ, code, _, ident, rseq = struct.unpack("!BBHHH", d[ihl:ihl + 8])
            if typ == 0 and ident == 0x4853 and rseq == seq:
                if d[ihl + 8:] != payload:
                    sys.exit("echo reply payload mismatch")
                break
    print(f"ok {a.count} echo replies from {a.host}")


p = argparse.ArgumentParser()
p.add_argument("mode")
p.add_argument("host")
p.add_argument("port", type=int)
p.add_argument("--count", type=int, default=1)
p.add_argument("--size", type=int, default=64)
p.add_argument("--file")
p.add_argument("--wait", type=float, default=10)
a = p.parse_args()
{"echo-client": echo_client, "echo-server": echo_server, "send-file": send_file,
 "recv-hash": recv_hash, "many": many, "hold": hold, "udp-echo-client": udp_echo_client,
 "ping": ping}[a.mode](a)
