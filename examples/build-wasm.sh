#!/usr/bin/env bash
# Builds the WebAssembly examples offline with Debian's packages:
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32 rustc libstd-rust-dev-wasm32
# usage: examples/build-wasm.sh OUTPUT_DIR   (writes upper.wasm from C, wordcount.wasm from Rust)
# Exits 3 when the packages are missing.
set -euo pipefail
out="$(realpath -m "${1:?usage: build-wasm.sh OUTPUT_DIR}")"
here="$(cd "$(dirname "$0")" && pwd)"
# Debian's rustc, not rustup's (first on PATH, without the wasm32-wasi standard library).
rustc=/usr/bin/rustc
command -v clang >/dev/null || { echo "build-wasm.sh: clang is missing (see the apt-get line at the top)" >&2; exit 3; }
command -v wasm-ld >/dev/null || { echo "build-wasm.sh: wasm-ld is missing (package lld)" >&2; exit 3; }
[[ -f /usr/lib/wasm32-wasi/libc.a ]] || { echo "build-wasm.sh: wasi-libc is missing" >&2; exit 3; }
compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null \
  || { echo "build-wasm.sh: clang's wasm32 runtime is missing (libclang-rt-14-dev-wasm32)" >&2; exit 3; }
[[ -x "$rustc" && -d /usr/lib/rustlib/wasm32-wasi ]] \
  || { echo "build-wasm.sh: Debian's rustc with libstd-rust-dev-wasm32 is missing" >&2; exit 3; }
mkdir -p "$out"
clang --target=wasm32-wasi --sysroot=/usr -O2 -Wl,--strip-all -o "$out/upper.wasm" "$here/wasm-c/upper.c"
"$rustc" --edition 2021 --target wasm32-wasi -O -C strip=symbols -o "$out/wordcount.wasm" "$here/wasm-rust/src/main.rs"
