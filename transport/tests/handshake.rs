//! Handshake tests on loopback: members connect and exchange frames both
//! ways; non-members and members of another cluster are refused.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::sync::Arc;

use common::*;
use lichen_transport::{Endpoint, Event, SendError};
use tokio::sync::mpsc::Receiver;

fn assert_no_connected(rx: &mut Receiver<Event>) {
    while let Ok(ev) = rx.try_recv() {
        assert!(!matches!(ev, Event::Connected { .. }), "unexpected {ev:?}");
    }
}

#[tokio::test]
async fn members_connect_and_frames_flow_both_ways() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let (a, mut arx) = node(1, &members).await;
    let (b, mut brx) = node(2, &members).await;
    assert_eq!(a.public_key(), key(1));

    // Only A dials; B accepts a member it was never told about.
    a.add_peer(key(2), vec![b.local_addr()]);
    assert_eq!(wait_connected(&mut arx, key(2)).await, b.local_addr());
    wait_connected(&mut brx, key(1)).await;

    a.try_send(&key(2), bytes::Bytes::from_static(b"ping"))
        .unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"ping");
    b.try_send(&key(1), bytes::Bytes::from_static(b"pong"))
        .unwrap();
    assert_eq!(&wait_frame(&mut arx, key(2)).await[..], b"pong");

    // Order is preserved on the long-lived stream; empty frames are fine.
    for i in 0..100u32 {
        send(&a, &key(2), if i % 10 == 0 { b"" } else { b"x" }).await;
        a.send(&key(2), bytes::Bytes::copy_from_slice(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        let _ = wait_frame(&mut brx, key(1)).await;
        assert_eq!(&wait_frame(&mut brx, key(1)).await[..], i.to_be_bytes());
    }

    let big = vec![0u8; a_max() + 1];
    assert_eq!(
        a.try_send(&key(2), big.into()),
        Err(SendError::TooLarge {
            len: a_max() + 1,
            max: a_max()
        })
    );
    assert_eq!(
        a.try_send(&key(9), bytes::Bytes::new()),
        Err(SendError::NotConnected)
    );

    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.frames_sent, 201);
    assert_eq!(sb.frames_received, 201);
    assert_eq!(sb.frames_sent, 1);
    assert_eq!((sa.connects, sb.connects), (1, 1));
    assert_eq!(sa.handshakes_failed + sb.handshakes_failed, 0);
    assert_eq!(a.connected_peers(), vec![key(2)]);
    assert_eq!(b.connected_peers(), vec![key(1)]);

    // Closing tells the other side.
    a.close().await;
    wait_disconnected(&mut brx, key(1)).await;
    assert!(b.connected_peers().is_empty());
}

fn a_max() -> usize {
    config(1).max_frame_len
}

#[tokio::test]
async fn non_member_is_refused() {
    init_tracing();
    // A and B know each other; C believes it is a member, A does not.
    let (a, mut arx) = node(1, &Members::of(&[key(1), key(2)])).await;
    let (c, mut crx) = node(3, &Members::of(&[key(1), key(3)])).await;
    c.add_peer(key(1), vec![a.local_addr()]);
    wait_until("both sides count a failed handshake", || {
        a.stats().handshakes_failed >= 1 && c.stats().handshakes_failed >= 1
    })
    .await;
    assert_no_connected(&mut arx);
    assert_no_connected(&mut crx);
    assert!(a.connected_peers().is_empty() && c.connected_peers().is_empty());
    assert_eq!(a.stats().connects + c.stats().connects, 0);

    // A refuses to even dial a non-member.
    a.add_peer(key(3), vec![c.local_addr()]);
    assert_eq!(
        a.try_send(&key(3), bytes::Bytes::new()),
        Err(SendError::NotConnected)
    );
}

#[tokio::test]
async fn other_cluster_is_refused() {
    init_tracing();
    let members = Members::of(&[key(1), key(4)]);
    let (a, mut arx) = node(1, &members).await;
    let mut cfg = config(4);
    cfg.cluster_id = [0x22; 32];
    let (d, mut drx) = Endpoint::bind(cfg, Arc::new(members.clone()))
        .await
        .unwrap();
    d.add_peer(key(1), vec![a.local_addr()]);
    wait_until("both sides count a failed handshake", || {
        a.stats().handshakes_failed >= 1 && d.stats().handshakes_failed >= 1
    })
    .await;
    assert_no_connected(&mut arx);
    assert_no_connected(&mut drx);
    assert!(a.connected_peers().is_empty() && d.connected_peers().is_empty());
}
