//! The resource-shaped API and the CLI features on top of it, against real `lichen`
//! processes: conditional writes (`If-Match` = the heads of an `ETag`), views of a document
//! (`?raw`, `?keys`), prefixes, deleting a whole document, editing and removing members.
//!
//! Agents use loopback addresses 127.0.0.174 to 127.0.0.177.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// One HTTP/1.1 exchange with the agent's token: status, headers (lower-case), body.
fn call(
    api: &str,
    method: &str,
    target: &str,
    extra: &str,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {api}\r\n{}{extra}Connection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        auth_header(api),
        body.len()
    )
    .unwrap();
    common::read_answer(&mut s)
}

fn etag(h: &[(String, String)]) -> String {
    h.iter()
        .find(|(k, _)| k == "etag")
        .map(|(_, v)| v.clone())
        .expect("an ETag")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn a_conditional_write_is_made_only_while_the_heads_are_unchanged() {
    let c = Cluster::start(1, 174, Net::Direct);
    let a = &c.agents[0];
    let api = a.api.as_str();
    // Create-only: `If-Match: ""` (no heads) succeeds on a document that does not exist.
    let (st, h, body) = call(api, "PUT", "/v1/docs/cas/n", "If-Match: \"\"\r\n", "1");
    assert_eq!(st, 200, "{body}");
    let v1 = etag(&h);
    assert_eq!(
        v1,
        format!("\"{}\"", json_of(&body)["heads"].as_str().unwrap())
    );
    let (st, _, body) = call(api, "PUT", "/v1/docs/cas/n", "If-Match: \"\"\r\n", "9");
    assert_eq!(st, 412, "create-only on an existing document: {body}");
    // GET gives the same ETag; a write naming it succeeds and moves it.
    let (st, h, _) = call(api, "GET", "/v1/docs/cas/n", "", "");
    assert_eq!((st, etag(&h)), (200, v1.clone()));
    let (st, h, body) = call(
        api,
        "PUT",
        "/v1/docs/cas/n",
        &format!("If-Match: {v1}\r\n"),
        "2",
    );
    assert_eq!(st, 200, "{body}");
    let v2 = etag(&h);
    assert_ne!(v2, v1);
    // The old heads: 412 with the current ETag, and nothing written (PUT and DELETE).
    let (st, h, body) = call(
        api,
        "PUT",
        "/v1/docs/cas/n",
        &format!("If-Match: {v1}\r\n"),
        "3",
    );
    assert_eq!(st, 412, "{body}");
    assert_eq!(etag(&h), v2, "the 412 names the current heads");
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("changed"));
    let (st, _, body) = call(
        api,
        "DELETE",
        "/v1/docs/cas/n",
        &format!("If-Match: {v1}\r\n"),
        "",
    );
    assert_eq!(st, 412, "{body}");
    let (st, _, body) = call(
        api,
        "DELETE",
        "/v1/docs/cas",
        &format!("If-Match: {v1}\r\n"),
        "",
    );
    assert_eq!(st, 412, "{body}");
    assert_eq!(a.get("cas", "n"), Some(json!(2)));

    // Eight clients race with the same heads: exactly one write is made.
    let go = Arc::new(Barrier::new(8));
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let (api, go, v2) = (a.api.clone(), go.clone(), v2.clone());
            std::thread::spawn(move || {
                go.wait();
                call(
                    &api,
                    "PUT",
                    "/v1/docs/cas/n",
                    &format!("If-Match: {v2}\r\n"),
                    &(100 + i).to_string(),
                )
                .0
            })
        })
        .collect();
    let mut statuses: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 412, 412, 412, 412, 412, 412, 412]);
    let won = a.get("cas", "n").unwrap().as_i64().unwrap();
    assert!((100..108).contains(&won), "{won}");

    // The CLI: --if-match with the heads `get --json` prints.
    let heads = json_of(&a.ok(&["--json", "get", "cas"]))["heads"]
        .as_str()
        .unwrap()
        .to_string();
    let out = a.cli(&["put", "cas", "n", "7", "--if-match", &v1.replace('"', "")]);
    assert_eq!(out.status.code(), Some(7), "heads moved: exit 7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&heads),
        "the error names the current heads: {err}"
    );
    a.ok(&["put", "cas", "n", "7", "--if-match", &heads]);
    assert_eq!(a.get("cas", "n"), Some(json!(7)));
    let out = a.cli(&["del", "cas", "n", "--if-match", &heads]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(a.get("cas", "n"), Some(json!(7)));
}

#[test]
fn documents_are_resources_with_views_prefixes_and_whole_document_deletes() {
    let c = Cluster::start(1, 175, Net::Direct);
    let a = &c.agents[0];
    let api = a.api.as_str();
    // Encoded segments: the document name's `/`, and a key holding `.` and `/`.
    let (st, _, body) = call(api, "PUT", "/v1/docs/app%2Fweb/limits/a.b%2Fc", "", "5");
    assert_eq!(st, 200, "{body}");
    assert_eq!(a.get("app/web", "limits.\"a.b/c\""), Some(json!(5)));
    a.ok(&["put", "app/web", "name", "\"web 1\""]);
    a.ok(&["put", "app/db", "name", "\"db\""]);
    a.ok(&["put", "other", "x", "[1, 2]"]);
    // ?raw: a string without quotes as text/plain; other values as JSON.
    let (st, h, body) = call(api, "GET", "/v1/docs/app%2Fweb/name?raw", "", "");
    assert_eq!((st, body.as_str()), (200, "web 1"));
    assert!(h
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/plain")));
    let (_, _, body) = call(api, "GET", "/v1/docs/other/x?raw", "", "");
    assert_eq!(json_of(&body), json!([1, 2]));
    // ?keys, [n] for a list index.
    let (_, _, body) = call(api, "GET", "/v1/docs/app%2Fweb?keys", "", "");
    assert_eq!(json_of(&body), json!(["limits", "name"]));
    let (_, _, body) = call(api, "GET", "/v1/docs/other/x/%5B1%5D", "", "");
    assert_eq!(json_of(&body)["value"], json!(2));
    // Unknown or clashing views are a 400 that says so.
    let (st, _, body) = call(api, "GET", "/v1/docs/other?keys&raw", "", "");
    assert_eq!(st, 400, "{body}");
    let (st, _, body) = call(api, "GET", "/v1/docs/other?nope", "", "");
    assert_eq!(st, 400, "{body}");
    // Prefixes: names, and values.
    let (_, _, body) = call(api, "GET", "/v1/docs?prefix=app%2F", "", "");
    assert_eq!(json_of(&body), json!(["app/db", "app/web"]));
    let (_, _, body) = call(api, "GET", "/v1/docs?prefix=app%2F&values", "", "");
    let v = json_of(&body);
    assert_eq!(v["app/db"]["value"], json!({"name": "db"}));
    assert_eq!(v["app/web"]["value"]["name"], json!("web 1"));
    assert!(v.get("other").is_none());

    // The CLI on top.
    assert_eq!(a.ok(&["get", "app/web", "name", "--raw"]), "web 1\n");
    assert_eq!(a.ok(&["get", "other", "x", "--raw"]).trim(), "[1,2]");
    let by_flag = json_of(&a.ok(&["get", "--prefix", "app/"]));
    let by_slash = json_of(&a.ok(&["get", "app/"]));
    assert_eq!(by_flag, by_slash);
    assert_eq!(by_flag["app/db"], json!({"name": "db"}));
    let j = json_of(&a.ok(&["--json", "get", "app/"]));
    assert!(j["app/web"]["heads"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));

    // A prefix watch: each document's current value, then changes (a new document too).
    let mut cmd = Command::new(BIN);
    cmd.args(["--api", api, "--data-dir", a.dir.to_str().unwrap()])
        .args(["watch", "--prefix", "app/", "--count", "4"]);
    let mut watch = Lines::spawn(cmd);
    watch.expect("app/db", PATIENCE, |l| l == "app/db {\"name\":\"db\"}");
    watch.expect("app/web", PATIENCE, |l| l.starts_with("app/web "));
    a.ok(&["put", "other", "x", "3"]);
    a.ok(&["put", "app/new", "k", "1"]);
    watch.expect("the new document", PATIENCE, |l| l == "app/new {\"k\":1}");
    a.ok(&["put", "app/db", "name", "\"db2\""]);
    watch.expect("the change", PATIENCE, |l| l == "app/db {\"name\":\"db2\"}");
    assert!(watch.child.wait().unwrap().success());

    // `del DOC` without a path needs --all, and deletes nothing without it.
    let out = a.cli(&["del", "app/db"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--all"));
    assert_eq!(a.get("app/db", "name"), Some(json!("db2")));
    a.ok(&["del", "app/db", "--all"]);
    assert_eq!(a.get("app/db", "name"), None);
    assert_eq!(a.cli(&["get", "app/db"]).status.code(), Some(4), "gone");
    assert_eq!(
        a.ok(&["ls"]).lines().collect::<Vec<_>>(),
        ["app/new", "app/web", "other"]
    );
    // DELETE of a whole document over HTTP, with its ETag; a second one is a 404.
    let (_, h, _) = call(api, "GET", "/v1/docs/other", "", "");
    let (st, h2, body) = call(
        api,
        "DELETE",
        "/v1/docs/other",
        &format!("If-Match: {}\r\n", etag(&h)),
        "",
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(json_of(&body)["changed"], json!(true));
    assert_ne!(etag(&h2), etag(&h));
    let (st, _, _) = call(api, "DELETE", "/v1/docs/other", "", "");
    assert_eq!(st, 404);
    let (st, _, _) = call(api, "GET", "/v1/docs/other", "", "");
    assert_eq!(st, 404);
    // Writing again brings it back.
    a.ok(&["put", "other", "y", "1"]);
    assert_eq!(a.get("other", ""), Some(json!({"y": 1})));
    // The old routes are gone, with a JSON 404 that lists the new ones.
    for old in ["/v1/get?doc=other&path=y", "/v1/ls", "/v1/watch?doc=other"] {
        let (st, _, body) = call(api, "GET", old, "", "");
        assert_eq!(st, 404, "{old}");
        assert!(json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("/v1/docs"));
    }
}

#[test]
fn members_are_edited_and_removed_by_id() {
    let c = Cluster::start(2, 176, Net::Direct);
    let (a, b) = (&c.agents[0], &c.agents[1]);
    // Scopes are editable after the add: b may then write only under `app/`.
    let (st, _, body) = call(
        &a.api,
        "PATCH",
        &format!("/v1/members/{}", b.id),
        "",
        "{\"scopes\": [\"app/\"]}",
    );
    assert_eq!(st, 200, "{body}");
    assert!(json_of(&body)["hash"]
        .as_str()
        .is_some_and(|h| h.len() == 64));
    let member = |who: &Agent, id: &str| -> Value {
        let list = json_of(&who.ok(&["--json", "members", "ls"]));
        list.as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(member(a, &b.id)["scopes"], json!(["app/"]));
    wait_until("b learns its scopes", PATIENCE, || {
        member(b, &b.id)["scopes"] == json!(["app/"])
    });
    assert_eq!(b.cli(&["put", "other", "k", "1"]).status.code(), Some(5));
    assert!(b.put("app/x", "k", "1"));
    // The CLI: role and scopes together; --all-docs clears the scopes.
    a.ok(&["members", "set", &b.id, "--role", "reader"]);
    assert_eq!(member(a, &b.id)["role"], json!("reader"));
    a.ok(&["members", "set", &b.id, "--role", "writer", "--all-docs"]);
    let m = member(a, &b.id);
    assert_eq!(
        (m["role"].clone(), m["scopes"].clone()),
        (json!("writer"), json!([]))
    );
    assert_eq!(a.cli(&["members", "set", &b.id]).status.code(), Some(2));
    // Bad input is refused before anything is signed.
    let before = a.ok(&["--json", "members", "ls"]);
    let (st, _, body) = call(
        &a.api,
        "PATCH",
        &format!("/v1/members/{}", b.id),
        "",
        "{\"scopes\": [\"../x\"]}",
    );
    assert_eq!(st, 422, "{body}");
    let (st, _, _) = call(
        &a.api,
        "PATCH",
        "/v1/members/zz",
        "",
        "{\"role\": \"reader\"}",
    );
    assert_eq!(st, 400);
    let (st, _, _) = call(
        &a.api,
        "PATCH",
        &format!("/v1/members/{}", b.id),
        "",
        "{\"colour\": \"red\"}",
    );
    assert_eq!(st, 422);
    assert_eq!(a.ok(&["--json", "members", "ls"]), before);
    // DELETE removes for good.
    let (st, _, body) = call(&a.api, "DELETE", &format!("/v1/members/{}", b.id), "", "");
    assert_eq!(st, 200, "{body}");
    assert_eq!(member(a, &b.id)["role"], json!("removed"));
}
