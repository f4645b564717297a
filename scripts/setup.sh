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
command -v gcc >/dev/null || need+=(gcc)
command -v unshare >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    echo "setup.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo (Rust toolchain) is required" >&2; exit 1; }
