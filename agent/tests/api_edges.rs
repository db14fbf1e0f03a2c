//! The local API at its edges, against real `lichen` processes: every error is JSON with a
//! next step, idle and slow connections cannot lock the API (or the agent's file bindings)
//! out, big inputs are refused before they cost memory, and the memory an accepted big
//! write takes is given back.
//!
//! Agents use loopback addresses 127.0.0.120 and up (127.0.0.160 for the memory story).
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
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One raw HTTP/1.1 exchange (`Connection: close`) with the agent's API token added after the
/// request line: status, headers (lower-case names) and body.
fn raw(api: &str, request: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(api).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a request line")
        + 2;
    let mut with_token = request[..line_end].to_vec();
    with_token.extend_from_slice(auth_header(api).as_bytes());
    with_token.extend_from_slice(&request[line_end..]);
    s.write_all(&with_token).unwrap();
    common::read_answer(&mut s)
}

fn request(method: &str, target: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer is `status` with a JSON body `{"error": "..."}` whose message contains `hint`.
fn assert_json_error(answer: (u16, Vec<(String, String)>, String), status: u16, hint: &str) {
    let (got, headers, body) = answer;
    assert_eq!(got, status, "status (body {body:?})");
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{status}: content-type {ct:?}, body {body:?}"
    );
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body:?}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}: no error in {v}"));
    assert!(
        msg.contains(hint),
        "{status}: {msg:?} does not contain {hint:?}"
    );
}

fn one_agent(ip_base: u8, config: &str) -> (tempfile::TempDir, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::new(dir.path(), "a", node_ip(ip_base, 0));
    std::fs::write(&a.config, config).unwrap();
    a.start();
    (dir, a)
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Anonymous resident memory of a process (heap, stacks; not the binary's pages), in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon")
}

/// A write at the size limit takes ~12 MiB of heap while it is built and committed; once it
/// is done that memory goes back to the system (the allocator purges freed pages within its
/// decay time, `agent/src/alloc.rs`), and the agent is left holding about the document
/// itself. With glibc's malloc the agent stayed ~12 MiB larger for good.
#[test]
fn the_memory_a_big_write_takes_is_given_back() {
    let (_dir, a) = one_agent(160, "log = \"info\"\n");
    let api = a.api.as_str();
    // The baseline includes what any write and read needs.
    assert!(a.put("small", "k", "1"));
    assert_eq!(a.get("small", "k"), Some(json!(1)));
    let base = rss_anon_kib(a.pid());
    let doc: serde_json::Map<String, Value> =
        (0..5_000).map(|i| (format!("{i:x}"), json!(i))).collect();
    let body = serde_json::to_string(&Value::Object(doc)).unwrap();
    let (status, _, text) = raw(
        api,
        &request(
            "PUT",
            "/v1/docs/big",
            "content-type: application/json\r\n",
            &body,
        ),
    );
    assert_eq!(status, 200, "{text}");
    let after = rss_anon_kib(a.pid());
    // The document stays loaded (~1 MiB); everything else the write took goes back.
    let bound = base + (3 << 10);
    let mut now = after;
    let start = Instant::now();
    wait_until(
        &format!("anonymous RSS back under {bound} KiB (baseline {base} KiB)"),
        Duration::from_secs(45),
        || {
            now = rss_anon_kib(a.pid());
            now <= bound
        },
    );
    eprintln!(
        "RssAnon: {base} KiB before, {after} KiB after the write, {now} KiB {:?} later",
        start.elapsed()
    );
    assert_eq!(a.get("big", "ff"), Some(json!(255)), "the write is kept");
}

#[test]
fn every_api_error_is_json_with_a_next_step() {
    let (_dir, a) = one_agent(120, "log = \"info\"\n");
    let api = a.api.as_str();
    // 413: refused by its Content-Length, before the body is read.
    assert_json_error(
        raw(
            api,
            b"PUT /v1/docs/d/x HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n1",
        ),
        413,
        "split the value",
    );
    // 413 too for a chunked body that turns out too large.
    let mut chunked = b"PUT /v1/docs/d/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b'1'; 1 << 16];
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_json_error(raw(api, &chunked), 413, "split the value");
    // 400: a query that does not parse.
    assert_json_error(
        raw(
            api,
            &request("GET", "/v1/docs/d?history&limit=many", "", ""),
        ),
        400,
        "check the query parameters",
    );
    // 404: no such route.
    assert_json_error(
        raw(api, &request("GET", "/v1/nope", "", "")),
        404,
        "the routes are",
    );
    // 405: wrong method, with the right ones named.
    assert_json_error(
        raw(api, &request("DELETE", "/v1/status", "", "")),
        405,
        "use GET",
    );
    // 415: not JSON.
    assert_json_error(
        raw(
            api,
            &request("POST", "/v1/members", "content-type: text/plain\r\n", "{}"),
        ),
        415,
        "Content-Type: application/json",
    );
    // 422: a field missing.
    assert_json_error(
        raw(
            api,
            &request(
                "POST",
                "/v1/members",
                "content-type: application/json\r\n",
                "{\"role\": \"writer\"}",
            ),
        ),
        422,
        "fields this route takes",
    );
    // 400 for a body that is not JSON at all.
    assert_json_error(
        raw(
            api,
            &request(
                "POST",
                "/v1/members",
                "content-type: application/json\r\n",
                "{nope",
            ),
        ),
        400,
        "check",
    );
    // The handlers' own errors keep their shape.
    assert_json_error(
        raw(api, &request("GET", "/v1/docs/nothing/x", "", "")),
        404,
        "lichen ls",
    );
}

#[test]
fn a_write_too_big_to_handle_is_refused_before_it_costs_memory() {
    let (_dir, a) = one_agent(121, "log = \"info\"\n");
    let api = a.api.as_str();
    // 100,000 keys in ~1 MiB: refused whole.
    let big: serde_json::Map<String, Value> =
        (0..100_000).map(|i| (format!("{i:x}"), json!(1))).collect();
    let body = serde_json::to_string(&Value::Object(big)).unwrap();
    assert!(body.len() < 1 << 20);
    let before = peak_rss_kib(a.pid());
    assert_json_error(
        raw(
            api,
            &request(
                "PUT",
                "/v1/docs/big",
                "content-type: application/json\r\n",
                &body,
            ),
        ),
        413,
        "write it in parts",
    );
    let grown = peak_rss_kib(a.pid()).saturating_sub(before);
    eprintln!("peak RSS grew by {grown} KiB for a refused 100,000-key write");
    assert!(grown < 40 << 10, "peak RSS grew by {grown} KiB");
    assert!(a.get("big", "").is_none(), "nothing of it was written");
    // At the limit it is written, and other requests are answered.
    let ok: serde_json::Map<String, Value> =
        (0..5_000).map(|i| (format!("{i:x}"), json!(i))).collect();
    let body = serde_json::to_string(&Value::Object(ok)).unwrap();
    let (status, _, text) = raw(
        api,
        &request(
            "PUT",
            "/v1/docs/big",
            "content-type: application/json\r\n",
            &body,
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(a.get("big", "ff"), Some(json!(255)));
}

#[test]
fn a_huge_bound_file_is_refused_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.json");
    let mut a = Agent::new(dir.path(), "a", node_ip(122, 0));
    std::fs::write(
        &a.config,
        format!(
            "log = \"info\"\n[[bind]]\ndoc = \"app\"\nfile = \"{}\"\nmode = \"sync\"\ndebounce_ms = 50\n",
            file.display()
        ),
    )
    .unwrap();
    a.start();
    assert!(a.put("app", "k", "1"));
    wait_until("the file is rendered", PATIENCE, || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"k\""))
    });
    let before = peak_rss_kib(a.pid());
    // 50 MB of valid JSON (one long string), saved by rename.
    let tmp = dir.path().join(".big.json.tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(b"{\"k\": \"").unwrap();
    let block = vec![b'x'; 1 << 20];
    for _ in 0..50 {
        f.write_all(&block).unwrap();
    }
    f.write_all(b"\"}\n").unwrap();
    drop(f);
    std::fs::rename(&tmp, &file).unwrap();
    wait_until("the edit is refused as too large", PATIENCE, || {
        let m = http_get(&a.api, "/metrics");
        m.contains("lichen_ingest_errors_total{reason=\"too_large\"} 1")
    });
    let grown = peak_rss_kib(a.pid()).saturating_sub(before);
    eprintln!("peak RSS grew by {grown} KiB for a refused 50 MB file");
    assert!(grown < 20 << 10, "peak RSS grew by {grown} KiB");
    assert_eq!(
        a.get("app", "k"),
        Some(json!(1)),
        "the document kept its value"
    );
}

/// Raise this test process's own descriptor limit (it opens more than 1,024 sockets); the
/// agents started before keep the limit they inherited.
fn raise_own_fd_limit(want: u64) -> bool {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: Some(want),
        maximum: lim.maximum,
    };
    let got = if lim.maximum.is_some_and(|h| h < want) {
        lim.current.unwrap_or(0)
    } else if setrlimit(Resource::Nofile, raised).is_ok() {
        want
    } else {
        0
    };
    if got < want {
        eprintln!("skipped: cannot raise this process's descriptor limit to {want} (got {got})");
        return false;
    }
    true
}

/// The soft "Max open files" limit of a process.
fn fd_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .split_whitespace()
        .nth(3)
        .unwrap_or("?")
        .to_string()
}

#[test]
fn idle_and_slow_api_connections_cannot_lock_the_agent_out() {
    // The agents start with the usual soft limit of 1,024 descriptors (as from a login
    // shell or a default systemd unit), inherited from this process.
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.map_or(1024, |s| s.min(1024));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: lim.maximum,
        },
    )
    .unwrap();
    // Two agents; b renders `app` into a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.json");
    let mut a = Agent::new(dir.path(), "a", node_ip(123, 0));
    let mut b = Agent::new(dir.path(), "b", node_ip(123, 1));
    std::fs::write(
        &b.config,
        format!(
            "log = \"info\"\n[sync]\nanti_entropy_ms = 200\n[[bind]]\ndoc = \"app\"\nfile = \"{}\"\nmode = \"render\"\ndebounce_ms = 50\n",
            file.display()
        ),
    )
    .unwrap();
    a.start();
    b.join = Some(a.status()["join_token"].as_str().unwrap().to_string());
    b.start();
    a.ok(&["members", "add", &b.id, "--role", "writer", "--name", "b"]);
    assert!(a.put("app", "v", "0"));
    wait_until("b renders app", PATIENCE, || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"v\": 0"))
    });
    eprintln!("b's descriptor limit: {}", fd_limit(b.pid()));
    if !raise_own_fd_limit(4096) {
        return;
    }
    // 1,100 connections that never send a byte, and 20 that send a request head one byte
    // at a time (slowloris), all to b.
    let idle: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect(&b.api).expect("connect"))
        .collect();
    let slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&b.api).expect("connect");
            s.write_all(b"GET /v1/status HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut slow: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let t = Instant::now();
    // Peer changes still reach b and are rendered while the connections are open.
    assert!(a.put("app", "v", "1"));
    wait_until("b renders a's change under API load", PATIENCE, || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"v\": 1"))
    });
    // And b's API answers again: idle and slow connections are closed after the idle
    // timeout, extra ones are refused at once.
    wait_until("b's API answers", PATIENCE, || {
        b.cli(&["status", "--json"]).status.success()
    });
    eprintln!("b answered {:?} after the connections opened", t.elapsed());
    let m = http_get(&b.api, "/metrics");
    assert!(
        metric(&m, "lichen_api_connections_refused_total").unwrap_or(0.0) > 0.0,
        "connections over the cap are refused:\n{m}"
    );
    // The agent closed the slow connections (they never completed a head).
    for mut s in slow {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = Vec::new();
        let closed = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            closed.is_ok(),
            "a slowloris connection is still open: {closed:?}"
        );
        assert!(
            !text.contains("\"node\""),
            "a slowloris request was served: {text}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
    drop(idle);
    assert!(b.alive(), "b is still running");
}
