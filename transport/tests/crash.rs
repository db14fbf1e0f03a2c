//! A peer that crashes: its process is killed with SIGKILL, so no CONNECTION_CLOSE is ever
//! sent and its UDP socket simply vanishes. The surviving side must notice through the QUIC
//! idle timeout (3 s in these tests, with 300 ms keep-alives; allowed 2 s of slack for QUIC's
//! 3×PTO floor and a loaded machine), report the peer down, and
//! reconnect on its own when the peer comes back on the same address.
//!
//! The peer runs in a child process: this test binary re-executed to run only
//! [`crash_peer_process`] (which does nothing unless [`CHILD_ENV`] is set). It reports what
//! it sees on stdout, one `peer: …` line per event.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use lichen_transport::{Endpoint, Event};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

/// Set (to the address to bind) in the child process only.
const CHILD_ENV: &str = "LICHEN_TRANSPORT_CRASH_PEER_ADDR";

/// The peer process (key 2). Not a test by itself: without [`CHILD_ENV`] it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_peer_process() {
    let Ok(addr) = std::env::var(CHILD_ENV) else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("address in the environment");
    let members = Members::of(&[key(1), key(2)]);
    let (_ep, mut rx) = Endpoint::bind(config_at(2, addr), Arc::new(members))
        .await
        .expect("bind the peer endpoint");
    println!("peer: ready");
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Connected { peer, .. } if peer == key(1) => println!("peer: connected"),
            Event::Frame { frame, .. } => {
                println!("peer: frame {}", String::from_utf8_lossy(&frame))
            }
            _ => {}
        }
    }
}

/// The peer process, killed (SIGKILL) and reaped on drop; its stdout lines on `lines`.
struct Peer {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Peer {
    fn start(addr: SocketAddr) -> Peer {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "crash_peer_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the peer process");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Peer { child, lines }
    }

    /// Waits for the line `want` (other lines are skipped).
    async fn expect(&mut self, want: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match timeout_at(deadline, self.lines.recv()).await {
                // The test harness may have printed "test … ... " on the same line.
                Ok(Some(l)) if l.ends_with(&format!("peer: {want}")) => return,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the peer process exited before printing {want:?}"),
                Err(_) => panic!("the peer process did not print {want:?} in time"),
            }
        }
    }

    /// SIGKILL: the process gets no chance to close anything.
    fn crash(&mut self) {
        self.child.kill().expect("kill the peer process");
        self.child.wait().expect("reap the peer process");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_without_closing_is_reported_down_by_the_idle_timeout_and_redialled() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let b_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port");
    let mut b = Peer::start(b_addr);
    b.expect("ready").await;

    let (a, mut arx) = node(1, &members).await;
    a.add_peer(key(2), vec![b_addr]);
    wait_connected(&mut arx, key(2)).await;
    b.expect("connected").await;
    a.send(&key(2), Bytes::from_static(b"before"))
        .await
        .unwrap();
    b.expect("frame before").await;

    // Crash. Nothing tells A; only the silence does.
    b.crash();
    let crashed = Instant::now();
    let reason = wait_disconnected(&mut arx, key(2)).await;
    let noticed = crashed.elapsed();
    let idle = config(1).idle_timeout;
    assert!(reason.contains("timed out"), "{reason}");
    assert!(
        noticed <= idle + Duration::from_secs(2),
        "noticed after {noticed:?}, idle timeout {idle:?}"
    );
    assert!(a.connected_peers().is_empty());
    eprintln!("crash noticed after {noticed:?} (idle timeout {idle:?})");

    // Back on the same address (same key, new process): A's dialer finds it unaided.
    let mut b = Peer::start(b_addr);
    b.expect("ready").await;
    wait_connected(&mut arx, key(2)).await;
    b.expect("connected").await;
    a.send(&key(2), Bytes::from_static(b"after")).await.unwrap();
    b.expect("frame after").await;
    assert_eq!(a.connected_peers(), vec![key(2)]);
}
