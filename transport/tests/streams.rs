//! Stream-level tests on loopback: bad frames are rejected per stream without
//! hurting the connection; a stalled peer fills only its own queue.
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

use bytes::Bytes;
use common::*;
use lichen_transport::{close_code, frame, Endpoint, Event, SendError};

async fn raw_stream(ep: &Endpoint, to: lichen_transport::PeerKey) -> quinn::SendStream {
    tokio::time::timeout(DEADLINE, ep.raw_uni_stream_for_tests(&to))
        .await
        .expect("timed out opening a raw stream")
        .expect("no connection for a raw stream")
}

#[tokio::test]
async fn garbage_and_oversized_frames_rejected_other_streams_keep_working() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let (a, mut arx) = node(1, &members).await;
    let mut cfg = config(2);
    cfg.max_frame_len = 1024;
    let (b, mut brx) = Endpoint::bind(cfg, Arc::new(members.clone()))
        .await
        .unwrap();
    a.add_peer(key(2), vec![b.local_addr()]);
    wait_connected(&mut arx, key(2)).await;
    wait_connected(&mut brx, key(1)).await;

    // A well-formed raw stream that stays open across the bad ones.
    let mut good = raw_stream(&a, key(2)).await;
    let mut bytes = frame::STREAM_PREAMBLE.to_vec();
    frame::encode_frame(b"first", 1024, &mut bytes).unwrap();
    good.write_all(&bytes).await.unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"first");

    // 1. Garbage: wrong preamble.
    let mut garbage = raw_stream(&a, key(2)).await;
    garbage.write_all(b"GARBAGE GARBAGE").await.unwrap();
    assert_eq!(
        garbage.stopped().await.unwrap(),
        Some(quinn::VarInt::from_u32(close_code::MALFORMED))
    );
    drop(garbage); // frees the stream slot (at most 4 concurrent per connection)

    // 2. Oversized: the header alone announces 1 MB > 1024 (no payload sent).
    let mut big = raw_stream(&a, key(2)).await;
    let mut bytes = frame::STREAM_PREAMBLE.to_vec();
    bytes.extend_from_slice(&1_000_000u32.to_be_bytes());
    big.write_all(&bytes).await.unwrap();
    assert_eq!(
        big.stopped().await.unwrap(),
        Some(quinn::VarInt::from_u32(close_code::FRAME_TOO_LARGE))
    );
    drop(big);

    // 3. Truncated: the stream ends inside a frame.
    let mut cut = raw_stream(&a, key(2)).await;
    let mut bytes = frame::STREAM_PREAMBLE.to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 10, 1, 2, 3]);
    cut.write_all(&bytes).await.unwrap();
    cut.finish().unwrap();
    wait_until("truncated stream counted", || {
        b.stats().rejected_malformed == 2
    })
    .await;

    let s = b.stats();
    assert_eq!((s.rejected_malformed, s.rejected_too_large), (2, 1));

    // The long-lived raw stream and the endpoint's own stream still work,
    // and the connection never dropped.
    let mut bytes = Vec::new();
    frame::encode_frame(b"second", 1024, &mut bytes).unwrap();
    good.write_all(&bytes).await.unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"second");
    a.try_send(&key(2), Bytes::from_static(b"third")).unwrap();
    assert_eq!(&wait_frame(&mut brx, key(1)).await[..], b"third");
    b.try_send(&key(1), Bytes::from_static(b"back")).unwrap();
    assert_eq!(&wait_frame(&mut arx, key(2)).await[..], b"back");
    assert_eq!(b.connected_peers(), vec![key(1)]);
    assert_eq!(b.stats().disconnects + a.stats().disconnects, 0);
    while let Ok(ev) = brx.try_recv() {
        assert!(
            !matches!(ev, Event::Disconnected { .. }),
            "unexpected {ev:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_peer_fills_its_queue_while_others_still_receive() {
    init_tracing();
    let members = Members::of(&[key(1), key(2), key(3)]);
    let mut cfg = config(1);
    cfg.send_queue_frames = 16;
    let (a, mut arx) = Endpoint::bind(cfg, Arc::new(members.clone()))
        .await
        .unwrap();
    // B never reads its events: after 8 of them its readers block, QUIC flow
    // control stops A's writer, and A's queue for B fills.
    let mut cfg = config(2);
    cfg.event_queue = 8;
    let (b, _brx_never_read) = Endpoint::bind(cfg, Arc::new(members.clone()))
        .await
        .unwrap();
    let (c, mut crx) = node(3, &members).await;
    a.add_peer(key(2), vec![b.local_addr()]);
    a.add_peer(key(3), vec![c.local_addr()]);
    for _ in 0..2 {
        match wait_event(&mut arx, "Connected", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await
        {
            Event::Connected { peer, .. } => assert!(peer == key(2) || peer == key(3)),
            _ => unreachable!(),
        }
    }
    wait_connected(&mut crx, key(1)).await;

    let payload = Bytes::from(vec![7u8; 16 * 1024]);
    let mut accepted_per_round = Vec::new();
    for round in 0..60u32 {
        let mut accepted = 0u32;
        loop {
            match a.try_send(&key(2), payload.clone()) {
                Ok(()) => accepted += 1,
                Err(SendError::Full) => break,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(accepted < 10_000, "queue to a stalled peer never filled");
        }
        accepted_per_round.push(accepted);
        // Meanwhile C gets every frame (and A's sender to B has time to drain
        // whatever QUIC flow control still allows).
        a.send(&key(3), Bytes::copy_from_slice(&round.to_be_bytes()))
            .await
            .unwrap();
        assert_eq!(&wait_frame(&mut crx, key(1)).await[..], round.to_be_bytes());
    }
    let total: u32 = accepted_per_round.iter().sum();
    // Bounded: queue (16) + B's event queue (8) + QUIC windows (~1.25 MB).
    assert!(
        total < 400,
        "accepted {total} frames for a stalled peer: {accepted_per_round:?}"
    );
    assert!(
        accepted_per_round.iter().rev().take(5).all(|&n| n == 0),
        "queue kept draining: {accepted_per_round:?}"
    );
    assert_eq!(a.try_send(&key(2), payload), Err(SendError::Full));
    assert!(a.stats().send_full >= 60);
    assert_eq!(a.connected_peers().len(), 2);
}
