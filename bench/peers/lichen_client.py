"""Lichen for the peer comparison: three agents over the HTTP API, one document `kv`.

The cluster is set up as `agent/examples/bench.rs` does it: agent 1 founds it, 2 and 3 join
with its token and are added as writers through agent 1's `POST /v1/members`. A put is
`PUT /v1/docs/kv/<key>` with a JSON string body on a kept-alive connection; it is
answered once the write is fsynced on the agent that took it (`fsync = "local"`). Visibility is
watched with `GET /v1/docs/kv/lat?watch` (Server-Sent Events); agreement is the same heads of
`kv` in every agent's `/v1/status`. Every request carries the agent's API token
(`Authorization: Bearer`, read from `api.token` in its data directory)."""

import http.client
import json
import os
import queue
import random
import threading
import time

import common

NAME = "Lichen"
DOC = "kv"

# The token file of each agent by API address ("ip:port"), filled as the agents start, and
# passed to the load's client processes (started with "spawn") in their environment.
TOKEN_FILES = {}
TOKEN_FILES_ENV = "LICHEN_BENCH_TOKEN_FILES"


def auth(addr):
    """The `Authorization` header for the agent at `addr` (none before its token exists)."""
    files = TOKEN_FILES or json.loads(os.environ.get(TOKEN_FILES_ENV, "{}"))
    try:
        with open(files[addr]) as f:
            return {"Authorization": "Bearer " + f.read().strip()}
    except (KeyError, OSError):
        return {}


class Http:
    """A kept-alive HTTP/1.1 connection; http.client sends a small request in one write."""

    def __init__(self, addr, timeout=30):
        host, port = addr.rsplit(":", 1)
        self.host, self.port, self.timeout = host, int(port), timeout
        self.auth = auth(addr)
        self.addr = addr
        self.conn = None

    def call(self, method, path, body=None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                if not self.auth:
                    self.auth = auth(self.addr)
                headers = {"Content-Type": "application/json"} if body is not None else {}
                headers.update(self.auth)
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def json(self, method, path, body=None):
        status, data = self.call(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} answered {status}: {data[:200]!r}")
        return json.loads(data)


def put_path(key):
    return f"/v1/docs/{DOC}/{key}"


class Cluster:
    def __init__(self, root, ips, opts):
        self.root = os.path.join(root, "lichen")
        self.ips = ips
        self.bin = opts["lichen_bin"]
        self.fsync = opts.get("lichen_fsync", "local")
        self.procs = []
        self.apis = []
        self.data_dirs = []

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    @property
    def endpoints(self):
        return self.apis

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        config = os.path.join(self.root, "agent.toml")
        with open(config, "w") as f:
            f.write(f'log = "warn"\nfsync = "{self.fsync}"\n')
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        token = None
        for i, ip in enumerate(self.ips):
            name = f"n{i + 1}"
            api = f"{ip}:{common.free_port(ip)}"
            listen = f"{ip}:{common.free_port(ip)}"
            data = os.path.join(self.root, name)
            args = [self.bin, "--api", api, "run", "--name", name, "--data-dir", data,
                    "--config", config, "--listen", listen]
            if token:
                args += ["--join", token]
            self.procs.append(common.spawn(args, os.path.join(self.root, f"{name}.log"), env))
            self.apis.append(api)
            self.data_dirs.append(data)
            TOKEN_FILES[api] = os.path.join(data, "api.token")
            os.environ[TOKEN_FILES_ENV] = json.dumps(TOKEN_FILES)
            h = Http(api, timeout=5)
            st = common.wait_until(f"lichen {name} to start", 20,
                                   lambda: h.json("GET", "/v1/status"))
            if token is None:
                token = st["join_token"]
            else:
                body = json.dumps({"id": st["node"]["id"], "role": "writer", "name": name})
                Http(self.apis[0]).json("POST", "/v1/members", body.encode())
        for api in self.apis:
            h = Http(api, timeout=5)

            def connected():
                s = h.json("GET", "/v1/status")
                return s["node"]["role"] != "not a member" and sum(
                    1 for p in s["peers"] if p["connected"]) == 2

            common.wait_until("the lichen cluster to connect", 30, connected)
        # The document exists on every agent before the measurements start.
        Http(self.apis[0]).json("PUT", put_path("lat"), json.dumps("start").encode())
        common.wait_until("the document on every agent", 10, self.agree)

    def heads(self, api):
        s = Http(api, timeout=5).json("GET", "/v1/status")
        for d in s["docs"]:
            if d["doc"] == DOC:
                return tuple(d["heads"])
        return ()

    def agree(self):
        hs = [self.heads(a) for a in self.apis]
        return bool(hs[0]) and all(h == hs[0] for h in hs)

    def latency(self, n, timeout=10):
        """`n` sequential writes through agent 1, each until agents 2 and 3 showed it."""
        q = queue.Queue()
        stop = threading.Event()
        watchers = [threading.Thread(target=_watch, args=(api, q, stop), daemon=True)
                    for api in self.apis[1:]]
        for t in watchers:
            t.start()
        rng = random.Random(1)
        w = Http(self.apis[0])
        # Each watcher first sends the current value; wait until both are following.
        w.json("PUT", put_path("lat"), json.dumps(common.value(rng, "-1")).encode())
        _wait_seen(q, "-1", 2, time.monotonic() + timeout)
        out = []
        for i in range(n):
            v = common.value(rng, str(i))
            t0 = time.perf_counter()
            w.json("PUT", put_path("lat"), json.dumps(v).encode())
            t1 = _wait_seen(q, str(i), 2, time.monotonic() + timeout)
            out.append(t1 - t0)
        stop.set()
        return out

    DIAG = ["lichen_writes_total", "lichen_changes_sent_total", "lichen_changes_received_total",
            "lichen_sync_messages_received_total", "lichen_send_dropped_total",
            "lichen_apply_latency_seconds_sum", "lichen_apply_latency_seconds_count",
            "lichen_write_latency_seconds_sum", "lichen_write_latency_seconds_count"]

    def diag(self):
        """Some of each agent's counters (`GET /metrics`), for the per-round notes."""
        out = []
        for api in self.apis:
            _, text = Http(api, timeout=5).call("GET", "/metrics")
            m = {}
            for line in text.decode().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] in self.DIAG:
                    m[parts[0].removeprefix("lichen_")] = float(parts[1])
            out.append(m)
        return out

    def stop(self):
        common.stop_all(self.procs)


def _wait_seen(q, tag, count, deadline):
    """Wait until `count` watchers reported the value tagged `tag`; the last arrival time."""
    seen, last = set(), 0.0
    while len(seen) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"write {tag} not seen on all nodes in time")
        try:
            who, t, at = q.get(timeout=left)
        except queue.Empty:
            continue
        if t == tag and who not in seen:
            seen.add(who)
            last = max(last, at)
    return last


def _watch(api, q, stop):
    host, port = api.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("GET", f"/v1/docs/{DOC}/lat?watch", headers=auth(api))
    r = c.getresponse()
    while not stop.is_set():
        line = r.readline()
        if not line:
            return
        if line.startswith(b"data:"):
            at = time.perf_counter()
            try:
                v = json.loads(line[5:])["value"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(v, str):
                q.put((api, v.split(":", 1)[0], at))


def load(endpoint, go, seed, keys):
    """One client: connects, then (once `go()` returned the end time) puts a new value at a
    random key, one in flight, until the end; the latencies of the answered puts and the count
    of failed ones."""
    rng = random.Random(seed)
    h = Http(endpoint)
    h.call("GET", "/v1/health")
    lat, errors = [], 0
    end_at = go()
    while time.time() < end_at:
        body = json.dumps(common.value(rng)).encode()
        path = put_path(f"k{rng.randrange(keys)}")
        t0 = time.perf_counter()
        try:
            status, _ = h.call("PUT", path, body)
        except (OSError, http.client.HTTPException):
            status = 0
        if status == 200:
            lat.append(time.perf_counter() - t0)
        else:
            errors += 1
    return lat, errors
