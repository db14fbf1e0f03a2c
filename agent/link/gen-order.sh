#!/bin/sh
# Regenerate agent/link/lichen.order, the function order the release `lichen` binary is linked
# with (see agent/build.rs). It lists, by mangled name, every function of the binary that runs
# while an agent starts and while a second one joins it, and while they serve puts/gets/status and sync, as recorded by
# valgrind's callgrind. Run from the workspace root after changing the toolchain, the
# dependencies (Cargo.lock) or the release profile: symbol names carry hashes of those, and
# names the linker does not find are ignored (the binary still works, only its layout degrades).
#   sh agent/link/gen-order.sh
set -eu
T=${CARGO_TARGET_DIR:-target}
cargo build --release -p lichen-agent
W=$(mktemp -d)
V= N=
trap 'kill $N $V 2>/dev/null || true; rm -rf "$W"' EXIT
cp "$T/release/lichen" "$W/lichen"
B="$W/lichen"
A1=127.0.0.1:27421 A2=127.0.0.1:27423
# The API wants each agent's token (api.token in its data directory).
la() { "$B" --api $A1 --token-file "$W/a/api.token" "$@"; }
lb() { "$B" --api $A2 --token-file "$W/b/api.token" "$@"; }
valgrind --tool=callgrind --demangle=no --compress-strings=no --callgrind-out-file="$W/cg" \
    "$B" --api $A1 run --data-dir "$W/a" --listen 127.0.0.1:27422 >"$W/a.log" 2>&1 &
V=$!
i=0; until la status >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 120 ] || exit 1; sleep 1; done
TOKEN=$(la --json status | sed -n 's/.*"join_token": *"\([^"]*\)".*/\1/p')
valgrind --tool=callgrind --demangle=no --compress-strings=no --callgrind-out-file="$W/cg.b" \
    "$B" --api $A2 run --data-dir "$W/b" --listen 127.0.0.1:27424 --join "$TOKEN" >"$W/b.log" 2>&1 &
N=$!
i=0; until lb status >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 120 ] || exit 1; sleep 1; done
ID=$(lb --json status | tr -d '\n ' | sed -n 's/.*"node":{"id":"\([0-9a-f]*\)".*/\1/p')
la members add "$ID" --role writer --name b >/dev/null
sleep 5
for k in 1 2 3 4 5 6 7 8 9 10; do la put app "k$k" "{\"v\": $k}" >/dev/null; done
# Scalar puts take the writer's fast path, and the followers' fast forward.
for k in 1 2 3 4 5 6 7 8 9 10; do la put hot n "$k" >/dev/null; done
lb put app b '"from b"' >/dev/null
lb put hot n '"from b"' >/dev/null
sleep 3
la get app >/dev/null; la ls >/dev/null; la status >/dev/null
la members ls >/dev/null; la history app >/dev/null
sleep 2
kill -INT $N $V; wait $V || true; wait $N || true; V= N=
awk '/^ob=/{ob=$0} /^fn=/{ if (ob ~ /\/lichen$/ && $0 !~ /^fn=(0x|\(below)/) print substr($0,4)}' "$W/cg" "$W/cg.b" |
    sort -u >agent/link/lichen.order
wc -l agent/link/lichen.order
