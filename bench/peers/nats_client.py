"""NATS JetStream KV for the peer comparison: three `nats-server`s in one cluster, one KV bucket
with three replicas (R3), history 1, file storage, the servers' defaults otherwise.

A put is `kv.put` (nats-py), answered once the stream's leader has the message on a quorum
(2 of 3). Visibility is a `kv.watch` on a connection to the node. Agreement is the same last
sequence of the bucket's stream in every server's own `/jsz` monitoring answer."""

import asyncio
import json
import os
import random
import time
import urllib.request

import nats

import common

NAME = "NATS"
BUCKET = "bench"


class Cluster:
    def __init__(self, root, ips, opts):
        self.root = os.path.join(root, "nats")
        self.ips = ips
        self.bin = opts.get("nats_bin", "nats-server")
        self.procs = []
        self.urls = []
        self.monitors = []
        self.data_dirs = []

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    @property
    def endpoints(self):
        return self.urls

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        client = [common.free_port(ip) for ip in self.ips]
        route = [common.free_port(ip) for ip in self.ips]
        mon = [common.free_port(ip) for ip in self.ips]
        routes = ", ".join(f'"nats-route://{ip}:{p}"' for ip, p in zip(self.ips, route))
        for i, ip in enumerate(self.ips):
            name = f"n{i + 1}"
            data = os.path.join(self.root, name)
            conf = os.path.join(self.root, f"{name}.conf")
            with open(conf, "w") as f:
                f.write(
                    f'server_name: {name}\nlisten: "{ip}:{client[i]}"\nhttp: "{ip}:{mon[i]}"\n'
                    f'jetstream {{ store_dir: "{data}" }}\n'
                    f'cluster {{ name: bench\n  listen: "{ip}:{route[i]}"\n  routes: [{routes}]\n}}\n'
                )
            self.procs.append(
                common.spawn([self.bin, "-c", conf], os.path.join(self.root, f"{name}.log")))
            self.urls.append(f"nats://{ip}:{client[i]}")
            self.monitors.append(f"http://{ip}:{mon[i]}")
            self.data_dirs.append(data)
        asyncio.run(self._create_bucket())
        common.wait_until("the bucket on every server", 10, self.agree)

    async def _create_bucket(self):
        nc = await _connect(self.urls[0])
        try:
            js = nc.jetstream()

            async def create():
                try:
                    return await js.create_key_value(bucket=BUCKET, history=1, replicas=3)
                except Exception:
                    return None  # no JetStream meta leader yet

            deadline = time.monotonic() + 30
            kv = None
            while kv is None:
                kv = await create()
                if kv is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError("could not create the NATS KV bucket in 30 s")
                    await asyncio.sleep(0.2)
            await kv.put("lat", b"start")
        finally:
            await nc.close()

    def last_seq(self, monitor):
        with urllib.request.urlopen(f"{monitor}/jsz?accounts=true&streams=true", timeout=5) as r:
            j = json.load(r)
        for acc in j.get("account_details") or []:
            for s in acc.get("stream_detail") or []:
                if s["name"] == f"KV_{BUCKET}":
                    return s["state"]["last_seq"]
        return None

    def agree(self):
        seqs = [self.last_seq(m) for m in self.monitors]
        return seqs[0] is not None and all(s == seqs[0] for s in seqs)

    def latency(self, n, timeout=10):
        return asyncio.run(self._latency(n, timeout))

    async def _latency(self, n, timeout):
        conns = [await _connect(u) for u in self.urls]
        try:
            kv = await conns[0].jetstream().key_value(BUCKET)
            arrivals = asyncio.Queue()

            async def watch(i, nc):
                w = await (await nc.jetstream().key_value(BUCKET)).watch("lat")
                async for e in w:
                    if e is None or e.value is None:
                        continue
                    at = time.perf_counter()
                    arrivals.put_nowait((i, e.value.split(b":", 1)[0].decode(), at))

            tasks = [asyncio.create_task(watch(i, nc)) for i, nc in enumerate(conns[1:])]
            rng = random.Random(1)

            async def seen(tag):
                got, last = set(), 0.0
                while len(got) < 2:
                    who, t, at = await asyncio.wait_for(arrivals.get(), timeout)
                    if t == tag and who not in got:
                        got.add(who)
                        last = max(last, at)
                return last

            await kv.put("lat", common.value(rng, "-1").encode())
            await seen("-1")
            out = []
            for i in range(n):
                v = common.value(rng, str(i)).encode()
                t0 = time.perf_counter()
                await kv.put("lat", v)
                out.append(await seen(str(i)) - t0)
            for t in tasks:
                t.cancel()
            return out
        finally:
            for nc in conns:
                await nc.close()

    def stop(self):
        common.stop_all(self.procs)


async def _quiet(_e):
    pass


async def _connect(url, timeout=30):
    """Connect to that server only (a client stays on the node the load assigns it), retrying
    while it starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await nats.connect(servers=[url], dont_randomize=True, connect_timeout=5,
                                      allow_reconnect=False, error_cb=_quiet)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def load(endpoint, go, seed, keys):
    return asyncio.run(_load(endpoint, go, seed, keys))


async def _load(endpoint, go, seed, keys):
    rng = random.Random(seed)
    nc = await _connect(endpoint)
    kv = await nc.jetstream().key_value(BUCKET)
    lat, errors = [], 0
    end_at = go()  # blocks the loop, which has nothing else to do yet
    while time.time() < end_at:
        v = common.value(rng).encode()
        key = f"k{rng.randrange(keys)}"
        t0 = time.perf_counter()
        try:
            await kv.put(key, v)
            lat.append(time.perf_counter() - t0)
        except Exception:
            errors += 1
    await nc.close()
    return lat, errors
