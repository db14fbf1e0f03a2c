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

use lichen_crdt::{parse_path, Op, SecretKey, Store};
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
}
