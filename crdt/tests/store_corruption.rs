//! Corruption on disk is found and healed (issue 15, point 4).
//!
//! Each story: a cluster converges, one node is stopped, a stored change in its SQLite file is
//! altered (either through SQL, so that every SQLite structure stays consistent, or by
//! flipping a byte of the file itself, as bit rot does: SQLite keeps no page checksums, so
//! neither is noticed by SQLite), the node restarts, and then:
//! * nothing damaged is applied or served: `get` and `conflicts` agree;
//! * the background scrub (or the first read) finds it, quarantines it with the changes that
//!   depend on it, and the node stops claiming them, so anti-entropy brings the good copies
//!   back from a peer;
//! * the node converges with its peers, holds the original bytes again, and counts it all
//!   in [`Store::scrub_status`].
//!
//! Replay one seed with `LICHEN_SIM_SEED=<n>`.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod sim;

use std::path::Path;

use lichen_crdt::{PathSeg, Store};
use rusqlite::{params, Connection};
use sim::{sweep, Sim, SimConfig};

const DOC: &str = "app/web";

/// How a stored change is damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// `UPDATE changes SET bytes = …` with one byte flipped: SQLite's pages stay consistent.
    SqlUpdate,
    /// One byte of the change flipped in the database file itself (bit rot).
    FileByte,
}

/// Alter the stored bytes of change `hash` in the (closed) database at `path`.
fn damage(path: &Path, hash: &[u8; 32], how: Damage) {
    let conn = Connection::open(path).unwrap();
    // Everything in the main file, so that a byte flipped there is what is read back.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let bytes: Vec<u8> = conn
        .query_row(
            "SELECT bytes FROM changes WHERE hash = ?1",
            params![hash.to_vec()],
            |r| r.get(0),
        )
        .unwrap();
    let at = bytes.len() / 2;
    let mut bad = bytes.clone();
    bad[at] ^= 0x5a;
    match how {
        Damage::SqlUpdate => {
            conn.execute(
                "UPDATE changes SET bytes = ?2 WHERE hash = ?1",
                params![hash.to_vec(), bad],
            )
            .unwrap();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
            drop(conn);
        }
        Damage::FileByte => {
            drop(conn);
            let mut file = std::fs::read(path).unwrap();
            let found: Vec<usize> = file
                .windows(bytes.len())
                .enumerate()
                .filter(|(_, w)| *w == bytes.as_slice())
                .map(|(i, _)| i)
                .collect();
            // The live row, and possibly stale copies in free pages: flip the byte in all.
            assert!(!found.is_empty(), "the change's bytes are in the file");
            for i in found {
                file[i + at] ^= 0x5a;
            }
            std::fs::write(path, file).unwrap();
        }
    }
}

/// Conflicts at every key of `doc` agree with `get` (the view), and the view with the
/// Automerge document.
fn get_and_conflicts_agree(s: &mut Store, doc: &str) {
    assert_eq!(s.check_view(doc).unwrap(), None, "view and document differ");
    let view = s.get(doc, &[]).unwrap().unwrap();
    for (k, v) in view.as_object().unwrap() {
        let all = s.conflicts(doc, &[PathSeg::Key(k.clone())]).unwrap();
        assert_eq!(all.first(), Some(v), "winner of {k}");
    }
}

/// Three nodes; nodes 0 and 1 write a chain of changes; node 2's copy of one change in the
/// middle of node 0's chain (so that later changes depend on it) is damaged while it is down.
fn story(seed: u64, how: Damage) {
    let mut s = Sim::new(seed, SimConfig::new(3));
    s.run_until(300);
    let mut chain = Vec::new();
    for i in 0..6 {
        chain.push(s.write(0, DOC, &format!("k{i}")).unwrap());
        s.run_until(s.now + 50);
        s.write(1, DOC, &format!("other{i}")).unwrap();
        s.run_until(s.now + 50);
    }
    s.settle(10_000);
    s.assert_converged();
    let victim = chain[2].hash().unwrap();
    let good = s.nodes[2].store().get_change(&victim).unwrap().unwrap();
    assert_eq!(good.bytes, chain[2].bytes);

    s.crash(2);
    damage(&s.nodes[2].path.clone(), &victim, how);
    s.restart(2);

    // Whatever reads it first, the damaged change is never used: a load refuses it and
    // serving leaves it out.
    let cluster = s.cluster;
    let author = s.nodes[0].id;
    let st = s.nodes[2].store.as_mut().unwrap();
    let served = st.changes_after(DOC, &author, 0, 100).unwrap();
    assert_eq!(served.len(), chain.len() - 1, "all but the damaged change");
    for c in &served {
        assert!(
            c.authenticate(&cluster).is_ok(),
            "seed {seed}: a damaged change was served"
        );
        assert_ne!(c.hash(), Some(victim));
    }
    if let Some(c) = st.get_change(&victim).unwrap() {
        assert_eq!(
            c.bytes, good.bytes,
            "seed {seed}: a damaged change was served"
        );
    }
    // The scrub, a few rows per step as the agent runs it, finds and quarantines it.
    let mut found = Vec::new();
    for _ in 0..20 {
        let step = s.nodes[2].store.as_mut().unwrap().scrub_step(8).unwrap();
        // As the agent does: the store changed behind the engine's back.
        s.nodes[2].engine.as_mut().unwrap().invalidate();
        found.extend(step.corrupt);
        if !found.is_empty() {
            break;
        }
    }
    assert_eq!(
        found,
        vec![(DOC.to_string(), victim)],
        "seed {seed} {how:?}: the scrub finds the damaged change"
    );
    let st = s.nodes[2].store.as_mut().unwrap();
    let status = st.scrub_status().unwrap();
    assert_eq!(status.corrupt_found, 1);
    assert!(
        status.quarantined >= 1,
        "the damaged change and its dependents wait for a good copy: {status:?}"
    );
    assert!(
        st.get_change(&victim).unwrap().is_none(),
        "no longer claimed"
    );
    // Meanwhile the node is consistent with itself.
    get_and_conflicts_agree(st, DOC);

    // Anti-entropy brings the good copy back.
    s.settle(20_000);
    s.assert_converged();
    let st = s.nodes[2].store.as_mut().unwrap();
    let back = st.get_change(&victim).unwrap().expect("healed");
    assert_eq!(back.bytes, good.bytes, "seed {seed}: the good copy is held");
    st.scrub_step(1000).unwrap();
    let status = st.scrub_status().unwrap();
    assert_eq!(status.quarantined, 0, "seed {seed}: {status:?}");
    assert!(status.healed >= 1, "{status:?}");
    assert_eq!(status.corrupt_ever, 1);
    get_and_conflicts_agree(st, DOC);
    // A full pass finds nothing more.
    let step = st.scrub_step(10_000).unwrap();
    assert!(step.corrupt.is_empty() && step.wrapped);
    // And the node writes and exchanges as before, in both directions.
    s.write(2, DOC, "after").unwrap();
    s.write(0, DOC, "after0").unwrap();
    s.settle(10_000);
    s.assert_converged();
}

#[test]
fn a_change_altered_through_sql_is_quarantined_and_healed_from_a_peer() {
    sweep("sql_update_heals", 0..3, |seed| {
        story(seed, Damage::SqlUpdate)
    });
}

#[test]
fn a_byte_flipped_in_the_database_file_is_quarantined_and_healed_from_a_peer() {
    sweep("file_byte_heals", 0..3, |seed| {
        story(seed, Damage::FileByte)
    });
}

/// The damaged change is found by a read before any scrub: loading the document for
/// `conflicts` refuses it, quarantines it, and answers from the rest; the node heals.
#[test]
fn a_load_that_meets_a_damaged_change_quarantines_it_and_the_node_heals() {
    let mut s = Sim::new(7, SimConfig::new(3));
    s.run_until(300);
    let mut chain = Vec::new();
    for i in 0..4 {
        chain.push(s.write(0, DOC, &format!("k{i}")).unwrap());
        s.run_until(s.now + 50);
    }
    s.settle(10_000);
    let victim = chain[1].hash().unwrap();
    s.crash(2);
    damage(&s.nodes[2].path.clone(), &victim, Damage::SqlUpdate);
    s.restart(2);
    let st = s.nodes[2].store.as_mut().unwrap();
    st.unload(DOC);
    get_and_conflicts_agree(st, DOC);
    assert_eq!(st.scrub_status().unwrap().corrupt_found, 1);
    assert!(st.get_change(&victim).unwrap().is_none());
    s.nodes[2].engine.as_mut().unwrap().invalidate();
    s.settle(20_000);
    s.assert_converged();
    let st = s.nodes[2].store.as_mut().unwrap();
    assert_eq!(
        st.get_change(&victim).unwrap().unwrap().bytes,
        chain[1].bytes
    );
    get_and_conflicts_agree(st, DOC);
}

/// A node whose own change was damaged refuses to write that document until the good copy is
/// back (its next write would reuse the seq), then writes again.
#[test]
fn a_node_does_not_reuse_the_seq_of_its_own_quarantined_change() {
    let mut s = Sim::new(11, SimConfig::new(2));
    s.run_until(300);
    let mut chain = Vec::new();
    for i in 0..3 {
        chain.push(s.write(1, DOC, &format!("k{i}")).unwrap());
        s.run_until(s.now + 50);
    }
    s.settle(10_000);
    let victim = chain[2].hash().unwrap();
    s.crash(1);
    damage(&s.nodes[1].path.clone(), &victim, Damage::SqlUpdate);
    s.restart(1);
    let key = s.nodes[1].sign_key.clone();
    let st = s.nodes[1].store.as_mut().unwrap();
    let step = st.scrub_step(1000).unwrap();
    assert_eq!(step.corrupt, vec![(DOC.to_string(), victim)]);
    s.nodes[1].engine.as_mut().unwrap().invalidate();
    let st = s.nodes[1].store.as_mut().unwrap();
    let err = st
        .write(
            &key,
            DOC,
            &lichen_crdt::Op::Put {
                path: vec![PathSeg::Key("x".into())],
                value: serde_json::json!(1),
            },
            0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("quarantined"), "{err}");
    s.settle(20_000);
    s.assert_converged();
    assert!(s.write(1, DOC, "x").is_some());
    s.settle(10_000);
    s.assert_converged();
    for n in &s.nodes {
        assert!(
            n.store().equivocators().unwrap().is_empty(),
            "no key flagged"
        );
    }
}

/// A damaged document snapshot is dropped and the document loaded from its changes; the
/// next maintenance saves a new one.
#[test]
fn a_damaged_snapshot_is_dropped_and_saved_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let admin = lichen_crdt::SecretKey::from_seed([1; 32]);
    let mut s = Store::create(&path, &admin, "root", 0).unwrap();
    s.set_fsync(false).unwrap();
    for i in 0..1100 {
        s.write(
            &admin,
            DOC,
            &lichen_crdt::Op::Put {
                path: vec![PathSeg::Key(format!("k{}", i % 40))],
                value: serde_json::json!(i),
            },
            0,
        )
        .unwrap();
    }
    assert_eq!(s.maintenance().unwrap(), 1);
    let before = s.get(DOC, &[]).unwrap();
    drop(s);
    {
        let conn = Connection::open(&path).unwrap();
        let mut snap: Vec<u8> = conn
            .query_row(
                "SELECT snapshot FROM snapshots WHERE doc = ?1",
                [DOC],
                |r| r.get(0),
            )
            .unwrap();
        let at = snap.len() / 2;
        snap[at] ^= 0x5a;
        conn.execute(
            "UPDATE snapshots SET snapshot = ?2 WHERE doc = ?1",
            params![DOC, snap],
        )
        .unwrap();
    }
    let mut s = Store::open(&path, None).unwrap();
    get_and_conflicts_agree(&mut s, DOC);
    assert_eq!(s.get(DOC, &[]).unwrap(), before);
    assert_eq!(s.scrub_status().unwrap().snapshots_dropped, 1);
    assert_eq!(s.maintenance().unwrap(), 1, "a new snapshot is saved");
    s.unload(DOC);
    get_and_conflicts_agree(&mut s, DOC);
    assert_eq!(s.scrub_status().unwrap().snapshots_dropped, 1);
}
