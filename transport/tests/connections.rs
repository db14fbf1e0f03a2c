//! Connection lifecycle on loopback: simultaneous dial, restart and
//! reconnect, network loss and recovery (through an in-process UDP relay),
//! removal from membership.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use lichen_transport::{Endpoint, Event};
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_leaves_exactly_one_connection() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let a_is_lower = key(1) < key(2);
    let mut raced = 0;
    for round in 0..5 {
        let (a, mut arx) = node(1, &members).await;
        let (b, mut brx) = node(2, &members).await;
        // Both dial at once.
        a.add_peer(key(2), vec![b.local_addr()]);
        b.add_peer(key(1), vec![a.local_addr()]);
        wait_connected(&mut arx, key(2)).await;
        wait_connected(&mut brx, key(1)).await;

        // Both ends settle on one connection and agree on who dialled it.
        // Once the lower key has dialled, its connection is the one that
        // survives (if it never dialled, it found itself connected already
        // and will not dial while that lasts).
        let lower = if a_is_lower { &a } else { &b };
        wait_until("one agreed connection on each side", || {
            let (ca, cb) = (a.connections(), b.connections());
            ca.len() == 1
                && cb.len() == 1
                && ca[0].dialed_by_us != cb[0].dialed_by_us
                && (lower.stats().dials_started == 0 || ca[0].dialed_by_us == a_is_lower)
        })
        .await;
        if a.stats().duplicates_closed + b.stats().duplicates_closed > 0 {
            raced += 1;
        }
        // Frames flow both ways over it, in order.
        for i in 0..10u8 {
            a.send(&key(2), Bytes::copy_from_slice(&[round, i]))
                .await
                .unwrap();
            b.send(&key(1), Bytes::copy_from_slice(&[round, i]))
                .await
                .unwrap();
        }
        for i in 0..10u8 {
            assert_eq!(&wait_frame(&mut brx, key(1)).await[..], [round, i]);
            assert_eq!(&wait_frame(&mut arx, key(2)).await[..], [round, i]);
        }
        assert_eq!(a.connections().len(), 1);
        assert_eq!(b.connections().len(), 1);
        a.close().await;
        b.close().await;
    }
    eprintln!("{raced} of 5 rounds had both dials complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_peer_restarts_on_same_port() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let (a, mut arx) = node(1, &members).await;
    let (b, brx) = node(2, &members).await;
    let b_addr = b.local_addr();
    a.add_peer(key(2), vec![b_addr]);
    wait_connected(&mut arx, key(2)).await;

    // The peer goes away: dropping every handle shuts it down.
    drop(b);
    drop(brx);
    let reason = wait_disconnected(&mut arx, key(2)).await;
    assert!(!reason.is_empty());
    assert!(a.connected_peers().is_empty());

    // Restart with the same key on the same port (the old socket is released
    // asynchronously, so retry the bind until it is free).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (_b2, mut b2rx) = loop {
        match Endpoint::bind(config_at(2, b_addr), Arc::new(members.clone())).await {
            Ok(x) => break x,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "rebind: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // A's dialer finds it again without being told.
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut b2rx, key(1)).await;
    a.send(&key(2), Bytes::from_static(b"welcome back"))
        .await
        .unwrap();
    assert_eq!(&wait_frame(&mut b2rx, key(1)).await[..], b"welcome back");
    assert_eq!(a.stats().connects, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_is_disconnected_within_a_second() {
    init_tracing();
    let members = Members::of(&[key(1), key(2), key(3)]);
    // A has its own view of membership, which the "agent" will change.
    let a_view = Members::of(&[key(1), key(2), key(3)]);
    let (a, mut arx) = node(1, &a_view).await;
    let (b, mut brx) = node(2, &members).await;
    let (c, mut crx) = node(3, &members).await;
    a.add_peer(key(2), vec![b.local_addr()]);
    // C dials A: the incoming side must be cut too.
    c.add_peer(key(1), vec![a.local_addr()]);
    wait_connected(&mut brx, key(1)).await;
    wait_connected(&mut crx, key(1)).await;
    wait_until("A sees both", || a.connected_peers().len() == 2).await;

    a_view.remove(&key(3));
    let started = tokio::time::Instant::now();
    a.membership_changed();
    // Closed at once on A's side...
    assert_eq!(a.connected_peers(), vec![key(2)]);
    // ...and both ends are told within a second.
    tokio::time::timeout(Duration::from_secs(1), async {
        wait_disconnected(&mut crx, key(1)).await;
        loop {
            match arx.recv().await {
                Some(Event::Disconnected { peer, reason }) if peer == key(3) => {
                    assert!(reason.contains("member"), "{reason}");
                    break;
                }
                Some(Event::Disconnected { peer, .. }) => panic!("{peer:?} disconnected"),
                Some(_) => {}
                None => panic!("events closed"),
            }
        }
    })
    .await
    .expect("removed member still connected after 1 s");
    assert!(started.elapsed() < Duration::from_secs(1));

    // B is unaffected; C's redials are refused.
    a.send(&key(2), Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"still here");
    let failed = a.stats().handshakes_failed;
    wait_until("C's redial is refused by A", || {
        a.stats().handshakes_failed > failed
    })
    .await;
    assert_eq!(a.connected_peers(), vec![key(2)]);
}

/// A UDP relay in front of `target` that can black-hole traffic, to simulate
/// the network going away and coming back.
async fn relay(target: std::net::SocketAddr, blackhole: Arc<AtomicBool>) -> std::net::SocketAddr {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_the_network_comes_back() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let (a, mut arx) = node(1, &members).await;
    let (b, mut brx) = node(2, &members).await;
    let blackhole = Arc::new(AtomicBool::new(false));
    let via = relay(b.local_addr(), blackhole.clone()).await;
    a.add_peer(key(2), vec![via]);
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;

    // Network down: keep-alives go unanswered and the idle timeout (3 s in
    // these tests) closes the connection.
    blackhole.store(true, Ordering::SeqCst);
    let reason = wait_disconnected(&mut arx, key(2)).await;
    assert!(reason.contains("timed out"), "{reason}");

    // Network back: A's dialer gets through on a later attempt.
    blackhole.store(false, Ordering::SeqCst);
    wait_connected(&mut arx, key(2)).await;
    a.send(&key(2), Bytes::from_static(b"back online"))
        .await
        .unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"back online");
    assert_eq!(a.connected_peers(), vec![key(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redial_cap_bounds_the_pause_while_a_peer_refuses_us() {
    init_tracing();
    // B does not accept A yet (A is "waiting to be admitted"); A accepts B.
    let a_view = Members::of(&[key(1), key(2)]);
    let b_view = Members::of(&[key(2)]);
    let mut ca = config(1);
    ca.backoff_max = Duration::from_secs(30);
    let (a, mut arx) = Endpoint::bind(ca, Arc::new(a_view)).await.unwrap();
    let (b, mut brx) = node(2, &b_view).await;
    a.set_redial_cap(key(2), Some(Duration::from_millis(200)));
    a.add_peer(key(2), vec![b.local_addr()]);

    // Ten refusals: uncapped, the pauses (20 ms doubling) would add up to
    // about 15 s and the next one would be 10 s or more.
    wait_until("B refused A ten times", || {
        b.stats().handshakes_failed >= 10
    })
    .await;
    assert!(a.connected_peers().is_empty());

    // Admitted: A's next redial, at most 200 ms away, gets through.
    b_view.add(key(1));
    b.membership_changed(); // does not wake A's dialer: only the cap helps
    let admitted = tokio::time::Instant::now();
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;
    assert!(
        admitted.elapsed() < Duration::from_secs(2),
        "connected {:?} after admission",
        admitted.elapsed()
    );

    // Back to the default cap: the connection is unaffected.
    a.set_redial_cap(key(2), None);
    a.send(&key(2), Bytes::from_static(b"admitted"))
        .await
        .unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"admitted");
}

/// Sends `n` frames from `a` to `b` one at a time (each waits for the previous to arrive,
/// like an agent pushing one write after another) and returns how many datagrams `b`
/// received from `a` and how many ACK frames it sent back.
async fn acks_for_one_at_a_time(threshold: u32, n: usize) -> (u64, u64) {
    let members = Members::of(&[key(1), key(2)]);
    let bind = |k: u8| {
        let mut c = config(k);
        c.ack_eliciting_threshold = threshold;
        Endpoint::bind(c, Arc::new(members.clone()))
    };
    let (a, mut arx) = bind(1).await.unwrap();
    let (b, mut brx) = bind(2).await.unwrap();
    a.add_peer(key(2), vec![b.local_addr()]);
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;
    let before = b.connections()[0].clone();
    for _ in 0..n {
        send(&a, &key(2), b"one write").await;
        wait_frame(&mut brx, key(1)).await;
    }
    let after = b.connections()[0].clone();
    (
        after.datagrams_received - before.datagrams_received,
        after.acks_sent - before.acks_sent,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_receiving_one_write_at_a_time_acknowledges_every_tenth_packet_not_every_second() {
    init_tracing();
    // QUIC's default: an ACK for every second packet (or sooner).
    let (datagrams, acks) = acks_for_one_at_a_time(0, 200).await;
    eprintln!("default: {acks} ACKs for {datagrams} datagrams");
    assert!(datagrams >= 200, "{datagrams}");
    assert!(
        acks * 3 > datagrams,
        "{acks} ACKs for {datagrams} datagrams"
    );
    // Lichen's default asks for one every ten: the writer wakes up for far fewer ACKs.
    let (datagrams, acks) = acks_for_one_at_a_time(10, 200).await;
    eprintln!("threshold 10: {acks} ACKs for {datagrams} datagrams");
    assert!(datagrams >= 200, "{datagrams}");
    assert!(
        acks * 4 < datagrams,
        "{acks} ACKs for {datagrams} datagrams"
    );
}
