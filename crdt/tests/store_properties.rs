//! Property: any delivery order, any batching and any duplication of the same valid changes
//! give identical heads and identical state on every replica — including when the set holds a
//! removal whose cut-off voids some of them.
//!
//! Proptest prints the failing case and persists its seed; `PROPTEST_CASES` scales the run.
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
use lichen_crdt::{Role, SignedChange, Store, MEMBERSHIP_DOC};
use proptest::prelude::*;
use serde_json::json;

/// Build a history on three forks (admin, writer a, writer b) with interleaved syncs, and
/// optionally a removal of writer b in the middle. Returns the cluster and every change made.
fn history(
    steps: &[(u8, u8, u8, bool)],
    remove_b_at: Option<usize>,
) -> (Cluster, Vec<SignedChange>) {
    let mut c = Cluster::new(3);
    let keys = [c.admin.clone(), key(2), key(3)];
    c.add(&keys[1], "a", Role::Writer, &[]);
    c.add(&keys[2], "b", Role::Writer, &[]);
    let mut made: Vec<SignedChange> = all_changes(&c.stores[0]);
    for (i, &(who, doc, k, sync)) in steps.iter().enumerate() {
        if Some(i) == remove_b_at {
            let admin = keys[0].clone();
            made.push(
                c.stores[0]
                    .remove_member(&admin, keys[2].node_id(), T0)
                    .unwrap(),
            );
        }
        let who = (who % 3) as usize;
        let doc = ["app/one", "app/two"][(doc % 2) as usize];
        // Top-level and nested paths, objects replacing scalars and deletions, so that the
        // materialized view must follow edits inside nested objects created by other forks.
        let (path, value) = [
            ("k0", Some(json!(i))),
            ("k1", Some(json!({ "a": { "b": i }, "l": [i, "x"] }))),
            ("k1.a.b", Some(json!(i))),
            ("k1.a.c", Some(json!([i]))),
            ("k1.a", None),
            ("k2", Some(json!({ "n": i }))),
            ("k2.n", None),
            ("k1.l.0", Some(json!(i))),
        ][(k % 8) as usize]
            .clone();
        let path = lichen_crdt::parse_path(path).unwrap();
        let op = match value {
            Some(value) => lichen_crdt::Op::Put { path, value },
            None => lichen_crdt::Op::Delete { path },
        };
        if let Ok(Some(ch)) = c.stores[who].write(&keys[who], doc, &op, T0) {
            made.push(ch);
        }
        if sync {
            // Pairwise sync between the writer's fork and the next one.
            let next = (who + 1) % 3;
            let theirs = all_changes(&c.stores[who]);
            c.stores[next].ingest(theirs).unwrap();
            for d in ["app/one", "app/two"] {
                assert_eq!(c.stores[next].check_view(d).unwrap(), None, "view of {d}");
            }
        }
    }
    (c, made)
}

fn state(s: &Store) -> Vec<(String, Vec<[u8; 32]>, Option<serde_json::Value>)> {
    let mut docs = vec![
        "app/one".to_string(),
        "app/two".to_string(),
        MEMBERSHIP_DOC.to_string(),
    ];
    docs.sort();
    docs.into_iter()
        .map(|d| (d.clone(), s.heads(&d).unwrap(), s.get(&d, &[]).unwrap()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_order_and_duplication_converges(
        steps in prop::collection::vec((0u8..3, 0u8..2, 0u8..8, any::<bool>()), 1..14),
        remove in prop::option::of(0usize..14),
        perms in prop::collection::vec((any::<u64>(), 1usize..6, 0usize..4), 3),
    ) {
        let (c, made) = history(&steps, remove.filter(|r| *r < steps.len()));
        let mut states = Vec::new();
        for (i, (seed, batch, dups)) in perms.into_iter().enumerate() {
            // Shuffle deterministically from the seed, duplicate some, deliver in batches.
            let mut order: Vec<SignedChange> = made.clone();
            for d in 0..dups {
                if !made.is_empty() {
                    order.push(made[(seed as usize + d * 7) % made.len()].clone());
                }
            }
            let mut x = seed | 1;
            for j in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(j, (x % (j as u64 + 1)) as usize);
            }
            let mut s = Store::join(&c.path(&format!("p{i}.db")), c.stores[0].cluster_id()).unwrap();
            s.set_fsync(false).unwrap();
            for chunk in order.chunks(batch) {
                s.ingest(chunk.to_vec()).unwrap();
            }
            for doc in ["app/one", "app/two"] {
                // The materialized view (what reads serve) equals the Automerge document.
                prop_assert_eq!(s.check_view(doc).unwrap(), None, "view of {} differs", doc);
            }
            states.push(state(&s));
        }
        prop_assert_eq!(&states[0], &states[1]);
        prop_assert_eq!(&states[1], &states[2]);
    }
}
