//! Lichen's network layer: authenticated QUIC connections between cluster
//! members carrying opaque, length-delimited frames.
//!
//! This crate knows nothing about Automerge. The agent gives it a node key, a
//! cluster id and an [`Authorizer`] (answered from the membership document);
//! it gets back an [`Endpoint`] to send frames with and a bounded channel of
//! [`Event`]s (peer connected / disconnected / frame received).
//!
//! # Using it from the agent
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use lichen_transport::*;
//! # struct Members;
//! # impl Authorizer for Members { fn is_member(&self, _k: &PeerKey) -> bool { true } }
//! # async fn run(seed: [u8; 32], cluster: [u8; 32], peer: PeerKey) -> Result<(), Error> {
//! let config = Config::new("0.0.0.0:7946".parse().unwrap(), seed, cluster);
//! let (endpoint, mut events) = Endpoint::bind(config, Arc::new(Members)).await?;
//! // Keep a connection; a name is resolved again at every dial attempt.
//! endpoint.add_peer(peer, ["192.0.2.7:7946", "node-b.example.net:7946"]);
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Connected { peer, .. } => { /* (re)start sync with `peer` */
//!             let _ = endpoint.try_send(&peer, bytes::Bytes::from_static(b"hello"));
//!         }
//!         Event::Frame { peer, frame } => { /* feed the sync engine */ }
//!         Event::Disconnected { peer, reason } => { /* drop per-peer sync state */ }
//!     }
//! }
//! // After the membership document changes:
//! endpoint.membership_changed();
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! * **Identity = key** (`tls` module). Self-signed certificates carry the
//!   ed25519 node key; custom rustls verifiers on both sides extract it,
//!   verify the TLS 1.3 handshake signature and ask the [`Authorizer`]. The
//!   cluster id is the ALPN protocol (`lichen/1/<hex>`), so members of another
//!   cluster fail the handshake. TLS 1.3 only, mutual auth, no resumption.
//! * **Streams** (`endpoint` module). Each connection has one long-lived
//!   unidirectional stream per direction, opened as soon as the connection is
//!   registered, that carries every frame queued by
//!   [`Endpoint::try_send`]/[`Endpoint::send`] in order. One ordered stream is
//!   what a sync protocol wants (messages to a peer are applied in the order
//!   they were produced) and costs one stream open per connection instead of
//!   per frame. Opening it eagerly also closes a TLS 1.3 gap: the dialler
//!   finishes its handshake before the server has checked the client
//!   certificate, so the dialler only reports `Connected` once the server's
//!   stream arrives (proof that the server accepted it). The receiver accepts
//!   any number of uni streams (up to 4 at once) and reads each
//!   independently: a stream that breaks the framing (garbage, oversized or
//!   truncated frame) is stopped with an application error code while the
//!   connection and its other streams go on, and the sender opens a fresh
//!   stream for the next frames. Bidirectional streams are not used (limit 0).
//! * **Framing** (`frame` module). Streams start with the preamble `lch\x01`,
//!   then frames `u32be length ‖ payload`. The length is checked against
//!   [`Config::max_frame_len`] before any buffer grows to hold the payload.
//! * **One connection per pair**. Both sides may dial at once. When a second
//!   live connection to the same peer completes, the one *dialled by the
//!   lower key* (bytewise comparison of the ed25519 public keys) wins; the
//!   other is closed with [`close_code::DUPLICATE`]. Both ends compute the same
//!   answer because each knows who dialled each connection. The newer one wins
//!   instead if the peer presents a different *run* on it (each endpoint run
//!   has a certificate with a fresh random serial: the peer restarted, so the
//!   old connection is stale, whatever the key order), if both connections
//!   were dialled by the same side (a redial), or if the current one is
//!   already closing. Keys given to [`Endpoint::set_refused`] (the agent
//!   refuses keys flagged for equivocation) get no connection at all
//!   ([`close_code::REFUSED`]).
//! * **Reconnects**. Each peer added with [`Endpoint::add_peer`] has a dialer
//!   task that keeps one connection up: exponential backoff with equal
//!   jitter, `base = min(backoff_max, backoff_min·2ⁿ)`, pause uniform in
//!   `[base/2, base]` (defaults 200 ms → 30 s). A connection that drops after
//!   living less than 10 s does not reset the attempt counter, so a peer that
//!   accepts-then-closes is not hammered. [`Endpoint::set_redial_cap`]
//!   lowers `backoff_max` for one peer (the agent uses it for its join seed
//!   while waiting to be admitted, so it connects within about a second of
//!   admission instead of up to `backoff_max` later). A peer address may be a
//!   DNS name ([`PeerAddr::Name`]): the dialer resolves it at every attempt
//!   through [`Config::resolver`], so a changed record applies at the next
//!   redial, and a failed lookup is retried with the same backoff. The QUIC stateless-reset
//!   key is derived from the node key, so a restarted peer resets our stale
//!   connection at the first packet instead of leaving us to wait for the idle
//!   timeout.
//! * **Membership**. [`Endpoint::membership_changed`] re-asks the
//!   [`Authorizer`] for every live connection and closes rejected ones
//!   immediately ([`close_code::NOT_MEMBER`]).
//! * **Flow control and backpressure**. Each connection has a bounded send
//!   queue ([`Config::send_queue_frames`]); [`Endpoint::try_send`] returns
//!   [`SendError::Full`] instead of buffering. The event channel is bounded
//!   ([`Config::event_queue`]); when the consumer is slow, stream readers wait,
//!   QUIC flow control then stops the remote sender, and its queue fills.
//!   Memory per peer is bounded by the queue, QUIC windows and
//!   `4 × max_frame_len` of reassembly buffers.
//!
//! # Benchmark
//!
//! `cargo run --release -p lichen-transport --example throughput 2`: frames/s and MB/s for
//! small and large frames, and connection set-up time, on loopback. Figures:
//! `docs/benchmarks.md`.
//!
//! # Tests
//!
//! Unit tests cover the codec (golden bytes, partial input, limits, a
//! pseudo-random round trip mirroring `fuzz/fuzz_targets/frame.rs`), backoff
//! and certificate/key handling. `tests/` runs real endpoints on loopback UDP:
//! handshakes (members, non-member, other cluster), streams (garbage,
//! oversized and truncated frames; stalled peer), connections
//! (simultaneous dial, restart on the same port, network loss through a UDP
//! relay, removal from membership, the redial cap while a peer refuses us),
//! restarts (`tests/restart.rs`: a peer's new run replaces the stale connection
//! of its previous run at once, for both key orders and both dialling sides;
//! a refused key loses its connection and gets no new one) and
//! a crash (`tests/crash.rs`: a peer process killed with SIGKILL, which sends
//! no CONNECTION_CLOSE, is reported down by the idle timeout and redialled
//! when it comes back).

#![warn(missing_docs)]

mod backoff;
mod endpoint;
pub mod frame;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use endpoint::{ConnectionInfo, Endpoint};
pub use tls::alpn_for;

/// The ed25519 public key for a 32-byte secret seed (what peers will see).
pub fn public_key_from_secret(secret_key: &[u8; 32]) -> Result<PeerKey, Error> {
    tls::public_key_from_secret(secret_key)
}

/// A node's identity: its ed25519 public key.
pub type PeerKey = [u8; 32];

/// Answers "is this key a member of our cluster?", from the membership document.
///
/// Called during every handshake (from a rustls callback, so it must be quick
/// and must not block or call back into the [`Endpoint`]) and for every live
/// connection by [`Endpoint::membership_changed`].
pub trait Authorizer: Send + Sync + 'static {
    /// `true` if `key` may connect to us.
    fn is_member(&self, key: &PeerKey) -> bool;
}

/// Application error codes used to close connections and stop streams.
pub mod close_code {
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 0x00;
    /// The connection lost the simultaneous-dial tie-break.
    pub const DUPLICATE: u32 = 0x01;
    /// The peer's key is (no longer) a member.
    pub const NOT_MEMBER: u32 = 0x02;
    /// The agent removed the peer ([`crate::Endpoint::remove_peer`]).
    pub const REMOVED: u32 = 0x03;
    /// The peer presented no usable identity, or our own key.
    pub const PROTOCOL: u32 = 0x04;
    /// The peer's key is refused ([`crate::Endpoint::set_refused`]).
    pub const REFUSED: u32 = 0x05;
    /// Stream error: a frame exceeded the maximum length.
    pub const FRAME_TOO_LARGE: u32 = 0x10;
    /// Stream error: bad preamble or stream ended inside a frame.
    pub const MALFORMED: u32 = 0x11;
}

/// Where a peer may be reached ([`Endpoint::add_peer`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// An IP address and port: dialled as is.
    Ip(SocketAddr),
    /// A `host:port` with a DNS name: resolved by the dialer at every dial attempt (through
    /// [`Config::resolver`]), so a changed DNS record applies at the next redial.
    Name(String),
}

impl PeerAddr {
    /// An IP address and port if `s` is one, else a name to resolve at each dial.
    pub fn parse(s: &str) -> PeerAddr {
        match s.parse::<SocketAddr>() {
            Ok(a) => PeerAddr::Ip(a),
            Err(_) => PeerAddr::Name(s.to_string()),
        }
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr::Ip(a)
    }
}

impl From<&str> for PeerAddr {
    fn from(s: &str) -> PeerAddr {
        PeerAddr::parse(s)
    }
}

impl From<String> for PeerAddr {
    fn from(s: String) -> PeerAddr {
        PeerAddr::parse(&s)
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Ip(a) => a.fmt(f),
            PeerAddr::Name(n) => f.write_str(n),
        }
    }
}

/// The answer of a [`Resolve`] lookup.
pub type Lookup = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves a peer's `host:port` name to addresses, for the dialers. The dialer calls it at
/// each dial attempt (bounded by the handshake timeout); a failure is logged, counted in
/// [`Stats::resolve_failures`] and retried with the dialer's backoff.
pub trait Resolve: Send + Sync + std::fmt::Debug + 'static {
    /// The addresses of `host_port` (`name:port`), in the order to try them.
    fn lookup(&self, host_port: &str) -> Lookup;
}

/// The system resolver, through [`tokio::net::lookup_host`] (getaddrinfo on the blocking
/// pool, never on the runtime's threads).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host_port: &str) -> Lookup {
        let name = host_port.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
    }
}

/// Endpoint settings. Build with [`Config::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on (and dial from).
    pub bind: SocketAddr,
    /// ed25519 secret seed of this node.
    pub secret_key: [u8; 32],
    /// Cluster id, bound into every handshake via ALPN.
    pub cluster_id: [u8; 32],
    /// Largest accepted/sent frame payload, in bytes. Default 16 MiB.
    pub max_frame_len: usize,
    /// Frames that may wait per peer before `try_send` says `Full`. Default 1024.
    pub send_queue_frames: usize,
    /// Capacity of the [`Event`] channel. Default 1024.
    pub event_queue: usize,
    /// QUIC keep-alive interval. Default 5 s.
    pub keep_alive: Duration,
    /// QUIC idle timeout. Handshakes time out after `min(idle_timeout, 10 s)`.
    /// Default 30 s.
    pub idle_timeout: Duration,
    /// First reconnect pause (before jitter). Default 200 ms.
    pub backoff_min: Duration,
    /// Largest reconnect pause (before jitter). Default 30 s.
    pub backoff_max: Duration,
    /// Seed for the backoff jitter RNG; `None` seeds from the OS.
    pub rng_seed: Option<u64>,
    /// Ask each peer to acknowledge only every this many ack-eliciting packets (QUIC ACK
    /// frequency extension; QUIC's default is every second packet). A node that pushes one
    /// small packet per write otherwise wakes up for an ACK after every other write. Peers
    /// still acknowledge within their `max_ack_delay` and at once when packets arrive out
    /// of order, so loss detection is not slowed. `0` leaves QUIC's default. Default 10.
    pub ack_eliciting_threshold: u32,
    /// Resolves peers' DNS names at each dial attempt. Default [`SystemResolver`].
    pub resolver: Arc<dyn Resolve>,
}

impl Config {
    /// Settings with the documented defaults.
    pub fn new(bind: SocketAddr, secret_key: [u8; 32], cluster_id: [u8; 32]) -> Self {
        Self {
            bind,
            secret_key,
            cluster_id,
            max_frame_len: 16 << 20,
            send_queue_frames: 1024,
            event_queue: 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            rng_seed: None,
            ack_eliciting_threshold: 10,
            resolver: Arc::new(SystemResolver),
        }
    }
}

/// What the endpoint reports to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection to `peer` is up (handshake and membership check passed).
    ///
    /// May be repeated without an intervening `Disconnected` when a duplicate
    /// connection replaces the current one; treat every `Connected` as "start
    /// a fresh session with this peer" (frames queued on the replaced
    /// connection may have been lost, and frames it had already delivered to
    /// the reader may still arrive just after this event).
    Connected {
        /// The peer's key.
        peer: PeerKey,
        /// Its address as seen by us.
        addr: SocketAddr,
    },
    /// The last connection to `peer` closed. All `Frame`s it carried were
    /// delivered before this event.
    Disconnected {
        /// The peer's key.
        peer: PeerKey,
        /// Human-readable cause.
        reason: String,
    },
    /// A frame from `peer`.
    Frame {
        /// The peer's key.
        peer: PeerKey,
        /// The frame payload.
        frame: bytes::Bytes,
    },
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No live connection to that peer.
    #[error("not connected to that peer")]
    NotConnected,
    /// The peer's send queue is full (it is slow or stalled); try later.
    #[error("send queue to that peer is full")]
    Full,
    /// The frame exceeds [`Config::max_frame_len`].
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
}

/// Errors from [`Endpoint::bind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Binding the UDP socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters since [`Endpoint::bind`]. Cheap snapshot of atomics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames written to QUIC streams.
    pub frames_sent: u64,
    /// Payload bytes of those frames.
    pub bytes_sent: u64,
    /// Frames received and delivered as [`Event::Frame`].
    pub frames_received: u64,
    /// Payload bytes of those frames.
    pub bytes_received: u64,
    /// Streams rejected because a frame exceeded the maximum length.
    pub rejected_too_large: u64,
    /// Streams rejected for a bad preamble or a truncated frame.
    pub rejected_malformed: u64,
    /// Frames lost because the peer stopped our stream or the connection died
    /// while they were being written.
    pub frames_dropped: u64,
    /// `try_send` calls answered with [`SendError::Full`].
    pub send_full: u64,
    /// Outgoing connection attempts started by dialers.
    pub dials_started: u64,
    /// Handshakes (incoming or outgoing) that failed or timed out.
    pub handshakes_failed: u64,
    /// Connections established (incl. ones that replaced a duplicate).
    pub connects: u64,
    /// [`Event::Disconnected`] events emitted.
    pub disconnects: u64,
    /// Connections closed by the simultaneous-dial tie-break.
    pub duplicates_closed: u64,
    /// Dial attempts where a peer's DNS name could not be resolved (failed or timed out).
    pub resolve_failures: u64,
}
