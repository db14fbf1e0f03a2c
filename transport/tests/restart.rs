//! A peer that restarts (crash, `kill -9`, restore from a snapshot) while the other side still
//! holds its old connection: the old connection is stale but nothing tells the survivor so
//! until its idle timeout. The restarted peer's new connection must replace it at once,
//! whichever key is lower and whichever side dialled the stale connection.
//!
//! The crash is simulated in-process: the stale connection runs through a UDP relay that is
//! black-holed before the old endpoint is dropped, so its CONNECTION_CLOSE never arrives
//! (as after `kill -9`), and the survivor's idle timeout (60 s here) is far beyond the test's
//! deadline.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use lichen_transport::{close_code, Endpoint, Event};
use tokio::net::UdpSocket;

/// A UDP relay in front of `target` that can black-hole traffic both ways.
async fn relay(target: SocketAddr, blackhole: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(target).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let (mut b1, mut b2) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut b1) => if let Ok((n, from)) = r {
                    client = Some(from);
                    if !blackhole.load(Ordering::SeqCst) {
                        let _ = back.send(&b1[..n]).await;
                    }
                },
                r = back.recv(&mut b2) => if let (Ok(n), Some(c)) = (r, client) {
                    if !blackhole.load(Ordering::SeqCst) {
                        let _ = front.send_to(&b2[..n], c).await;
                    }
                },
            }
        }
    });
    addr
}

/// Config with an idle timeout far beyond the test deadline: a stale connection is only
/// ever replaced, never timed out, within the test.
fn long_idle(n: u8) -> lichen_transport::Config {
    let mut c = config(n);
    c.idle_timeout = Duration::from_secs(60);
    c
}

/// Node `restarted` crashes and comes back (same key, new run) while node `survivor` still
/// holds the old connection, dialled by `survivor` if `survivor_dialled`. The new run's
/// dial must be accepted and replace the stale connection at once.
async fn restarted_peer_replaces_stale_connection(
    restarted: u8,
    survivor: u8,
    survivor_dialled: bool,
) {
    init_tracing();
    let (r, s) = (key(restarted), key(survivor));
    let members = Members::of(&[r, s]);
    let auth = Arc::new(members.clone());
    let (sv, mut svrx) = Endpoint::bind(long_idle(survivor), auth.clone())
        .await
        .unwrap();
    let (old, mut oldrx) = Endpoint::bind(long_idle(restarted), auth.clone())
        .await
        .unwrap();
    let blackhole = Arc::new(AtomicBool::new(false));
    if survivor_dialled {
        let via = relay(old.local_addr(), blackhole.clone()).await;
        sv.add_peer(r, vec![via]);
    } else {
        let via = relay(sv.local_addr(), blackhole.clone()).await;
        old.add_peer(s, vec![via]);
    }
    wait_connected(&mut svrx, r).await;
    wait_connected(&mut oldrx, s).await;
    assert_eq!(
        sv.connections()[0].dialed_by_us,
        survivor_dialled,
        "the stale connection was dialled by the intended side"
    );

    // Crash: the old run vanishes without a word reaching the survivor.
    blackhole.store(true, Ordering::SeqCst);
    drop(old);
    drop(oldrx);
    assert_eq!(sv.connected_peers(), vec![r], "the survivor still believes");

    // The new run (same key, new port) dials the survivor.
    let (new, mut newrx) = Endpoint::bind(long_idle(restarted), auth).await.unwrap();
    new.add_peer(s, vec![sv.local_addr()]);
    wait_connected(&mut newrx, s).await;
    wait_connected(&mut svrx, r).await;
    wait_until("the survivor holds only the new run's connection", || {
        let c = sv.connections();
        c.len() == 1 && c[0].remote_addr == new.local_addr()
    })
    .await;

    // Frames flow both ways over the new connection.
    new.send(&s, Bytes::from_static(b"back")).await.unwrap();
    assert_eq!(&wait_frame(&mut svrx, r).await[..], b"back");
    sv.send(&r, Bytes::from_static(b"welcome")).await.unwrap();
    assert_eq!(&wait_frame(&mut newrx, s).await[..], b"welcome");
    // The replaced connection produced no Disconnected for the new run's key.
    while let Ok(ev) = svrx.try_recv() {
        assert!(
            !matches!(ev, Event::Disconnected { .. }),
            "unexpected {ev:?}"
        );
    }
}

/// Seeds `(lower, higher)`: the node with seed `lower` has the lower key.
fn ordered() -> (u8, u8) {
    if key(1) < key(2) {
        (1, 2)
    } else {
        (2, 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_higher_key_replaces_the_connection_the_survivor_dialled() {
    let (lo, hi) = ordered();
    restarted_peer_replaces_stale_connection(hi, lo, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_lower_key_replaces_the_connection_the_survivor_dialled() {
    let (lo, hi) = ordered();
    restarted_peer_replaces_stale_connection(lo, hi, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_higher_key_replaces_the_connection_it_dialled_before() {
    let (lo, hi) = ordered();
    restarted_peer_replaces_stale_connection(hi, lo, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_lower_key_replaces_the_connection_it_dialled_before() {
    let (lo, hi) = ordered();
    restarted_peer_replaces_stale_connection(lo, hi, false).await;
}

/// A refused key (the agent refuses keys flagged for equivocation) loses its live connection
/// at once and gets no new one, whichever side dials; lifting the refusal lets it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_key_is_disconnected_and_cannot_reconnect() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let (a, mut arx) = node(1, &members).await;
    let (b, mut brx) = node(2, &members).await;
    a.add_peer(key(2), vec![b.local_addr()]);
    b.add_peer(key(1), vec![a.local_addr()]);
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;

    a.set_refused([key(2)]);
    let reason = wait_disconnected(&mut arx, key(2)).await;
    assert!(reason.contains("refused"), "{reason}");
    wait_disconnected(&mut brx, key(1)).await;
    // B keeps dialling (its backoff is at most 500 ms here); A dials no more.
    let dials = a.stats().dials_started;
    wait_until("B was refused three more times", || {
        b.stats().handshakes_failed >= 3
    })
    .await;
    assert!(a.connected_peers().is_empty());
    assert!(b.connected_peers().is_empty());
    assert_eq!(a.stats().dials_started, dials);
    assert_eq!(close_code::REFUSED, 0x05);

    a.set_refused([]);
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;
}
