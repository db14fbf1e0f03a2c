//! `lichen exec` stories with a real agent and a real child process (a shell script that
//! writes its environment to a file, one file per start, and exits 7 on SIGTERM).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The child: appends "start <pid>" to `events`, writes its APP_ variables to `env.<pid>`,
/// exits 7 on SIGTERM (after noting it), notes SIGHUP, and otherwise waits.
fn write_child(dir: &Path) -> PathBuf {
    let script = dir.join("child.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
out="$1"
echo "start $$" >> "$out/events"
env | grep '^APP_\|^LICHEN_' | sort > "$out/env.$$.tmp" && mv "$out/env.$$.tmp" "$out/env.$$"
trap 'echo "term $$" >> "$out/events"; exit 7' TERM
trap 'echo "hup $$" >> "$out/events"' HUP
while :; do sleep 0.05; done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

fn events(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The pid of the newest start.
fn last_start(dir: &Path) -> Option<String> {
    events(dir)
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("start ").map(str::to_string))
}

fn env_of(dir: &Path, pid: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(format!("env.{pid}"))).ok()
}

/// A running `lichen exec`. Dropped, it gets SIGTERM first so that its child stops with it
/// (a SIGKILLed exec leaves its child running, as any supervisor would).
struct Exec(Guard);

impl Drop for Exec {
    fn drop(&mut self) {
        if self.0 .0.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0 .0.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + PATIENCE;
            while self.0 .0.try_wait().ok().flatten().is_none()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn exec(a: &Agent, out: &Path, script: &Path, extra: &[&str]) -> Exec {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--api", &a.api, "exec", "--doc", "app/web", "--prefix", "APP_",
    ])
    .arg("--data-dir")
    .arg(&a.dir)
    .args(["--debounce", "100ms", "--kill-timeout", "5s"])
    .args(extra)
    .arg("--")
    .arg(script)
    .arg(out)
    .env_remove("LICHEN_API")
    .stdin(Stdio::null())
    .stderr(std::fs::File::create(out.join("exec.log")).unwrap());
    Exec(Guard(cmd.spawn().expect("start lichen exec")))
}

/// What `lichen exec` printed (its own messages go to stderr).
fn exec_log(out: &Path) -> String {
    std::fs::read_to_string(out.join("exec.log")).unwrap_or_default()
}

#[test]
fn exec_waits_for_the_document_restarts_on_change_and_passes_sigterm_and_the_exit_code() {
    let c = Cluster::start(1, 150, Net::Direct);
    let a = &c.agents[0];
    let out = c.dir.path().join("exec");
    std::fs::create_dir_all(&out).unwrap();
    let script = write_child(c.dir.path());
    let mut ex = exec(a, &out, &script, &[]);

    // The document does not exist yet: exec says it waits, and nothing starts.
    wait_until("exec waits for the document", PATIENCE, || {
        exec_log(&out).contains("waiting for app/web to have a value")
    });
    assert!(
        events(&out).is_empty(),
        "started from nothing: {:?}",
        events(&out)
    );

    assert!(a.put(
        "app/web",
        "",
        r#"{"port": 8080, "limits": {"rate": 5}, "name": "web"}"#
    ));
    wait_until("the child starts", PATIENCE, || {
        last_start(&out).is_some_and(|p| env_of(&out, &p).is_some())
    });
    let first = last_start(&out).unwrap();
    let env = env_of(&out, &first).unwrap();
    assert!(env.contains("APP_PORT=8080\n"), "{env}");
    assert!(env.contains("APP_LIMITS_RATE=5\n"), "{env}");
    assert!(env.contains("APP_NAME=web\n"), "{env}");
    assert!(env.contains("LICHEN_DOC=app/web\n"), "{env}");
    assert!(env.contains("LICHEN_HEADS="), "{env}");

    // A change restarts it with the new values; the old one got SIGTERM.
    assert!(a.put("app/web", "port", "9090"));
    wait_until("the child restarts", PATIENCE, || {
        last_start(&out).is_some_and(|p| p != first && env_of(&out, &p).is_some())
    });
    let second = last_start(&out).unwrap();
    assert!(
        events(&out).contains(&format!("term {first}")),
        "{:?}",
        events(&out)
    );
    assert!(env_of(&out, &second).unwrap().contains("APP_PORT=9090\n"));

    // A write that leaves the variables as they are restarts nothing.
    assert!(a.put("app/web", "port", "9090"));
    assert!(a.put("other/doc", "x", "1"));

    // SIGTERM to exec reaches the child, whose exit code is exec's.
    let status = {
        Command::new("kill")
            .args(["-TERM", &ex.0 .0.id().to_string()])
            .status()
            .unwrap();
        ex.0.wait_exit(PATIENCE)
    };
    assert_eq!(status.code(), Some(7), "exec's exit code is the child's");
    assert!(
        events(&out).contains(&format!("term {second}")),
        "{:?}",
        events(&out)
    );
    let starts = events(&out)
        .iter()
        .filter(|e| e.starts_with("start"))
        .count();
    assert_eq!(
        starts,
        2,
        "one start per distinct configuration: {:?}",
        events(&out)
    );
}

#[test]
fn the_child_outlives_the_agent_and_exec_reconnects() {
    let mut c = Cluster::start(1, 152, Net::Direct);
    let out = c.dir.path().join("exec");
    std::fs::create_dir_all(&out).unwrap();
    let script = write_child(c.dir.path());
    assert!(c.agents[0].put("app/web", "", r#"{"port": 1}"#));
    let mut ex = exec(&c.agents[0], &out, &script, &["--on-change", "signal:HUP"]);
    wait_until("the child starts", PATIENCE, || last_start(&out).is_some());
    let pid = last_start(&out).unwrap();

    c.agents[0].kill9();
    // The child keeps running while the agent is away, and exec with it.
    wait_until("exec notices the agent is gone", PATIENCE, || {
        exec_log(&out).contains("the watch reconnects")
    });
    assert!(
        ex.0 .0.try_wait().unwrap().is_none(),
        "exec exited with the agent"
    );
    assert!(
        !events(&out).iter().any(|e| e.starts_with("term")),
        "{:?}",
        events(&out)
    );
    c.agents[0].start();

    // After the reconnection a change reaches the child, as SIGHUP (its mode), not a restart.
    assert!(c.agents[0].put("app/web", "port", "2"));
    wait_until("the child gets SIGHUP", Duration::from_secs(60), || {
        events(&out).contains(&format!("hup {pid}"))
    });
    assert_eq!(
        last_start(&out),
        Some(pid.clone()),
        "signal mode does not restart"
    );
    assert!(ex.0 .0.try_wait().unwrap().is_none());
}

#[test]
fn bad_exec_arguments_are_refused_clearly() {
    let c = Cluster::start(1, 154, Net::Direct);
    let a = &c.agents[0];
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(["--api", &a.api, "exec"])
            .arg("--data-dir")
            .arg(&a.dir)
            .args(args)
            .env_remove("LICHEN_API")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&["--doc", "app/web", "--on-change", "reload", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("signal:NAME"));
    let o = run(&["--doc", "app/web"]);
    assert_eq!(o.status.code(), Some(2), "a command is required");
    let o = run(&["--doc", "../bad", "--", "true"]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    a.ok(&["put", "app/scalar", "x", "1"]);
    let out = c.dir.path().join("exec");
    std::fs::create_dir_all(&out).unwrap();
    let _g = Guard(
        Command::new(BIN)
            .args([
                "--api",
                &a.api,
                "exec",
                "--doc",
                "app/scalar",
                "--path",
                "x",
                "--data-dir",
                a.dir.to_str().unwrap(),
                "--",
            ])
            .args([
                "sh",
                "-c",
                "echo started > \"$0\"",
                out.join("started").to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(out.join("exec.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // Not an object: reported, and the program is not started (exec keeps waiting).
    wait_until("exec refuses a scalar", PATIENCE, || {
        exec_log(&out).contains("not an object")
    });
    assert!(!out.join("started").exists());
}
