//! Loopback throughput and handshake benchmark for `lichen-transport`.
//!
//! Two endpoints on 127.0.0.1; A pushes frames to B with the awaiting
//! `Endpoint::send` (so the bounded queue paces it) while B's event loop
//! counts them. Then it measures connection set-up: a fresh endpoint dials B
//! and the time from `add_peer` to its `Connected` event is averaged.
//!
//! Run: `cargo run --release -p lichen-transport --example throughput [SCALE]`
//! (SCALE multiplies the frame counts; default 1).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lichen_transport::{public_key_from_secret, Authorizer, Config, Endpoint, Event, PeerKey};

struct Members(RwLock<Vec<PeerKey>>);

impl Authorizer for Members {
    fn is_member(&self, key: &PeerKey) -> bool {
        self.0.read().map(|m| m.contains(key)).unwrap_or(false)
    }
}

fn config(seed: u8) -> Config {
    Config::new("127.0.0.1:0".parse().unwrap(), [seed; 32], [9; 32])
}

async fn wait_connected(rx: &mut tokio::sync::mpsc::Receiver<Event>) {
    while let Some(ev) = rx.recv().await {
        if matches!(ev, Event::Connected { .. }) {
            return;
        }
    }
    panic!("event channel closed");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scale: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    const HANDSHAKES: u8 = 50;
    let keys: Vec<PeerKey> = (1..=2 + HANDSHAKES)
        .map(|s| public_key_from_secret(&[s; 32]))
        .collect::<Result<_, _>>()?;
    let members = Arc::new(Members(RwLock::new(keys.clone())));

    let (a, mut arx) = Endpoint::bind(config(1), members.clone()).await?;
    let (b, mut brx) = Endpoint::bind(config(2), members.clone()).await?;
    let (ka, kb) = (keys[0], keys[1]);
    a.add_peer(kb, vec![b.local_addr()]);
    wait_connected(&mut arx).await;
    wait_connected(&mut brx).await;
    tokio::spawn(async move { while arx.recv().await.is_some() {} });

    for (size, count) in [(100usize, 200_000u32 * scale), (16 * 1024, 20_000 * scale)] {
        let payload = Bytes::from(vec![0xa5u8; size]);
        let sender = a.clone();
        let start = Instant::now();
        let send_task = tokio::spawn(async move {
            for _ in 0..count {
                sender.send(&kb, payload.clone()).await.expect("send");
            }
        });
        let mut got = 0u32;
        while got < count {
            match brx.recv().await {
                Some(Event::Frame { peer, frame }) if peer == ka => {
                    assert_eq!(frame.len(), size);
                    got += 1;
                }
                Some(_) => {}
                None => panic!("events closed"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        send_task.await?;
        println!(
            "frames of {size:>6} B: {count} in {secs:.3} s = {:>9.0} frames/s, {:>7.1} MB/s",
            f64::from(count) / secs,
            f64::from(count) * size as f64 / secs / 1e6
        );
    }

    // Handshakes: fresh endpoint each time (bound before the clock starts).
    tokio::spawn(async move { while brx.recv().await.is_some() {} });
    let mut total = Duration::ZERO;
    for i in 0..HANDSHAKES {
        let (c, mut crx) = Endpoint::bind(config(3 + i), members.clone()).await?;
        let start = Instant::now();
        c.add_peer(kb, vec![b.local_addr()]);
        wait_connected(&mut crx).await;
        total += start.elapsed();
        drop(c);
    }
    println!(
        "connection set-up (dial → Connected, incl. mutual TLS 1.3): mean {:.2} ms over {HANDSHAKES}",
        total.as_secs_f64() * 1e3 / f64::from(HANDSHAKES)
    );
    let s = a.stats();
    println!(
        "sender stats: {} frames, {} bytes, {} dropped",
        s.frames_sent, s.bytes_sent, s.frames_dropped
    );
    a.close().await;
    b.close().await;
    Ok(())
}
