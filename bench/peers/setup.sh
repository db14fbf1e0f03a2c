#!/usr/bin/env bash
# Installs what the peer comparison needs: etcd and nats-server from Debian, and a venv with the
# Python client for NATS under bench/peers/.venv. Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v etcd >/dev/null || ! command -v nats-server >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get install -y etcd-server etcd-client nats-server
    # The Debian packages enable a service each; the bench starts its own processes.
    $sudo systemctl disable --now etcd nats-server >/dev/null 2>&1 || true
fi
if [ ! -x "$here/.venv/bin/python" ]; then
    python3 -m venv "$here/.venv"
fi
"$here/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
echo "ready: etcd $(etcd --version | head -1 | awk '{print $3}'), nats-server $(nats-server --version | awk '{print $2}'), $("$here/.venv/bin/python" --version)"
