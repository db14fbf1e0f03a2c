//! Store benchmarks (criterion). Run: `cargo bench -p lichen-crdt --bench store`.
//!
//! * `local_commit`: make + sign + store one change, with no sync at all (`synchronous=OFF`:
//!   the CPU cost) and fsynced (`FULL`): a scalar put at a top-level key (the writer's fast
//!   path), and `automerge_path_fsync_off`, the same put with the fast path turned off.
//! * `group_commit_8`: eight writes to one document sharing one transaction, one fsync and one
//!   signed change.
//! * `ingest_10k`: verify + apply a batch of 10,000 remote changes on a fresh replica.
//! * `open_and_read_100k`: open a store holding a 100,000-change document and read it.
//! * `hot_key`: local commit on a fresh key vs one overwritten 10,000 times (the follower's
//!   side, which does grow, is measured by `cargo run --release -p lichen-crdt --example hot_key`).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use lichen_crdt::{parse_path, Op, SecretKey, SignedChange, Store};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

fn put(i: u64) -> Op {
    Op::Put {
        path: parse_path(&format!("k{}", i % 1000)).unwrap(),
        value: json!(i),
    }
}

fn local_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed([1; 32]);
    let mut g = c.benchmark_group("local_commit");
    for fsync in [false, true] {
        let path = dir.path().join(format!("commit-{fsync}.db"));
        let mut s = Store::create(&path, &key, "bench", T0).unwrap();
        if fsync {
            s.set_fsync(true).unwrap();
        } else {
            s.set_no_sync().unwrap();
        }
        let mut i = 0u64;
        g.bench_function(if fsync { "fsync_on" } else { "fsync_off" }, |b| {
            b.iter(|| {
                i += 1;
                s.write(&key, "app/bench", &put(i), T0).unwrap().unwrap()
            })
        });
    }
    let path = dir.path().join("automerge-path.db");
    let mut s = Store::create(&path, &key, "bench", T0).unwrap();
    s.set_no_sync().unwrap();
    s.set_local_fast_path(false);
    let mut i = 0u64;
    g.bench_function("automerge_path_fsync_off", |b| {
        b.iter(|| {
            i += 1;
            s.write(&key, "app/bench", &put(i), T0).unwrap().unwrap()
        })
    });
    let path = dir.path().join("group.db");
    let mut s = Store::create(&path, &key, "bench", T0).unwrap();
    let mut i = 0u64;
    g.bench_function("group_commit_8_fsync_on", |b| {
        b.iter(|| {
            let ops: Vec<(String, Op)> = (0..8)
                .map(|_| {
                    i += 1;
                    ("app/bench".to_string(), put(i))
                })
                .collect();
            s.write_batch(&key, &ops, T0)
        })
    });
    g.finish();
}

/// A store with `n` changes in one document, and those changes (one write per change: a
/// group commit would fold writes to one document into one change).
fn history(path: &std::path::Path, n: u64) -> (Store, Vec<SignedChange>) {
    let key = SecretKey::from_seed([1; 32]);
    let mut s = Store::create(path, &key, "bench", T0).unwrap();
    s.set_no_sync().unwrap();
    let out = (0..n)
        .map(|i| s.write(&key, "app/big", &put(i), T0).unwrap().unwrap())
        .collect();
    (s, out)
}

/// Local commit on one key already overwritten `n` times: Automerge keeps every overwritten
/// value, so the cost of writing (and applying) a hot key grows with its history.
fn hot_key(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed([1; 32]);
    let mut g = c.benchmark_group("hot_key");
    for n in [0u64, 10_000] {
        let path = dir.path().join(format!("hot-{n}.db"));
        let mut s = Store::create(&path, &key, "bench", T0).unwrap();
        s.set_no_sync().unwrap();
        let hot = |i: u64| Op::Put {
            path: parse_path("hot").unwrap(),
            value: json!(i),
        };
        for i in 0..n {
            s.write(&key, "app/hot", &hot(i), T0).unwrap();
        }
        let mut i = n;
        g.bench_function(format!("commit_after_{n}_overwrites"), |b| {
            b.iter(|| {
                i += 1;
                s.write(&key, "app/hot", &hot(i), T0).unwrap().unwrap()
            })
        });
    }
    g.finish();
}

fn ingest_10k(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (src, changes) = history(&dir.path().join("src.db"), 10_000);
    let cluster = src.cluster_id();
    let genesis = src
        .changes_after(
            lichen_crdt::MEMBERSHIP_DOC,
            &SecretKey::from_seed([1; 32]).node_id(),
            0,
            10,
        )
        .unwrap();
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let mut n = 0;
    g.bench_function("verify_apply_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let mut s = Store::join(&dir.path().join(format!("dst{n}.db")), cluster).unwrap();
                s.ingest(genesis.clone()).unwrap();
                let t = Instant::now();
                let r = s.ingest(changes.clone()).unwrap();
                total += t.elapsed();
                assert_eq!(r.applied_count(), 10_000);
            }
            total
        })
    });
    g.finish();
}

fn open_100k(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let (s, _) = history(&path, 100_000);
    let cluster = s.cluster_id();
    drop(s);
    let mut g = c.benchmark_group("open");
    g.sample_size(10);
    g.bench_function("open_and_read_100k", |b| {
        b.iter(|| {
            let s = Store::open(&path, Some(cluster)).unwrap();
            let v = s.get("app/big", &[]).unwrap().unwrap();
            assert_eq!(v.as_object().unwrap().len(), 1000);
        })
    });
    g.finish();
}

criterion_group!(benches, local_commit, ingest_10k, open_100k, hot_key);
criterion_main!(benches);
