//! Backup and restore with real processes (issue 20, points 2 and 3).
//!
//! * A backup taken while a client keeps writing verifies, and the database restored from it
//!   holds every write acknowledged before the backup was asked for; a tampered copy fails
//!   `lichen backup verify`.
//! * A restore with a new key prints the `members add` command; run on the admin, it admits the
//!   restored node, which catches up with what was written after the backup.
//! * A restore with the node's own key refuses writes while it cannot reach a peer (a clear
//!   error and exit code, however long the write hold is), and once a peer is back it gets
//!   the changes its key signed after the backup and writes again; no key is flagged anywhere.
//!
//! Loopback addresses 127.0.0.210-219.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use lichen_crdt::{parse_path, Store};
use serde_json::{json, Value};

fn equivocators(a: &Agent) -> Vec<Value> {
    a.status()["equivocators"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Run the CLI with no agent (`backup verify`, `restore`).
fn lichen(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("LICHEN_API")
        .env_remove("LICHEN_DATA_DIR")
        .output()
        .expect("run lichen")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_backup_under_write_load_holds_every_acknowledged_write_and_tampering_fails_verify() {
    let c = Cluster::start(2, 210, Net::Direct);
    let a = &c.agents[0];
    // A client writing as fast as the CLI goes, recording when each write was acknowledged.
    let acked: Arc<std::sync::Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (api, dir, acked, stop) = (a.api.clone(), a.dir.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let out = std::process::Command::new(BIN)
                    .args([
                        "--api",
                        &api,
                        "put",
                        "load",
                        &format!("k{i}"),
                        &i.to_string(),
                    ])
                    .arg("--data-dir")
                    .arg(&dir)
                    .env_remove("LICHEN_TOKEN")
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", text(&out.stderr));
                acked.lock().unwrap().push((i, Instant::now()));
                i += 1;
            }
        })
    };
    wait_until("20 writes acknowledged", PATIENCE, || {
        acked.lock().unwrap().len() >= 20
    });
    let file = c.dir.path().join("a.backup");
    let began = Instant::now();
    a.ok(&["backup", "-o", s(&file)]);
    let during = acked.lock().unwrap().len();
    wait_until("writes acknowledged after the backup", PATIENCE, || {
        acked.lock().unwrap().len() >= during + 5
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let before: Vec<usize> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| *t < began)
        .map(|(i, _)| *i)
        .collect();
    assert!(before.len() >= 20);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a backup is readable by its owner only");
    // Refuses to overwrite.
    assert!(!a.cli(&["backup", "-o", s(&file)]).status.success());

    let out = lichen(&["--json", "backup", "verify", s(&file)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["summary"]["source"], json!(a.id), "{v}");
    assert_eq!(v["summary"]["with_key"], json!(false), "{v}");
    assert_eq!(
        v["summary"]["members"],
        json!({"admin": 1, "writer": 1}),
        "{v}"
    );

    let data = c.dir.path().join("restored");
    let out = lichen(&["restore", s(&file), "--data-dir", s(&data)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let store = Store::open(&data.join("lichen.db"), None).unwrap();
    for i in &before {
        assert_eq!(
            store
                .get("load", &parse_path(&format!("k{i}")).unwrap())
                .unwrap(),
            Some(json!(i)),
            "write k{i}, acknowledged before the backup began, is in it"
        );
    }
    drop(store);

    // Tampered copies: a signature, a stored value, bytes of the file.
    let cases: &[(&str, &str)] = &[
        (
            "signature",
            "UPDATE changes SET sig = zeroblob(64) WHERE id = (SELECT max(id) FROM changes WHERE doc = 'load')",
        ),
        ("value", "UPDATE kv SET value = '-1' WHERE doc = 'load' AND key = 'k3'"),
    ];
    for (what, sql) in cases {
        let t = c.dir.path().join(format!("tampered-{what}"));
        std::fs::copy(&file, &t).unwrap();
        rusqlite::Connection::open(&t)
            .unwrap()
            .execute(sql, [])
            .unwrap();
        let out = lichen(&["--json", "backup", "verify", s(&t)]);
        assert!(!out.status.success(), "{what}: a tampered backup fails");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], json!(false), "{what}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("does not verify"),
            "{what}: {v}"
        );
        let out = lichen(&["restore", s(&t), "--data-dir", s(&c.dir.path().join("x"))]);
        assert!(!out.status.success(), "{what}: nothing restored from it");
        assert!(!c.dir.path().join("x").exists());
    }
    // Bytes of the file, flipped inside a stored change (the one nearest the middle of the
    // file), wherever its bytes appear: a fixed offset may fall in a page's free space, or in
    // a free page holding a stale copy of a row, which no check reads (the copy would rightly
    // still verify).
    let t = c.dir.path().join("tampered-bytes");
    let mut bytes = std::fs::read(&file).unwrap();
    let blobs: Vec<Vec<u8>> = {
        let db = rusqlite::Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut q = db
            .prepare("SELECT bytes FROM changes WHERE doc = 'load'")
            .unwrap();
        let rows = q.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let at = |b: &[u8], bytes: &[u8]| -> Vec<usize> {
        bytes
            .windows(b.len())
            .enumerate()
            .filter(|(_, w)| *w == b)
            .map(|(i, _)| i)
            .collect()
    };
    let mid = bytes.len() / 2;
    let blob = blobs
        .iter()
        .filter(|b| b.len() >= 16)
        .filter_map(|b| Some((at(b, &bytes).first()?.abs_diff(mid), b)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, b)| b.clone())
        .expect("a stored change's bytes in the backup file");
    for i in at(&blob, &bytes) {
        let m = i + blob.len() / 2;
        for b in &mut bytes[m - 4..m + 4] {
            *b ^= 0x5a;
        }
    }
    std::fs::write(&t, &bytes).unwrap();
    let out = lichen(&["--json", "backup", "verify", s(&t)]);
    assert!(!out.status.success(), "flipped bytes fail");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("does not verify"),
        "{v}"
    );
}

#[test]
fn a_restore_with_a_new_key_is_admitted_with_the_printed_command_and_catches_up() {
    let c = Cluster::start(2, 212, Net::Direct);
    let (a, b) = (&c.agents[0], &c.agents[1]);
    assert!(b.put("cfg", "before", "1"));
    c.wait_converged("cfg", PATIENCE);
    let file = c.dir.path().join("b.backup");
    b.ok(&["backup", "-o", s(&file)]);
    assert!(a.put("cfg", "after", "2"));

    let mut r = Agent::new(c.dir.path(), "b-restored", node_ip(212, 2));
    let out = lichen(&[
        "restore",
        s(&file),
        "--data-dir",
        s(&r.dir),
        "--advertise",
        &r.advertise.to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let cmd = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("lichen "))
        .unwrap_or_else(|| panic!("no command printed:\n{printed}"));
    assert!(
        cmd.contains("--name b-restored") && cmd.contains("--role writer"),
        "{cmd}"
    );
    // Into a directory that is not empty: refused.
    let out = lichen(&["restore", s(&file), "--data-dir", s(&b.dir)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );

    a.ok(&cmd.split_whitespace().collect::<Vec<_>>());
    r.start();
    wait_until(
        "the restored node is a writer and caught up",
        PATIENCE,
        || r.status()["node"]["role"] == json!("writer") && r.get("cfg", "after") == Some(json!(2)),
    );
    assert_ne!(r.id, b.id, "a new key");
    assert!(r.put("cfg", "restored", "3"));
    wait_until("a sees the restored node's write", PATIENCE, || {
        a.get("cfg", "restored") == Some(json!(3))
    });
}

#[test]
fn a_restore_with_the_key_refuses_writes_until_it_reaches_a_peer_and_never_equivocates() {
    let mut c = Cluster::start(2, 214, Net::Direct);
    // A short write hold: the refusal below is the restore's rule, not the hold.
    std::fs::write(
        &c.agents[1].config,
        "log = \"info\"\n[sync]\nanti_entropy_ms = 200\nhold_writes_ms = 100\n",
    )
    .unwrap();
    assert!(c.agents[1].put("cfg", "before", "1"));
    c.wait_converged("cfg", PATIENCE);
    let file = c.dir.path().join("b.backup");
    let b_dir = c.agents[1].dir.clone();
    // `Agent::cli` passes `--data-dir` (b's): --with-key reads the key from there.
    c.agents[1].ok(&["backup", "-o", s(&file), "--with-key"]);
    let out = lichen(&["--json", "backup", "verify", s(&file)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["with_key"], json!(true), "{v}");
    // Signed by b after the backup, held by a: the restored node must get them back before
    // it signs anything, or it would reuse their sequence numbers.
    for i in 0..3 {
        assert!(c.agents[1].put("cfg", &format!("after{i}"), &i.to_string()));
    }
    c.wait_converged("cfg", PATIENCE);

    // b is lost; a is down too: the restored b is alone.
    c.agents[1].kill9();
    c.agents[0].terminate();
    std::fs::remove_dir_all(&b_dir).unwrap();
    let out = lichen(&["restore", s(&file), "--data-dir", s(&b_dir), "--with-key"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.agents[1].start();
    let b = &c.agents[1];
    wait_until(
        "the restored node says why it refuses writes",
        PATIENCE,
        || {
            b.log_text()
                .contains("writes are refused until it has caught up")
        },
    );
    for _ in 0..3 {
        let out = b.cli(&["put", "cfg", "isolated", "1"]);
        assert_eq!(out.status.code(), Some(1), "refused while isolated");
        let err = text(&out.stderr);
        assert!(err.contains("restored from a backup with its key"), "{err}");
        assert!(err.contains("--allow-isolated-writes"), "{err}");
    }
    assert!(b.dir.join("restored-with-key").exists());

    // The same backup restored elsewhere and started with --allow-isolated-writes: the
    // operator took the risk, it writes after the usual hold (this copy is then dropped
    // before any peer could see it).
    let other = c.dir.path().join("b-elsewhere");
    let out = lichen(&["restore", s(&file), "--data-dir", s(&other), "--with-key"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let api = format!("127.0.0.1:{}", free_tcp_port());
    let log = std::fs::File::create(c.dir.path().join("b-elsewhere.log")).unwrap();
    let mut elsewhere = Guard(
        std::process::Command::new(BIN)
            .args([
                "--api",
                &api,
                "run",
                "--name",
                "b",
                "--allow-isolated-writes",
            ])
            .args(["--data-dir", s(&other), "--config", s(&b.config)])
            .args(["--listen", &free_udp_addr(node_ip(214, 3)).to_string()])
            .env_remove("LICHEN_API")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let put = || {
        std::process::Command::new(BIN)
            .args(["--api", &api, "put", "cfg", "isolated", "1"])
            .args(["--data-dir", s(&other)])
            .env_remove("LICHEN_TOKEN")
            .output()
            .unwrap()
            .status
            .success()
    };
    wait_until(
        "the copy started with --allow-isolated-writes writes",
        PATIENCE,
        put,
    );
    let _ = elsewhere.0.kill();
    let _ = elsewhere.0.wait();

    // The peer comes back: b catches up, then writes.
    c.agents[0].start();
    let b = &c.agents[1];
    wait_until("the restored node writes once caught up", PATIENCE, || {
        b.put("cfg", "new", "5")
    });
    let v = c.wait_converged("cfg", PATIENCE);
    assert_eq!(
        v,
        json!({"before": 1, "after0": 0, "after1": 1, "after2": 2, "new": 5}),
        "nothing lost, nothing written while isolated"
    );
    for a in &c.agents {
        assert!(
            equivocators(a).is_empty(),
            "{} flagged {:?}",
            a.name,
            equivocators(a)
        );
    }
    assert!(
        !b.dir.join("restored-with-key").exists(),
        "the marker goes once caught up"
    );
}
