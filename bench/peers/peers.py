"""The peer comparison: the same load against Lichen, NATS JetStream KV (R3) and etcd, each as
three nodes on loopback, measured back to back, in rounds; prints one table with ratios
Lichen/NATS and Lichen/etcd taken within each round.

Per system and round:
1. start three nodes in a fresh directory; idle RSS per node (after 1 s);
2. latency: `--writes` sequential writes through node 1, each until nodes 2 and 3 show it;
3. load: `--clients` client processes, client k on node k mod 3, one put in flight each, a
   new 128-byte value at a random key out of `--keys` (one keyspace; for Lichen one
   document), for `--seconds`;
4. the time from the last answered put until all nodes agree (same heads / stream sequence /
   revision), then the server CPU (utime + stime from /proc, 3 nodes summed, from the load's
   start until agreement) per put, RSS and disk per node.

Run it with `bench/peers/run.sh`, which sets up the venv and bounds the run in time."""

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import common

SYSTEMS = {"lichen": "lichen_client", "nats": "nats_client", "etcd": "etcd_client",
           # The same agents with `fsync = "never"`: what the durability rule costs (an
           # acknowledged write is then NOT durable; a measurement of the floor, not a mode).
           "lichen-nofsync": "lichen_client"}


def _worker(modname, endpoint, seed, keys, seconds, barrier, results, idx):
    try:
        mod = importlib.import_module(modname)

        def go():
            barrier.wait(timeout=60)
            return time.time() + seconds

        lat, errors = mod.load(endpoint, go, seed, keys)
        results.put((idx, lat, errors, time.time(), None))
    except Exception:
        try:
            barrier.abort()
        except Exception:
            pass
        results.put((idx, [], 0, time.time(), traceback.format_exc()))


def measure(name, args, root):
    mod = importlib.import_module(SYSTEMS[name])
    opts = {"lichen_bin": args.lichen_bin,
            "lichen_fsync": "never" if name == "lichen-nofsync" else "local"}
    ips = common.node_ips(args.ip_base)
    c = mod.Cluster(root, ips, opts)
    r = {"system": mod.NAME}
    try:
        c.start()
        time.sleep(1)
        r["rss_idle"] = [common.rss_mib(p) for p in c.pids]

        vis = sorted(c.latency(args.writes))
        r["visible_p50_ms"] = common.pct(vis, 0.5) * 1e3
        r["visible_p99_ms"] = common.pct(vis, 0.99) * 1e3

        perfs = []
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            for i, pid in enumerate(c.pids):
                out = os.path.join(args.profile, f"{name}-n{i + 1}.perf.data")
                perfs.append(common.spawn(
                    ["perf", "record", "-F", "250", "--call-graph", "dwarf,16384",
                     "-p", str(pid), "-o", out], out + ".log"))
            time.sleep(3)  # perf needs a moment to attach on a loaded machine
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(args.clients + 1)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, daemon=True, args=(
                SYSTEMS[name], c.endpoints[k % 3], 1000 + k, args.keys, args.seconds, barrier,
                results, k))
            for k in range(args.clients)
        ]
        for p in procs:
            p.start()
        barrier.wait(timeout=60)
        t0 = time.time()
        cpu0 = [common.cpu_seconds(p) for p in c.pids]
        diag0 = c.diag() if hasattr(c, "diag") else None
        trace, tracing_done = [], None
        if args.trace and diag0 is not None:
            import threading

            tracing_done = threading.Event()

            def sample():
                while not tracing_done.wait(args.trace):
                    try:
                        trace.append((time.time() - t0, [common.cpu_seconds(p) for p in c.pids],
                                      c.diag()))
                    except Exception:
                        pass

            threading.Thread(target=sample, daemon=True).start()
        got = [results.get(timeout=args.seconds + 60) for _ in procs]
        failed = [g[4] for g in got if g[4]]
        if failed:
            raise RuntimeError("a client failed:\n" + failed[0])
        stopped = max(g[3] for g in got)
        common.wait_until(f"{name}: all nodes to agree", 120, c.agree, interval=0.01)
        r["agree_s"] = time.time() - stopped
        cpu1 = [common.cpu_seconds(p) for p in c.pids]
        if tracing_done is not None:
            tracing_done.set()
            r["trace"] = trace
        for p in perfs:
            p.send_signal(signal.SIGINT)
        for p in perfs:
            p.wait(timeout=120)
        if diag0 is not None:
            r["diag"] = [{k: round(b[k] - a.get(k, 0), 3) for k in b}
                         for a, b in zip(diag0, c.diag())]
        for p in procs:
            p.join(timeout=10)
        wall = stopped - t0
        lat = sorted(x for g in got for x in g[1])
        puts = len(lat)
        r["puts"] = puts
        r["errors"] = sum(g[2] for g in got)
        r["throughput"] = puts / wall
        r["put_p50_ms"] = common.pct(lat, 0.5) * 1e3
        r["put_p99_ms"] = common.pct(lat, 0.99) * 1e3
        r["put_max_ms"] = lat[-1] * 1e3 if lat else float("nan")
        r["cpu_ms_per_put"] = sum(b - a for a, b in zip(cpu0, cpu1)) * 1e3 / max(1, puts)
        r["cpu_s_per_node"] = [b - a for a, b in zip(cpu0, cpu1)]
        r["per_node"] = [
            sum(len(g[1]) for g in got if g[0] % 3 == i) / wall for i in range(3)]
        r["clients_per_node"] = [sum(1 for k in range(args.clients) if k % 3 == i)
                                 for i in range(3)]
        r["rss_after"] = [common.rss_mib(p) for p in c.pids]
        r["disk"] = [common.disk_mib(d) for d in c.data_dirs]
    finally:
        c.stop()
    return r


def rng_fmt(vals, fmt="{:.2f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    a, b = fmt.format(lo), fmt.format(hi)
    return a if a == b else f"{a}–{b}"


def fmt_num(v):
    if v >= 100:
        return "{:,.0f}"
    if v >= 10:
        return "{:.1f}"
    return "{:.2f}"


def row_range(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    return rng_fmt(vals, fmt_num(max(vals)))


def spread(r):
    per_client = [t / k for t, k in zip(r["per_node"], r["clients_per_node"]) if k]
    return max(per_client) / max(1e-9, min(per_client))


def table(rounds, systems):
    """One markdown table: a column per system (ranges over rounds) and per ratio."""
    names = [s for s in ["lichen", "lichen-nofsync", "nats", "etcd"] if s in systems]
    by = {n: [r[n] for r in rounds if n in r] for n in names}

    def get(n, f):
        return [f(r) for r in by[n]]

    rows = [
        ("write → visible on all, p50 / p99 ms", [
            lambda r: r["visible_p50_ms"], lambda r: r["visible_p99_ms"]]),
        ("throughput, puts/s", [lambda r: r["throughput"]]),
        ("put latency under load, p50 / p99 / max ms", [
            lambda r: r["put_p50_ms"], lambda r: r["put_p99_ms"], lambda r: r["put_max_ms"]]),
        ("server CPU-ms per put, 3 nodes summed", [lambda r: r["cpu_ms_per_put"]]),
        ("RSS per node idle → after, MiB", [
            lambda r: max(r["rss_idle"]), lambda r: max(r["rss_after"])]),
        ("disk per node after, MiB", [lambda r: max(r["disk"])]),
        ("per-node throughput, slowest / fastest node, puts/s per client", [
            lambda r: min(t / k for t, k in zip(r["per_node"], r["clients_per_node"])),
            lambda r: max(t / k for t, k in zip(r["per_node"], r["clients_per_node"]))]),
        ("fastest ÷ slowest node, puts/s per client", [lambda r: spread(r)]),
        ("all nodes agree after the load stops, s", [lambda r: r["agree_s"]]),
    ]
    sep = {0: " / ", 4: " → "}
    header = ["", *[(by[n][0]["system"] + (" (fsync never)" if n == "lichen-nofsync" else ""))
                    if by[n] else n for n in names]]
    ratios = [("lichen", o) for o in ["nats", "etcd"] if "lichen" in names and o in names]
    ratios += [("lichen-nofsync", o) for o in ["nats"] if "lichen-nofsync" in names and o in names]
    header += [f"Lichen{' (fsync never)' if a == 'lichen-nofsync' else ''} / "
               f"{by[o][0]['system'] if by[o] else o}" for a, o in ratios]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (label, fs) in enumerate(rows):
        cells = [label]
        for n in names:
            cells.append(sep.get(i, " / ").join(row_range(get(n, f)) for f in fs))
        for a, o in ratios:
            parts = []
            for f in fs:
                rs = [f(r[a]) / f(r[o]) for r in rounds
                      if a in r and o in r and f(r[o])]
                parts.append(rng_fmt(rs, "{:.2f}×") if rs else "–")
            cells.append(sep.get(i, " / ").join(parts))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--writes", type=int, default=1000, help="sequential writes for latency")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--only", default="lichen,nats,etcd")
    ap.add_argument("--ip-base", type=int, default=140, help="nodes on 127.0.0.<base>..+2")
    ap.add_argument("--lichen-bin", default=os.environ.get("LICHEN_BIN", ""))
    ap.add_argument("--json", help="also write every round's figures to this file")
    ap.add_argument("--profile", metavar="DIR",
                    help="record each server with `perf` during the load, into DIR")
    ap.add_argument("--trace", type=float, metavar="SECONDS",
                    help="Lichen: print each agent's counters every SECONDS during the load")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    args = ap.parse_args()
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s!r}: choose from {', '.join(SYSTEMS)}")
    if any(s.startswith("lichen") for s in systems) and not os.access(args.lichen_bin, os.X_OK):
        sys.exit(f"lichen binary {args.lichen_bin!r} not found: cargo build --release -p lichen-agent")

    root = tempfile.mkdtemp(prefix="lichen-peers-")
    rounds = []
    try:
        for rnd in range(args.rounds):
            res = {}
            for s in systems:
                d = os.path.join(root, f"r{rnd}-{s}")
                t = time.time()
                print(f"round {rnd + 1}/{args.rounds}: {s} ...", file=sys.stderr, flush=True)
                res[s] = measure(s, args, d)
                r = res[s]
                print(f"  {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not isinstance(v, list)})}", file=sys.stderr)
                print(f"  per node puts/s {[round(x) for x in r['per_node']]} "
                      f"(clients {r['clients_per_node']}), cpu s {[round(x, 2) for x in r['cpu_s_per_node']]}, "
                      f"rss idle {[round(x, 1) for x in r['rss_idle']]} after {[round(x, 1) for x in r['rss_after']]}, "
                      f"disk {[round(x, 1) for x in r['disk']]} ({time.time() - t:.0f} s)",
                      file=sys.stderr, flush=True)
                for i, d in enumerate(r.get("diag", [])):
                    print(f"  node {i + 1} during the load: {json.dumps(d)}", file=sys.stderr)
                prev = None
                for t, cpu, d in r.get("trace", []):
                    if prev:
                        pt, pcpu, pd = prev
                        cells = []
                        for i in range(3):
                            dd = {k: d[i].get(k, 0) - pd[i].get(k, 0) for k in d[i]}
                            cells.append(
                                f"n{i + 1} cpu {100 * (cpu[i] - pcpu[i]) / (t - pt):3.0f}% "
                                f"w {dd['writes_total']:5.0f} sent {dd['changes_sent_total']:4.0f} "
                                f"recv {dd['changes_received_total']:4.0f} "
                                f"apply {dd['apply_latency_seconds_sum']:.2f}s")
                        print(f"  {t:5.1f}s " + " | ".join(cells), file=sys.stderr)
                    prev = (t, cpu, d)
                if not args.keep:
                    shutil.rmtree(d, ignore_errors=True)
            rounds.append(res)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rounds, f, indent=1)
        print()
        print(f"{args.clients} clients, {args.seconds:g} s, {args.keys} keys, {args.writes} "
              f"sequential writes for latency, {args.rounds} round(s); ranges over rounds, "
              f"ratios within a round")
        print()
        print(table(rounds, systems))
    finally:
        if args.keep:
            print(f"data kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
