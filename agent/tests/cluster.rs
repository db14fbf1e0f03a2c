//! Three real `lichen` processes: join, write and read through the CLI, `watch` seeing a remote
//! write, kill -9 and restart under load with no acknowledged write lost, and a network
//! partition with concurrent writes that converge into a visible conflict. Also: a joining
//! node that was refused for a while connects within seconds of `members add`.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{node_ip, wait_until, Agent, Cluster, Lines, Net, Rng, BIN, PATIENCE};
use serde_json::{json, Value};

#[test]
fn join_write_watch_kill9_restart_converge() {
    let mut rng = Rng::from_env("join_write_watch_kill9_restart_converge");
    let mut c = Cluster::start(3, 11, Net::Direct);

    // Write on one node, read it on the others.
    assert!(c.agents[0].put("app", "replicas", "3"));
    for a in &c.agents[1..] {
        wait_until(&format!("{} reads replicas", a.name), PATIENCE, || {
            a.get("app", "replicas") == Some(json!(3))
        });
    }
    assert_eq!(c.agents[2].ok(&["get", "app", "replicas"]).trim(), "3");

    // `watch` on c sees a write made on a.
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "--api",
        &c.agents[2].api,
        "--data-dir",
        c.agents[2].dir.to_str().unwrap(),
        "watch",
        "app",
        "greeting",
        "--count",
        "2",
    ]);
    let mut watch = Lines::spawn(cmd);
    watch.expect("with the initial (absent) value", PATIENCE, |l| l == "null");
    assert!(c.agents[0].put("app", "greeting", "\"hello\""));
    watch.expect("with the remote write", PATIENCE, |l| l == "\"hello\"");
    assert!(
        watch.child.wait().unwrap().success(),
        "watch --count 2 exits 0"
    );

    // Writers on every node; kill -9 node b in the middle and restart it.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let apis: Vec<(String, String)> = c
        .agents
        .iter()
        .map(|a| (a.api.clone(), a.dir.to_str().unwrap().to_string()))
        .collect();
    let writers: Vec<_> = apis
        .into_iter()
        .enumerate()
        .map(|(n, (api, dir))| {
            let (stop, acked, counts) = (stop.clone(), acked.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut i = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let key = format!("n{n}_{i}");
                    let st = std::process::Command::new(BIN)
                        .args(["--api", &api, "--data-dir", &dir])
                        .args(["put", "acked", &key, &i.to_string()])
                        .stderr(std::process::Stdio::null())
                        .status()
                        .unwrap();
                    if st.success() {
                        acked.lock().unwrap().push((key, i));
                        counts[n].fetch_add(1, Ordering::SeqCst);
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    let kill_after = 5 + rng.below(20) as usize;
    wait_until("writes before the kill", PATIENCE, || {
        counts[1].load(Ordering::SeqCst) >= kill_after
    });
    c.agents[1].kill9();
    let others = counts[0].load(Ordering::SeqCst) + counts[2].load(Ordering::SeqCst);
    wait_until("a and c keep writing while b is down", PATIENCE, || {
        counts[0].load(Ordering::SeqCst) + counts[2].load(Ordering::SeqCst) >= others + 10
    });
    let before = counts[1].load(Ordering::SeqCst);
    c.agents[1].start();
    wait_until("b accepts writes again", PATIENCE, || {
        counts[1].load(Ordering::SeqCst) >= before + 10
    });
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }

    // Everything converges; every acknowledged write is on every node.
    let doc = c.wait_converged("acked", PATIENCE);
    let acked = acked.lock().unwrap();
    eprintln!(
        "{} acknowledged writes ({:?} per node), b killed after {kill_after}",
        acked.len(),
        counts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    );
    for (k, v) in acked.iter() {
        assert_eq!(
            doc.get(k),
            Some(&json!(v)),
            "acknowledged write {k}={v} lost"
        );
    }
    for a in &c.agents {
        assert_eq!(a.get("app", "greeting"), Some(json!("hello")));
    }
}

fn partition(net: Net, ip_base: u8) {
    let mut c = Cluster::start(3, ip_base, net);
    assert!(c.agents[0].put("cfg", "color", "\"red\""));
    c.wait_converged("cfg", PATIENCE);

    // Cut c off; write on both sides, including the same key.
    c.isolate(2);
    assert!(c.agents[0].put("cfg", "color", "\"blue\""));
    assert!(c.agents[0].put("cfg", "from_a", "1"));
    assert!(c.agents[2].put("cfg", "color", "\"green\""));
    assert!(c.agents[2].put("cfg", "from_c", "1"));
    assert_eq!(c.agents[0].get("cfg", "color"), Some(json!("blue")));
    assert_eq!(c.agents[2].get("cfg", "color"), Some(json!("green")));
    // b hears from a but not from c while the cut lasts.
    wait_until("b sees a's write", PATIENCE, || {
        c.agents[1].get("cfg", "from_a").is_some()
    });
    assert_eq!(c.agents[1].get("cfg", "from_c"), None);

    c.heal();
    let doc = c.wait_converged("cfg", PATIENCE);
    assert_eq!(doc["from_a"], json!(1));
    assert_eq!(doc["from_c"], json!(1));
    let winner = doc["color"].clone();
    assert!(winner == json!("blue") || winner == json!("green"), "{doc}");
    for a in &c.agents {
        let out = a.ok(&["--json", "conflicts", "cfg", "color"]);
        let vals: Vec<Value> = serde_json::from_str(&out).expect("conflicts --json is JSON");
        assert_eq!(vals.len(), 2, "{}: {out}", a.name);
        assert_eq!(vals[0], winner, "winner first on {}", a.name);
        assert!(vals.contains(&json!("blue")) && vals.contains(&json!("green")));
    }
}

/// Portable: the agents talk through an in-process relay that drops c's traffic.
#[test]
fn partition_through_relay_converges_with_visible_conflict() {
    partition(Net::Relay, 14);
}

/// As root with iptables: DROP rules between c's address and the others' (removed in Drop).
#[test]
fn partition_with_iptables_converges_with_visible_conflict() {
    if !common::iptables_usable() {
        eprintln!(
            "skipped: needs root and a working `iptables` (the relay test covers partitions)"
        );
        return;
    }
    partition(Net::Direct, 17);
}

/// A joining node is refused by its seed until an admin runs `members add`. However long it
/// has been refused, it must see the cluster's data within seconds of being admitted (its
/// redials of the seed are capped at 1 s while it waits), not after a transport backoff that
/// has grown towards 30 s.
#[test]
fn joining_node_syncs_within_seconds_of_admission() {
    let mut c = Cluster::start(1, 31, Net::Direct);
    assert!(c.agents[0].put("app", "replicas", "3"));
    let token = c.agents[0].status()["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut b = Agent::new(c.dir.path(), "b", node_ip(31, 1));
    b.join = Some(token);
    b.start();
    c.agents.push(b);
    let (a, b) = (&c.agents[0], &c.agents[1]);

    // Let the seed refuse b seven times. With the uncapped backoff (200 ms doubling) that
    // takes about 19 s on average and b's next pause would be 12.8 s to 25.6 s.
    let refusals = || a.log_text().matches("incoming handshake failed").count();
    wait_until("a refused b seven times", Duration::from_secs(60), || {
        refusals() >= 7
    });
    assert_eq!(b.get("app", "replicas"), None, "b is not admitted yet");

    a.ok(&["members", "add", &b.id, "--role", "writer", "--name", "b"]);
    let admitted = std::time::Instant::now();
    wait_until(
        "b reads the cluster's data after admission",
        Duration::from_secs(8),
        || b.get("app", "replicas") == Some(json!(3)),
    );
    eprintln!("b synced {:?} after `members add`", admitted.elapsed());
    wait_until("b knows it is a writer", PATIENCE, || {
        b.status()["node"]["role"] == "writer"
    });
}

/// A node restored from an old copy of its data directory (a backup, a disk image) lacks the
/// changes it made since, and its peers hold them. Had it written before getting them back,
/// its write would reuse one of their sequence numbers, and every node would flag its key as
/// equivocating (void from there on). So after a start a node holds its own writes until it
/// has caught up with a peer: here b comes back from a copy while a is down; b's write waits
/// for a, then lands after b's later changes, and no key is flagged.
#[test]
fn a_node_restored_from_an_old_copy_of_its_data_catches_up_before_it_writes() {
    let mut c = Cluster::start(2, 51, Net::Direct);
    // Long enough that only a catch-up can release b's writes in this story.
    let mut cfg = std::fs::read_to_string(&c.agents[1].config).unwrap();
    cfg.push_str("hold_writes_ms = 600000\n");
    std::fs::write(&c.agents[1].config, cfg).unwrap();
    assert!(c.agents[1].put("app", "k", "1"));
    wait_until("a reads k = 1", PATIENCE, || {
        c.agents[0].get("app", "k") == Some(json!(1))
    });

    // A copy of b's data directory, then two more writes of b that a receives.
    c.agents[1].terminate();
    let backup = c.dir.path().join("b-backup");
    copy_dir(&c.agents[1].dir, &backup);
    c.agents[1].start();
    wait_until("b caught up and writes", PATIENCE, || {
        c.agents[1].status()["writes_held"].is_null()
    });
    assert!(c.agents[1].put("app", "k", "2"));
    assert!(c.agents[1].put("app", "k", "3"));
    wait_until("a reads k = 3", PATIENCE, || {
        c.agents[0].get("app", "k") == Some(json!(3))
    });

    // a goes down; b comes back from the copy and is asked to write.
    c.agents[0].terminate();
    c.agents[1].terminate();
    std::fs::remove_dir_all(&c.agents[1].dir).unwrap();
    copy_dir(&backup, &c.agents[1].dir);
    c.agents[1].start();
    assert_eq!(c.agents[1].get("app", "k"), Some(json!(1)), "the old copy");
    let put = std::process::Command::new(BIN)
        .args(["--api", &c.agents[1].api, "put", "app", "later", "4"])
        .arg("--data-dir")
        .arg(&c.agents[1].dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("b holds the write", PATIENCE, || {
        c.agents[1].status()["writes_held"] == json!(1)
    });
    let mut put = common::Guard(put);
    assert!(
        put.0.try_wait().unwrap().is_none(),
        "the write returned while held"
    );
    let metrics = common::http_get(&c.agents[1].api, "/metrics");
    assert_eq!(common::metric(&metrics, "lichen_writes_held"), Some(1.0));
    assert!(c.agents[1].ok(&["status"]).contains("writes held: 1"));

    // a is back: b gets its own k = 2 and 3 back first, then writes.
    c.agents[0].start();
    assert!(put.wait_exit(PATIENCE).success(), "the held write fails");
    for a in &c.agents {
        wait_until(&format!("{} converges", a.name), PATIENCE, || {
            a.get("app", "k") == Some(json!(3)) && a.get("app", "later") == Some(json!(4))
        });
        assert_eq!(
            a.status()["equivocators"],
            json!([]),
            "{} flags a key",
            a.name
        );
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}
