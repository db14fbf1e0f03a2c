//! Shared helpers for the loopback integration tests: membership sets, test
//! configs, and waiting on events/conditions with a deadline.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lichen_transport::{Authorizer, Config, Endpoint, Event, PeerKey};
use tokio::sync::mpsc::Receiver;
use tokio::time::{timeout_at, Instant};

/// Generous upper bound for any single wait; tests finish far sooner.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub const CLUSTER: [u8; 32] = [0x11; 32];

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A mutable member set, standing in for the membership document.
#[derive(Clone, Default)]
pub struct Members(Arc<RwLock<HashSet<PeerKey>>>);

impl Members {
    pub fn of(keys: &[PeerKey]) -> Self {
        let m = Self::default();
        for k in keys {
            m.add(*k);
        }
        m
    }
    pub fn add(&self, k: PeerKey) {
        self.0.write().unwrap().insert(k);
    }
    pub fn remove(&self, k: &PeerKey) {
        self.0.write().unwrap().remove(k);
    }
}

impl Authorizer for Members {
    fn is_member(&self, key: &PeerKey) -> bool {
        self.0.read().unwrap().contains(key)
    }
}

pub fn seed(n: u8) -> [u8; 32] {
    [n; 32]
}

pub fn key(n: u8) -> PeerKey {
    lichen_transport::public_key_from_secret(&seed(n)).unwrap()
}

pub fn config(n: u8) -> Config {
    config_at(n, "127.0.0.1:0".parse().unwrap())
}

pub fn config_at(n: u8, bind: SocketAddr) -> Config {
    let mut c = Config::new(bind, seed(n), CLUSTER);
    c.keep_alive = Duration::from_millis(300);
    c.idle_timeout = Duration::from_secs(3);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(500);
    c.rng_seed = Some(u64::from(n));
    c
}

pub async fn node(n: u8, members: &Members) -> (Endpoint, Receiver<Event>) {
    Endpoint::bind(config(n), Arc::new(members.clone()))
        .await
        .unwrap()
}

/// Waits for the first event matching `pred`, discarding others.
pub async fn wait_event(
    rx: &mut Receiver<Event>,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event channel closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

pub async fn wait_connected(rx: &mut Receiver<Event>, peer: PeerKey) -> SocketAddr {
    match wait_event(
        rx,
        "Connected",
        |e| matches!(e, Event::Connected { peer: p, .. } if *p == peer),
    )
    .await
    {
        Event::Connected { addr, .. } => addr,
        _ => unreachable!(),
    }
}

pub async fn wait_disconnected(rx: &mut Receiver<Event>, peer: PeerKey) -> String {
    match wait_event(
        rx,
        "Disconnected",
        |e| matches!(e, Event::Disconnected { peer: p, .. } if *p == peer),
    )
    .await
    {
        Event::Disconnected { reason, .. } => reason,
        _ => unreachable!(),
    }
}

pub async fn wait_frame(rx: &mut Receiver<Event>, from: PeerKey) -> bytes::Bytes {
    match wait_event(
        rx,
        "Frame",
        |e| matches!(e, Event::Frame { peer, .. } if *peer == from),
    )
    .await
    {
        Event::Frame { frame, .. } => frame,
        _ => unreachable!(),
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `frame`, retrying while the queue is momentarily full.
pub async fn send(ep: &Endpoint, to: &PeerKey, frame: &'static [u8]) {
    ep.send(to, bytes::Bytes::from_static(frame))
        .await
        .expect("send");
}
