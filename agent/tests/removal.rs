//! A member removed (or demoted to reader) by an admin learns it, with real processes: its
//! peers let a former member connect only to receive the signed membership changes that
//! prove the removal, after which its status says `removed` and `lichen put` fails with the
//! revoked-key error (exit 5). Removed while connected, and removed while cut off then
//! healed (iptables where root, the in-process relay otherwise).
//!
//! Also: membership edits that break the membership rules (empty or oversized name, an
//! address that does not parse, a scope like `../../`) are refused by the API (exit 6)
//! before anything is signed.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use common::{wait_until, Agent, Cluster, Net, PATIENCE};
use serde_json::json;

/// Exit code of `lichen` for a refused (denied) request.
const DENIED: i32 = 5;
/// Exit code of `lichen` for an invalid request.
const INVALID: i32 = 6;

/// Wait until `a` reports `role` for itself.
fn wait_role(a: &Agent, role: &str) {
    wait_until(&format!("{} says it is {role}", a.name), PATIENCE, || {
        a.status()["node"]["role"] == role
    });
}

/// `lichen put` on `a` is refused with the revoked-key error (exit 5).
fn assert_put_revoked(a: &Agent) {
    let out = a.cli(&["put", "app", "after", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(DENIED), "put: {err}");
    assert!(
        err.contains("revoked"),
        "the error names the revocation: {err}"
    );
}

fn assert_removed(c: &Cluster, i: usize) {
    let x = &c.agents[i];
    wait_role(x, "removed");
    let st = x.status();
    assert_eq!(st["node"]["revoked"], json!(true), "{st}");
    let text = x.ok(&["status"]);
    assert!(text.contains("REMOVED"), "status text says so:\n{text}");
    assert_put_revoked(x);
    for a in c.agents.iter().filter(|a| a.name != x.name) {
        wait_until(
            &format!("{} sees {} removed", a.name, x.name),
            PATIENCE,
            || {
                let ls = a.ok(&["--json", "members", "ls"]);
                ls.contains(&x.id) && {
                    let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
                    v.as_array()
                        .unwrap()
                        .iter()
                        .any(|m| m["id"] == x.id.as_str() && m["role"] == "removed")
                }
            },
        );
    }
}

#[test]
fn a_writer_removed_while_connected_learns_it() {
    let c = Cluster::start(3, 90, Net::Direct);
    assert!(c.agents[2].put("app", "before", "1"));
    c.wait_converged("app", PATIENCE);
    c.agents[0].ok(&["members", "remove", &c.agents[2].id]);
    assert_removed(&c, 2);
    // Its refused writes reach no one; the others still sync among themselves.
    assert!(c.agents[0].put("app", "later", "2"));
    wait_until("b has a's later write", PATIENCE, || {
        c.agents[1].get("app", "later") == Some(json!(2))
    });
    assert_eq!(
        c.agents[2].get("app", "later"),
        None,
        "a removed node is served nothing else"
    );
    assert_eq!(c.agents[0].get("app", "after"), None);
}

fn removed_while_cut_off(ip_base: u8) {
    let net = if common::iptables_usable() {
        Net::Direct
    } else {
        eprintln!("iptables not usable: cutting the link with the in-process relay");
        Net::Relay
    };
    let mut c = Cluster::start(3, ip_base, net);
    assert!(c.agents[2].put("app", "before", "1"));
    c.wait_converged("app", PATIENCE);
    c.isolate(2);
    c.agents[0].ok(&["members", "remove", &c.agents[2].id]);
    wait_until("b has the removal", PATIENCE, || {
        c.agents[1]
            .ok(&["--json", "members", "ls"])
            .contains("\"removed\"")
    });
    // Cut off, c cannot know yet: it still acknowledges writes (void everywhere else).
    assert!(c.agents[2].put("app", "while_cut", "1"));
    assert_eq!(c.agents[2].status()["node"]["role"], "writer");
    c.heal();
    assert_removed(&c, 2);
    // Give its void write every chance to spread: a later write by a reaches b first.
    assert!(c.agents[0].put("app", "later", "2"));
    wait_until("b has a's later write", PATIENCE, || {
        c.agents[1].get("app", "later") == Some(json!(2))
    });
    for a in &c.agents[..2] {
        assert_eq!(a.get("app", "while_cut"), None, "{}", a.name);
        assert_eq!(a.get("app", "before"), Some(json!(1)), "{}", a.name);
    }
}

#[test]
fn a_writer_removed_while_cut_off_learns_it_when_the_link_heals() {
    removed_while_cut_off(93);
}

#[test]
fn a_writer_demoted_to_reader_refuses_its_writes() {
    let c = Cluster::start(2, 96, Net::Direct);
    assert!(c.agents[1].put("app", "before", "1"));
    c.wait_converged("app", PATIENCE);
    c.agents[0].ok(&["members", "role", &c.agents[1].id, "reader"]);
    wait_role(&c.agents[1], "reader");
    assert_put_revoked(&c.agents[1]);
    // A reader still receives what the others write.
    assert!(c.agents[0].put("app", "later", "2"));
    wait_until("the reader has a's later write", PATIENCE, || {
        c.agents[1].get("app", "later") == Some(json!(2))
    });
}

#[test]
fn invalid_member_edits_are_refused_by_the_api() {
    let c = Cluster::start(1, 98, Net::Direct);
    let a = &c.agents[0];
    let id = "a".repeat(64);
    let long = "n".repeat(100_000);
    let cases: [(&str, Vec<&str>); 5] = [
        ("empty name", vec!["--name", ""]),
        ("100,000-character name", vec!["--name", &long]),
        (
            "address that does not parse",
            vec!["--name", "x", "--addr", "not an address"],
        ),
        ("scope ../../", vec!["--name", "x", "--scope", "../../"]),
        ("scope /etc/", vec!["--name", "x", "--scope", "/etc/"]),
    ];
    let before = a.ok(&["--json", "members", "ls"]);
    for (what, extra) in cases {
        let mut args = vec!["members", "add", &id, "--role", "writer"];
        args.extend(extra);
        let out = a.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(INVALID), "{what}: {err}");
        assert!(
            err.contains("pass"),
            "{what}: the error names a next step: {err}"
        );
    }
    let raw = http_post(
        &a.api,
        "/v1/members",
        r#"{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"x","scopes":["../../"]}"#,
    );
    assert!(raw.starts_with("HTTP/1.1 422"), "{raw}");
    assert!(raw.contains("\"error\""), "{raw}");
    assert_eq!(
        a.ok(&["--json", "members", "ls"]),
        before,
        "nothing was signed"
    );
}

/// POST a JSON body over plain HTTP/1.1; the raw answer (status line, headers, body).
fn http_post(api: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).expect("connect to the API");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {api}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        common::auth_header(api),
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
