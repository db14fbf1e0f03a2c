#!/usr/bin/env bash
# The peer comparison: Lichen, NATS JetStream KV (R3) and etcd, three nodes each on loopback,
# the same load for all, measured back to back; prints one table with ratios.
#
#   bench/peers/run.sh [--rounds 2] [--seconds 10] [--only lichen,nats,etcd[,lichen-nofsync]] [--writes 1000]
#                      [--clients 8] [--keys 10000] [--ip-base 140] [--json FILE]
#
# Needs `cargo build --release -p lichen-agent` (or LICHEN_BIN=/path/to/lichen). Installs etcd,
# nats-server (Debian) and the Python client for NATS (venv in bench/peers/.venv) on first use.
# Every process it starts, and its data directory, is gone when it exits, however it exits.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export LICHEN_BIN="${LICHEN_BIN:-$repo/target/release/lichen}"

if [ ! -x "$here/.venv/bin/python" ] || ! command -v etcd >/dev/null || ! command -v nats-server >/dev/null; then
    "$here/setup.sh"
fi

# Bound: per system and round the load, 2 min of set-up, latency and catch-up at most.
rounds=2 seconds=10 nsys=3
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --rounds) rounds="${args[$((i + 1))]}" ;;
        --seconds) seconds="${args[$((i + 1))]}" ;;
        --only) nsys=$(tr ',' '\n' <<<"${args[$((i + 1))]}" | grep -c .) ;;
    esac
done
bound=$(python3 -c "print(int($rounds * $nsys * ($seconds + 180)))")

work="$(mktemp -d /tmp/lichen-peers-run.XXXXXX)"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The harness's servers die with it (PR_SET_PDEATHSIG); its temporary files go under $work.
TMPDIR="$work" timeout -k 10 "$bound" "$here/.venv/bin/python" "$here/peers.py" "$@" &
pid=$!
wait "$pid"
