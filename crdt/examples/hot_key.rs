//! How a hot key costs over time: one writer overwrites one key, a replica ingests each change.
//!
//! ```text
//! cargo run --release -p lichen-crdt --example hot_key
//! ```
//!
//! Automerge keeps every overwritten value (concurrent writers may still refer to them), and
//! its batch apply walks the ops of the object a change edits. So a replica's cost to apply one
//! overwrite grows with the number of overwrites already held, while the writer's cost stays
//! flat. Prints the mean per change for each block of 1,000 writes.
//!
//! The store applies a chain of root-level puts on its own heads (a *fast forward*) without
//! Automerge, so that replica cost stays flat too. A change concurrent with one of ours is
//! not a fast forward: the last lines measure that, with a second writer on the replica
//! whose changes cross the writer's (each side writes on its own heads, then receives the
//! other's change), after the 10,000 overwrites and again on a fresh document.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use lichen_crdt::{parse_path, Op, Role, SecretKey, Store};
use serde_json::json;
use std::time::Instant;
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed([1; 32]);
    let mut s = Store::create(&dir.path().join("w.db"), &key, "b", 1).unwrap();
    s.set_fsync(false).unwrap();
    let mut r = Store::join(&dir.path().join("r.db"), s.cluster_id()).unwrap();
    r.set_fsync(false).unwrap();
    let g = s
        .changes_after(lichen_crdt::MEMBERSHIP_DOC, &key.node_id(), 0, 100)
        .unwrap();
    r.ingest(g).unwrap();
    let hot = |i: u64| Op::Put {
        path: parse_path("hot").unwrap(),
        value: json!(i),
    };
    for round in 0..10 {
        let (mut tw, mut ti) = (0.0, 0.0);
        for i in 0..1000u64 {
            let t = Instant::now();
            let ch = s
                .write(&key, "app/hot", &hot(i + round * 1000), 1)
                .unwrap()
                .unwrap();
            tw += t.elapsed().as_secs_f64();
            let t = Instant::now();
            r.ingest(vec![ch]).unwrap();
            ti += t.elapsed().as_secs_f64();
        }
        println!(
            "overwrites {:>6}..{:>6}: write {:.1} us, ingest {:.1} us",
            round * 1000,
            round * 1000 + 1000,
            tw * 1e3,
            ti * 1e3
        );
    }
    // Concurrent writers: the replica's node gets a writer key.
    let other = SecretKey::from_seed([2; 32]);
    s.add_member(&key, other.node_id(), "r", Role::Writer, vec![], vec![], 1)
        .unwrap();
    let m = s
        .changes_after(lichen_crdt::MEMBERSHIP_DOC, &key.node_id(), 0, 100)
        .unwrap();
    r.ingest(m).unwrap();
    for (doc, label) in [
        ("app/hot", "after 10,000 overwrites"),
        ("app/new", "fresh document"),
    ] {
        let (mut ts, mut tr) = (0.0, 0.0);
        let rounds = 200;
        for i in 0..=rounds {
            let a = s.write(&key, doc, &hot(i), 1).unwrap().unwrap();
            let b = r.write(&other, doc, &hot(i + 1), 1).unwrap().unwrap();
            let t = Instant::now();
            s.ingest(vec![b]).unwrap();
            let t1 = t.elapsed().as_secs_f64();
            let t = Instant::now();
            r.ingest(vec![a]).unwrap();
            let t2 = t.elapsed().as_secs_f64();
            if i > 0 {
                // (the first round catches the replica's document up: not counted)
                ts += t1;
                tr += t2;
            }
        }
        println!(
            "concurrent changes, {label}: ingest {:.1} us on the writer, {:.1} us on the replica",
            ts / rounds as f64 * 1e6,
            tr / rounds as f64 * 1e6
        );
    }
}
