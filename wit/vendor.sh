#!/usr/bin/env bash
# Vendors the WASI 0.2 WIT packages that `world.wit` imports, taken from the wasmtime-wasi-http
# crate the host links, so that guest and host agree on the exact wasi:http version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(grep -A1 'name = "wasmtime-wasi-http"' "$here/../Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"wasmtime-wasi-http-$version"/wit/deps | head -n 1)
rm -rf "$here/deps" && mkdir -p "$here/deps"
cp "$src"/*.wit "$here/deps/"
echo "vendored WASI WIT from wasmtime-wasi-http $version"
