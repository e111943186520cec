#!/usr/bin/env bash
# Builds the example Go plugin offline in GOPATH mode with Debian's packages:
#   apt-get install golang-go golang-github-hashicorp-go-plugin-dev golang-google-grpc-dev \
#                   golang-goprotobuf-dev protobuf-compiler
# usage: examples/go-plugin/build.sh OUTPUT [--host]
#   (--host builds the benchmarks' go-plugin host, host/main.go, instead of the plugin)
set -euo pipefail
out="$(realpath -m "${1:?usage: build.sh OUTPUT}")"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for tool in go protoc protoc-gen-go; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (see the apt-get line at the top)" >&2; exit 3; }
done
export GO111MODULE=off GOPATH="$work:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$root/target/go-cache}"
mkdir -p "$work/bin" "$work/src/mycelium-example-go-plugin"
if ! command -v protoc-gen-go-grpc >/dev/null; then
  # golang-google-grpc-dev ships the generator as source.
  go build -o "$work/bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc
fi
export PATH="$work/bin:$PATH"
# One protoc run per Go package.
for proto in io/cloudevents/v1/cloudevents.proto mycelium/function/v1/function.proto; do
  protoc -I "$root/proto" -I /usr/include --go_out="$work/src" --go-grpc_out="$work/src" "$root/proto/$proto"
done
if [ "${2:-}" = "--host" ]; then
  # The benchmarks' go-plugin host (examples/go-plugin/host), instead of the plugin.
  mkdir -p "$work/src/mycelium-go-host"
  cp "$here/host/main.go" "$work/src/mycelium-go-host/"
  go build -o "$out" mycelium-go-host
  exit 0
fi
cp "$here/main.go" "$work/src/mycelium-example-go-plugin/"
go build -o "$out" mycelium-example-go-plugin
