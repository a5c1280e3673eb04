#!/usr/bin/env bash
# Builds every plugin in this folder as a wasm32-wasip2 component into
# plugins/target/wasm32-wasip2/release/*.wasm, installing the target first if
# it is missing. Plugins are built one at a time because each enables a
# different hook feature of the SDK. The target directory is set explicitly:
# the tests and benches look for the components there, whatever
# CARGO_TARGET_DIR says.
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
for p in route-by-header content-filter tenant-priority hot-key-fanout retry-backoff versioned-route hostile probe; do
    cargo build --quiet --release --target wasm32-wasip2 --target-dir target -p "$p"
done
ls target/wasm32-wasip2/release/*.wasm | sed 's/^/built /'
