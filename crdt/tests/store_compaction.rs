//! Compaction cuts in the store (rule: `lichen_crdt::compaction`): history dropped from disk
//! and memory, the base served to a peer without the history, late changes carried forward by
//! their authors, concurrent cuts deciding the same winner everywhere.
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
use lichen_crdt::compaction::CutRecord;
use lichen_crdt::{Role, SignedChange, Store};
use serde_json::json;

/// Hand a store's cut records and winning base to another store, as sync would.
fn send_cut(stores: &mut [Store], from: usize, to: usize, key: &lichen_crdt::SecretKey, doc: &str) {
    let records: Vec<CutRecord> = stores[from]
        .cut_records(doc)
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    let (winner, base) = stores[from].current_cut(doc).unwrap().expect("a cut");
    let to = &mut stores[to];
    // The chain's records without their bases (evidence, and the winner's ancestry).
    for r in records.iter().filter(|r| **r != winner) {
        to.apply_cut(r, None, Some(key), T0).unwrap();
    }
    to.apply_cut(&winner, Some(&base), Some(key), T0).unwrap();
}

fn stored_changes(s: &mut Store, doc: &str) -> usize {
    s.history(doc, &[], usize::MAX)
        .map(|h| h.len())
        .unwrap_or(0)
}

fn state(s: &Store, doc: &str) -> (Vec<[u8; 32]>, Option<serde_json::Value>) {
    (s.heads(doc).unwrap(), s.get(doc, &[]).unwrap())
}

#[test]
fn a_cut_drops_history_and_a_peer_without_it_catches_up_from_the_base() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let b = key(2);
    c.add(&b, "b", Role::Writer, &[]);
    for i in 0..20 {
        put(&mut c.stores[0], &admin, "app/x", "k", json!(i));
    }
    put(&mut c.stores[0], &admin, "app/x", "other", json!("o"));
    c.sync_all();
    assert_eq!(stored_changes(&mut c.stores[0], "app/x"), 21);
    assert_eq!(c.stores[0].history_size("app/x").unwrap().0, 21);
    assert_eq!(
        c.stores[0].docs_due_for_cut(20, u64::MAX).unwrap(),
        vec!["app/x".to_string()]
    );
    assert!(c.stores[0]
        .docs_due_for_cut(21, u64::MAX)
        .unwrap()
        .is_empty());
    let before = state(&c.stores[0], "app/x").1;
    let (rec, base, applied) = c.stores[0].compact(&admin, "app/x", T0).unwrap();
    assert!(applied.won);
    assert_eq!(applied.folded, 21);
    assert_eq!(rec.epoch, 1);
    assert_eq!(
        state(&c.stores[0], "app/x").1,
        before,
        "a cut changes no value"
    );
    assert_eq!(
        stored_changes(&mut c.stores[0], "app/x"),
        1,
        "only the base is left"
    );
    // A second cut built on the first deletes the retained history from disk.
    put(&mut c.stores[0], &admin, "app/x", "k", json!("after"));
    let (rec2, _, applied2) = c.stores[0].compact(&admin, "app/x", T0).unwrap();
    assert_eq!((rec2.epoch, rec2.parent), (2, Some(rec.hash())));
    assert_eq!(applied2.dropped, 21, "epoch-0 history deleted");
    // On disk: the first base and the write after it (retained one epoch), and the new base.
    assert_eq!(c.stores[0].history_size("app/x").unwrap().0, 3);
    // A node that never saw the history (a fresh join) catches up from the newest base.
    let cluster = c.stores[0].cluster_id();
    let mut fresh = Store::join(&c.path("fresh.db"), cluster).unwrap();
    let members: Vec<SignedChange> = all_changes(&c.stores[0])
        .into_iter()
        .filter(|ch| ch.doc == lichen_crdt::MEMBERSHIP_DOC)
        .collect();
    fresh.ingest(members).unwrap();
    let fk = key(9);
    let mut pair = vec![c.stores.remove(0), fresh];
    send_cut(&mut pair, 0, 1, &fk, "app/x");
    let fresh = pair.pop().unwrap();
    c.stores.insert(0, pair.pop().unwrap());
    assert_eq!(state(&fresh, "app/x"), state(&c.stores[0], "app/x"));
    assert_eq!(get(&fresh, "app/x", "k"), Some(json!("after")));
    // The other replica (which held the whole history) converges too, and writes continue.
    send_cut(&mut c.stores, 0, 1, &b, "app/x");
    let _ = base;
    put(&mut c.stores[1], &b, "app/x", "k", json!("b-after-cut"));
    c.sync_all();
    assert_eq!(state(&c.stores[0], "app/x"), state(&c.stores[1], "app/x"));
    assert_eq!(get(&c.stores[0], "app/x", "k"), Some(json!("b-after-cut")));
}

#[test]
fn a_write_concurrent_with_a_cut_is_carried_forward_by_its_author() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let b = key(2);
    let third = key(3);
    c.add(&b, "b", Role::Writer, &[]);
    c.add(&third, "c", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "k", json!(1));
    put(&mut c.stores[0], &admin, "app/x", "j", json!(1));
    c.sync_all();
    // Partition: b writes k and a new key without seeing the cut; the third store holds
    // b's write when the cut reaches it.
    let late = put(&mut c.stores[1], &b, "app/x", "k", json!("late"));
    let late2 = put(&mut c.stores[1], &b, "app/x", "n", json!("new"));
    c.stores[2]
        .ingest(vec![late.clone(), late2.clone()])
        .unwrap();
    let (_rec, _base, _) = c.stores[0].compact(&admin, "app/x", T0).unwrap();
    // The third node applies the cut: b's writes are late there, void, noted.
    send_cut(&mut c.stores, 0, 2, &third, "app/x");
    assert_eq!(get(&c.stores[2], "app/x", "k"), Some(json!(1)));
    let voided = c.stores[2].take_voided();
    assert!(
        voided.iter().any(|v| v.reason == "late_for_cut"),
        "{voided:?}"
    );
    // b learns of the cut: it carries its own late writes forward, signed by itself.
    let (rec, base) = c.stores[0].current_cut("app/x").unwrap().unwrap();
    let applied = c.stores[1]
        .apply_cut(&rec, Some(&base), Some(&b), T0)
        .unwrap();
    let carried = applied.carried.expect("b's late writes carried forward");
    assert_eq!(carried.author, b.node_id());
    c.sync_all();
    for s in &c.stores {
        assert_eq!(get(s, "app/x", "k"), Some(json!("late")));
        assert_eq!(get(s, "app/x", "n"), Some(json!("new")));
        assert_eq!(get(s, "app/x", "j"), Some(json!(1)));
    }
    assert_eq!(state(&c.stores[0], "app/x"), state(&c.stores[1], "app/x"));
    assert_eq!(state(&c.stores[0], "app/x"), state(&c.stores[2], "app/x"));
    // Late writes offered again (a peer that never cut) change nothing.
    let fp = state(&c.stores[0], "app/x");
    let _ = c.stores[0].ingest(vec![late, late2]).unwrap();
    assert_eq!(state(&c.stores[0], "app/x"), fp);
}

#[test]
fn concurrent_cuts_pick_the_same_winner_in_any_order_and_lose_nothing() {
    let mut c = Cluster::new(3);
    let a1 = c.admin.clone();
    let a2 = key(2);
    c.add(&a2, "a2", Role::Admin, &[]);
    put(&mut c.stores[0], &a1, "app/x", "k", json!(1));
    c.sync_all();
    // Each admin writes a key the other has not seen, then cuts.
    put(&mut c.stores[0], &a1, "app/x", "p", json!("from-a1"));
    put(&mut c.stores[1], &a2, "app/x", "q", json!("from-a2"));
    let (r1, b1, _) = c.stores[0].compact(&a1, "app/x", T0).unwrap();
    let (r2, b2, _) = c.stores[1].compact(&a2, "app/x", T0).unwrap();
    assert_eq!(r1.epoch, r2.epoch);
    let k3 = key(3);
    // The third store learns them in one order, the cutters each learn the other's.
    c.stores[2]
        .apply_cut(&r2, Some(&b2), Some(&k3), T0)
        .unwrap();
    c.stores[2]
        .apply_cut(&r1, Some(&b1), Some(&k3), T0)
        .unwrap();
    c.stores[0]
        .apply_cut(&r2, Some(&b2), Some(&a1), T0)
        .unwrap();
    c.stores[1]
        .apply_cut(&r1, Some(&b1), Some(&a2), T0)
        .unwrap();
    let winners: Vec<CutRecord> = c
        .stores
        .iter()
        .map(|s| s.current_cut("app/x").unwrap().unwrap().0)
        .collect();
    assert!(winners.iter().all(|w| *w == winners[0]));
    c.sync_all();
    for s in &c.stores {
        assert_eq!(get(s, "app/x", "p"), Some(json!("from-a1")));
        assert_eq!(get(s, "app/x", "q"), Some(json!("from-a2")));
        assert_eq!(get(s, "app/x", "k"), Some(json!(1)));
    }
    assert_eq!(state(&c.stores[0], "app/x"), state(&c.stores[1], "app/x"));
    assert_eq!(state(&c.stores[0], "app/x"), state(&c.stores[2], "app/x"));
}

#[test]
fn only_an_admin_cuts_and_a_forged_base_is_refused() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "k", json!(1));
    assert!(c.stores[0].compact(&w, "app/x", T0).is_err());
    let (rec, mut base, _) = c.stores[0].compact(&admin, "app/x", T0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut other = Store::join(&dir.path().join("o.db"), c.stores[0].cluster_id()).unwrap();
    other.ingest(all_changes(&c.stores[0])).unwrap();
    let n = base.len();
    base[n - 1] ^= 1;
    assert!(other.apply_cut(&rec, Some(&base), None, T0).is_err());
    assert!(other.current_cut("app/x").unwrap().is_none());
}

/// A small deterministic generator (the store tests have no sync engine, so no `sim` Rng).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Everything `from` holds of `doc` that `to` may lack: its cut records (the winner with its
/// base, the others without), then its valid changes; `to` carries its own late writes.
fn gossip(stores: &mut [Store], keys: &[lichen_crdt::SecretKey], from: usize, to: usize) {
    let records: Vec<CutRecord> = stores[from]
        .cut_records("app/x")
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    let winner = stores[from].current_cut("app/x").unwrap();
    let changes = all_changes(&stores[from]);
    let to_store = &mut stores[to];
    for r in &records {
        let base = winner
            .as_ref()
            .filter(|(w, _)| w == r)
            .map(|(_, b)| b.as_slice());
        to_store.apply_cut(r, base, Some(&keys[to]), T0).unwrap();
    }
    to_store.ingest(changes).unwrap();
}

/// Cuts under partitions (random pairwise gossip only), restarts (reopen from disk) and
/// concurrent writes and cuts by two admins. At quiescence every store holds the same heads
/// and value, and every acknowledged write is present or superseded by a later write to the
/// same key (the key holds one of the values acknowledged for it, and no key is lost).
/// `LICHEN_SIM_SEED=n` replays one seed, `LICHEN_SIM_SEEDS=a..b` sweeps wider.
#[test]
fn cuts_under_partitions_restarts_and_concurrent_writes_converge() {
    let only = std::env::var("LICHEN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let range = std::env::var("LICHEN_SIM_SEEDS").ok().and_then(|s| {
        let (a, b) = s.split_once("..")?;
        Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?)
    });
    let seeds: Vec<u64> = match (only, range) {
        (Some(s), _) => vec![s],
        (None, Some(r)) => r.collect(),
        (None, None) => (0..16).collect(),
    };
    for seed in seeds {
        let r = std::panic::catch_unwind(|| compaction_run(seed, 4, 120));
        if let Err(e) = r {
            eprintln!(
                "FAILED with seed {seed}; replay: LICHEN_SIM_SEED={seed} cargo test -p lichen-crdt \
                 --test store_compaction cuts_under_partitions"
            );
            std::panic::resume_unwind(e);
        }
    }
}

fn compaction_run(seed: u64, n: usize, steps: usize) {
    let mut rng = Rng(seed);
    let mut c = Cluster::new(n);
    let keys: Vec<lichen_crdt::SecretKey> = (1..=n as u8).map(key).collect();
    for (i, k) in keys.iter().enumerate().skip(1) {
        let role = if i == 1 { Role::Admin } else { Role::Writer };
        c.add(k, &format!("n{i}"), role, &[]);
    }
    let cluster = c.stores[0].cluster_id();
    // Acknowledged writes: key -> values.
    let mut acked: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut cuts = 0;
    for step in 0..steps {
        let who = rng.below(n as u64) as usize;
        match rng.below(10) {
            0..=4 => {
                let k = format!("k{}", rng.below(4));
                let v = format!("n{who}-{step}");
                put(&mut c.stores[who], &keys[who], "app/x", &k, json!(v));
                acked.entry(k).or_default().push(v);
            }
            5..=7 => {
                let to = rng.below(n as u64) as usize;
                if to != who {
                    gossip(&mut c.stores, &keys, who, to);
                }
            }
            8 => {
                // One of the two admins cuts what it holds.
                let admin = rng.below(2) as usize;
                if c.stores[admin].has_doc("app/x").unwrap() {
                    c.stores[admin].compact(&keys[admin], "app/x", T0).unwrap();
                    cuts += 1;
                }
            }
            _ => {
                // Restart: reopen from disk.
                let path = c.path(&format!("r{who}.db"));
                let placeholder = Store::join(&c.path(&format!("tmp{step}.db")), cluster).unwrap();
                drop(std::mem::replace(&mut c.stores[who], placeholder));
                let mut s = Store::open(&path, Some(cluster)).unwrap();
                s.set_fsync(false).unwrap();
                c.stores[who] = s;
            }
        }
    }
    // Quiescence: gossip everything to everyone until nothing changes.
    for _ in 0..4 {
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    gossip(&mut c.stores, &keys, from, to);
                }
            }
        }
    }
    let first = state(&c.stores[0], "app/x");
    for (i, s) in c.stores.iter().enumerate() {
        assert_eq!(
            state(s, "app/x"),
            first,
            "seed {seed}: store {i} diverges ({cuts} cuts)"
        );
    }
    let value = first.1.unwrap_or(json!({}));
    for (k, vs) in &acked {
        let got = value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        assert!(
            got.as_ref().is_some_and(|g| vs.contains(g)),
            "seed {seed}: key {k} holds {got:?}, not one of its acknowledged writes {vs:?}"
        );
    }
    // History is bounded by the cuts: nothing beyond one epoch of retained changes is valid.
    let held = c.stores[0].current_cut("app/x").unwrap();
    assert_eq!(held.is_some(), cuts > 0, "seed {seed}");
}

/// Many nodes (1,000 by default, `LICHEN_COMPACTION_NODES=n`): an admin cuts twice while
/// writers keep writing and news spreads by epidemic gossip only (each round every node
/// pushes to one random peer: no node ever sees the whole cluster at once). Checks at
/// quiescence as the sweep does; prints the rounds and the time taken. Run with
/// `cargo test --release -p lichen-crdt --test store_compaction many_nodes -- --ignored --nocapture`.
#[test]
#[ignore = "1,000 SQLite stores: run it by hand (see docs/benchmarks.md)"]
#[allow(clippy::needless_range_loop)] // `w` indexes both the stores and their keys
fn many_nodes_converge_on_cuts_by_gossip() {
    let n: usize = std::env::var("LICHEN_COMPACTION_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let started = std::time::Instant::now();
    let mut rng = Rng(7);
    let mut c = Cluster::new(1);
    let cluster = c.stores[0].cluster_id();
    let admin = c.admin.clone();
    // Members: the admin and 15 writers spread over the nodes; other nodes are readers.
    let writers: Vec<lichen_crdt::SecretKey> = (2..=16u8).map(key).collect();
    for (i, w) in writers.iter().enumerate() {
        c.add(w, &format!("w{i}"), Role::Writer, &[]);
    }
    let members = all_changes(&c.stores[0]);
    let mut keys: Vec<lichen_crdt::SecretKey> = vec![admin.clone()];
    for i in 1..n {
        let mut s = Store::join(&c.path(&format!("m{i}.db")), cluster).unwrap();
        s.set_fsync(false).unwrap();
        s.ingest(members.clone()).unwrap();
        c.stores.push(s);
        keys.push(if i <= writers.len() {
            writers[i - 1].clone()
        } else {
            // A non-member key of its own (distinct from every member's: a shared key would be
            // a cloned key, which equivocates as soon as both copies carry a write forward).
            let mut seed = [0xee; 32];
            seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
            lichen_crdt::SecretKey::from_seed(seed)
        });
    }
    let mut acked: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut rounds = 0;
    let mut quiet = 0;
    while quiet < 3 {
        rounds += 1;
        if rounds <= 12 {
            for w in 0..=writers.len().min(n - 1) {
                let k = format!("k{}", rng.below(8));
                let v = format!("n{w}-r{rounds}");
                put(&mut c.stores[w], &keys[w], "app/x", &k, json!(v));
                acked.entry(k).or_default().push(v);
            }
        }
        if rounds == 4 || rounds == 9 {
            c.stores[0].compact(&admin, "app/x", T0).unwrap();
        }
        let before: Vec<_> = c.stores.iter().map(|s| state(s, "app/x")).collect();
        for from in 0..n {
            let to = rng.below(n as u64) as usize;
            if to != from {
                gossip(&mut c.stores, &keys, from, to);
            }
        }
        let after: Vec<_> = c.stores.iter().map(|s| state(s, "app/x")).collect();
        let agreed = after.iter().all(|s| *s == after[0]);
        quiet = if rounds > 12 && agreed && before == after {
            quiet + 1
        } else {
            0
        };
        if rounds >= 200 {
            let mut distinct: Vec<&(Vec<[u8; 32]>, Option<serde_json::Value>)> = Vec::new();
            for st in &after {
                if !distinct.contains(&st) {
                    distinct.push(st);
                }
            }
            let epochs: std::collections::BTreeMap<u64, usize> = c
                .stores
                .iter()
                .map(|s| s.current_cut("app/x").unwrap().map_or(0, |(r, _)| r.epoch))
                .fold(Default::default(), |mut m, e| {
                    *m.entry(e).or_default() += 1;
                    m
                });
            panic!(
                "no convergence after 200 rounds: {} distinct states (heads: {:?}), nodes per epoch {epochs:?}, changed in the last round: {}",
                distinct.len(),
                distinct.iter().map(|d| d.0.len()).collect::<Vec<_>>(),
                before != after
            );
        }
    }
    let first = state(&c.stores[0], "app/x");
    let value = first.1.clone().unwrap_or(json!({}));
    for (k, vs) in &acked {
        let got = value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        assert!(
            got.as_ref().is_some_and(|g| vs.contains(g)),
            "key {k}: {got:?}"
        );
    }
    let epochs: Vec<u64> = c
        .stores
        .iter()
        .map(|s| s.current_cut("app/x").unwrap().map_or(0, |(r, _)| r.epoch))
        .collect();
    assert!(
        epochs.iter().all(|e| *e == 2),
        "every node on the second cut"
    );
    println!(
        "{n} nodes: converged after {rounds} gossip rounds in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// What does not handle compacted documents yet says so instead of calling them damaged: an
/// audit bundle is refused, and a backup holding a cut is refused by `verify` as not
/// verifiable by this build (not as tampered).
#[test]
fn audit_bundles_and_backup_verify_refuse_compacted_documents_plainly() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    put(&mut c.stores[0], &admin, "app/x", "k", json!(1));
    put(&mut c.stores[0], &admin, "app/y", "k", json!(1));
    c.stores[0].compact(&admin, "app/x", T0).unwrap();
    let e = c.stores[0]
        .audit_bundle(&admin, "app/x", &[], T0)
        .unwrap_err();
    assert!(e.to_string().contains("compacted"), "{e}");
    assert!(c.stores[0].audit_bundle(&admin, "app/y", &[], T0).is_ok());
    let file = c.path("backup.db");
    c.stores[0].backup_to(&file, admin.node_id(), T0).unwrap();
    let e = lichen_crdt::store::backup::verify(&file, &c.path("scratch.db")).unwrap_err();
    assert!(e.to_string().contains("compacted"), "{e}");
}
