//! Scale run of the sync protocol: the cluster simulator (`crdt/tests/sim`) with thousands
//! of nodes, each a real SQLite [`lichen_crdt::Store`] (fsync off) and a
//! [`lichen_crdt::sync::SyncEngine`], each connected to a bounded random set of peers.
//!
//! Why it exists: CI runs clusters of up to 50 nodes; this measures how the protocol scales
//! (convergence time in rounds, messages and bytes per node) at 1,000 and 10,000 nodes. It is
//! not part of CI.
//!
//! ```text
//! cargo run --release -p lichen-crdt --example sim_scale -- --nodes 1000
//! cargo run --release -p lichen-crdt --example sim_scale -- --nodes 1000,10000 --degree 12
//! ```
//! Options: `--nodes N[,N…]` (default 1000), `--degree D` (random links per node, default 12),
//! `--fanout F` (relay fanout, default from `Config`), `--inline B` (relay pushes up to B
//! bytes in full, larger ones as `Announce`/`Have` announcements; default from `Config`),
//! `--pulled P` (relay changes newly applied from anti-entropy batches of at most P changes;
//! default from `Config`), `--eager2 0|1` (relay a change pushed by its author in full;
//! default from `Config`), `--skip-holders 0|1`, `--prop 0|1`, `--prefer 0|1`, `--quiet 0|1`
//! (`Config::relay_skip_holders`, `relay_proportional`, `ae_prefer_unknown`,
//! `quiet_while_fetching`; defaults from `Config`), `--writes W`
//! (writes per side in the partition scenario, default 16), `--size B` (the single write
//! carries a B-byte string instead of a small object), `--memory 1` (SQLite `:memory:`
//! databases instead of files: a file store holds 3 descriptors, so 10,000 file stores exceed
//! a 20,000 open-file limit), `--seed S`.
//!
//! Two scenarios per N, latency fixed at 20 ms per message so that time converts to rounds:
//! 1. **One write** by node 0 (eager push, relay): time until every node holds it, messages and
//!    bytes per node from the write until one second after the last node applied it, and
//!    bytes per node ÷ the bytes of the change a node was missing.
//! 2. **Healed partition**: the cluster is split in halves, each half writes W changes and
//!    converges internally, then the partition heals: time until every node holds everything,
//!    and bytes per node ÷ bytes of changes that node was missing (the other half's).
//!
//! Results and how to read them: the table in the docs of `crdt/src/sync/mod.rs`.
//!
//! Only every `N/64`-th node is a member (a writer); the others replicate every document (and
//! the membership document) without writing. This keeps each store's membership small so that
//! 10,000 stores fit in memory; the protocol does not depend on who is a member.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::Instant;

use lichen_crdt::sync::Config;
use sim::{Sim, SimConfig};

struct Args {
    nodes: Vec<usize>,
    degree: usize,
    fanout: usize,
    inline: usize,
    pulled: usize,
    eager2: bool,
    writes: usize,
    size: usize,
    memory: bool,
    seed: u64,
    skip_holders: bool,
    quiet: bool,
    prop: bool,
    prefer: bool,
}

fn parse() -> Args {
    let d = Config::default();
    let mut a = Args {
        nodes: vec![1000],
        degree: 12,
        fanout: d.fanout,
        inline: d.relay_inline_bytes,
        pulled: d.relay_pulled_max,
        eager2: d.eager_first_hop,
        writes: 16,
        size: 0,
        memory: false,
        seed: 1,
        skip_holders: d.relay_skip_holders,
        quiet: d.quiet_while_fetching,
        prop: d.relay_proportional,
        prefer: d.ae_prefer_unknown,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        let num = |v: &str| -> usize {
            v.parse()
                .unwrap_or_else(|_| panic!("{k} needs a number, got `{v}`"))
        };
        match k.as_str() {
            "--nodes" => a.nodes = v.split(',').map(num).collect(),
            "--degree" => a.degree = num(&v),
            "--fanout" => a.fanout = num(&v),
            "--inline" => a.inline = num(&v),
            "--pulled" => a.pulled = num(&v),
            "--eager2" => a.eager2 = v == "1" || v == "true",
            "--writes" => a.writes = num(&v),
            "--size" => a.size = num(&v),
            "--memory" => a.memory = v == "1" || v == "true",
            "--seed" => a.seed = num(&v) as u64,
            "--skip-holders" => a.skip_holders = v == "1" || v == "true",
            "--quiet" => a.quiet = v == "1" || v == "true",
            "--prop" => a.prop = v == "1" || v == "true",
            "--prefer" => a.prefer = v == "1" || v == "true",
            other => panic!("unknown option {other}"),
        }
    }
    a
}

fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

const LATENCY: u64 = 20;

fn main() {
    let a = parse();
    println!(
        "| N | scenario | time to converge | rounds (20 ms delays / 1 s AE) | msgs/node | bytes/node | missing bytes/node | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &a.nodes {
        run(n, &a);
    }
}

fn run(n: usize, a: &Args) {
    let wall = Instant::now();
    let mut cfg = SimConfig::new(n).degree(a.degree);
    cfg.latency = (LATENCY, LATENCY);
    cfg.check_every_step = false;
    cfg.in_memory = a.memory;
    cfg.member_stride = Some((n / 64).max(1));
    cfg.sync.fanout = a.fanout;
    cfg.sync.relay_inline_bytes = a.inline;
    cfg.sync.relay_pulled_max = a.pulled;
    cfg.sync.eager_first_hop = a.eager2;
    cfg.sync.relay_skip_holders = a.skip_holders;
    cfg.sync.quiet_while_fetching = a.quiet;
    cfg.sync.relay_proportional = a.prop;
    cfg.sync.ae_prefer_unknown = a.prefer;
    let stride = cfg.member_stride.unwrap_or(1);
    let interval = cfg.sync.anti_entropy_interval_ms;
    let mut s = Sim::new(a.seed, cfg);
    let setup = wall.elapsed();
    s.run_until(3_000);
    // Idle cost: bytes per node per second with nothing to sync.
    let idle0 = s.wire;
    s.run_until(5_000);
    let idle = (s.wire.1 - idle0.1) as f64 / n as f64 / 2.0;

    // 1. One write.
    let w0 = s.wire;
    let kinds_w0 = s.by_kind.clone();
    let c = if a.size > 0 {
        let value = serde_json::Value::String("x".repeat(a.size));
        s.write_value(0, "app/scale", "blob", value)
    } else {
        s.write(0, "app/scale", "replicas")
    }
    .expect("a change");
    let h = c.hash().expect("hash");
    let missing = c.encoded_len() as f64 * (n - 1) as f64 / n as f64;
    let start = s.now;
    let mut lacking: Vec<usize> = (1..n).collect();
    let mut t99 = None;
    while !lacking.is_empty() {
        s.run_until(s.now + 5);
        lacking.retain(|i| s.nodes[*i].store().get_change(&h).unwrap().is_none());
        if t99.is_none() && lacking.len() * 100 <= n {
            t99 = Some(s.now - start);
        }
        assert!(s.now - start < 120_000, "one write did not converge");
    }
    let t = s.now - start;
    s.run_until(s.now + 1_000);
    let what = format!(
        "one write ({} B; 99% at {} ms)",
        c.encoded_len(),
        t99.unwrap_or(t)
    );
    row(n, &what, t, interval, s.wire, w0, missing);
    kinds(&s, &kinds_w0, n);

    // 2. Partition into halves; each half writes; heal.
    let half = n / 2;
    s.split(move |i| i < half);
    let writers_a: Vec<usize> = (0..half).filter(|i| i % stride == 0).collect();
    let writers_b: Vec<usize> = (half..n).filter(|i| i % stride == 0).collect();
    let (mut bytes_a, mut bytes_b) = (0usize, 0usize);
    for k in 0..a.writes {
        let wa = writers_a[k % writers_a.len()];
        let wb = writers_b[k % writers_b.len()];
        let doc = format!("app/p{}", k % 4);
        bytes_a += s
            .write(wa, &doc, &format!("k{k}"))
            .map_or(0, |c| c.encoded_len());
        bytes_b += s
            .write(wb, &doc, &format!("k{k}"))
            .map_or(0, |c| c.encoded_len());
        s.run_until(s.now + 50);
    }
    s.run_until(s.now + 15_000);
    let w1 = s.wire;
    let kinds0 = s.by_kind.clone();
    let missing = (half * bytes_b + (n - half) * bytes_a) as f64 / n as f64;
    s.heal();
    let t = s.settle(300_000);
    s.run_until(s.now + 1_000);
    let what = format!("healed partition ({} changes each side)", a.writes);
    row(n, &what, t, interval, s.wire, w1, missing);
    kinds(&s, &kinds0, n);
    s.assert_converged();
    eprintln!(
        "N={n}: setup {:.1?}, total wall {:.1?}, peak RSS {} MiB, idle {:.0} B/node/s, \
         dropped pushes {}, members {}",
        setup,
        wall.elapsed(),
        peak_rss_mb(),
        idle,
        s.total(|st| st.dropped_pushes),
        n.div_ceil(stride),
    );
}

/// Messages and bytes per node by message kind since `before`.
fn kinds(s: &Sim, before: &std::collections::BTreeMap<&'static str, (u64, u64)>, n: usize) {
    for (k, (m, b)) in &s.by_kind {
        let (m0, b0) = before.get(k).copied().unwrap_or((0, 0));
        if m > &m0 {
            eprintln!(
                "  {k}: {:.2} msgs/node, {:.0} bytes/node",
                (m - m0) as f64 / n as f64,
                (b - b0) as f64 / n as f64
            );
        }
    }
}

fn row(
    n: usize,
    what: &str,
    t: u64,
    interval: u64,
    now: (u64, u64),
    before: (u64, u64),
    missing: f64,
) {
    let msgs = (now.0 - before.0) as f64 / n as f64;
    let bytes = (now.1 - before.1) as f64 / n as f64;
    println!(
        "| {n} | {what} | {t} ms | {:.0} / {:.1} | {msgs:.1} | {bytes:.0} | {missing:.0} | {:.2}× |",
        t as f64 / LATENCY as f64,
        t as f64 / interval as f64,
        bytes / missing,
    );
}
