//! Who may use the local API, against real `lichen` processes: a request without the token,
//! with a wrong one, with the read-only token on a write or a backup, or with a Host header that does not
//! name loopback is refused with its status and changes nothing; the unix socket needs no
//! token, and its file permissions decide who connects.
//!
//! Agents use loopback addresses 127.0.0.170 to 127.0.0.172.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// One HTTP/1.1 exchange over any stream: status, headers (lower-case names), body.
fn exchange(mut s: impl Read + Write, request: &str) -> (u16, Vec<(String, String)>, String) {
    s.write_all(request.as_bytes()).unwrap();
    common::read_answer(&mut s)
}

/// A request over TCP with the given Host and Authorization (None: no such header).
fn tcp(
    api: &str,
    method: &str,
    target: &str,
    host: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    exchange(
        s,
        &format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn one_agent(dir: &Path, name: &str, ip: u8, config: &str) -> Agent {
    let mut a = Agent::new(dir, name, node_ip(ip, 0));
    std::fs::write(&a.config, config).unwrap();
    a.start();
    a
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn requests_without_the_token_or_from_a_foreign_host_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = one_agent(
        dir.path(),
        "a",
        170,
        "log = \"info\"\napi_read_token_file = \"read.token\"\n",
    );
    let api = a.api.as_str();
    let token_file = a.dir.join("api.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is the owner's only");
    let token = common::token(api);
    assert_eq!(token.len(), 64, "256 bits in hex");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let read = std::fs::read_to_string(dir.path().join("read.token"))
        .unwrap()
        .trim()
        .to_string();
    assert!(read.len() >= 32 && read != token);

    assert!(a.put("cfg", "k", "1"));
    let before = a.heads("cfg").unwrap();
    let localhost = format!("localhost:{}", api.rsplit(':').next().unwrap());

    // No token: 401, the message says where the token is and how the CLI finds it, and
    // nothing about the node.
    let (st, h, body) = tcp(api, "PUT", "/v1/docs/cfg/k", api, None, "2");
    assert_eq!(st, 401, "{body}");
    assert_eq!(
        header(&h, "www-authenticate"),
        Some("Bearer realm=\"lichen\"")
    );
    let msg = serde_json::from_str::<Value>(&body).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains(token_file.to_str().unwrap()), "{msg}");
    assert!(
        msg.contains("--data-dir") && msg.contains("LICHEN_TOKEN"),
        "{msg}"
    );
    assert!(!body.contains(&a.id), "no node id: {body}");
    assert!(
        !body.contains(env!("CARGO_PKG_VERSION")),
        "no version: {body}"
    );
    // Every route, reads too.
    for target in [
        "/v1/status",
        "/v1/docs",
        "/v1/docs/cfg/k",
        "/v1/members",
        "/metrics",
    ] {
        let (st, _, body) = tcp(api, "GET", target, &localhost, None, "");
        assert_eq!(st, 401, "{target}: {body}");
    }
    // A wrong token (same length), and an Authorization header without a token.
    let wrong = "0".repeat(64);
    let (st, _, body) = tcp(api, "PUT", "/v1/docs/cfg/k", api, Some(&wrong), "3");
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("wrong API token"), "{body}");
    let (st, _, _) = tcp(api, "DELETE", "/v1/docs/cfg", api, Some(""), "");
    assert_eq!(st, 401);

    // The read-only token reads, and may not write.
    let (st, h, body) = tcp(api, "GET", "/v1/docs/cfg/k", api, Some(&read), "");
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["value"],
        json!(1)
    );
    assert!(header(&h, "etag").is_some());
    let (st, _, body) = tcp(api, "GET", "/metrics", api, Some(&read), "");
    assert_eq!(st, 200, "{body}");
    for (method, target, b) in [
        ("PUT", "/v1/docs/cfg/k", "4"),
        ("DELETE", "/v1/docs/cfg/k", ""),
        ("DELETE", "/v1/docs/cfg", ""),
        ("POST", "/v1/members", "{\"id\": \"00\"}"),
    ] {
        let (st, _, body) = tcp(api, method, target, api, Some(&read), b);
        assert_eq!(st, 403, "{method} {target}: {body}");
        assert!(body.contains("read-only"), "{body}");
    }
    // Nor take a backup (it holds every document), whatever the method; without a token, 401.
    for method in ["POST", "GET"] {
        let (st, h, body) = tcp(api, method, "/v1/backup", api, Some(&read), "");
        assert_eq!(st, 403, "{method} /v1/backup: {body}");
        assert!(
            body.contains("read-only") && body.contains("backup"),
            "{body}"
        );
        assert_ne!(
            header(&h, "content-type"),
            Some("application/octet-stream"),
            "no copy"
        );
    }
    let (st, _, body) = tcp(api, "POST", "/v1/backup", api, None, "");
    assert_eq!(st, 401, "{body}");

    // A Host that is not loopback (DNS rebinding) is refused even with the right token, and
    // even for /v1/health.
    for (method, target, b) in [
        ("GET", "/v1/status", ""),
        ("PUT", "/v1/docs/cfg/k", "5"),
        ("GET", "/v1/health", ""),
    ] {
        let (st, _, body) = tcp(api, method, target, "evil.example", Some(&token), b);
        assert_eq!(st, 403, "{method} {target}: {body}");
        assert!(body.contains("loopback"), "{body}");
        let (st, _, _) = tcp(api, method, target, "evil.example:80", Some(&token), b);
        assert_eq!(st, 403);
    }

    // Health is open; a loopback name or address with the token works.
    let (st, _, body) = tcp(api, "GET", "/v1/health", api, None, "");
    assert_eq!(st, 200, "{body}");
    let (st, _, body) = tcp(api, "GET", "/v1/docs/cfg/k", "[::1]:1", Some(&token), "");
    assert_eq!(st, 200, "{body}");

    // Nothing changed, and each refusal was counted by reason.
    assert_eq!(a.get("cfg", "k"), Some(json!(1)));
    assert_eq!(a.heads("cfg").unwrap(), before, "no change was signed");
    let m = http_get(api, "/metrics");
    for (reason, at_least) in [
        ("no_token", 8.0),
        ("wrong_token", 1.0),
        ("read_only", 6.0),
        ("foreign_host", 6.0),
    ] {
        let line = format!("lichen_api_refused_total{{reason=\"{reason}\"}} ");
        let n: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in metrics"))
            .trim()
            .parse()
            .unwrap();
        assert!(n >= at_least, "{reason}: {n}");
    }
    // The CLI finds the token in the data directory; without it the agent's answer says
    // where it is, with exit code 8.
    assert_eq!(a.ok(&["get", "cfg", "k"]).trim(), "1");
    let out = Command::new(BIN)
        .args(["--api", api, "get", "cfg", "k"])
        .args(["--data-dir", dir.path().join("elsewhere").to_str().unwrap()])
        .env_remove("LICHEN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(token_file.to_str().unwrap()), "{err}");
    // LICHEN_TOKEN and --token-file work from anywhere.
    let out = Command::new(BIN)
        .args(["--api", api, "get", "cfg", "k"])
        .args(["--data-dir", "/nonexistent"])
        .env("LICHEN_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["--api", api, "--data-dir", "/nonexistent", "--token-file"])
        .arg(&token_file)
        .args(["put", "cfg", "k", "6"])
        .env_remove("LICHEN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The read-only token through the CLI: reads work, writes exit 5.
    let ro = dir.path().join("read.token");
    let cli_ro = |args: &[&str]| {
        Command::new(BIN)
            .args(["--api", api, "--data-dir", "/nonexistent", "--token-file"])
            .arg(&ro)
            .args(args)
            .env_remove("LICHEN_TOKEN")
            .output()
            .unwrap()
    };
    assert!(cli_ro(&["status"]).status.success());
    assert_eq!(cli_ro(&["put", "cfg", "k", "7"]).status.code(), Some(5));
    assert_eq!(a.get("cfg", "k"), Some(json!(6)));
    // `lichen backup` with it: refused (exit 5, the agent's reason), no file.
    let file = dir.path().join("ro.backup");
    let out = cli_ro(&["backup", "-o", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
    assert!(!file.exists());
    // The full token takes one.
    a.ok(&["backup", "-o", file.to_str().unwrap()]);
    assert!(std::fs::metadata(&file).unwrap().len() > 0);
}

#[test]
fn metrics_can_be_left_open_by_config_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let a = one_agent(dir.path(), "a", 171, "api_metrics_open = true\n");
    let (st, _, body) = tcp(&a.api, "GET", "/metrics", &a.api, None, "");
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("lichen_api_refused_total{reason=\"no_token\"} 0"),
        "{body}"
    );
    let (st, _, _) = tcp(&a.api, "GET", "/v1/status", &a.api, None, "");
    assert_eq!(st, 401);
    let (st, _, _) = tcp(&a.api, "GET", "/metrics", "evil.example", None, "");
    assert_eq!(st, 403, "the Host check still applies");
}

/// Run `lichen` as the user `nobody` (uid 65534, group 65534 only).
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(BIN)
        .args(args)
        .env_remove("LICHEN_TOKEN")
        .env_remove("LICHEN_API")
        .output()
        .expect("run setpriv")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn the_unix_socket_needs_no_token_and_its_permissions_decide_who_connects() {
    let dir = tempfile::tempdir().unwrap();
    // Everyone may enter the test's directories (the agent's data directory is its own).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = one_agent(dir.path(), "a", 172, "log = \"info\"\n");
    let sock = a.dir.join("api.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("the socket exists");
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "mode 0660");
    assert_eq!(meta.uid(), process_uid(), "owned by the agent's user");

    // No token, no Host check needed: the socket's permissions were the check.
    let s = UnixStream::connect(&sock).unwrap();
    let (st, _, body) = exchange(
        s,
        "PUT /v1/docs/app/k HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: 1\r\n\r\n1",
    );
    assert_eq!(st, 200, "{body}");
    // The CLI with --api unix:PATH, and without --api (it takes the data directory's socket
    // when it can connect; no token is read: LICHEN_TOKEN is wrong here).
    let sock_arg = format!("unix:{}", sock.display());
    let out = Command::new(BIN)
        .args(["--api", &sock_arg, "get", "app", "k"])
        .env("LICHEN_TOKEN", "wrong-wrong-wrong-wrong")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = Command::new(BIN)
        .args([
            "--data-dir",
            a.dir.to_str().unwrap(),
            "put",
            "app",
            "k",
            "2",
        ])
        .env("LICHEN_TOKEN", "wrong-wrong-wrong-wrong")
        .env_remove("LICHEN_API")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.get("app", "k"), Some(json!(2)));

    if !is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED the other-user half: it needs root and setpriv(1) to run a client as `nobody`"
        );
        return;
    }
    // A user outside the socket's group: even with the data directory open for entering,
    // the socket (0660, root's group) refuses it.
    std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = as_nobody(&["--api", &sock_arg, "put", "app", "k", "3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "nobody cannot connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.get("app", "k"), Some(json!(2)), "nothing changed");
}

/// With `api_socket_group`, a member of that group uses the socket (the agent lets the group
/// enter the data directory, mode 0710); others still cannot.
#[test]
fn a_configured_group_may_use_the_socket() {
    if !is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and setpriv(1) to run a client as `nobody`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = one_agent(dir.path(), "g", 173, "api_socket_group = \"65534\"\n");
    let sock = a.dir.join("api.sock");
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(meta.gid(), 65534);
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let dmeta = std::fs::metadata(&a.dir).unwrap();
    assert_eq!(
        (dmeta.gid(), dmeta.permissions().mode() & 0o777),
        (65534, 0o710)
    );
    let sock_arg = format!("unix:{}", sock.display());
    let out = as_nobody(&["--api", &sock_arg, "put", "app", "k", "1"]);
    assert!(
        out.status.success(),
        "a member of the group writes through the socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.get("app", "k"), Some(json!(1)));
    // The token file stays the owner's: the group cannot read it.
    let out = as_nobody(&[
        "--api",
        &a.api,
        "--data-dir",
        a.dir.to_str().unwrap(),
        "status",
    ]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "no token for the group over TCP"
    );
}

/// This process's uid, without libc: the owner of a file it creates.
fn process_uid() -> u32 {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid()
}

/// `lichen init` creates the token too (so that it can be handed to a client before the first
/// start), and a start keeps it.
#[test]
fn init_creates_the_token_and_a_start_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(BIN)
        .args(["init", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = data.join("api.token");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap();
    let out = Command::new(BIN)
        .args(["init", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), token, "kept");
}
