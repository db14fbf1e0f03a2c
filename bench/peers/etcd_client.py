"""etcd for the peer comparison: three `etcd` members (Debian's etcd-server, 3.4), reached
through the v3 HTTP/JSON gateway with the standard library.

A put is `POST /v3/kv/put` on a kept-alive connection, answered once the Raft leader has it
on a quorum and the member applied it. Visibility is a `POST /v3/watch` stream on the node.
Agreement is the same revision in every member's serializable (local) read."""

import base64
import json
import os
import queue
import random
import threading
import time

import common
from lichen_client import Http, _wait_seen

NAME = "etcd"


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class Cluster:
    def __init__(self, root, ips, opts):
        self.root = os.path.join(root, "etcd")
        self.ips = ips
        self.bin = opts.get("etcd_bin", "etcd")
        self.procs = []
        self.clients = []
        self.data_dirs = []

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    @property
    def endpoints(self):
        return self.clients

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        client = [common.free_port(ip) for ip in self.ips]
        peer = [common.free_port(ip) for ip in self.ips]
        initial = ",".join(f"n{i + 1}=http://{ip}:{peer[i]}" for i, ip in enumerate(self.ips))
        for i, ip in enumerate(self.ips):
            name = f"n{i + 1}"
            data = os.path.join(self.root, name)
            args = [
                self.bin, "--name", name, "--data-dir", data,
                "--listen-client-urls", f"http://{ip}:{client[i]}",
                "--advertise-client-urls", f"http://{ip}:{client[i]}",
                "--listen-peer-urls", f"http://{ip}:{peer[i]}",
                "--initial-advertise-peer-urls", f"http://{ip}:{peer[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", "bench", "--logger", "zap", "--log-level", "warn",
            ]
            self.procs.append(common.spawn(args, os.path.join(self.root, f"{name}.log")))
            self.clients.append(f"{ip}:{client[i]}")
            self.data_dirs.append(data)
        put = json.dumps({"key": b64("lat"), "value": b64("start")}).encode()
        common.wait_until("the etcd cluster to take a write", 30,
                          lambda: Http(self.clients[0], timeout=5).json("POST", "/v3/kv/put", put))
        common.wait_until("the write on every member", 10, self.agree)

    def revision(self, addr):
        body = json.dumps({"key": b64("lat"), "serializable": True}).encode()
        return int(Http(addr, timeout=5).json("POST", "/v3/kv/range", body)["header"]["revision"])

    def agree(self):
        revs = [self.revision(a) for a in self.clients]
        return all(r == revs[0] for r in revs)

    def latency(self, n, timeout=10):
        q = queue.Queue()
        stop = threading.Event()
        for addr in self.clients[1:]:
            threading.Thread(target=_watch, args=(addr, q, stop), daemon=True).start()
        rng = random.Random(1)
        w = Http(self.clients[0])

        def put(v):
            w.json("POST", "/v3/kv/put", json.dumps({"key": b64("lat"), "value": b64(v)}).encode())

        # The watch sends nothing for the current value: write until both watchers are on.
        deadline = time.monotonic() + timeout
        while True:
            put(common.value(rng, "-1"))
            try:
                _wait_seen(q, "-1", 2, time.monotonic() + 0.5)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        out = []
        for i in range(n):
            v = common.value(rng, str(i))
            t0 = time.perf_counter()
            put(v)
            out.append(_wait_seen(q, str(i), 2, time.monotonic() + timeout) - t0)
        stop.set()
        return out

    def stop(self):
        common.stop_all(self.procs)


def _watch(addr, q, stop):
    import http.client

    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("POST", "/v3/watch", body=json.dumps({"create_request": {"key": b64("lat")}}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    while not stop.is_set():
        line = r.readline()  # the gateway sends one JSON object per line
        if not line:
            return
        at = time.perf_counter()
        try:
            events = json.loads(line)["result"].get("events") or []
        except (ValueError, KeyError, AttributeError):
            continue
        for e in events:
            v = base64.b64decode(e["kv"].get("value", "")).decode(errors="replace")
            q.put((addr, v.split(":", 1)[0], at))


def load(endpoint, go, seed, keys):
    import http.client

    rng = random.Random(seed)
    h = Http(endpoint)
    h.call("GET", "/health")
    lat, errors = [], 0
    end_at = go()
    while time.time() < end_at:
        body = json.dumps({"key": b64(f"k{rng.randrange(keys)}"),
                           "value": b64(common.value(rng))}).encode()
        t0 = time.perf_counter()
        try:
            status, _ = h.call("POST", "/v3/kv/put", body)
        except (OSError, http.client.HTTPException):
            status = 0
        if status == 200:
            lat.append(time.perf_counter() - t0)
        else:
            errors += 1
    return lat, errors
