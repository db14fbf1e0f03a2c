//! Peer addresses given as DNS names are resolved by the dialer at every dial attempt: when
//! the name moves to another address, the next redial goes there, and a lookup that fails is
//! counted and retried with backoff. A test resolver stands in for DNS (no /etc/hosts edits).

// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use lichen_transport::{Endpoint, Lookup, PeerAddr, Resolve};

/// A name table the test edits; counts lookups.
#[derive(Debug, Default)]
struct TestDns {
    table: Mutex<HashMap<String, SocketAddr>>,
    lookups: AtomicUsize,
}

impl TestDns {
    fn set(&self, name: &str, addr: Option<SocketAddr>) {
        let mut t = self.table.lock().unwrap();
        match addr {
            Some(a) => t.insert(name.to_string(), a),
            None => t.remove(name),
        };
    }
}

impl Resolve for TestDns {
    fn lookup(&self, host_port: &str) -> Lookup {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let r = match self.table.lock().unwrap().get(host_port) {
            Some(a) => Ok(vec![*a]),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no such name {host_port}"),
            )),
        };
        Box::pin(async move { r })
    }
}

const NAME: &str = "b.cluster.test:7946";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_resolves_the_peer_name_again_at_each_redial() {
    init_tracing();
    let members = Members::of(&[key(1), key(2)]);
    let dns = Arc::new(TestDns::default());
    let mut ca = config(1);
    ca.resolver = dns.clone();
    let (a, mut ev_a) = Endpoint::bind(ca, Arc::new(members.clone())).await.unwrap();

    // b runs at its first address; the name points there.
    let (b1, _ev_b1) = node(2, &members).await;
    dns.set(NAME, Some(b1.local_addr()));
    a.add_peer(key(2), [PeerAddr::parse(NAME)]);
    let first = wait_connected(&mut ev_a, key(2)).await;
    assert_eq!(first, b1.local_addr());

    // b moves: the old process is gone and the name does not resolve for a while.
    dns.set(NAME, None);
    b1.close().await;
    drop(b1);
    wait_disconnected(&mut ev_a, key(2)).await;
    wait_until("a failed lookup is counted", || {
        a.stats().resolve_failures >= 1
    })
    .await;

    // b comes back elsewhere and the record follows it: a's next redial finds it, without
    // add_peer being called again.
    let (b2, _ev_b2) = node(2, &members).await;
    assert_ne!(b2.local_addr(), first);
    let lookups = dns.lookups.load(Ordering::SeqCst);
    dns.set(NAME, Some(b2.local_addr()));
    let second = wait_connected(&mut ev_a, key(2)).await;
    assert_eq!(second, b2.local_addr());
    assert!(dns.lookups.load(Ordering::SeqCst) > lookups);
}
