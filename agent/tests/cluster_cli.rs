//! The CLI and the daemon's process behaviour, with real `lichen` processes: exit codes,
//! `--json` output, messages for non-members, SIGTERM, SIGHUP, `lichen` with no arguments,
//! and `lichen demo`.
//!
//! Exit codes (see `client::exit`): 0 ok, 1 other failure, 2 usage (including a VALUE that is
//! not JSON: the CLI checks it before calling the agent), 3 agent unreachable, 4 not found,
//! 5 denied (not a member, role, scope), 6 invalid request refused by the agent (bad path, a
//! non-object whole document).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    free_tcp_port, free_udp_addr, http_get, metric, node_ip, wait_until, Agent, Cluster, Guard,
    Net, BIN, PATIENCE,
};
use serde_json::{json, Value};

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn parses(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn exit_codes_json_output_and_membership_messages() {
    // Nothing listening.
    let out = Command::new(BIN)
        .args(["--api", &format!("127.0.0.1:{}", free_tcp_port()), "status"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("lichen run"), "{}", stderr(&out));
    // Usage errors are clap's 2.
    assert_eq!(
        code(&Command::new(BIN).arg("frobnicate").output().unwrap()),
        2
    );

    let mut c = Cluster::start(1, 21, Net::Direct);
    let token = c.agents[0].status()["join_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut b = Agent::new(c.dir.path(), "b", node_ip(21, 1));
    b.join = Some(token);
    b.start();
    c.agents.push(b);
    let (a, b) = (&c.agents[0], &c.agents[1]);

    // A node that is not a member yet is told what to run.
    let out = b.cli(&["put", "cfg", "x", "1"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let expected = format!("lichen members add {} --role writer --name b", b.id);
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(b.log_text().contains(&expected), "the banner says it too");

    // Not found, invalid values and paths.
    a.ok(&["put", "cfg", "x", "1"]);
    assert_eq!(code(&a.cli(&["get", "nodoc"])), 4);
    assert_eq!(code(&a.cli(&["get", "cfg", "missing"])), 4);
    let out = a.cli(&["put", "cfg", "x", "{bad"]);
    assert_eq!(code(&out), 2, "a VALUE that is not JSON is a usage error");
    assert!(stderr(&out).contains("quote it"), "{}", stderr(&out));
    assert_eq!(code(&a.cli(&["put", "cfg", "", "[1]"])), 6);
    assert_eq!(code(&a.cli(&["put", "cfg", "a[", "1"])), 6);

    // --json output parses.
    let put = parses(&a.ok(&["--json", "put", "cfg", "y", "{\"z\": [1, 2]}"]));
    assert_eq!(put["changed"], true);
    let got = parses(&a.ok(&["--json", "get", "cfg", "y"]));
    assert_eq!(got["value"], json!({"z": [1, 2]}));
    assert!(got["heads"].is_string());
    assert_eq!(parses(&a.ok(&["--json", "ls"])), json!(["cfg"]));
    assert_eq!(parses(&a.ok(&["--json", "ls", "cfg"])), json!(["x", "y"]));
    let hist = parses(&a.ok(&["--json", "history", "cfg"]));
    assert_eq!(hist.as_array().map(Vec::len), Some(2), "{hist}");
    let st = parses(&a.ok(&["--json", "status"]));
    assert_eq!(st["node"]["role"], "admin");
    assert!(st["join_token"].is_string() && st["peers"].is_array());
    let members = parses(&a.ok(&["--json", "members", "ls"]));
    assert_eq!(
        members.as_array().map(Vec::len),
        Some(1),
        "b is not admitted"
    );
    assert_eq!(
        parses(&a.ok(&["--json", "conflicts", "cfg", "x"])),
        json!([1])
    );

    // Admitted as a writer, b may write but not administer.
    a.ok(&["members", "add", &b.id, "--role", "writer", "--name", "b"]);
    wait_until("b learns it is a writer", PATIENCE, || {
        b.status()["node"]["role"] == "writer"
    });
    wait_until("b's write is accepted", PATIENCE, || b.put("cfg", "x", "2"));
    let stranger = "ab".repeat(32);
    let out = b.cli(&["members", "add", &stranger]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(code(&b.cli(&["members", "role", &a.id, "writer"])), 5);
    assert_eq!(code(&b.cli(&["members", "remove", &a.id])), 5);
}

#[test]
fn a_second_agent_on_the_same_data_directory_is_refused_and_the_first_keeps_going() {
    let c = Cluster::start(1, 26, Net::Direct);
    let a = &c.agents[0];
    assert!(a.put("doc", "k", "1"));
    // Same data directory, its own ports: it must not share the database with the first.
    let second_api = format!("127.0.0.1:{}", free_tcp_port());
    let child = Command::new(BIN)
        .args(["--api", &second_api, "run", "--name", "twin"])
        .arg("--data-dir")
        .arg(&a.dir)
        .args(["--listen", &free_udp_addr(node_ip(26, 1)).to_string()])
        .env_remove("RUST_LOG")
        .env_remove("LICHEN_API")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = Guard(child);
    let st = g.wait_exit(PATIENCE);
    assert_eq!(st.code(), Some(1), "a refused start exits 1");
    let mut err = String::new();
    std::io::Read::read_to_string(g.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("in use by another process"),
        "the error names the cause: {err}"
    );
    // The first agent did not notice.
    assert!(a.put("doc", "k", "2"));
    assert_eq!(a.get("doc", "k"), Some(json!(2)));
}

#[test]
fn sigterm_shuts_down_cleanly_and_keeps_acknowledged_writes() {
    let mut c = Cluster::start(1, 24, Net::Direct);
    let api = c.agents[0].api.clone();
    let dir = c.agents[0].dir.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let ok = Command::new(BIN)
                    .args([
                        "--api",
                        &api,
                        "put",
                        "acked",
                        &format!("k{i}"),
                        &i.to_string(),
                    ])
                    .arg("--data-dir")
                    .arg(&dir)
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                if ok {
                    acked.lock().unwrap().push(i);
                } else {
                    return;
                }
            }
        })
    };
    wait_until("some writes", PATIENCE, || {
        acked.lock().unwrap().len() >= 10
    });
    let st = c.agents[0].terminate();
    assert_eq!(st.code(), Some(0), "SIGTERM exits 0");
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(c.agents[0].log_text().contains("stopped cleanly"));

    c.agents[0].start();
    let doc = c.agents[0].get("acked", "").unwrap();
    let acked = acked.lock().unwrap();
    for i in acked.iter() {
        assert_eq!(doc[format!("k{i}")], json!(i), "acknowledged k{i} lost");
    }
}

#[test]
fn an_idle_agent_checkpoints_its_write_ahead_log_so_the_next_burst_does_not_grow_it() {
    let mut c = Cluster::start(1, 27, Net::Direct);
    let a = &mut c.agents[0];
    let wal = a.dir.join("lichen.db-wal");
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    // 1 from a commit until the idle checkpoint after it.
    let pending = || {
        metric(
            &http_get(&a.api, "/metrics"),
            "lichen_wal_checkpoint_pending",
        ) == Some(1.0)
    };
    let burst = |keys: std::ops::Range<usize>| {
        for i in keys {
            a.ok(&["put", "cfg", &format!("k{i}"), &i.to_string()]);
        }
    };
    // A second after a burst of writes the log is copied into the database...
    burst(0..30);
    wait_until("the idle agent checkpoints", PATIENCE, || !pending());
    let size = wal_len();
    assert!(size > 0);
    // ...so the next (smaller) burst writes the log from its beginning again instead of
    // growing it.
    burst(30..40);
    assert_eq!(wal_len(), size, "the log restarted from its beginning");
    wait_until("the idle agent checkpoints again", PATIENCE, || !pending());
    let m = http_get(&a.api, "/metrics");
    assert!(
        metric(&m, "lichen_wal_checkpoints_total") >= Some(2.0),
        "{m}"
    );
    // Nothing was lost by it.
    a.kill9();
    a.start();
    for i in 0..40 {
        assert_eq!(a.get("cfg", &format!("k{i}")), Some(json!(i)));
    }
}

#[test]
fn sighup_with_an_invalid_config_keeps_running_with_the_old_one() {
    let mut c = Cluster::start(1, 25, Net::Direct);
    let a = &mut c.agents[0];
    let good = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(&a.config, "fsync = \"sometimes\"\n").unwrap();
    a.signal("HUP");
    wait_until("the reload error is logged", PATIENCE, || {
        a.log_text()
            .contains("new configuration is invalid; keeping the old one")
    });
    assert!(a.alive(), "still running");
    a.ok(&["put", "cfg", "x", "1"]);
    let m = http_get(&a.api, "/metrics");
    assert_eq!(metric(&m, "lichen_config_reload_errors_total"), Some(1.0));
    assert_eq!(metric(&m, "lichen_config_reloads_total"), Some(0.0));

    std::fs::write(&a.config, &good).unwrap();
    a.signal("HUP");
    wait_until("the good config is loaded", PATIENCE, || {
        metric(&http_get(&a.api, "/metrics"), "lichen_config_reloads_total") == Some(1.0)
    });
    assert_eq!(a.get("cfg", "x"), Some(json!(1)));

    // A valid change that only a restart can apply is loaded and reported as pending.
    std::fs::write(&a.config, format!("wal_checkpoint_pages = 5000\n{good}")).unwrap();
    a.signal("HUP");
    wait_until("the pending setting is reported", PATIENCE, || {
        let log = a.log_text();
        log.contains("take effect at the next start") && log.contains("wal_checkpoint_pages")
    });
    assert_eq!(
        metric(&http_get(&a.api, "/metrics"), "lichen_config_reloads_total"),
        Some(2.0)
    );
}

/// `lichen` alone (and `lichen run`), with the data directory from `HOME` or
/// `LICHEN_DATA_DIR`, prints how to add a second node.
#[test]
fn run_with_no_arguments_uses_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, env_dir, data) in [
        (
            &[][..],
            ("HOME", tmp.path().join("home")),
            tmp.path().join("home/.local/share/lichen"),
        ),
        (
            &["run"][..],
            ("LICHEN_DATA_DIR", tmp.path().join("data")),
            tmp.path().join("data"),
        ),
    ] {
        let api = format!("127.0.0.1:{}", free_tcp_port());
        let listen = free_udp_addr(node_ip(27, 0));
        let log = tmp.path().join(format!("{}.log", args.len()));
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("LICHEN_DATA_DIR")
            .env_remove("XDG_DATA_HOME")
            .env_remove("LICHEN_CONFIG")
            .env_remove("RUST_LOG")
            .env(env_dir.0, &env_dir.1)
            .env("LICHEN_API", &api)
            .env("LICHEN_LISTEN", listen.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = Guard(cmd.spawn().unwrap());
        wait_until("the agent answers", PATIENCE, || {
            assert!(child.0.try_wait().unwrap().is_none(), "exited early");
            Command::new(BIN)
                .args(["--api", &api, "status"])
                .arg("--data-dir")
                .arg(&data)
                .output()
                .unwrap()
                .status
                .success()
        });
        assert!(data.join("node.key").exists(), "key in {}", data.display());
        let banner = std::fs::read_to_string(&log).unwrap();
        assert!(
            banner.contains("to add a node: on it run   lichen run --join "),
            "{banner}"
        );
        assert!(banner.contains(&listen.to_string()), "{banner}");
        assert!(Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success());
        assert_eq!(child.wait_exit(PATIENCE).code(), Some(0));
    }
}

#[test]
fn demo_runs_and_shows_the_converged_state() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("demo.out");
    let mut child = Guard(
        Command::new(BIN)
            .arg("demo")
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let st = child.wait_exit(Duration::from_secs(90));
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(st.success(), "demo failed ({st}):\n{out}");
    assert!(out.contains("converged"), "{out}");
    assert!(out.contains("conflict"), "{out}");
    // The file binding: b's file shows a's write, then b's edit of the file is a change
    // signed by b that a reads.
    let binding = out
        .split("A file binding")
        .nth(1)
        .unwrap_or_else(|| panic!("no file binding part:\n{out}"));
    let (remote, local) = binding
        .split_once("an operator edits web.json")
        .unwrap_or_else(|| panic!("no local edit:\n{out}"));
    assert!(remote.contains("ran its reload command"), "{out}");
    assert!(remote.contains("\"workers\": 4"), "{out}");
    assert!(local.contains("\"workers\": 8"), "{out}");
    assert!(local.contains("-> 8,"), "a reads the edit: {out}");
    assert!(local.contains("signed by b"), "{out}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "demo.out")
        .collect();
    assert!(
        left.is_empty(),
        "the demo removes its directories: {left:?}"
    );
}

#[test]
fn watch_follows_local_writes_and_a_delete() {
    // The node task updates watchers itself after each commit: every step is seen, in order.
    let c = Cluster::start(1, 37, Net::Direct);
    let a = &c.agents[0];
    let mut cmd = Command::new(BIN);
    cmd.args(["--api", &a.api, "watch", "w", "k", "--count", "4"])
        .arg("--data-dir")
        .arg(&a.dir);
    let mut watch = common::Lines::spawn(cmd);
    watch.expect("with the initial (absent) value", PATIENCE, |l| l == "null");
    assert!(a.put("w", "k", "1"));
    watch.expect("with the first write", PATIENCE, |l| l == "1");
    assert!(a.put("w", "k", "{\"x\": 2}"));
    watch.expect("with the second write", PATIENCE, |l| {
        serde_json::from_str::<Value>(l).ok() == Some(json!({"x": 2}))
    });
    a.ok(&["del", "w", "k"]);
    watch.expect("with the delete", PATIENCE, |l| l == "null");
    assert!(
        watch.child.wait().unwrap().success(),
        "watch --count 4 exits 0"
    );
}
