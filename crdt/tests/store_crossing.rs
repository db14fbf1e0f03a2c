//! Several writers putting scalars at top-level keys of one document at once (the peer
//! comparison's load, `bench/peers`): every replica receives changes concurrent with its own.
//! Story: three writers on three replicas, each round every writer group-commits a few puts
//! (often at the same keys as another: conflicts), then every replica ingests the others'
//! changes, in a varying order. The document must never be loaded into Automerge on any
//! replica (crossing puts are stored without it, `store::ingest_cross`; an Automerge apply
//! walks the document's whole history), and after every ingest each replica's view, values
//! and the ops behind each row, must be what Automerge holds; in the end all replicas hold the
//! same heads and view.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use common::*;
use lichen_crdt::{parse_path, Op, Role, SignedChange};
use serde_json::json;

const DOC: &str = "app/kv";

#[test]
fn crossing_puts_from_three_writers_skip_automerge_and_keep_the_view_exact() {
    let mut c = Cluster::new(3);
    let (w2, w3) = (key(2), key(3));
    c.add(&w2, "w2", Role::Writer, &[]);
    c.add(&w3, "w3", Role::Writer, &[]);
    let writers = [c.admin.clone(), w2, w3];
    let keys = ["a", "b", "c", "d", "e"];
    let mut n = 0u64;
    for round in 0..40usize {
        let mut made: Vec<Vec<SignedChange>> = vec![Vec::new(); 3];
        for (r, w) in writers.iter().enumerate() {
            let batch: Vec<(String, Op)> = (0..1 + (round + r) % 3)
                .map(|j| {
                    n += 1;
                    let k = keys[(round * 7 + r * 3 + j * 2) % keys.len()];
                    let value = match n % 4 {
                        0 => json!(n),
                        1 => json!(format!("v{n}")),
                        2 => json!(n % 3 == 0),
                        _ => json!(n as f64 + 0.5),
                    };
                    let path = parse_path(k).unwrap();
                    (DOC.to_string(), Op::Put { path, value })
                })
                .collect();
            for res in c.stores[r].write_batch(w, &batch, T0 + round as i64) {
                if let Some(ch) = res.unwrap() {
                    if made[r].last().map(|l| l.hash()) != Some(ch.hash()) {
                        made[r].push(ch);
                    }
                }
            }
        }
        // Each replica hears the other two, in an order that changes with the round.
        for r in 0..3 {
            let mut from: Vec<usize> = (0..3).filter(|&o| o != r).collect();
            if round % 2 == 1 {
                from.reverse();
            }
            for o in from {
                c.stores[r].ingest(made[o].clone()).unwrap();
                assert_eq!(
                    c.stores[r].loaded_docs(),
                    0,
                    "round {round}: replica {r} loaded the document to apply replica {o}'s crossing puts"
                );
                assert_eq!(
                    c.stores[r].check_view(DOC).unwrap(),
                    None,
                    "round {round}: replica {r}'s view after replica {o}'s changes"
                );
            }
        }
    }
    let heads = c.stores[0].heads(DOC).unwrap();
    let view = c.stores[0].get(DOC, &[]).unwrap();
    for s in &c.stores[1..] {
        assert_eq!(s.heads(DOC).unwrap(), heads);
        assert_eq!(s.get(DOC, &[]).unwrap(), view);
    }
    // Concurrent puts at one key left conflicts, and they read as Automerge has them.
    let conflicted = keys
        .iter()
        .filter(|k| {
            c.stores[0]
                .conflicts(DOC, &parse_path(k).unwrap())
                .unwrap()
                .len()
                > 1
        })
        .count();
    assert!(conflicted > 0, "the story should leave conflicts");
}
