//! The node: the one owner of the store and the sync engine, on its own thread.
//!
//! Everything that touches the store goes through the node, as a [`Command`] on a bounded
//! channel (the HTTP API, the file bindings). The node `select!`s on commands, transport
//! events and the engine's timer, and after each step drains every engine output: messages go
//! to the transport (bounded per-peer queues; a full queue drops the message and anti-entropy
//! repairs it), events go to metrics and to watchers. Then it trims the store's in-memory
//! documents to their cap; every 5 minutes it saves snapshots of busy documents.
//!
//! ## Its own thread
//!
//! The node runs on a dedicated OS thread (`lichen-node`, [`spawn`]) with its own
//! single-threaded Tokio runtime (timers only) driving that `select!` loop. Its work is
//! synchronous work on the store: SQLite transactions and their fsyncs, write-ahead log
//! checkpoints, snapshot saves, carry-forward, the scrub, closing the database at shutdown. On
//! a slow disk or under a stream of large writes one step takes tens or hundreds of
//! milliseconds; on its own thread that never stalls the main runtime, which runs the QUIC
//! endpoint (its driver, keep-alives, dialers, stream readers) and the HTTP API. A busy store
//! delays only the answers that need the store; `GET /v1/health`, `/metrics` and QUIC
//! keep-alives are answered meanwhile.
//!
//! The two sides share only channels and a few atomics: commands in ([`NodeHandle`]: a bounded
//! mpsc, each answered on a oneshot), transport events in (the endpoint's bounded event
//! channel), frames out (`Endpoint::try_send`, never waits: bounded per-peer queues),
//! [`Notice`]s and watch channels out, [`Metrics`] counters. The endpoint methods the node
//! calls (`add_peer`, `set_refused`, ...) start their tasks on the runtime `Endpoint::bind`
//! ran on, never on the node's. A runtime rather than a blocking loop over channels, because
//! the loop waits on several channels and timers at once (the engine's deadline, the write
//! hold, the idle checkpoint, the scrub and snapshot ticks), which `select!` over the same
//! Tokio channels the async side uses says directly.
//!
//! Writes are group-committed: every write command waiting in the channel is taken and
//! committed in one SQLite transaction (one fsync); each caller is answered only after that
//! commit, and the changes are pushed to connected peers right after (durable before
//! announced). Right after answering a batch, the node waits up to 0.3-1 ms for those writers'
//! next writes before it commits what is queued (`run::gather_returning`): across the thread
//! boundary, concurrent writers otherwise split into two groups committing in turn.
//!
//! After a start, writes and membership edits are held (queued, answered later) until the
//! node's first catch-up with a peer, or `sync.hold_writes_ms`: a data directory older than
//! the node's last run must get the node's own later changes back before it signs new ones.
//! The hold only works if the restarted node reaches its peers within it; the transport
//! makes sure of that by letting a restarted node's new connection replace the stale one a
//! peer still holds from its previous run (without that, a peer kept the stale connection
//! until its idle timeout, longer than the hold, and a node restored from a snapshot wrote
//! over sequence numbers it had already used).
//!
//! A data directory restored from a backup with its key (`lichen restore --with-key`, see
//! [`NodeParts::restored`]) is stricter: until its first catch-up, with no deadline, writes
//! and membership edits are refused (503, not queued), and its own void writes are not
//! carried forward; the marker file is removed at that catch-up (`run`).
//!
//! This node's advertised addresses are written into the membership document at most once
//! per run, after the hold, and only if the document differs from the configured ones then.
//! It never writes them again because the document changed: a copy of this data directory
//! running elsewhere with its own address (a cloned key) would otherwise rewrite it in turn
//! forever. Keys flagged for equivocation (a cloned key that wrote) are refused by the
//! transport (`Endpoint::set_refused`), so a clone cannot keep the peers' connections
//! flipping between two machines.
//!
//! ## Where things are
//!
//! * `run`: the event loop, engine output to the transport, engine events to metrics.
//! * `command`: the [`Command`]s callers send, and the answers to those that are not writes.
//! * `commit`: group commit of writes, and the write hold after a start.
//! * `watchers`: watch streams and document notices.
//! * `carry`: voided changes, and carrying this node's own void writes forward.
//! * `membership_sync`: membership document → transport (gate, dial addresses, refused keys).
//! * `maintenance`: checkpoint, scrub, snapshots.
//! * `settings`: settings a reload applies live, and those pending a restart.
//! * `status`: the status and members views.
//! * `error`: answering refused changes, and counting storage failures.
//! * `gate`: the transport's admission check ([`Gate`]).

mod carry;
mod command;
mod commit;
mod error;
mod gate;
mod maintenance;
mod membership_sync;
mod past;
mod run;
mod settings;
mod status;
mod watchers;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lichen_crdt::sync::{Config as SyncConfig, SyncEngine};
use lichen_crdt::{NodeId, Role, SecretKey, Store};
use lichen_transport::{Endpoint, Event as NetEvent};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::metrics::Metrics;

pub(crate) use crate::error::ApiError;
pub(crate) use command::Command;
pub(crate) use command::Reply;
pub(crate) use gate::Gate;
pub(crate) use settings::LiveSettings;
use watchers::Watcher;
pub(crate) use watchers::{Notice, Watched};

/// Cheap handle to the node task.
#[derive(Clone)]
pub(crate) struct NodeHandle {
    tx: mpsc::Sender<Command>,
    pub notices: broadcast::Sender<Notice>,
    pub metrics: Arc<Metrics>,
    /// This node's identity and every file binding's state, kept by the render manager and
    /// shown by `status`.
    pub(crate) bindings: crate::render::Board,
}

impl NodeHandle {
    /// Send a command and wait for its answer.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| {
            ApiError::new(
                crate::error::ErrorKind::Unavailable,
                "the agent is shutting down",
            )
        })?;
        rx.await.map_err(|_| {
            ApiError::new(
                crate::error::ErrorKind::Unavailable,
                "the agent is shutting down",
            )
        })?
    }
}

/// Everything the node task needs.
pub(crate) struct NodeParts {
    pub store: Store,
    pub key: SecretKey,
    pub name: String,
    pub advertise: Vec<String>,
    pub endpoint: Endpoint,
    pub net_events: mpsc::Receiver<NetEvent>,
    pub gate: Arc<Gate>,
    pub seeds: Vec<(NodeId, String)>,
    pub sync: SyncConfig,
    pub metrics: Arc<Metrics>,
    pub join_token: Option<String>,
    /// How long this node's own writes may wait after start for a first catch-up with a
    /// peer (`sync.hold_writes_ms`; zero: they do not wait).
    pub hold_writes: Duration,
    /// Stored changes the background scrub checks per second (0: off).
    pub scrub_rows_per_second: u32,
    /// Set on a data directory restored from a backup with its key (`lichen restore
    /// --with-key`): the marker file, removed at the first catch-up with a peer. Until then
    /// writes are refused, whatever `hold_writes` says (see `Node::restored`).
    pub restored: Option<std::path::PathBuf>,
}

/// Start the node on its own thread (see the module doc). It runs until `shutdown` flips to
/// true, answers what is still queued, and closes the store.
///
/// Errors: the thread or its runtime could not be created (the OS refused a thread or a
/// timer descriptor).
pub(crate) fn spawn(
    parts: NodeParts,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(NodeHandle, NodeThread)> {
    let (tx, rx) = mpsc::channel(1024);
    let (notices, _) = broadcast::channel(1024);
    let id = parts.key.node_id();
    let handle = NodeHandle {
        tx,
        notices: notices.clone(),
        metrics: parts.metrics.clone(),
        bindings: crate::render::Board::new(id.to_string(), parts.name.clone()),
    };
    let seed = u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8]))
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let engine = SyncEngine::new(id, parts.sync.clone(), seed);
    let start = Instant::now();
    // Hold writes only where they could clash with this node's own past: a member with
    // other members to catch up from (a node still waiting to be admitted may not write).
    let m = parts.store.membership();
    let others = m
        .members
        .iter()
        .any(|(other, mm)| *other != id && mm.role != Role::Removed);
    let hold_until = (m.is_active(&id) && others && !parts.hold_writes.is_zero())
        .then(|| start + parts.hold_writes);
    // Restored with its key: held until a catch-up, with no deadline.
    let hold_until = match &parts.restored {
        Some(_) => Some(start + Duration::from_secs(3600 * 24 * 365)),
        None => hold_until,
    };
    let task = Node {
        store: parts.store,
        key: parts.key,
        name: parts.name,
        advertise: parts.advertise,
        endpoint: parts.endpoint,
        gate: parts.gate,
        seeds: parts.seeds,
        engine,
        metrics: parts.metrics,
        notices,
        start,
        hold_until,
        held: Vec::new(),
        last_caught_up: HashMap::new(),
        known_peers: BTreeSet::new(),
        membership: None,
        join_token: parts.join_token,
        watchers: HashMap::new(),
        storage_log: std::cell::Cell::new((None, 0)),
        committed: false,
        addrs_checked: false,
        refused: Vec::new(),
        scrub_rows: parts.scrub_rows_per_second as usize,
        restored: parts.restored,
        restart_pending: Vec::new(),
    };
    // Timers only: the node does no socket I/O of its own (the transport's tasks stay on the
    // caller's runtime, which `Endpoint::bind` captured).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let (done_tx, done) = oneshot::channel();
    let net_events = parts.net_events;
    let thread = std::thread::Builder::new()
        .name("lichen-node".into())
        .spawn(move || {
            let store = rt.block_on(task.run(rx, net_events, shutdown));
            // Closing the database (its last checkpoint) happens here too, off the runtime.
            drop(store);
            let _ = done_tx.send(());
        })?;
    Ok((handle, NodeThread { done, thread }))
}

/// The node's thread, to wait for at shutdown.
pub(crate) struct NodeThread {
    /// Sent once the node has answered what was queued and closed the store.
    done: oneshot::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

impl NodeThread {
    /// Wait, without blocking the runtime, until the node has stopped: every queued command
    /// answered, the store closed. Errors if the node thread panicked.
    pub(crate) async fn join(self) -> Result<(), String> {
        let finished = self.done.await.is_ok();
        let thread = self.thread;
        // The thread has nothing left to do once `done` is sent (or it unwound): reaping it
        // does not wait long, but it is a blocking call.
        let joined = tokio::task::spawn_blocking(move || thread.join().is_ok())
            .await
            .unwrap_or(false);
        if finished && joined {
            Ok(())
        } else {
            Err("the node thread panicked (see the log above)".into())
        }
    }
}

struct Node {
    store: Store,
    key: SecretKey,
    name: String,
    advertise: Vec<String>,
    endpoint: Endpoint,
    gate: Arc<Gate>,
    seeds: Vec<(NodeId, String)>,
    engine: SyncEngine,
    metrics: Arc<Metrics>,
    notices: broadcast::Sender<Notice>,
    start: Instant,
    /// Until when this node's own writes are held, from start until its first catch-up
    /// with a peer. A data directory older than the node's last run (a restored backup or
    /// disk image; a power loss with `fsync = "never"`) lacks changes this node made and
    /// peers hold: writing before getting them back would reuse their sequence numbers, and
    /// every node would flag this key as equivocating.
    hold_until: Option<Instant>,
    /// Writes and membership edits received while held, answered once released.
    held: Vec<Command>,
    /// The marker of a data directory restored with its key, until the first catch-up: the
    /// backup may lack changes this key signed after it was taken, so writing before a peer
    /// gave them back would sign other changes at the same sequence numbers (an equivocation,
    /// which voids this key's writes everywhere). Writes are refused meanwhile, not queued.
    restored: Option<std::path::PathBuf>,
    last_caught_up: HashMap<NodeId, u64>,
    known_peers: BTreeSet<NodeId>,
    membership: Option<lichen_crdt::Membership>,
    join_token: Option<String>,
    /// Watchers by document.
    watchers: HashMap<String, Vec<Watcher>>,
    /// When a storage failure was last logged, and how many since were not.
    storage_log: std::cell::Cell<(Option<Instant>, u64)>,
    /// Something was committed since the last look (for the idle checkpoint).
    committed: bool,
    /// This run has compared its configured addresses with the membership document (and
    /// written them if they differed); it never does again (see the module doc).
    addrs_checked: bool,
    /// Keys flagged for equivocation, refused by the transport.
    refused: Vec<NodeId>,
    /// Stored changes the background scrub checks per second (0: off).
    scrub_rows: usize,
    /// Changed settings (config-file names) that apply at the next start.
    restart_pending: Vec<String>,
}

/// Milliseconds since the Unix epoch (the wall time a change records).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn heads_string(h: &[[u8; 32]]) -> String {
    h.iter()
        .map(|x| NodeId(*x).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Node {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}
