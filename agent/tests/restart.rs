//! Restarts, restores and clones with real processes (issue 15, points 1 and 5).
//!
//! * A node killed with `kill -9` and restored from a crash-consistent copy of its data
//!   directory (taken while it ran, like a VM snapshot) reconnects at once (its peers hold
//!   stale connections from its previous run, which its new ones replace), catches up before
//!   it writes, and loses nothing: the writes it acknowledged after the copy come back from
//!   its peers, its new write uses a fresh sequence number, no key is flagged. Run for both
//!   key orders (the restored node's key lowest, and highest): the transport's old duplicate
//!   tie-break kept the stale connection unless the restarted node had the lower key.
//! * A copy of a node's data directory running next to the original with its own address
//!   (a cloned key) writes its address into the membership document once, not in a loop;
//!   once the two write concurrently the key is flagged everywhere, its connections are
//!   refused, and the honest nodes converge.
//!
//! Keys are generated with `lichen keygen` until they are in the wanted order, then placed in
//! the data directories before the agents start. Loopback addresses 127.0.0.60-79.
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
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Generate `n` key files under `dir`; returns (node id, path), sorted by node id (the hex
/// id orders like the key bytes the transport compares).
fn sorted_keys(dir: &Path, n: usize) -> Vec<(String, std::path::PathBuf)> {
    let mut keys: Vec<(String, std::path::PathBuf)> = (0..n)
        .map(|i| {
            let path = dir.join(format!("key{i}"));
            let out = Command::new(BIN)
                .args(["keygen", "--out"])
                .arg(&path)
                .output()
                .expect("run lichen keygen");
            assert!(out.status.success(), "keygen failed");
            let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
            assert_eq!(id.len(), 64, "node id {id}");
            (id, path)
        })
        .collect();
    keys.sort();
    keys
}

/// Put `key` in the agent's data directory before its first start.
fn place_key(agent: &Agent, key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&agent.dir).unwrap();
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(key, agent.dir.join("node.key")).unwrap();
}

/// Start agents `a` (founder, admin) and writers `b`, `c`… with the given key files, as
/// [`Cluster::start`] does; returns once all are members connected to each other.
fn cluster_with_keys(ip_base: u8, keys: &[&Path], dir: tempfile::TempDir) -> Cluster {
    let mut agents: Vec<Agent> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let name = ((b'a' + i as u8) as char).to_string();
            let a = Agent::new(dir.path(), &name, node_ip(ip_base, i));
            place_key(&a, k);
            a
        })
        .collect();
    agents[0].start();
    let token = agents[0].status()["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    for a in &mut agents[1..] {
        a.join = Some(token.clone());
        a.start();
    }
    for a in &agents[1..] {
        agents[0].ok(&[
            "members", "add", &a.id, "--role", "writer", "--name", &a.name,
        ]);
    }
    let c = Cluster {
        agents,
        relay: None,
        iptables: None,
        dir,
    };
    c.wait_connected();
    c
}

/// Copy a directory tree (files only one level deep are enough for a data directory).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A crash-consistent copy of a running agent's data directory: the process is frozen
/// (SIGSTOP) while its files are copied, as a VM snapshot would freeze the disk.
fn snapshot(agent: &Agent, to: &Path) {
    agent.signal("STOP");
    copy_dir(&agent.dir, to);
    agent.signal("CONT");
}

fn connected_peers(a: &Agent) -> usize {
    a.status()["peers"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["connected"] == true).count())
        .unwrap_or(0)
}

fn equivocators(a: &Agent) -> Vec<Value> {
    a.status()["equivocators"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The restore scenario for one key order: `restored_rank` is the position of the restored
/// node's key among the three (0: lowest, 2: highest).
fn restore_loses_nothing(ip_base: u8, restored_rank: usize) {
    let dir = tempfile::tempdir().unwrap();
    let keys = sorted_keys(dir.path(), 3);
    // Node b (index 1, a writer) is restored; it gets the key of rank `restored_rank`.
    let mut order: Vec<&Path> = keys.iter().map(|(_, p)| p.as_path()).collect();
    let b_key = order.remove(restored_rank);
    order.insert(1, b_key);
    let mut c = cluster_with_keys(ip_base, &order, dir);
    let b_id = c.agents[1].id.clone();
    assert_eq!(b_id, keys[restored_rank].0);
    eprintln!("restored node {b_id} has key rank {restored_rank} of 3");

    assert!(c.agents[1].put("cfg", "before", "1"));
    c.wait_converged("cfg", PATIENCE);
    let snap = c.dir.path().join("b-snapshot");
    snapshot(&c.agents[1], &snap);

    // Acknowledged and replicated after the copy: the restored node must get them back.
    for i in 0..4 {
        assert!(c.agents[1].put("cfg", &format!("after{i}"), &i.to_string()));
    }
    c.wait_converged("cfg", PATIENCE);

    // Crash, restore the copy, restart on the same address.
    c.agents[1].kill9();
    std::fs::remove_dir_all(&c.agents[1].dir).unwrap();
    copy_dir(&snap, &c.agents[1].dir);
    let started = Instant::now();
    c.agents[1].start();
    assert!(
        c.agents[1].put("cfg", "new", "5"),
        "the restored node writes"
    );
    let b = &c.agents[1];
    // Connected to both peers long before their 20 s idle timeout would have dropped the
    // stale connections.
    wait_until(
        "the restored node is connected to both peers",
        Duration::from_secs(10),
        || connected_peers(b) == 2,
    );
    for a in &c.agents {
        wait_until(
            &format!("{} is connected to both peers", a.name),
            Duration::from_secs(10),
            || connected_peers(a) == 2,
        );
    }
    eprintln!("reconnected within {:?}", started.elapsed());

    let v = c.wait_converged("cfg", PATIENCE);
    assert_eq!(
        v,
        serde_json::json!({"before": 1, "after0": 0, "after1": 1, "after2": 2, "after3": 3, "new": 5}),
        "nothing lost"
    );
    for a in &c.agents {
        assert!(
            equivocators(a).is_empty(),
            "{} flagged {:?}",
            a.name,
            equivocators(a)
        );
    }
    let log = c.agents[1].log_text();
    assert!(
        log.contains("caught up with a peer: writes resume"),
        "the restored node caught up before writing"
    );
    assert!(
        !log.contains("writing without it"),
        "the restored node's hold expired with its peers up"
    );
}

#[test]
fn restored_node_with_the_lowest_key_loses_nothing() {
    restore_loses_nothing(60, 0);
}

#[test]
fn restored_node_with_the_highest_key_loses_nothing() {
    restore_loses_nothing(64, 2);
}

/// The number of stored changes of the membership document on `a`.
fn membership_changes(a: &Agent) -> u64 {
    a.status()["docs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["doc"] == "_members")
        .and_then(|d| d["changes"].as_u64())
        .expect("membership doc in status")
}

/// The addresses the membership document lists for `id`, as seen by `a`.
fn listed_addrs(a: &Agent, id: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&a.ok(&["--json", "members", "ls"])).unwrap();
    let list = v["members"].as_array().or(v.as_array()).cloned();
    list.unwrap_or_default()
        .into_iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["addrs"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn cloned_data_directory_cannot_split_the_membership() {
    let mut c = Cluster::start(3, 68, Net::Direct);
    let o = 1; // the original
    let o_id = c.agents[o].id.clone();
    assert!(c.agents[0].put("cfg", "base", "1"));
    c.wait_converged("cfg", PATIENCE);
    wait_until(
        "the membership document is the same everywhere",
        PATIENCE,
        || {
            let h = c.agents[0].heads("_members");
            c.agents.iter().all(|a| a.heads("_members") == h)
        },
    );
    let before = membership_changes(&c.agents[0]);
    let snap = c.dir.path().join("clone-data");
    snapshot(&c.agents[o], &snap);

    // The clone: the copied data directory, its own address.
    let mut clone = Agent::new(c.dir.path(), "b-clone", node_ip(68, 3));
    std::fs::remove_dir_all(&clone.dir).ok();
    copy_dir(&snap, &clone.dir);
    clone.start();
    assert_eq!(clone.id, o_id);
    let clone_addr = clone.advertise.to_string();
    c.agents.push(clone);
    let cl = 3;

    // The clone catches up, then writes its address once.
    wait_until(
        "the membership document lists the clone's address",
        PATIENCE,
        || listed_addrs(&c.agents[0], &o_id) == vec![Value::from(clone_addr.clone())],
    );
    // Nobody writes: the membership document stops growing (before, the original and the
    // clone rewrote the key's address in turn for as long as both ran).
    let settle = Instant::now();
    let mut n = membership_changes(&c.agents[0]);
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(4) {
        assert!(
            settle.elapsed() < PATIENCE,
            "the membership document keeps growing: {n} changes"
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = membership_changes(&c.agents[0]);
        if now != n {
            n = now;
            stable_since = Instant::now();
        }
    }
    assert_eq!(n, before + 1, "one membership change: the clone's address");
    for a in &c.agents {
        assert!(
            equivocators(a).is_empty(),
            "{} flagged {:?} while nobody wrote",
            a.name,
            equivocators(a)
        );
    }
    for a in [&c.agents[o], &c.agents[cl]] {
        let published = a
            .log_text()
            .matches("published this node's addresses")
            .count();
        assert!(published <= 1, "{} published {published} times", a.name);
    }

    // The original and the clone each write while the honest nodes are frozen: two
    // different changes at one sequence number.
    c.agents[0].signal("STOP");
    c.agents[2].signal("STOP");
    assert!(c.agents[o].put("cfg", "who", "\"original\""));
    assert!(c.agents[cl].put("cfg", "who", "\"clone\""));
    c.agents[0].signal("CONT");
    c.agents[2].signal("CONT");

    // Both honest nodes flag the key and refuse its connections.
    for h in [0, 2] {
        wait_until(
            &format!("{} flags the cloned key", c.agents[h].name),
            PATIENCE,
            || equivocators(&c.agents[h]).contains(&Value::from(o_id.clone())),
        );
    }
    for h in [0, 2] {
        wait_until(
            &format!("{} has no connection to the cloned key", c.agents[h].name),
            PATIENCE,
            || {
                c.agents[h].status()["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["id"] == o_id.as_str())
                    .all(|p| p["connected"] == false)
            },
        );
    }
    for k in [o, cl] {
        let a = &c.agents[k];
        wait_until(
            &format!("{} is refused by the honest nodes", a.name),
            PATIENCE,
            || a.log_text().contains("peer refuses this node's key") && connected_peers(a) == 0,
        );
    }

    // The honest nodes converge (same values and heads) and stay connected to each other.
    let honest = [&c.agents[0], &c.agents[2]];
    for doc in ["cfg", "_members"] {
        wait_until(&format!("honest nodes converge on {doc}"), PATIENCE, || {
            honest[0].heads(doc).is_some()
                && honest[0].heads(doc) == honest[1].heads(doc)
                && (doc == "_members" || honest[0].get(doc, "") == honest[1].get(doc, ""))
        });
    }
    // An honest node that restarts refuses the key from its start (it knew the flag).
    let flagged_line = "key flagged for equivocation";
    assert_eq!(c.agents[0].log_text().matches(flagged_line).count(), 1);
    c.agents[0].kill9();
    c.agents[0].start();
    wait_until("a refuses the flagged key from its start", PATIENCE, || {
        c.agents[0].log_text().matches(flagged_line).count() == 2
    });
    wait_until("a reconnects to c", PATIENCE, || {
        connected_peers(&c.agents[0]) == 1 && connected_peers(&c.agents[2]) == 1
    });
    let honest = [&c.agents[0], &c.agents[2]];

    // Both variants are void: neither machine's write stands.
    assert_eq!(
        honest[0].get("cfg", ""),
        Some(serde_json::json!({"base": 1}))
    );
    assert_eq!(
        honest[0].status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["connected"] == true)
            .count(),
        1
    );
}
