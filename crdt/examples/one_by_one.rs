//! Per-write CPU of the store on the agent's path: one local write on a writer, then the same
//! change ingested alone on a follower (as the agent does for each pushed change). Prints
//! µs per write and per ingest; meant for `valgrind --tool=callgrind` (instruction counts are
//! repeatable on a noisy machine).
//!
//! ```text
//! cargo run --release -p lichen-crdt --example one_by_one -- 2000 [scalar]
//! CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release -p lichen-crdt --example one_by_one
//! valgrind --tool=callgrind target/release/examples/one_by_one 500 scalar
//! ```
//!
//! Measured 2026-11-23 (callgrind, 500 scalar overwrites of one key, no fsync): a local write
//! is ~493k instructions, of which the ed25519 signature is 236k; a single-change ingest is
//! ~555k, of which strict ed25519 verification is 405k (after caching decompressed public
//! keys; 595k before). So the signature scheme alone is ~1.05M instructions of every write
//! replicated to two followers; SQLite and Automerge are the rest (~0.4M).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]
use std::time::Instant;

use lichen_crdt::{parse_path, Op, SecretKey, Store};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    // `scalar`: one key overwritten with a number (the agent benchmark's write); else objects
    // over 50 keys.
    let scalar = std::env::args().nth(2).as_deref() == Some("scalar");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SecretKey::from_seed([1; 32]);
    let mut a = Store::create(&dir.path().join("a.db"), &key, "a", 0).expect("create");
    a.set_no_sync().expect("sync");
    let cluster = a.cluster_id();
    let mut b = Store::join(&dir.path().join("b.db"), cluster).expect("join");
    b.set_no_sync().expect("sync");
    let genesis = a.get_change(&cluster).unwrap().unwrap();
    b.ingest(vec![genesis]).expect("genesis");
    let mut changes = Vec::with_capacity(n as usize);
    let t = Instant::now();
    for i in 0..n {
        let op = if scalar {
            Op::Put {
                path: parse_path("lat").unwrap(),
                value: serde_json::json!(i),
            }
        } else {
            Op::Put {
                path: parse_path(&format!("k{}", i % 50)).unwrap(),
                value: serde_json::json!({ "n": i, "host": "10.0.0.1", "port": 8080 }),
            }
        };
        changes.push(a.write(&key, "app/bench", &op, i as i64).unwrap().unwrap());
    }
    let write = t.elapsed();
    let t = Instant::now();
    for c in changes {
        let r = b.ingest(vec![c]).unwrap();
        assert_eq!(r.applied_count(), 1);
    }
    let ingest = t.elapsed();
    println!(
        "write {:.1} µs, ingest {:.1} µs per change (no fsync)",
        write.as_secs_f64() * 1e6 / n as f64,
        ingest.as_secs_f64() * 1e6 / n as f64
    );
}
