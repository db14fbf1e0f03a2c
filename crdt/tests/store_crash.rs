//! Crash safety: a child process commits changes and reports each one after `write` returns;
//! the parent kills it with SIGKILL at an arbitrary moment. After reopening, every change the
//! child reported committed is there, and the store opens cleanly.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use lichen_crdt::{Outcome, RejectReason, Role, Store};
use serde_json::json;

const CHILD_ENV: &str = "LICHEN_CRASH_CHILD_DB";

/// Runs only as the child: write forever, printing each committed change hash.
#[test]
#[ignore = "run by kill9_loses_no_acknowledged_write as a child process"]
fn crash_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let admin = key(1);
    let mut s = Store::open(std::path::Path::new(&path), None).unwrap();
    for i in 0u64.. {
        let doc = format!("app/d{}", i % 3);
        let value = json!(format!("{}-{i}", std::process::id()));
        let ch = put(&mut s, &admin, &doc, &format!("k{}", i % 50), value);
        println!("committed {} {}", doc, hex(&ch.hash().unwrap()));
    }
}

/// Runs only as the child: receive changes from a second store forever, with received
/// changes not fsynced (`set_fsync_policy(true, false)`), printing each one once ingested.
#[test]
#[ignore = "run by kill9_loses_no_ingested_change as a child process"]
fn crash_child_receiver() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let path = std::path::Path::new(&path);
    let admin = key(1);
    let mut src = Store::open(&path.with_extension("src"), None).unwrap();
    src.set_fsync(false).unwrap();
    let mut s = Store::open(path, None).unwrap();
    s.set_fsync_policy(true, false).unwrap();
    // A previous round may have been killed between writing to the source and ingesting:
    // catch up first, or the next change would wait for its predecessor (a seq gap).
    s.ingest(all_changes(&src)).unwrap();
    for i in 0u64.. {
        let doc = format!("app/d{}", i % 3);
        let value = json!(format!("{}-{i}", std::process::id()));
        let ch = put(&mut src, &admin, &doc, &format!("k{}", i % 50), value);
        let report = s.ingest(vec![ch.clone()]).unwrap();
        assert_eq!(report.applied_count(), 1);
        println!("committed {} {}", doc, hex(&ch.hash().unwrap()));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    kill9_rounds("crash_child_writer");
}

/// Received changes committed without fsync (the agent's default `fsync = "local"`) still
/// survive a process crash.
#[test]
fn kill9_loses_no_ingested_change() {
    kill9_rounds("crash_child_receiver");
}

fn kill9_rounds(child_test: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let cluster = Store::create(&path, &key(1), "root", T0)
        .unwrap()
        .cluster_id();
    // The receiver's source: a second replica of the same cluster.
    std::fs::copy(&path, path.with_extension("src")).unwrap();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                child_test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut acked = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("committed ") {
                acked.push(rest.to_string());
                // Kill at a different point each round, mid-stream.
                if acked.len() >= 40 + round * 37 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(acked.len() >= 40, "child wrote too little");
        let s = Store::open(&path, Some(cluster)).unwrap();
        for a in &acked {
            let (doc, h) = a.split_once(' ').unwrap();
            let hash: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let got = s.get_change(&hash.try_into().unwrap()).unwrap();
            assert!(
                got.is_some(),
                "round {round}: acknowledged change {h} of {doc} lost"
            );
        }
        // The materialized view agrees with the changes: the last acknowledged value is there.
        assert!(s.get("app/d0", &[]).unwrap().is_some());
    }
}

/// The files of a closed store, copied aside (a disk as it was at that moment).
fn copy_store_files(db: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let f = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if f.exists() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// Put a copy taken by `copy_store_files` back in place of the store's files.
fn restore_store_files(from: &std::path::Path, db: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let f = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        let _ = std::fs::remove_file(&f);
        let saved = from.join(f.file_name().unwrap());
        if saved.exists() {
            std::fs::copy(&saved, &f).unwrap();
        }
    }
}

/// Why a writer's own change is fsynced before anyone hears of it (the agent's default
/// `fsync = "local"`; `always` too). A power loss is modelled by putting back a copy of the
/// writer's files taken before its last write: that change reached a peer but not the
/// writer's disk. The writer's next write reuses the change's sequence number with other
/// content, which is exactly what a cloned key does, so every replica that sees both flags
/// the key in that document and voids both. With `fsync = "never"` a power loss between a
/// write and the kernel's own flush can do this. A writer that first fetches its lost change
/// back from a peer (what anti-entropy does when it reconnects) carries on cleanly.
#[test]
fn a_writer_that_loses_a_change_its_peer_holds_equivocates_if_it_writes_before_resyncing() {
    let mut c = Cluster::new(2);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    // The writer gets its own replica of the cluster.
    let cluster = c.stores[0].cluster_id();
    let wdb = c.path("w.db");
    let mut ws = Store::join(&wdb, cluster).unwrap();
    ws.set_fsync(false).unwrap();
    ws.ingest(all_changes(&c.stores[0])).unwrap();
    let first = put(&mut ws, &w, "app/x", "k", json!(1));
    assert_eq!(
        outcome(&c.stores[1].ingest(vec![first.clone()]).unwrap()),
        Outcome::Applied
    );

    // The disk as it is now; then a write that reaches the peer but, as far as the writer's
    // disk is concerned, never happened.
    drop(ws);
    let before = c.path("w-before-power-loss");
    copy_store_files(&wdb, &before);
    let mut ws = Store::open(&wdb, Some(cluster)).unwrap();
    ws.set_fsync(false).unwrap();
    let lost = put(&mut ws, &w, "app/x", "k", json!(2));
    assert_eq!(
        outcome(&c.stores[1].ingest(vec![lost.clone()]).unwrap()),
        Outcome::Applied
    );
    drop(ws);
    restore_store_files(&before, &wdb);

    // Written before resyncing: the same seq with other content, a fork of the key.
    let mut ws = Store::open(&wdb, Some(cluster)).unwrap();
    ws.set_fsync(false).unwrap();
    assert!(
        ws.get_change(&lost.hash().unwrap()).unwrap().is_none(),
        "rolled back"
    );
    let again = put(&mut ws, &w, "app/x", "k", json!(3));
    assert_eq!(
        lichen_crdt::header::parse(&again.bytes).unwrap().seq,
        lichen_crdt::header::parse(&lost.bytes).unwrap().seq
    );
    let r = c.stores[1].ingest(vec![again]).unwrap();
    assert_eq!(outcome(&r), Outcome::Rejected(RejectReason::Equivocation));
    assert_eq!(c.stores[1].equivocators().unwrap(), vec![w.node_id()]);
    // Both variants are void: the key's value is back to the write before the fork.
    assert_eq!(get(&c.stores[1], "app/x", "k"), Some(json!(1)));
    drop(ws);

    // The same loss, but the writer first gets its change back from the peer.
    restore_store_files(&before, &wdb);
    let mut ws = Store::open(&wdb, Some(cluster)).unwrap();
    ws.set_fsync(false).unwrap();
    let mut fresh = Store::join(&c.path("fresh.db"), cluster).unwrap();
    fresh.set_fsync(false).unwrap();
    fresh.ingest(all_changes(&c.stores[0])).unwrap();
    fresh.ingest(vec![first, lost.clone()]).unwrap();
    ws.ingest(all_changes(&fresh)).unwrap();
    assert!(ws.get_change(&lost.hash().unwrap()).unwrap().is_some());
    let next = put(&mut ws, &w, "app/x", "k", json!(3));
    assert_eq!(
        outcome(&fresh.ingest(vec![next]).unwrap()),
        Outcome::Applied
    );
    assert!(fresh.equivocators().unwrap().is_empty());
    assert_eq!(get(&fresh, "app/x", "k"), Some(json!(3)));
}
