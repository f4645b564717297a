#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the integration
# tests that run a real hoststackd against kernel peers in network namespaces.
# Usage: scripts/test.sh   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TERM_COLOR=never
echo "== fmt"; cargo fmt --all -- --check
echo "== clippy"; cargo clippy --release --workspace --all-targets -- -D warnings
echo "== docs (broken links, bad HTML in rustdoc)"; RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items
echo "== build (release: the integration tests run these binaries)"
cargo build --release --workspace --lib --bins --examples
echo "== tests"
cargo test --release --workspace -- --test-threads=2
