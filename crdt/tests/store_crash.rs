//! Crash safety: a child process commits changes and reports each one after `write` returns;
//! the parent kills it with SIGKILL at an arbitrary moment. After reopening, every change the
//! child reported committed is there, and the store opens cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use lichen_crdt::Store;
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
