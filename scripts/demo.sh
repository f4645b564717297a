#!/usr/bin/env bash
# hoststack demo: a private testbed, the daemon, native apps served through
# shared memory, unmodified nginx and Envoy under the shim, kernel clients in
# a peer namespace, hoststackctl tables, and
# a short comparison with the kernel. Run as root: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "demo.sh: please run as root (it creates a network namespace and opens AF_PACKET)" >&2
    exit 1
fi
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
envoy_version() { "${HOSTSTACK_ENVOY_DIR:-/opt/hoststack/envoy-py}/envoy/_bin/envoy" --version 2>/dev/null | grep -o '/1\.[0-9.]*/' | tr -d / || true; }

step "1/9 installing what is missing and building (release)"
scripts/setup.sh
cargo build --release --workspace --lib --bins --examples 2>&1 | tail -n 2
BIN=target/release
EX=target/release/examples

ID=$$
NS=hsdemo$ID
DIF=hsd${ID}a
PIF=hsd${ID}b
DIR=$(mktemp -d /tmp/hoststack-demo.XXXXXX)
SECRET=demo-$RANDOM$RANDOM
PIDS=()
cleanup() {
    set +e
    # Apps first (newest first), the daemon last.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null; sleep 0.05; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    PIDS=()
    ip link del "$DIF" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$DIR"
    echo "testbed removed"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "2/9 testbed: veth $DIF (daemon, no kernel IP) <-> $PIF in netns $NS (198.18.0.2)"
ip netns add "$NS"
ip link add "$DIF" type veth peer name "$PIF"
ip link set "$PIF" netns "$NS"
sysctl -qw "net.ipv6.conf.$DIF.disable_ipv6=1"
ip link set "$DIF" up
ip -n "$NS" addr add 198.18.0.2/24 dev "$PIF"
ip -n "$NS" addr add 2001:2::2/64 dev "$PIF" nodad
ip -n "$NS" link set "$PIF" up
ip -n "$NS" link set lo up

step "3/9 starting hoststackd on $DIF as 198.18.0.1 / 2001:2::1"
$BIN/hoststackd --interface "$DIF" --ipv4 198.18.0.1/24 --ipv6 2001:2::1/64 \
    --socket-dir "$DIR" --namespace "default=$SECRET" --log warn &
PIDS+=($!)
for _ in $(seq 100); do [[ -S $DIR/ctl.sock ]] && break; sleep 0.05; done
export HOSTSTACK_SOCKET_DIR=$DIR HOSTSTACK_SECRET=$SECRET

step "4/9 native echo server (TCP+UDP :7000) <- kernel clients in the peer namespace"
$EX/echo_server --listen 0.0.0.0:7000 --udp > "$DIR/echo.log" &
PIDS+=($!)
sleep 0.3
ip netns exec "$NS" python3 tests/py/peer.py echo-client 198.18.0.1 7000 --count 2000 --size 64
ip netns exec "$NS" python3 tests/py/peer.py udp-echo-client 198.18.0.1 7000 --count 200 --size 512

step "5/9 bulk: kernel sender in the peer namespace -> native receiver (512 MiB), hoststackctl while it runs"
$EX/throughput recv --listen 0.0.0.0:9000 > "$DIR/recv.log" &
PIDS+=($!)
sleep 0.3
head -c $((1 << 29)) /dev/urandom > "$DIR/blob"
ip netns exec "$NS" python3 tests/py/peer.py send-file 198.18.0.1 9000 --file "$DIR/blob" > "$DIR/send.log" &
SENDER=$!
sleep 1
$BIN/hoststackctl --socket-dir "$DIR" sessions || true
wait $SENDER || true
sleep 0.5
cat "$DIR/recv.log" | grep received || true

step "6/9 cut-through: two native apps through a shared FIFO pair (1 GiB; both ends compute SHA-256, which bounds this rate)"
$EX/throughput recv --listen 127.0.0.1:9100 > "$DIR/ct.log" &
PIDS+=($!)
sleep 0.3
$EX/throughput send --connect 127.0.0.1:9100 --bytes $((1 << 30))
sleep 0.3
grep received "$DIR/ct.log" || true

step "7/9 unmodified nginx under the shim (hoststack run), kernel curl + wrk in the peer namespace"
mkdir -p "$DIR/www" && head -c 64 /dev/urandom | base64 | head -c 64 > "$DIR/www/index.html"
chmod -R a+rX "$DIR"
cat > "$DIR/nginx.conf" <<EOF2
worker_processes 2; daemon off; pid $DIR/nginx.pid; error_log $DIR/nginx.err warn;
events { worker_connections 1024; }
http { access_log off; server { listen 198.18.0.1:8080; listen 127.0.0.1:8081; root $DIR/www; } }
EOF2
$BIN/hoststack run -- nginx -c "$DIR/nginx.conf" -p "$DIR" &
PIDS+=($!)
for _ in $(seq 100); do ip netns exec "$NS" curl -s -o /dev/null --max-time 1 http://198.18.0.1:8080/ && break; sleep 0.1; done
if ip netns exec "$NS" curl -s http://198.18.0.1:8080/ | cmp -s - "$DIR/www/index.html"; then
    echo "curl from the peer namespace: body matches"
else
    echo "curl from the peer namespace: body DIFFERS" >&2
fi
ip netns exec "$NS" wrk -t1 -c16 -d2s http://198.18.0.1:8080/ | grep -E "Requests/sec|errors" || true
$BIN/hoststackctl --socket-dir "$DIR" apps

step "8/9 unmodified Envoy $(envoy_version) under the shim in front of that nginx (Envoy -> nginx: cut-through)"
$BIN/hoststack-envoy --listen 198.18.0.1:10000 --upstream 127.0.0.1:8081 --admin 127.0.0.1:19901 \
    --concurrency 2 --dir "$DIR/envoy" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null --max-time 1 http://127.0.0.1:19901/ready && break; sleep 0.1; done
for _ in $(seq 50); do ip netns exec "$NS" curl -s -o /dev/null --max-time 1 http://198.18.0.1:10000/ && break; sleep 0.1; done
if ip netns exec "$NS" curl -s http://198.18.0.1:10000/ | cmp -s - "$DIR/www/index.html"; then
    echo "curl from the peer namespace through Envoy: body matches"
else
    echo "curl from the peer namespace through Envoy: body DIFFERS" >&2
fi
ip netns exec "$NS" wrk -t1 -c32 -d4s http://198.18.0.1:10000/ > "$DIR/wrk-envoy.txt" &
WRK=$!
sleep 2
echo "-- hoststackctl sessions while wrk -> Envoy -> nginx runs (first 14 sessions):"
$BIN/hoststackctl --socket-dir "$DIR" sessions | sed -n '/^SESSIONS/,$p' | head -16 || true
wait $WRK || true
grep -E "requests in|Requests/sec|errors|Non-2xx" "$DIR/wrk-envoy.txt" || true
echo "-- Envoy's own counters (admin endpoint):"
curl -s "http://127.0.0.1:19901/stats?filter=^(http.ingress.downstream_rq_(2xx|5xx)|cluster.upstream.upstream_cx_total)$" || true

step "9/9 final hoststackctl view"
$BIN/hoststackctl --socket-dir "$DIR" workers || true
$BIN/hoststackctl --socket-dir "$DIR" counters --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["counters"]; print("counters: " + ", ".join("%s.%s=%s" % (g, k, v) for g in ("stack", "session") for k, v in sorted(c.get(g, {}).items()) if v))' || true

step "kernel vs hoststack, side by side (target/release/hoststack-bench --http-only: nginx with sendfile on and off, new connections, Envoy c1/c2; about 2 minutes)"
cleanup
trap - EXIT
$BIN/hoststack-bench --reps 3 --http-secs 2 --no-scale --http-only
echo
echo "demo finished"
