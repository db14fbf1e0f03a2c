#!/bin/sh
# The README's walk-through as one script: two agents on loopback, a document rendered into
# a file on each, edits of either file propagating, an invalid edit ignored, a check refusing
# a bad value, and a partition with concurrent edits that merge. Cleans up after itself
# (the run/ directory stays for inspection).
#
#   LICHEN=/path/to/lichen ./demo.sh      (default: `lichen` in PATH, else ../../target/*/lichen)
set -eu
cd "$(dirname "$0")"

LICHEN=${LICHEN:-$(command -v lichen || ls ../../target/release/lichen ../../target/debug/lichen 2>/dev/null | head -n 1)}
[ -x "$LICHEN" ] || { echo "build lichen first: cargo build --release -p lichen-agent" >&2; exit 1; }
# The API address, and the data directory the CLI reads the API token from.
A="127.0.0.1:7521 --data-dir run/a/data"
B="127.0.0.1:7531 --data-dir run/b/data"
PIDA= PIDB=
cleanup() { kill $PIDA $PIDB 2>/dev/null || true; }
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# wait_until DESCRIPTION COMMAND...: retry for up to 20 s.
wait_until() {
    what=$1; shift
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 200 ] || { echo "timed out: $what" >&2; exit 1; }
        sleep 0.1
    done
}
has() { grep -q "$2" "$1"; }
start_a() { "$LICHEN" run --config lichen.toml 2>>run/a/agent.log & PIDA=$!; wait_until "agent a" "$LICHEN" --api $A status; }
start_b() { "$LICHEN" run --config lichen-b.toml 2>>run/b/agent.log & PIDB=$!; wait_until "agent b" "$LICHEN" --api $B status; }

rm -rf run && mkdir -p run/a run/b

step "start node a (founds a cluster); its file does not exist yet and is not created from nothing"
start_a
TOKEN=$("$LICHEN" --api $A status | sed -n 's/^join *lichen run --join //p')
echo "join token: $TOKEN"

step "node b joins; node a makes it a writer"
BID=$("$LICHEN" init --config lichen-b.toml --join "$TOKEN")
start_b
"$LICHEN" --api $A members add "$BID" --role writer --name b --addr 127.0.0.1:7530
wait_until "b is a writer" sh -c "'$LICHEN' --api $B status | grep -q 'writer)'"

step "write the document on a: both files are rendered, both services reloaded"
"$LICHEN" --api $A put app/web '' '{"port": 8080, "workers": 2, "server_name": "example.org"}'
wait_until "b rendered" has run/b/web.json 8080
wait_until "a rendered" has run/a/web.json 8080
cat run/b/web.json
wait_until "b reloaded" has run/b/reloads.log 8080
cat run/a/reloads.log run/b/reloads.log 2>/dev/null || true

step "edit the file on b with sed -i: the change reaches a's document and file"
sed -i 's/"workers": 2/"workers": 8/' run/b/web.json
wait_until "a's file updated" has run/a/web.json '"workers": 8'
"$LICHEN" --api $A get app/web

step "an invalid edit on a is ignored: the document and b's file keep the last good value"
printf '{"port": 8080, "workers": \n' > run/a/web.json
wait_until "a logged it" has run/a/agent.log "ignoring an invalid edit"
grep "ignoring an invalid edit" run/a/agent.log | tail -n 1
"$LICHEN" --api $A get app/web workers
printf 'file on a, left as written: '; cat run/a/web.json

step "a value the check refuses (port 70000) is not applied either"
printf '{"port": 70000, "server_name": "example.org", "workers": 8}\n' > run/a/web.json
wait_until "a logged it" has run/a/agent.log "check refused the edit"
"$LICHEN" --api $A get app/web port

step "fix the file on a (write a new file, rename it over): applied everywhere"
printf '{"port": 8081, "server_name": "example.org", "workers": 8}\n' > run/a/.web.json.new
mv run/a/.web.json.new run/a/web.json
wait_until "b's file updated" has run/b/web.json 8081
cat run/b/web.json

step "partition: stop b; edit on a; stop a; start b; edit on b; start a again"
kill $PIDB; wait $PIDB 2>/dev/null || true
sed -i 's/"workers": 8/"workers": 16/; s/example.org/a.example.org/' run/a/web.json
wait_until "a applied its edit" sh -c "'$LICHEN' --api $A get app/web workers | grep -q 16"
kill $PIDA; wait $PIDA 2>/dev/null || true
start_b
sed -i 's/"port": 8081/"port": 9000/; s/example.org/b.example.org/' run/b/web.json
wait_until "b applied its edit" sh -c "'$LICHEN' --api $B get app/web port | grep -q 9000"
start_a

step "healed: both edits survive (workers from a, port from b); server_name was edited on both"
wait_until "files identical and merged" sh -c 'cmp -s run/a/web.json run/b/web.json && grep -q 9000 run/a/web.json && grep -q 16 run/a/web.json'
cat run/a/web.json
echo "lichen conflicts app/web server_name (winner first, the same on every node):"
"$LICHEN" --api $A conflicts app/web server_name
"$LICHEN" --api $B conflicts app/web server_name

step "reloads: one line per effective change of each file (renders and local edits)"
wait_until "a reloaded the merge" has run/a/reloads.log 9000
wait_until "b reloaded the merge" has run/b/reloads.log 16
cat run/a/reloads.log run/b/reloads.log
echo
echo "done; agent logs are in run/a/agent.log and run/b/agent.log"
