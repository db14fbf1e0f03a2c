#!/bin/sh
# The README's walk-through as one script: start an agent, write a document, watch the
# template render an nginx upstream block, change it, preview a template edit with a dry
# run. The agent is stopped at the end (run/ stays for inspection).
#
#   LICHEN=/path/to/lichen ./demo.sh      (default: `lichen` in PATH, else ../../target/*/lichen)
set -eu
cd "$(dirname "$0")"

LICHEN=${LICHEN:-$(command -v lichen || ls ../../target/release/lichen ../../target/debug/lichen 2>/dev/null | head -n 1)}
[ -x "$LICHEN" ] || { echo "build lichen first: cargo build --release -p lichen-agent" >&2; exit 1; }
# The CLI finds the agent through the config file: its data directory's socket (or its
# `api` address with the token in the data directory).
CLI="--config lichen.toml"
PID=
cleanup() { kill $PID 2>/dev/null || true; }
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_until() {
    what=$1; shift
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 200 ] || { echo "timed out: $what" >&2; exit 1; }
        sleep 0.1
    done
}

# The template may read DEPLOY_ENV (env = ["DEPLOY_ENV"] in lichen.toml). `lichen render`
# reads its own environment, so export it for both.
export DEPLOY_ENV=staging
rm -rf run && mkdir -p run
step "start the agent; the template reads app/nginx, which does not exist yet: it waits"
"$LICHEN" run --config lichen.toml 2>>run/agent.log & PID=$!
wait_until "agent" "$LICHEN" $CLI status
"$LICHEN" $CLI status | sed -n '/^bindings/,$p'

step "write the document: the upstream block is rendered, checked and reloaded"
"$LICHEN" $CLI put app/nginx '' '{"name": "web", "port": 8080, "servers": ["10.0.0.2:80", "10.0.0.1:80"]}'
wait_until "rendered" grep -q "10.0.0.1" run/upstream.conf
cat run/upstream.conf
wait_until "reloaded" test -s run/reloads.log

step "add a server: only the changed file is rewritten, and reloaded once"
"$LICHEN" $CLI put app/nginx servers '["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]'
wait_until "re-rendered" grep -q "10.0.0.3" run/upstream.conf
wait_until "reloaded twice" sh -c '[ $(wc -l < run/reloads.log) -ge 2 ]'
cat run/reloads.log run/check.log

step "status: what each binding last rendered, from which heads, and what the commands said"
"$LICHEN" $CLI status | sed -n '/^bindings/,$p'

step "preview a template edit without writing anything (dry run with a diff)"
sed 's/ max_fails=/ fail_timeout=10s max_fails=/' upstream.conf.tmpl > run/edited.tmpl
cp upstream.conf.tmpl run/original.tmpl && cp run/edited.tmpl upstream.conf.tmpl
"$LICHEN" $CLI render --dry-run || true
cp run/original.tmpl upstream.conf.tmpl
echo "(template restored; run/upstream.conf was not touched)"

step "render a template once to stdout, for developing it"
"$LICHEN" $CLI render --template upstream.conf.tmpl --env DEPLOY_ENV | head -n 6
