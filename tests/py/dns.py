#!/usr/bin/env python3
"""A tiny authoritative DNS server for tests: answers A queries for the
names given on the command line (name=ip), NXDOMAIN otherwise.
Usage: dns.py BIND_IP PORT name=ip... ; prints "ready" when listening.
Bounded: exits after 120 s."""
import socket, struct, sys, time

def main():
    ip, port = sys.argv[1], int(sys.argv[2])
    table = dict(a.split("=", 1) for a in sys.argv[3:])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    s.settimeout(1.0)
    print("ready", flush=True)
    end = time.time() + 120
    while time.time() < end:
        try:
            q, addr = s.recvfrom(512)
        except socket.timeout:
            continue
        if len(q) < 12:
            continue
        tid, flags, qd = struct.unpack("!HHH", q[:6])
        # Question name.
        i, labels = 12, []
        while i < len(q) and q[i] != 0:
            n = q[i]
            labels.append(q[i + 1 : i + 1 + n].decode(errors="replace"))
            i += 1 + n
        qend = i + 5
        qtype = struct.unpack("!H", q[i + 1 : i + 3])[0] if qend <= len(q) else 0
        name = ".".join(labels).lower()
        question = q[12:qend]
        ans = table.get(name)
        print(f"query {name} type {qtype} from {addr[0]}", flush=True)
        if ans and qtype == 1:
            hdr = struct.pack("!HHHHHH", tid, 0x8180, 1, 1, 0, 0)
            rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ans)
            s.sendto(hdr + question + rr, addr)
        else:
            rcode = 0 if ans else 3
            hdr = struct.pack("!HHHHHH", tid, 0x8180 | rcode, 1, 0, 0, 0)
            s.sendto(hdr + question, addr)

main()
