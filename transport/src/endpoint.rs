//! The endpoint: one UDP socket, one QUIC endpoint, and the tasks that keep
//! exactly one authenticated connection per member and move frames over it.
//!
//! # Tasks and data flow
//!
//! ```text
//!   agent ──try_send/send──► per-connection bounded queue ──► send_loop ──► uni stream ──► network
//!   network ──► accept_loop ──► handshake (tls verifiers) ──► establish ──► serve
//!   dial_loop (one per add_peer'd key) ──► connect ──► establish ──► serve
//!   serve ──accept_uni──► read_stream (one per incoming uni stream) ──► bounded Event channel ──► agent
//! ```
//!
//! * `establish` runs once per completed handshake. Under a per-peer async
//!   lock it re-checks membership and the refused keys, applies the duplicate
//!   tie-break, records the connection in the registry (`State::conns`) and
//!   emits `Connected`.
//! * `serve` owns the connection afterwards: it starts `send_loop`, accepts
//!   incoming uni streams (each read by its own `read_stream` task), and when
//!   the connection dies removes it from the registry, waits for its readers
//!   to hand over the frames they already read, then emits `Disconnected`.
//!   Holding the per-peer lock across that keeps the per-peer event order
//!   sane: a newer connection's `Connected` comes after the older one's
//!   `Disconnected`.
//!
//! # One connection per peer: the tie-break
//!
//! When a connection to a peer completes while another one to that peer is
//! registered, one of them is closed with [`close_code::DUPLICATE`]. The new
//! one wins when
//!
//! 1. the registered one is already closing; or
//! 2. the peer presents a different **run** than on the registered one
//!    (`tls::RunId`: each endpoint run presents a certificate with a fresh
//!    random serial). The peer restarted — after a crash or `kill -9` nothing
//!    closed the old connection, and without this rule it would linger until
//!    the idle timeout while the restarted peer's dials were refused as
//!    duplicates. A run never comes back, so the newer connection is the live
//!    one; the decision needs no timeout and does not depend on key order; or
//! 3. both were dialled by the same side (that side redialled: it considers
//!    the old one dead); or
//! 4. both are from the same runs and were dialled by opposite sides (a
//!    simultaneous dial): the one dialled by the lower key wins, which both
//!    ends compute alike because each knows who dialled each connection.
//!
//! Two processes running one key (a cloned data directory) are two runs, so
//! their connections replace each other at a peer; the agent stops that by
//! refusing the key once its equivocation is known ([`Endpoint::set_refused`],
//! [`close_code::REFUSED`]).
//!
//! # Why streams are used this way
//!
//! Every frame for a peer goes through one queue and, in order, onto one
//! long-lived uni stream per connection and direction. The agent's sync
//! protocol wants in-order delivery per peer, and a stream per frame would
//! cost a stream open (and a flow-control round) per message. The receiver
//! still treats each uni stream as independent: a stream that violates the
//! framing is stopped with [`close_code::FRAME_TOO_LARGE`] or
//! [`close_code::MALFORMED`] (logged with the peer id and counted) without
//! touching the connection or other streams, and the sender opens a new
//! stream for the following frames if its stream gets stopped. The number of
//! concurrent incoming uni streams is capped (4) to bound reassembly memory.
//!
//! # Backpressure
//!
//! Readers `await` on the bounded event channel, so a slow consumer stops
//! reads; QUIC flow control then stops the remote writer, whose bounded queue
//! fills and makes its `try_send` return `Full`. Nothing is dropped silently
//! and nothing grows without bound; other peers have their own queues, tasks
//! and streams and are unaffected.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use quinn::VarInt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::frame::{self, FrameError, HEADER_LEN, STREAM_PREAMBLE};
use crate::tls::{self, Hex};
use crate::{
    backoff, close_code, Authorizer, Config, Error, Event, PeerAddr, PeerKey, SendError, Stats,
};

/// Concurrent incoming uni streams a peer may have open on one connection.
const MAX_UNI_STREAMS: u32 = 4;
/// Handshakes in progress at once on the accepting side; more are refused.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Largest chunk taken from a stream per read.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes the sender gathers from its queue into one write.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Frames up to this size are coalesced into one buffer by the sender.
const SMALL_FRAME: usize = 1024;
/// Upper bound on a handshake (dial or accept), whatever the idle timeout.
const MAX_HANDSHAKE_TIME: Duration = Duration::from_secs(10);
/// A connection that lived at least this long resets the dial backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn code(c: u32) -> VarInt {
    VarInt::from_u32(c)
}

async fn until_shutdown(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, i.e. the endpoint is being torn down.
    let _ = rx.wait_for(|closing| *closing).await;
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    rejected_too_large: AtomicU64,
    rejected_malformed: AtomicU64,
    frames_dropped: AtomicU64,
    send_full: AtomicU64,
    dials_started: AtomicU64,
    handshakes_failed: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    duplicates_closed: AtomicU64,
    resolve_failures: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            frames_sent: g(&self.frames_sent),
            bytes_sent: g(&self.bytes_sent),
            frames_received: g(&self.frames_received),
            bytes_received: g(&self.bytes_received),
            rejected_too_large: g(&self.rejected_too_large),
            rejected_malformed: g(&self.rejected_malformed),
            frames_dropped: g(&self.frames_dropped),
            send_full: g(&self.send_full),
            dials_started: g(&self.dials_started),
            handshakes_failed: g(&self.handshakes_failed),
            connects: g(&self.connects),
            disconnects: g(&self.disconnects),
            duplicates_closed: g(&self.duplicates_closed),
            resolve_failures: g(&self.resolve_failures),
        }
    }
}

/// A live connection, as reported by [`Endpoint::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's key.
    pub peer: PeerKey,
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// `true` if this node dialled the connection.
    pub dialed_by_us: bool,
    /// Current round-trip estimate.
    pub rtt: Duration,
    /// UDP datagrams received from the peer on this connection.
    pub datagrams_received: u64,
    /// ACK frames sent to the peer on this connection.
    pub acks_sent: u64,
}

/// What the registry and the connection's `serve` task share.
struct ConnShared {
    id: usize,
    /// Set when a duplicate replaced this connection: no `Disconnected` then.
    replaced: AtomicBool,
    /// Set by whoever closed the connection locally, for `Disconnected`.
    reason: Mutex<Option<String>>,
}

struct ConnEntry {
    conn: quinn::Connection,
    tx: mpsc::Sender<Bytes>,
    /// Key of the node that dialled this connection (tie-break input).
    dialer: PeerKey,
    /// The run of the peer on this connection (tie-break input).
    peer_run: tls::RunId,
    dialed_by_us: bool,
    shared: Arc<ConnShared>,
}

impl ConnEntry {
    fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn close(&self, c: u32, reason: &str) {
        *lock(&self.shared.reason) = Some(reason.to_string());
        self.conn.close(code(c), reason.as_bytes());
    }
}

/// State of the task that keeps a connection to one `add_peer`'d key.
struct Dialer {
    peer: PeerKey,
    /// Resolved at each dial attempt (names through [`Config::resolver`]).
    addrs: Mutex<Vec<PeerAddr>>,
    /// Wakes the dial loop: disconnect, new addresses, membership change, removal.
    notify: Notify,
    cancelled: AtomicBool,
}

#[derive(Default)]
struct State {
    conns: HashMap<PeerKey, ConnEntry>,
    dialers: HashMap<PeerKey, Arc<Dialer>>,
    /// Serialises establish/teardown per peer (see module doc).
    peer_locks: HashMap<PeerKey, Arc<tokio::sync::Mutex<()>>>,
    /// Per-peer caps on the redial pause, below [`Config::backoff_max`]
    /// ([`Endpoint::set_redial_cap`]).
    redial_caps: HashMap<PeerKey, Duration>,
    /// Keys whose connections are refused ([`Endpoint::set_refused`]).
    refused: HashSet<PeerKey>,
}

struct Inner {
    quinn: quinn::Endpoint,
    identity: tls::Identity,
    transport: Arc<quinn::TransportConfig>,
    config: Config,
    auth: Arc<dyn Authorizer>,
    local_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    events: mpsc::Sender<Event>,
    stats: Counters,
    shutdown: watch::Sender<bool>,
    rng: Mutex<StdRng>,
    handshakes: Arc<Semaphore>,
}

/// Dropping the last [`Endpoint`] handle shuts the endpoint down (tasks hold
/// `Arc<Inner>`, not this guard).
struct Guard {
    inner: Arc<Inner>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.shutdown_now();
    }
}

/// Handle to a running transport endpoint. Cheap to clone; the endpoint shuts
/// down when [`Endpoint::close`] is called or the last clone is dropped.
///
/// Methods that start tasks (`add_peer`) use the Tokio runtime `bind` ran on.
#[derive(Clone)]
pub struct Endpoint {
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field(
                "public_key",
                &Hex(&self.inner().identity.public_key()).to_string(),
            )
            .field("local_addr", &self.inner().local_addr)
            .finish_non_exhaustive()
    }
}

/// A connection that passed `establish`, handed to `serve`.
struct Established {
    peer: PeerKey,
    conn: quinn::Connection,
    shared: Arc<ConnShared>,
    rx: mpsc::Receiver<Bytes>,
    peer_lock: Arc<tokio::sync::Mutex<()>>,
    /// For dialled connections: the stream the server opened first.
    first: Option<quinn::RecvStream>,
}

/// Stateless-reset key derived from the node key, so that a restarted node
/// can reset connections its previous incarnation had.
fn reset_key(secret: &[u8; 32]) -> ring::hmac::Key {
    let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let derived = ring::hmac::sign(&master, b"lichen/1 quic stateless reset key");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
}

impl Endpoint {
    /// Binds the UDP socket, starts accepting connections and returns the
    /// handle plus the bounded event channel (capacity [`Config::event_queue`]).
    ///
    /// The agent must keep reading events: when the channel is full, reading
    /// from peers pauses (backpressure) until it is drained.
    pub async fn bind(
        config: Config,
        auth: Arc<dyn Authorizer>,
    ) -> Result<(Endpoint, mpsc::Receiver<Event>), Error> {
        if config.send_queue_frames == 0 || config.event_queue == 0 {
            return Err(Error::Config("queue sizes must be at least 1".into()));
        }
        if config.max_frame_len == 0 || u32::try_from(config.max_frame_len).is_err() {
            return Err(Error::Config(
                "max_frame_len must be in 1..=u32::MAX".into(),
            ));
        }
        let identity = tls::Identity::new(&config.secret_key, &config.cluster_id, auth.clone())?;

        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(config.keep_alive));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|_| Error::Config("idle_timeout too large".into()))?,
        ));
        transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
        transport.max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
        if config.ack_eliciting_threshold > 0 {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(config.ack_eliciting_threshold));
            transport.ack_frequency_config(Some(ack));
        }
        let transport = Arc::new(transport);

        let mut server = quinn::ServerConfig::with_crypto(Arc::new(identity.server_config()?));
        server.transport_config(transport.clone());
        let endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key(&config.secret_key)));
        let socket = std::net::UdpSocket::bind(config.bind)?;
        let quinn = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = quinn.local_addr()?;

        let rng = match config.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let (events, rx) = mpsc::channel(config.event_queue);
        let inner = Arc::new(Inner {
            quinn,
            identity,
            transport,
            config,
            auth,
            local_addr,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State::default()),
            events,
            stats: Counters::default(),
            shutdown: watch::Sender::new(false),
            rng: Mutex::new(rng),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
        });
        info!(key = %Hex(&inner.identity.public_key()), addr = %local_addr, "transport endpoint bound");
        inner.runtime.spawn(accept_loop(inner.clone()));
        Ok((
            Endpoint {
                guard: Arc::new(Guard { inner }),
            },
            rx,
        ))
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.guard.inner
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner().local_addr
    }

    /// This node's ed25519 public key.
    pub fn public_key(&self) -> PeerKey {
        self.inner().identity.public_key()
    }

    /// Keeps a connection to `key`, dialling `addrs` in order with backoff
    /// whenever there is none. Idempotent: calling it again only replaces the
    /// addresses (and retries at once). Peers not added here may still
    /// connect to us if the [`Authorizer`] accepts them.
    ///
    /// An address is a [`SocketAddr`] or a `host:port` ([`PeerAddr`]); names
    /// are resolved at every dial attempt, not here.
    pub fn add_peer<A: Into<PeerAddr>>(&self, key: PeerKey, addrs: impl IntoIterator<Item = A>) {
        let addrs: Vec<PeerAddr> = addrs.into_iter().map(Into::into).collect();
        let inner = self.inner();
        if key == inner.identity.public_key() {
            warn!("add_peer called with our own key; ignored");
            return;
        }
        let mut st = lock(&inner.state);
        if *inner.shutdown.borrow() {
            return;
        }
        if let Some(d) = st.dialers.get(&key) {
            *lock(&d.addrs) = addrs;
            d.notify.notify_one();
            return;
        }
        let d = Arc::new(Dialer {
            peer: key,
            addrs: Mutex::new(addrs),
            notify: Notify::new(),
            cancelled: AtomicBool::new(false),
        });
        st.dialers.insert(key, d.clone());
        inner.runtime.spawn(dial_loop(inner.clone(), d));
    }

    /// Stops dialling `key` and closes any connection to it
    /// ([`close_code::REMOVED`]). It may still connect to us while the
    /// [`Authorizer`] accepts it; use [`Endpoint::membership_changed`] for
    /// peers that left the cluster.
    pub fn remove_peer(&self, key: PeerKey) {
        let mut st = lock(&self.inner().state);
        if let Some(d) = st.dialers.remove(&key) {
            d.cancelled.store(true, Ordering::SeqCst);
            d.notify.notify_one();
        }
        if let Some(e) = st.conns.remove(&key) {
            e.close(close_code::REMOVED, "peer removed");
        }
    }

    /// Caps the pause between redials of `key` at `cap` (before jitter: the
    /// pause is drawn from `[cap/2, cap]` once the exponential backoff reaches
    /// it), or restores [`Config::backoff_max`] with `None`. A cap above
    /// `backoff_max` has no effect. Lowering the cap cuts a pause in progress
    /// short (the dialer retries at once); setting the same cap again does
    /// nothing. May be called before or after [`Endpoint::add_peer`].
    ///
    /// For peers we must reach soon after they start accepting us, e.g. the
    /// seed of a node that is waiting to be admitted to the cluster.
    pub fn set_redial_cap(&self, key: PeerKey, cap: Option<Duration>) {
        let inner = self.inner();
        let mut st = lock(&inner.state);
        let old = st.redial_caps.get(&key).copied();
        if old == cap {
            return;
        }
        match cap {
            Some(c) => st.redial_caps.insert(key, c),
            None => st.redial_caps.remove(&key),
        };
        let lowered = match (old, cap) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(o), Some(c)) => c < o,
        };
        if lowered {
            if let Some(d) = st.dialers.get(&key) {
                d.notify.notify_one();
            }
        }
    }

    /// Re-asks the [`Authorizer`] about every live connection and closes, at
    /// once, those it now rejects ([`close_code::NOT_MEMBER`]); dialers of
    /// rejected keys pause until membership changes again.
    pub fn membership_changed(&self) {
        let inner = self.inner();
        let mut st = lock(&inner.state);
        let rejected: Vec<PeerKey> = st
            .conns
            .keys()
            .filter(|k| !inner.auth.is_member(k))
            .copied()
            .collect();
        for key in rejected {
            if let Some(e) = st.conns.remove(&key) {
                info!(peer = %Hex(&key), "closing connection: no longer a member");
                e.close(close_code::NOT_MEMBER, "peer is no longer a member");
            }
        }
        for d in st.dialers.values() {
            d.notify.notify_one();
        }
    }

    /// Refuses every connection from or to the keys in `keys` (replacing the
    /// previous set): live ones are closed at once ([`close_code::REFUSED`]),
    /// new ones are closed right after their handshake, and dialers of these
    /// keys pause until the set changes. For keys that a membership check
    /// cannot exclude because they are (still) members, e.g. a key that two
    /// machines run at once (see the module doc).
    pub fn set_refused(&self, keys: impl IntoIterator<Item = PeerKey>) {
        let inner = self.inner();
        let mut st = lock(&inner.state);
        let keys: HashSet<PeerKey> = keys.into_iter().collect();
        if keys == st.refused {
            return;
        }
        for k in &keys {
            if let Some(e) = st.conns.remove(k) {
                info!(peer = %Hex(k), "closing connection: key refused");
                e.close(close_code::REFUSED, "key refused");
            }
        }
        st.refused = keys;
        for d in st.dialers.values() {
            d.notify.notify_one();
        }
    }

    /// Queues `frame` for `peer` without waiting.
    ///
    /// Errors: [`SendError::TooLarge`] above [`Config::max_frame_len`],
    /// [`SendError::NotConnected`] without a live connection,
    /// [`SendError::Full`] when [`Config::send_queue_frames`] frames are
    /// already waiting (the peer is slow or stalled).
    pub fn try_send(&self, peer: &PeerKey, frame: Bytes) -> Result<(), SendError> {
        let inner = self.inner();
        let max = inner.config.max_frame_len;
        if frame.len() > max {
            return Err(SendError::TooLarge {
                len: frame.len(),
                max,
            });
        }
        let st = lock(&inner.state);
        let entry = st.conns.get(peer).ok_or(SendError::NotConnected)?;
        match entry.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                add(&inner.stats.send_full, 1);
                Err(SendError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::NotConnected),
        }
    }

    /// Queues `frame` for `peer`, waiting while its queue is full. Fails with
    /// [`SendError::NotConnected`] if the connection goes away meanwhile.
    pub async fn send(&self, peer: &PeerKey, frame: Bytes) -> Result<(), SendError> {
        let inner = self.inner();
        let max = inner.config.max_frame_len;
        if frame.len() > max {
            return Err(SendError::TooLarge {
                len: frame.len(),
                max,
            });
        }
        let tx = {
            let st = lock(&inner.state);
            st.conns
                .get(peer)
                .ok_or(SendError::NotConnected)?
                .tx
                .clone()
        };
        tx.send(frame).await.map_err(|_| SendError::NotConnected)
    }

    /// Keys of peers with a live connection.
    pub fn connected_peers(&self) -> Vec<PeerKey> {
        let st = lock(&self.inner().state);
        st.conns
            .iter()
            .filter(|(_, e)| e.alive())
            .map(|(k, _)| *k)
            .collect()
    }

    /// Details of every live connection.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let st = lock(&self.inner().state);
        st.conns
            .iter()
            .filter(|(_, e)| e.alive())
            .map(|(k, e)| {
                let stats = e.conn.stats();
                ConnectionInfo {
                    peer: *k,
                    remote_addr: e.conn.remote_address(),
                    dialed_by_us: e.dialed_by_us,
                    rtt: stats.path.rtt,
                    datagrams_received: stats.udp_rx.datagrams,
                    acks_sent: stats.frame_tx.acks,
                }
            })
            .collect()
    }

    /// Counters since `bind`.
    pub fn stats(&self) -> Stats {
        self.inner().stats.snapshot()
    }

    /// Closes every connection ([`close_code::SHUTDOWN`]), stops all tasks and
    /// waits (at most one second) for the peers to be told.
    pub async fn close(&self) {
        let inner = self.inner();
        inner.shutdown_now();
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.quinn.wait_idle()).await;
    }

    /// Test hook (feature `test-hooks`): opens a raw uni stream on the live connection to
    /// `peer`, so tests can write arbitrary bytes past the framing. Not part of the supported API.
    #[cfg(feature = "test-hooks")]
    pub async fn raw_uni_stream_for_tests(&self, peer: &PeerKey) -> Option<quinn::SendStream> {
        let conn = {
            let st = lock(&self.inner().state);
            st.conns.get(peer)?.conn.clone()
        };
        conn.open_uni().await.ok()
    }
}

impl Inner {
    fn shutdown_now(&self) {
        if self.shutdown.send_replace(true) {
            return;
        }
        {
            let mut st = lock(&self.state);
            for (_, d) in st.dialers.drain() {
                d.cancelled.store(true, Ordering::SeqCst);
                d.notify.notify_one();
            }
        }
        self.quinn.close(code(close_code::SHUTDOWN), b"shutdown");
        info!(key = %Hex(&self.identity.public_key()), "transport endpoint closed");
    }

    fn closing(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sends an event, waiting for room; `false` if the consumer is gone or
    /// the endpoint is shutting down.
    async fn emit(&self, event: Event) -> bool {
        let mut sd = self.shutdown.subscribe();
        if *sd.borrow_and_update() {
            return false;
        }
        tokio::select! {
            r = self.events.send(event) => r.is_ok(),
            _ = until_shutdown(&mut sd) => false,
        }
    }

    fn peer_lock(&self, peer: PeerKey) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.state)
            .peer_locks
            .entry(peer)
            .or_default()
            .clone()
    }

    fn is_refused(&self, peer: &PeerKey) -> bool {
        lock(&self.state).refused.contains(peer)
    }

    fn is_connected(&self, peer: &PeerKey) -> bool {
        lock(&self.state)
            .conns
            .get(peer)
            .is_some_and(ConnEntry::alive)
    }

    fn handshake_timeout(&self) -> Duration {
        self.config.idle_timeout.min(MAX_HANDSHAKE_TIME)
    }

    fn backoff(&self, peer: &PeerKey, attempt: u32) -> Duration {
        let max = match lock(&self.state).redial_caps.get(peer) {
            Some(cap) => self.config.backoff_max.min(*cap),
            None => self.config.backoff_max,
        };
        let mut rng = lock(&self.rng);
        backoff::delay(attempt, self.config.backoff_min, max, &mut *rng)
    }

    fn reject_stream(&self, peer: &PeerKey, recv: &mut quinn::RecvStream, e: FrameError) {
        let c = match e {
            FrameError::TooLarge { .. } => {
                add(&self.stats.rejected_too_large, 1);
                close_code::FRAME_TOO_LARGE
            }
            FrameError::BadPreamble | FrameError::Truncated { .. } => {
                add(&self.stats.rejected_malformed, 1);
                close_code::MALFORMED
            }
        };
        warn!(peer = %Hex(peer), error = %e, code = c, "rejecting stream from peer");
        // Fails only if the stream is already finished/reset: nothing to stop.
        let _ = recv.stop(code(c));
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    let mut sd = inner.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            i = inner.quinn.accept() => i,
            _ = until_shutdown(&mut sd) => None,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "too many handshakes in progress; refusing");
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        inner.runtime.clone().spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    add(&inner.stats.handshakes_failed, 1);
                    debug!(%remote, error = %e, "incoming connection failed");
                    return;
                }
            };
            let result = tokio::time::timeout(inner.handshake_timeout(), connecting).await;
            drop(permit);
            match result {
                Ok(Ok(conn)) => {
                    if let Some(est) = establish(&inner, conn, None).await {
                        serve(inner, est).await;
                    }
                }
                Ok(Err(e)) => {
                    add(&inner.stats.handshakes_failed, 1);
                    info!(%remote, error = %e, "incoming handshake failed");
                }
                Err(_) => {
                    add(&inner.stats.handshakes_failed, 1);
                    info!(%remote, "incoming handshake timed out");
                }
            }
        });
    }
    debug!("accept loop stopped");
}

/// Keeps one connection to `d.peer` while the dialer is not cancelled.
async fn dial_loop(inner: Arc<Inner>, d: Arc<Dialer>) {
    let peer = d.peer;
    let client = match inner.identity.client_config(peer) {
        Ok(c) => {
            let mut c = quinn::ClientConfig::new(Arc::new(c));
            c.transport_config(inner.transport.clone());
            c
        }
        Err(e) => {
            warn!(peer = %Hex(&peer), error = %e, "cannot build client config; not dialling");
            return;
        }
    };
    let mut sd = inner.shutdown.subscribe();
    let mut attempt: u32 = 0;
    loop {
        if d.cancelled.load(Ordering::SeqCst) || inner.closing() {
            return;
        }
        if inner.is_connected(&peer) || !inner.auth.is_member(&peer) || inner.is_refused(&peer) {
            tokio::select! {
                _ = d.notify.notified() => {}
                _ = until_shutdown(&mut sd) => return,
            }
            continue;
        }
        let targets = lock(&d.addrs).clone();
        let addrs = tokio::select! {
            a = resolve(&inner, peer, &targets) => a,
            _ = until_shutdown(&mut sd) => return,
        };
        let mut connected_at = None;
        for addr in addrs {
            if d.cancelled.load(Ordering::SeqCst) {
                return;
            }
            let Some((conn, first)) = dial(&inner, &client, peer, addr, &mut sd).await else {
                continue;
            };
            if let Some(est) = establish(&inner, conn, Some((&d, first))).await {
                connected_at = Some(Instant::now());
                inner.runtime.spawn(serve(inner.clone(), est));
            }
            // Either we are connected now, or a duplicate won / we were
            // removed: in both cases stop trying addresses.
            break;
        }
        if let Some(t) = connected_at {
            while inner.is_connected(&peer) && !d.cancelled.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = d.notify.notified() => {}
                    _ = until_shutdown(&mut sd) => return,
                }
            }
            if t.elapsed() >= STABLE_AFTER {
                attempt = 0;
            }
        }
        if inner.is_connected(&peer) {
            continue;
        }
        let delay = inner.backoff(&peer, attempt);
        attempt = attempt.saturating_add(1);
        debug!(peer = %Hex(&peer), ?delay, attempt, "waiting before redial");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = d.notify.notified() => {}
            _ = until_shutdown(&mut sd) => return,
        }
    }
}

/// The socket addresses of `targets`, in order: names resolved now (each attempt), so that
/// a changed DNS record is used at the next redial. A name that does not resolve is logged
/// and counted; the other addresses are still tried, and if none is left the dial loop
/// backs off and tries again.
async fn resolve(inner: &Inner, peer: PeerKey, targets: &[PeerAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for t in targets {
        let name = match t {
            PeerAddr::Ip(a) => {
                if !out.contains(a) {
                    out.push(*a);
                }
                continue;
            }
            PeerAddr::Name(n) => n,
        };
        let lookup = inner.config.resolver.lookup(name);
        match tokio::time::timeout(inner.handshake_timeout(), lookup).await {
            Ok(Ok(list)) if !list.is_empty() => {
                debug!(peer = %Hex(&peer), %name, addrs = ?list, "resolved peer address");
                for a in list {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
            Ok(Ok(_)) => {
                add(&inner.stats.resolve_failures, 1);
                warn!(peer = %Hex(&peer), %name, "peer address resolves to nothing; retrying with backoff");
            }
            Ok(Err(e)) => {
                add(&inner.stats.resolve_failures, 1);
                warn!(peer = %Hex(&peer), %name, error = %e, "cannot resolve peer address; retrying with backoff");
            }
            Err(_) => {
                add(&inner.stats.resolve_failures, 1);
                warn!(peer = %Hex(&peer), %name, "resolving peer address timed out; retrying with backoff");
            }
        }
    }
    out
}

async fn dial(
    inner: &Inner,
    client: &quinn::ClientConfig,
    peer: PeerKey,
    addr: SocketAddr,
    sd: &mut watch::Receiver<bool>,
) -> Option<(quinn::Connection, quinn::RecvStream)> {
    add(&inner.stats.dials_started, 1);
    let connecting = match inner
        .quinn
        .connect_with(client.clone(), addr, tls::SERVER_NAME)
    {
        Ok(c) => c,
        Err(e) => {
            debug!(peer = %Hex(&peer), %addr, error = %e, "cannot start dial");
            return None;
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(inner.handshake_timeout(), connecting) => r,
        _ = until_shutdown(sd) => return None,
    };
    let conn = match result {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            add(&inner.stats.handshakes_failed, 1);
            info!(peer = %Hex(&peer), %addr, error = %e, "dial failed");
            return None;
        }
        Err(_) => {
            add(&inner.stats.handshakes_failed, 1);
            debug!(peer = %Hex(&peer), %addr, "dial timed out");
            return None;
        }
    };
    // In TLS 1.3 the client finishes its handshake before the server has
    // checked the client's certificate. The server opens its stream as soon
    // as it has accepted us, so that stream is our proof of acceptance.
    let result = tokio::select! {
        r = tokio::time::timeout(inner.handshake_timeout(), conn.accept_uni()) => r,
        _ = until_shutdown(sd) => return None,
    };
    match result {
        Ok(Ok(first)) => Some((conn, first)),
        Ok(Err(quinn::ConnectionError::ApplicationClosed(c)))
            if c.error_code == code(close_code::DUPLICATE) =>
        {
            debug!(peer = %Hex(&peer), %addr, "peer kept another connection");
            None
        }
        Ok(Err(quinn::ConnectionError::ApplicationClosed(c)))
            if c.error_code == code(close_code::REFUSED) =>
        {
            add(&inner.stats.handshakes_failed, 1);
            warn!(peer = %Hex(&peer), %addr, "peer refuses this node's key (flagged?)");
            None
        }
        Ok(Err(e)) => {
            add(&inner.stats.handshakes_failed, 1);
            info!(peer = %Hex(&peer), %addr, error = %e, "peer refused the connection");
            None
        }
        Err(_) => {
            add(&inner.stats.handshakes_failed, 1);
            conn.close(code(close_code::PROTOCOL), b"no stream from server");
            debug!(peer = %Hex(&peer), %addr, "peer never confirmed the connection");
            None
        }
    }
}

/// Registers a freshly handshaken connection (see module doc). `dialed` is
/// `Some` for connections we dialled, with the server's first stream.
async fn establish(
    inner: &Arc<Inner>,
    conn: quinn::Connection,
    dialed: Option<(&Dialer, quinn::RecvStream)>,
) -> Option<Established> {
    let (dialer, first) = match dialed {
        Some((d, first)) => (Some(d), Some(first)),
        None => (None, None),
    };
    let local = inner.identity.public_key();
    let Some((peer, peer_run)) = tls::peer_of(&conn) else {
        conn.close(code(close_code::PROTOCOL), b"no peer identity");
        return None;
    };
    if peer == local {
        conn.close(code(close_code::PROTOCOL), b"connected to self");
        return None;
    }
    let peer_lock = inner.peer_lock(peer);
    let guard = peer_lock.lock().await;
    let dialed_by_us = dialer.is_some();
    let dialer_key = if dialed_by_us { local } else { peer };
    let (tx, rx) = mpsc::channel(inner.config.send_queue_frames);
    let shared = Arc::new(ConnShared {
        id: conn.stable_id(),
        replaced: AtomicBool::new(false),
        reason: Mutex::new(None),
    });
    {
        let mut st = lock(&inner.state);
        if inner.closing() {
            conn.close(code(close_code::SHUTDOWN), b"shutdown");
            return None;
        }
        if dialer.is_some_and(|d| d.cancelled.load(Ordering::SeqCst)) {
            conn.close(code(close_code::REMOVED), b"peer removed");
            return None;
        }
        // Checked under the state lock so that it cannot interleave with
        // `membership_changed`.
        if !inner.auth.is_member(&peer) {
            conn.close(code(close_code::NOT_MEMBER), b"not a member");
            return None;
        }
        if st.refused.contains(&peer) {
            debug!(peer = %Hex(&peer), dialed_by_us, "connection from a refused key closed");
            conn.close(code(close_code::REFUSED), b"key refused");
            return None;
        }
        if let Some(existing) = st.conns.get(&peer) {
            // See "One connection per peer" in the module doc.
            let lower = local.min(peer);
            let restarted = existing.peer_run != peer_run;
            let new_wins = !existing.alive()
                || restarted
                || existing.dialer == dialer_key
                || dialer_key == lower;
            if restarted {
                info!(peer = %Hex(&peer), dialed_by_us, "peer restarted: its new connection replaces the old one");
            }
            add(&inner.stats.duplicates_closed, 1);
            if !new_wins {
                debug!(peer = %Hex(&peer), dialed_by_us, "duplicate connection lost the tie-break");
                conn.close(code(close_code::DUPLICATE), b"duplicate connection");
                return None;
            }
            debug!(peer = %Hex(&peer), dialed_by_us, "duplicate connection replaces the current one");
            existing.shared.replaced.store(true, Ordering::SeqCst);
            existing.close(close_code::DUPLICATE, "duplicate connection");
        }
        st.conns.insert(
            peer,
            ConnEntry {
                conn: conn.clone(),
                tx,
                dialer: dialer_key,
                peer_run,
                dialed_by_us,
                shared: shared.clone(),
            },
        );
    }
    add(&inner.stats.connects, 1);
    let addr = conn.remote_address();
    info!(peer = %Hex(&peer), %addr, dialed_by_us, "connected");
    inner.emit(Event::Connected { peer, addr }).await;
    drop(guard);
    Some(Established {
        peer,
        conn,
        shared,
        rx,
        peer_lock,
        first,
    })
}

/// Runs a registered connection until it closes, then reports it.
async fn serve(inner: Arc<Inner>, est: Established) {
    let Established {
        peer,
        conn,
        shared,
        rx,
        peer_lock,
        first,
    } = est;
    let mut sd = inner.shutdown.subscribe();
    let sender = inner
        .runtime
        .spawn(send_loop(inner.clone(), conn.clone(), peer, rx));
    let mut readers = JoinSet::new();
    if let Some(recv) = first {
        readers.spawn_on(read_stream(inner.clone(), peer, recv), &inner.runtime);
    }
    let error = loop {
        tokio::select! {
            r = conn.accept_uni() => match r {
                Ok(recv) => {
                    readers.spawn_on(read_stream(inner.clone(), peer, recv), &inner.runtime);
                }
                Err(e) => break e.to_string(),
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
            _ = until_shutdown(&mut sd) => {
                conn.close(code(close_code::SHUTDOWN), b"shutdown");
                break "endpoint closed".to_string();
            }
        }
    };
    sender.abort();
    let guard = peer_lock.lock().await;
    {
        let mut st = lock(&inner.state);
        if st
            .conns
            .get(&peer)
            .is_some_and(|e| e.shared.id == shared.id)
        {
            st.conns.remove(&peer);
        }
    }
    // Let readers hand over the frames they already decoded, so that every
    // Frame of this connection precedes its Disconnected.
    while readers.join_next().await.is_some() {}
    if !shared.replaced.load(Ordering::SeqCst) {
        let reason = lock(&shared.reason).clone().unwrap_or(error);
        add(&inner.stats.disconnects, 1);
        info!(peer = %Hex(&peer), %reason, "disconnected");
        inner.emit(Event::Disconnected { peer, reason }).await;
    }
    drop(guard);
    let dialer = lock(&inner.state).dialers.get(&peer).cloned();
    if let Some(d) = dialer {
        d.notify.notify_one();
    }
}

/// Opens a uni stream and queues the preamble on it.
async fn open_stream(conn: &quinn::Connection) -> Result<quinn::SendStream, quinn::WriteError> {
    let mut s = conn.open_uni().await?;
    s.write_chunk(Bytes::from_static(&STREAM_PREAMBLE)).await?;
    Ok(s)
}

/// Drains the connection's queue onto one long-lived uni stream.
///
/// The stream is opened at once (not on the first frame): for the accepting
/// side it doubles as the "you are accepted" signal the dialler waits for.
async fn send_loop(
    inner: Arc<Inner>,
    conn: quinn::Connection,
    peer: PeerKey,
    mut rx: mpsc::Receiver<Bytes>,
) {
    let max = inner.config.max_frame_len;
    let mut stream = match open_stream(&conn).await {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(peer = %Hex(&peer), error = %e, "cannot open stream; sender stops");
            return;
        }
    };
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut small = BytesMut::new();
    while let Some(first) = rx.recv().await {
        chunks.clear();
        let s = match stream.as_mut() {
            Some(s) => s,
            None => match open_stream(&conn).await {
                Ok(s) => stream.insert(s),
                Err(e) => {
                    add(&inner.stats.frames_dropped, 1 + rx.len() as u64);
                    debug!(peer = %Hex(&peer), error = %e, "cannot open stream; sender stops");
                    return;
                }
            },
        };
        let (mut frames, mut bytes) = (0u64, 0usize);
        let mut next = Some(first);
        while let Some(f) = next.take() {
            match frame::encode_header(f.len(), max) {
                Ok(h) => {
                    bytes += f.len();
                    frames += 1;
                    // Small frames are copied into one buffer (fewer, larger
                    // writes); large ones are passed through without a copy.
                    small.extend_from_slice(&h);
                    if f.len() <= SMALL_FRAME {
                        small.extend_from_slice(&f);
                    } else {
                        chunks.push(small.split().freeze());
                        chunks.push(f);
                    }
                }
                // try_send/send already refuse these; count defensively.
                Err(_) => add(&inner.stats.frames_dropped, 1),
            }
            if bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        match s.write_all_chunks(&mut chunks).await {
            Ok(()) => {
                add(&inner.stats.frames_sent, frames);
                add(&inner.stats.bytes_sent, bytes as u64);
            }
            Err(e) => {
                add(&inner.stats.frames_dropped, frames);
                stream = None;
                match e {
                    quinn::WriteError::Stopped(c) => {
                        warn!(peer = %Hex(&peer), code = %c, "peer stopped our stream; opening a new one");
                    }
                    other => {
                        debug!(peer = %Hex(&peer), error = %other, "send stream failed; sender stops");
                        return;
                    }
                }
            }
        }
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
}

/// Decodes frames from one incoming uni stream and hands them to the agent.
async fn read_stream(inner: Arc<Inner>, peer: PeerKey, mut recv: quinn::RecvStream) {
    let max = inner.config.max_frame_len;
    let mut buf = BytesMut::new();
    let mut started = false;
    loop {
        loop {
            if !started {
                match frame::check_preamble(&buf) {
                    Ok(Some(n)) => {
                        buf.advance(n);
                        started = true;
                    }
                    Ok(None) => break,
                    Err(e) => return inner.reject_stream(&peer, &mut recv, e),
                }
            }
            match frame::decode_frame(&buf, max) {
                Ok(Some((_, consumed))) => {
                    let frame = buf.split_to(consumed).freeze().slice(HEADER_LEN..);
                    add(&inner.stats.frames_received, 1);
                    add(&inner.stats.bytes_received, frame.len() as u64);
                    if !inner.emit(Event::Frame { peer, frame }).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => return inner.reject_stream(&peer, &mut recv, e),
            }
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                if !buf.is_empty() {
                    let e = FrameError::Truncated {
                        buffered: buf.len(),
                    };
                    inner.reject_stream(&peer, &mut recv, e);
                }
                return;
            }
            Err(e) => {
                debug!(peer = %Hex(&peer), error = %e, "stream ended");
                return;
            }
        }
    }
}
