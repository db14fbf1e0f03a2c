//! The writer's fast path builds a change of scalar puts at top-level keys without Automerge
//! (`store::local_fast`). Story: two replicas of one writer's key hold the same documents,
//! one with the fast path and one without; every edit, made on both at the same time, must
//! give the very same signed change (bytes and signature) or the same refusal, and the same
//! view, while another writer's changes cross theirs (conflicts), edits that need Automerge
//! come in between, and several edits share one group commit; after every step each
//! replica's view (values, and the ops behind each row that the fast path names as
//! overwritten) must be what Automerge holds. Randomised: the seed is printed and
//! `LICHEN_FAST_PATH_SEED=<n>` replays one.
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
use lichen_crdt::{parse_path, Op, Role, SignedChange, Store};
use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

fn random_op(rng: &mut Rng, i: usize) -> Op {
    let key = ["a", "b", "c", "d"][rng.below(4) as usize];
    let scalar = match rng.below(7) {
        0 => json!(i),
        1 => json!(format!("v{}", rng.below(3))),
        2 => json!(rng.below(2) == 0),
        3 => Value::Null,
        4 => json!(0.5 + rng.below(3) as f64),
        5 => json!(-(rng.below(3) as i64)),
        _ => json!(u64::MAX - rng.below(2)),
    };
    let put = |path: &str, value: Value| Op::Put {
        path: parse_path(path).unwrap(),
        value,
    };
    match rng.below(10) {
        // Mostly what the fast path takes; the rest goes through Automerge.
        0..=5 => put(key, scalar),
        6 => put(&format!("{key}.x"), scalar),
        7 => put(key, json!({ "x": i, "l": [i] })),
        8 => Op::Delete {
            path: parse_path(key).unwrap(),
        },
        _ => Op::Replace {
            value: json!({ "a": i, "b": { "x": 1 } }),
        },
    }
}

fn outcome(r: &Result<Option<SignedChange>, lichen_crdt::StoreError>) -> String {
    match r {
        Ok(Some(c)) => format!("change {:?} sig {:?}", c.bytes, c.sig),
        Ok(None) => "unchanged".into(),
        Err(e) => format!("error {e}"),
    }
}

/// A change as Automerge reads it, for failure messages.
fn decoded(r: &Result<Option<SignedChange>, lichen_crdt::StoreError>) -> String {
    match r {
        Ok(Some(c)) => match automerge::Change::try_from(c.bytes.as_slice()) {
            Ok(ch) => format!("{:?}", ch.decode()),
            Err(e) => format!("undecodable: {e}"),
        },
        _ => String::new(),
    }
}

fn run(seed: u64) {
    eprintln!("seed {seed} (replay: LICHEN_FAST_PATH_SEED={seed} cargo test -p lichen-crdt --test store_fast_path)");
    let mut rng = Rng(seed);
    let mut c = Cluster::new(3);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let admin = c.admin.clone();
    c.stores[2].set_local_fast_path(false);
    let docs = ["app/x", "app/y"];
    for i in 0..300 {
        let doc = docs[rng.below(2) as usize];
        let now = T0 + i as i64;
        match rng.below(10) {
            // The admin writes on replica 0, which may or may not have w's latest changes:
            // concurrent puts leave conflicts that the next put must overwrite.
            0 | 1 => {
                let op = random_op(&mut rng, i);
                let _ = c.stores[0].write(&admin, doc, &op, now);
            }
            // Replicas exchange what they have.
            2 => {
                let all: Vec<SignedChange> = c.stores.iter().flat_map(all_changes).collect();
                let to = rng.below(3) as usize;
                c.stores[to].ingest(all).unwrap();
                if to != 0 {
                    // Keep w's two replicas identical.
                    let from = all_changes(&c.stores[to]);
                    c.stores[3 - to].ingest(from).unwrap();
                }
            }
            // w writes the same edits on both of its replicas.
            _ => {
                let n = 1 + rng.below(3) as usize;
                let batch: Vec<(String, Op)> = (0..n)
                    .map(|_| {
                        let d = if rng.below(4) == 0 { docs[0] } else { doc };
                        (d.to_string(), random_op(&mut rng, i))
                    })
                    .collect();
                let fast = c.stores[1].write_batch(&w, &batch, now);
                let slow = c.stores[2].write_batch(&w, &batch, now);
                for (k, (f, s)) in fast.iter().zip(&slow).enumerate() {
                    assert_eq!(
                        outcome(f),
                        outcome(s),
                        "seed {seed}, step {i}, edit {k} of {batch:?}: fast {} slow {}",
                        decoded(f),
                        decoded(s)
                    );
                }
            }
        }
        // The fast path is for documents not in memory: drop them now and then.
        for d in docs {
            if rng.below(2) == 0 {
                c.stores[1].unload(d);
            }
        }
        // Every replica's view, values and the ops behind them, is what Automerge holds.
        for d in docs {
            for r in 0..3 {
                assert_eq!(
                    c.stores[r].check_view(d).unwrap(),
                    None,
                    "seed {seed}, step {i}: replica {r}, {d}"
                );
            }
        }
        for d in docs {
            assert_eq!(
                get(&c.stores[1], d, ""),
                get(&c.stores[2], d, ""),
                "seed {seed}, step {i}: views of {d}"
            );
            assert_eq!(c.stores[1].heads(d).unwrap(), c.stores[2].heads(d).unwrap());
        }
    }
    // And after a reopen.
    let path = c.stores[1].path().to_path_buf();
    let cluster = c.stores[1].cluster_id();
    let before: Vec<Option<Value>> = docs.iter().map(|d| get(&c.stores[1], d, "")).collect();
    drop(c.stores.remove(1));
    let mut reopened = Store::open(&path, Some(cluster)).unwrap();
    for (d, b) in docs.iter().zip(before) {
        assert_eq!(
            reopened.check_view(d).unwrap(),
            None,
            "seed {seed}: {d} reopened"
        );
        assert_eq!(get(&reopened, d, ""), b);
    }
}

#[test]
fn the_fast_path_makes_the_change_automerge_makes() {
    if let Some(seed) = std::env::var("LICHEN_FAST_PATH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return run(seed);
    }
    for seed in 0..8 {
        run(seed);
    }
}
