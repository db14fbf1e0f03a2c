//! The node task: the one owner of the store and the sync engine.
//!
//! Everything that touches the store goes through this task, as a [`Command`] on a bounded
//! channel (the HTTP API, the file bindings). The task `select!`s on commands, transport
//! events and the engine's timer, and after each step drains every engine output: messages go
//! to the transport (bounded per-peer queues; a full queue drops the message and anti-entropy
//! repairs it), events go to metrics and to watchers. Then it trims the store's in-memory
//! documents to their cap; every 5 minutes it saves snapshots of busy documents.
//!
//! Writes are group-committed: every write command waiting in the channel is taken and
//! committed in one SQLite transaction (one fsync); each caller is answered only after that
//! commit, and the changes are pushed to connected peers right after (durable before
//! announced).
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
//! This node's advertised addresses are written into the membership document at most once
//! per run, after the hold, and only if the document differs from the configured ones then.
//! It never writes them again because the document changed: a copy of this data directory
//! running elsewhere with its own address (a cloned key) would otherwise rewrite it in turn
//! forever. Keys flagged for equivocation (a cloned key that wrote) are refused by the
//! transport (`Endpoint::set_refused`), so a clone cannot keep the peers' connections
//! flipping between two machines.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lichen_crdt::sync::{Config as SyncConfig, Event as SyncEvent, SyncEngine};
use lichen_crdt::{
    format_path, HistoryEntry, Member, NodeId, Op, PathSeg, Role, SecretKey, Store, StoreError,
    MEMBERSHIP_DOC,
};
use lichen_transport::{Endpoint, Event as NetEvent, PeerKey};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::metrics::Metrics;

/// Longest pause between dials of a join seed while this node waits to be admitted.
const JOIN_REDIAL_CAP: Duration = Duration::from_secs(1);

pub(crate) use crate::error::ApiError;

mod past;

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A request to the node task.
pub enum Command {
    Write {
        doc: String,
        op: Op,
        reply: Reply<Option<String>>,
    },
    Get {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<Option<(Value, String)>>,
    },
    Ls {
        doc: Option<String>,
        path: Vec<PathSeg>,
        reply: Reply<Value>,
    },
    History {
        doc: String,
        path: Vec<PathSeg>,
        limit: usize,
        reply: Reply<Vec<HistoryEntry>>,
    },
    Conflicts {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<Vec<Value>>,
    },
    /// How many changes of `doc` this node has signed (its entry in the document's version
    /// vector): a file binding compares it across a restart to tell whether an edit it sent
    /// was committed (see `render::last`). Held, like writes, until this node has caught up
    /// after a start.
    OwnSeq {
        doc: String,
        reply: Reply<u64>,
    },
    Members {
        reply: Reply<Value>,
    },
    MemberAdd {
        id: NodeId,
        name: String,
        role: Role,
        addrs: Vec<String>,
        scopes: Vec<String>,
        reply: Reply<String>,
    },
    MemberRemove {
        id: NodeId,
        reply: Reply<String>,
    },
    MemberRole {
        id: NodeId,
        role: Role,
        reply: Reply<String>,
    },
    Status {
        reply: Reply<Value>,
    },
    /// Follow the value at a path: the receiver holds the current value and is updated by
    /// the node task itself whenever the document's heads change (no round trip per change).
    Watch {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<watch::Receiver<Arc<Watched>>>,
    },
    /// Read the past, blame, export, audit; or revert or import (a write): see
    /// [`crate::history`] and `node/past.rs`.
    Past {
        req: crate::history::PastRequest,
        reply: Reply<crate::history::PastAnswer>,
    },
}

impl Command {
    /// Whether this command waits while writes are held: it makes a change signed by this
    /// node, or it is [`Command::OwnSeq`], which a file binding asks just before it reads the
    /// document to merge an edit into (so that the merge sees what the catch-up brought).
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::OwnSeq { .. }
                | Command::MemberAdd { .. }
                | Command::MemberRemove { .. }
                | Command::MemberRole { .. }
        ) || matches!(self, Command::Past { req, .. } if req.writes())
    }
}

/// Answer a write or membership edit that was not made (503, `why`).
fn refuse(c: Command, why: &str) {
    let e = ApiError::new(503, why);
    match c {
        Command::Write { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::OwnSeq { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::MemberAdd { reply, .. }
        | Command::MemberRemove { reply, .. }
        | Command::MemberRole { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Past { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        _ => {}
    }
}

/// The value at a watched path and the document heads it was read at (`""` and null when
/// the path holds nothing).
#[derive(Debug, Default)]
pub struct Watched {
    pub heads: String,
    pub value: Value,
}

/// A `GET /v1/watch` subscriber, kept by the node task.
struct Watcher {
    path: Vec<PathSeg>,
    tx: watch::Sender<Arc<Watched>>,
}

/// A document changed (locally or from a peer).
#[derive(Debug, Clone)]
pub struct Notice {
    pub doc: String,
}

/// Cheap handle to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    pub notices: broadcast::Sender<Notice>,
    pub metrics: Arc<Metrics>,
}

impl NodeHandle {
    /// Send a command and wait for its answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::new(503, "the agent is shutting down"))?;
        rx.await
            .map_err(|_| ApiError::new(503, "the agent is shutting down"))?
    }
}

/// Who may connect: active members, former members (keys the membership document lists as
/// removed), plus the join seed while membership is unknown.
///
/// A former member is let in so that it learns of its removal: the sync engine sends it the
/// signed membership changes that prove it, refuses everything it sends, and serves it
/// nothing else (see "Former members" in `lichen_crdt::sync`). Refused at the handshake, it
/// would never learn, and would keep acknowledging writes every other node treats as void.
#[derive(Default)]
pub struct Gate {
    members: RwLock<HashSet<PeerKey>>,
    former: RwLock<HashSet<PeerKey>>,
    bootstrap: RwLock<HashSet<PeerKey>>,
}

impl lichen_transport::Authorizer for Gate {
    fn is_member(&self, key: &PeerKey) -> bool {
        let members = self
            .members
            .read()
            .map(|m| m.contains(key))
            .unwrap_or(false);
        let former = self.former.read().map(|m| m.contains(key)).unwrap_or(false);
        members
            || former
            || (self.members.read().map(|m| m.is_empty()).unwrap_or(false)
                && self
                    .bootstrap
                    .read()
                    .map(|b| b.contains(key))
                    .unwrap_or(false))
    }
}

/// Everything the node task needs.
pub struct NodeParts {
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
}

/// Start the node task. It runs until `shutdown` flips to true, then returns the store.
pub fn spawn(
    parts: NodeParts,
    shutdown: watch::Receiver<bool>,
) -> (NodeHandle, tokio::task::JoinHandle<Store>) {
    let (tx, rx) = mpsc::channel(1024);
    let (notices, _) = broadcast::channel(1024);
    let id = parts.key.node_id();
    let handle = NodeHandle {
        tx,
        notices: notices.clone(),
        metrics: parts.metrics.clone(),
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
    };
    let jh = tokio::spawn(task.run(rx, parts.net_events, shutdown));
    (handle, jh)
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
}

/// At most this many writes wait while writes are held; more are refused (503).
const MAX_HELD: usize = 1024;

/// After this long without commits the write-ahead log is checkpointed (restarted).
const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

/// How often the background scrub checks a few stored changes.
const SCRUB_EVERY: Duration = Duration::from_millis(250);

/// How often documents with many changes since their last snapshot get a new one.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(300);

/// At most one log line per this long for repeated storage failures (a full disk).
const STORAGE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a change that was valid became void (the labels of `lichen_changes_voided_total`).
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

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut net: mpsc::Receiver<NetEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Store {
        self.refresh_membership();
        // Keys flagged before this start stay refused (later flags: after each ingest).
        self.refuse_flagged();
        // Own writes voided before a crash or restart are carried forward now.
        self.handle_voided(true);
        // One timer, moved only when the engine's deadline moves (not a new one per event).
        let idle = self.start + Duration::from_secs(3600 * 24 * 365);
        let timer = tokio::time::sleep_until(idle.into());
        tokio::pin!(timer);
        // Snapshots of documents with many changes since their last one, so that a document
        // dropped from memory (see `trim_cache` below) or loaded after a restart is rebuilt fast.
        let mut maintenance = tokio::time::interval_at(
            (Instant::now() + MAINTENANCE_EVERY).into(),
            MAINTENANCE_EVERY,
        );
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The background scrub: a few stored changes checked per tick, so that damage on
        // disk is found (and fetched again from a peer) without loading the disk.
        let mut scrub =
            tokio::time::interval_at((Instant::now() + SCRUB_EVERY).into(), SCRUB_EVERY);
        scrub.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update_scrub_metrics();
        // Once writes pause, copy the write-ahead log into the database, so that the next
        // writes start it again from its beginning: the checkpoint is then not paid inside a
        // write (SQLite does it in the commit that crosses `wal_checkpoint_pages`).
        let checkpoint = tokio::time::sleep_until(idle.into());
        tokio::pin!(checkpoint);
        let mut wal_dirty = false;
        let hold = tokio::time::sleep_until(self.hold_until.unwrap_or(idle).into());
        tokio::pin!(hold);
        if let Some(until) = self.hold_until {
            tracing::info!(
                at_most_ms = until.duration_since(self.start).as_millis() as u64,
                "holding this node's writes until it has caught up with a peer (sync.hold_writes_ms)"
            );
        }
        loop {
            let deadline = self
                .engine
                .poll_timeout()
                .map(|ms| self.start + Duration::from_millis(ms))
                .unwrap_or(idle);
            if timer.deadline() != deadline.into() {
                timer.as_mut().reset(deadline.into());
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break; }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut batch = vec![cmd];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    self.handle_commands(batch);
                }
                ev = net.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle_net(ev);
                }
                _ = &mut hold, if self.hold_until.is_some() => {
                    self.hold_until = None;
                    let held = self.held.len();
                    if held > 0 {
                        tracing::warn!(held, "no peer caught up with since start (sync.hold_writes_ms): writing without it");
                    } else {
                        tracing::info!("no peer caught up with since start (sync.hold_writes_ms): writes will not wait");
                    }
                }
                _ = &mut timer => {
                    let now = self.now();
                    if let Err(e) = self.engine.handle_timeout(now, &mut self.store) {
                        tracing::error!(error = %e, "sync timer failed");
                    }
                }
                _ = &mut checkpoint, if wal_dirty => {
                    wal_dirty = false;
                    checkpoint.as_mut().reset(idle.into());
                    match self.store.checkpoint() {
                        Ok(()) => {
                            use std::sync::atomic::Ordering::Relaxed;
                            self.metrics.wal_checkpoints.fetch_add(1, Relaxed);
                            self.metrics.wal_checkpoint_pending.store(0, Relaxed);
                        }
                        Err(e) => {
                            if !self.storage_failure(&e, "write-ahead log checkpoint") {
                                tracing::warn!(error = %e, "write-ahead log checkpoint failed");
                            }
                        }
                    }
                }
                _ = scrub.tick(), if self.scrub_rows > 0 => {
                    let budget = (self.scrub_rows * SCRUB_EVERY.as_millis() as usize / 1000).max(1);
                    match self.store.scrub_step(budget) {
                        Ok(step) => {
                            if step.healed > 0 || !step.corrupt.is_empty() {
                                // The store no longer claims (or claims again) some changes:
                                // the engine's cached version vectors are stale.
                                self.engine.invalidate();
                                self.refresh_membership();
                            }
                        }
                        Err(e) => {
                            if !self.storage_failure(&e, "background scrub") {
                                tracing::warn!(error = %e, "background scrub failed");
                            }
                        }
                    }
                    self.update_scrub_metrics();
                }
                _ = maintenance.tick() => {
                    match self.store.maintenance() {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(snapshots = n, "saved document snapshots"),
                        Err(e) => {
                            if !self.storage_failure(&e, "document snapshots") {
                                tracing::warn!(error = %e, "saving document snapshots failed");
                            }
                        }
                    }
                }
            }
            self.drain();
            if self.hold_until.is_none() && !self.held.is_empty() {
                let held = std::mem::take(&mut self.held);
                self.handle_commands(held);
                self.drain();
            }
            self.metrics
                .writes_held
                .store(self.held.len() as u64, std::sync::atomic::Ordering::Relaxed);
            // Between batches nothing holds a document: keep memory to the cap.
            self.store.trim_cache();
            if std::mem::take(&mut self.committed) {
                wal_dirty = true;
                self.metrics
                    .wal_checkpoint_pending
                    .store(1, std::sync::atomic::Ordering::Relaxed);
                checkpoint
                    .as_mut()
                    .reset((Instant::now() + IDLE_CHECKPOINT).into());
            }
        }
        // Answer what is still queued, then hand back the store (already durable).
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            self.handle_commands(vec![cmd]);
        }
        for c in std::mem::take(&mut self.held) {
            refuse(
                c,
                "the agent stopped before it caught up with a peer; the write was not made",
            );
        }
        self.drain();
        self.store
    }

    fn handle_net(&mut self, ev: NetEvent) {
        let now = self.now();
        match ev {
            NetEvent::Connected { peer, addr } => {
                tracing::info!(peer = %NodeId(peer), %addr, "peer connected");
                if let Err(e) = self.engine.peer_up(now, NodeId(peer), &mut self.store) {
                    tracing::error!(error = %e, "sync failed");
                }
            }
            NetEvent::Disconnected { peer, reason } => {
                tracing::info!(peer = %NodeId(peer), %reason, "peer disconnected");
                self.engine.peer_down(now, NodeId(peer));
            }
            NetEvent::Frame { peer, frame } => {
                let t = Instant::now();
                self.metrics
                    .messages_received
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics
                    .bytes_received
                    .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = self
                    .engine
                    .handle_bytes(now, NodeId(peer), &frame, &mut self.store)
                {
                    let lichen_crdt::sync::SyncError::Store(se) = &e;
                    if !self.storage_failure(se, "received changes (they will be fetched again)") {
                        tracing::error!(error = %e, peer = %NodeId(peer), "applying received changes failed; they will be fetched again");
                    }
                }
                self.metrics.apply_latency.observe(t.elapsed());
            }
        }
    }

    /// Changes the store voided since the last call: log and count them, and when one of them
    /// is this node's own (or `always`, at start), carry this node's void writes forward as
    /// new changes (see `lichen_crdt::store` `carry`): durable, then pushed like local writes.
    fn handle_voided(&mut self, always: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let notes = self.store.take_voided();
        let me = self.key.node_id();
        let own = notes.iter().any(|v| v.author == me);
        let mut groups: BTreeMap<(&str, &'static str), Vec<String>> = BTreeMap::new();
        for v in &notes {
            self.metrics
                .inc_labelled("lichen_changes_voided_total", v.reason, 1);
            groups
                .entry((v.doc.as_str(), v.reason))
                .or_default()
                .push(NodeId(v.hash).to_string());
        }
        for ((doc, reason), hashes) in groups {
            let count = hashes.len();
            let shown = &hashes[..count.min(8)];
            tracing::warn!(doc, reason, count, hashes = ?shown, "changes that were valid here became void");
        }
        if !own && !always {
            return;
        }
        let carried = match self.store.carry_forward(&self.key, wall_ms()) {
            Ok(c) => c,
            Err(e) => {
                if !self.storage_failure(
                    &e,
                    "own writes to carry forward (retried at the next start)",
                ) {
                    tracing::error!(error = %e, "carrying this node's void writes forward failed");
                }
                return;
            }
        };
        let mut committed = Vec::new();
        for c in carried {
            self.metrics
                .carried_forward
                .fetch_add(c.voided.len() as u64, Relaxed);
            let voided: Vec<String> = c.voided.iter().map(|h| NodeId(*h).to_string()).collect();
            let new = c
                .change
                .as_ref()
                .and_then(|ch| ch.hash())
                .map(|h| NodeId(h).to_string());
            tracing::warn!(
                doc = %c.doc,
                voided = ?voided,
                new_change = new.as_deref().unwrap_or("none (the values already stand)"),
                "this node's acknowledged writes were void (built on a void change): their values were written again as a new change"
            );
            if let Some(ch) = c.change {
                committed.push(ch);
                self.doc_changed(c.doc);
            }
        }
        if !committed.is_empty() {
            self.committed = true;
            self.metrics
                .changes_sent
                .fetch_add(committed.len() as u64, Relaxed);
            let now = self.now();
            if let Err(e) = self.engine.local_commit(now, &committed, &mut self.store) {
                tracing::error!(error = %e, "push failed; anti-entropy will deliver");
            }
        }
    }

    /// Send every queued message; turn engine events into metrics and notices.
    fn drain(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.handle_voided(false);
        self.flush();
        let mut store_touched = false;
        let mut membership_touched = false;
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                SyncEvent::Applied { from, docs, count } => {
                    store_touched = true;
                    self.committed = true;
                    self.metrics
                        .changes_received
                        .fetch_add(count as u64, Relaxed);
                    tracing::debug!(from = %from, count, ?docs, "applied changes");
                    for doc in docs {
                        if doc == MEMBERSHIP_DOC {
                            membership_touched = true;
                        }
                        self.doc_changed(doc);
                    }
                }
                SyncEvent::Rejected { from, label, count } => {
                    store_touched = true;
                    if label == "former_member" {
                        // Until it has the proof of its removal (sent as soon as it
                        // connects), a removed member's messages are refused, one by one.
                        tracing::debug!(from = %from, "refused a message from a removed member");
                    } else {
                        tracing::warn!(from = %from, reason = label, count, "rejected changes from peer");
                    }
                    self.metrics
                        .inc_labelled("lichen_changes_rejected_total", label, count as u64);
                }
                SyncEvent::CaughtUp { peer } => {
                    if self.hold_until.take().is_some() {
                        tracing::info!(peer = %peer, held = self.held.len(), "caught up with a peer: writes resume");
                    }
                    let now = self.now();
                    self.last_caught_up.insert(peer, now);
                }
            }
        }
        let now = self.now();
        let up = self.engine.peers_up();
        let lag = up
            .iter()
            .map(|p| now.saturating_sub(*self.last_caught_up.get(p).unwrap_or(&0)))
            .min()
            .unwrap_or(0);
        self.metrics.sync_lag_ms.store(lag, Relaxed);
        self.metrics.connections.store(up.len() as u64, Relaxed);
        if membership_touched {
            self.refresh_membership();
        }
        if store_touched {
            self.refuse_flagged();
        }
        if self.publish_own_addrs() {
            self.flush();
        }
    }

    /// Hand every message the engine has queued to the transport.
    fn flush(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        while let Some((peer, msg)) = self.engine.poll_transmit() {
            let bytes = msg.encode();
            let len = bytes.len() as u64;
            match self.endpoint.try_send(&peer.0, bytes.into()) {
                Ok(()) => {
                    self.metrics.messages_sent.fetch_add(1, Relaxed);
                    self.metrics.bytes_sent.fetch_add(len, Relaxed);
                }
                Err(e) => {
                    self.metrics.send_dropped.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %peer, error = %e, "message dropped; anti-entropy will repair");
                }
            }
        }
    }

    /// Tell the transport to refuse every key flagged for equivocation (other than ours: a
    /// node does not connect to itself). Two machines running one key make the peers'
    /// connections flip between them; once the key is proven cloned, neither gets one.
    fn refuse_flagged(&mut self) {
        let me = self.key.node_id();
        let flagged: Vec<NodeId> = match self.store.equivocators() {
            Ok(f) => f.into_iter().filter(|k| *k != me).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the keys flagged for equivocation");
                return;
            }
        };
        if flagged == self.refused {
            return;
        }
        for k in flagged.iter().filter(|k| !self.refused.contains(k)) {
            tracing::warn!(peer = %k, "key flagged for equivocation (a cloned key?): its connections are refused; remove it and re-admit the machine with a new key");
        }
        self.endpoint.set_refused(flagged.iter().map(|k| k.0));
        self.refused = flagged;
    }

    /// Write this node's configured addresses into the membership document if it shows
    /// others, once per run, after the write hold (see the module doc). Returns whether a
    /// change was made.
    fn publish_own_addrs(&mut self) -> bool {
        let me = self.key.node_id();
        if self.addrs_checked || self.hold_until.is_some() || self.advertise.is_empty() {
            return false;
        }
        let m = self.store.membership();
        if !m.is_active(&me) {
            return false;
        }
        self.addrs_checked = true;
        if m.get(&me).is_some_and(|x| x.addrs == self.advertise) {
            return false;
        }
        match self
            .store
            .set_own_addrs(&self.key, self.advertise.clone(), wall_ms())
        {
            Ok(Some(ch)) => {
                tracing::info!(addrs = ?self.advertise, "published this node's addresses");
                self.committed = true;
                let now = self.now();
                if let Err(e) = self.engine.local_commit(now, &[ch], &mut self.store) {
                    tracing::error!(error = %e, "push failed; anti-entropy will deliver");
                }
                self.doc_changed(MEMBERSHIP_DOC.to_string());
                self.refresh_membership();
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not publish own addresses");
                false
            }
        }
    }

    /// Align the transport with the membership document: who may connect, whom to dial.
    fn refresh_membership(&mut self) {
        let m = self.store.membership().clone();
        if self.membership.as_ref() == Some(&m) {
            return;
        }
        let me = self.key.node_id();
        let active: HashSet<PeerKey> = m
            .members
            .iter()
            .filter(|(_, mm)| mm.role != Role::Removed)
            .map(|(id, _)| id.0)
            .collect();
        let former: HashSet<PeerKey> = m
            .members
            .iter()
            .filter(|(_, mm)| mm.role == Role::Removed)
            .map(|(id, _)| id.0)
            .collect();
        if let Ok(mut g) = self.gate.members.write() {
            *g = active.clone();
        }
        if let Ok(mut g) = self.gate.former.write() {
            *g = former;
        }
        // Removed for good (the proof came from a peer, or this node's own store holds it):
        // nothing left to sync, so no one to dial. Its writes are refused as revoked.
        let removed = m.get(&me).is_some_and(|x| x.role == Role::Removed);
        if removed
            && self
                .membership
                .as_ref()
                .and_then(|o| o.get(&me))
                .map(|x| x.role)
                != Some(Role::Removed)
        {
            tracing::error!(
                node = %me,
                "this node was removed from the cluster by an admin: its key is revoked, its writes are refused and it no longer syncs; to take part again, start it with a new data directory (a new key) and ask an admin to add it"
            );
        }
        if let Ok(mut b) = self.gate.bootstrap.write() {
            *b = self.seeds.iter().map(|(id, _)| id.0).collect();
        }
        let mut wanted: BTreeMap<NodeId, Vec<SocketAddr>> = BTreeMap::new();
        for (id, mm) in &m.members {
            if *id == me || mm.role == Role::Removed || removed {
                continue;
            }
            let addrs: Vec<SocketAddr> = mm
                .addrs
                .iter()
                .filter_map(|a| crate::config::resolve_addr(a).ok())
                .collect();
            wanted.insert(*id, addrs);
        }
        for (id, addr) in self.seeds.iter().filter(|_| !removed) {
            if let Ok(a) = crate::config::resolve_addr(addr) {
                let entry = wanted.entry(*id).or_default();
                if !entry.contains(&a) {
                    entry.push(a);
                }
            }
        }
        for id in &self.known_peers {
            if !wanted.contains_key(id) {
                self.endpoint.remove_peer(id.0);
            }
        }
        for (id, addrs) in &wanted {
            self.endpoint.add_peer(id.0, addrs.clone());
        }
        // Waiting to be admitted (not a member, not removed): the seeds refuse us until an
        // admin runs `members add`, and we must notice that within about a second, not after
        // a backoff pause that has grown to half a minute.
        let waiting = !m.is_active(&me) && m.get(&me).is_none_or(|x| x.role != Role::Removed);
        for (id, _) in &self.seeds {
            self.endpoint
                .set_redial_cap(id.0, waiting.then_some(JOIN_REDIAL_CAP));
        }
        self.known_peers = wanted.keys().copied().collect();
        self.endpoint.membership_changed();
        // Our own addresses are published by `publish_own_addrs`, once per run.
        if !m.is_active(&me) && m.root.is_some() && !removed {
            tracing::warn!(
                node = %me,
                "this node is not a member yet: on an admin run `lichen members add {me} --role writer --name {}`",
                self.name
            );
        }
        self.membership = Some(self.store.membership().clone());
    }

    fn handle_commands(&mut self, batch: Vec<Command>) {
        let mut writes: Vec<(String, Op, Reply<Option<String>>)> = Vec::new();
        let mut others = Vec::new();
        for c in batch {
            match c {
                c if self.hold_until.is_some() && c.writes() => {
                    if self.held.len() < MAX_HELD {
                        self.held.push(c);
                    } else {
                        refuse(c, "this node is catching up with its peers after a restart before it writes; retry in a few seconds");
                    }
                }
                Command::Write { doc, op, reply } => writes.push((doc, op, reply)),
                other => others.push(other),
            }
        }
        if !writes.is_empty() {
            self.commit_writes(writes);
        }
        for c in others {
            self.handle_command(c);
        }
    }

    fn commit_writes(&mut self, writes: Vec<(String, Op, Reply<Option<String>>)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let t = Instant::now();
        let ops: Vec<(String, Op)> = writes
            .iter()
            .map(|(d, o, _)| (d.clone(), o.clone()))
            .collect();
        let results = self.store.write_batch(&self.key, &ops, wall_ms());
        let elapsed = t.elapsed();
        let mut committed = Vec::new();
        let mut docs = BTreeSet::new();
        for ((doc, _, reply), r) in writes.into_iter().zip(results) {
            let answer = match r {
                Ok(Some(ch)) => {
                    self.metrics.writes.fetch_add(1, Relaxed);
                    self.metrics.write_latency.observe(elapsed);
                    let h = ch.hash().map(|h| NodeId(h).to_string());
                    committed.push(ch);
                    docs.insert(doc);
                    Ok(h)
                }
                Ok(None) => Ok(None),
                Err(e) => {
                    self.metrics.write_errors.fetch_add(1, Relaxed);
                    Err(self.write_error(e))
                }
            };
            let _ = reply.send(answer);
        }
        self.committed |= !committed.is_empty();
        // Writes to one document in one group commit share a change: announce it once.
        let mut seen = HashSet::new();
        committed.retain(|c| seen.insert(c.hash()));
        if !committed.is_empty() {
            self.metrics
                .changes_sent
                .fetch_add(committed.len() as u64, Relaxed);
            let now = self.now();
            if let Err(e) = self.engine.local_commit(now, &committed, &mut self.store) {
                tracing::error!(error = %e, "push failed; anti-entropy will deliver");
            }
        }
        for doc in docs {
            self.doc_changed(doc);
        }
    }

    /// A document changed: update its watchers, then tell the other subscribers (file
    /// bindings).
    fn doc_changed(&mut self, doc: String) {
        if let Some(mut list) = self.watchers.remove(&doc) {
            list.retain(|w| !w.tx.is_closed());
            let mut heads: Option<String> = None;
            for w in &list {
                let snap = match self.snapshot(&doc, &w.path, &mut heads) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(doc = %doc, error = %e, "cannot read a watched value");
                        continue;
                    }
                };
                w.tx.send_if_modified(|cur| {
                    let changed = cur.heads != snap.heads;
                    if changed {
                        *cur = Arc::new(snap);
                    }
                    changed
                });
            }
            if !list.is_empty() {
                self.watchers.insert(doc.clone(), list);
            }
        }
        let _ = self.notices.send(Notice { doc });
    }

    /// The watched value at `path`; `heads` caches the document's heads across watchers.
    fn snapshot(
        &self,
        doc: &str,
        path: &[PathSeg],
        heads: &mut Option<String>,
    ) -> Result<Watched, StoreError> {
        Ok(match self.store.get(doc, path)? {
            Some(value) => {
                let h = match heads {
                    Some(h) => h.clone(),
                    None => heads.insert(heads_string(&self.store.heads(doc)?)).clone(),
                };
                Watched { heads: h, value }
            }
            None => Watched::default(),
        })
    }

    /// Count (and log) a store failure that is not the caller's fault: a full disk or a
    /// failed commit. `false` for other errors (refusals, bad input).
    fn storage_failure(&self, e: &StoreError, what: &str) -> bool {
        let reason = match e {
            StoreError::DiskFull => "disk_full",
            StoreError::CommitFailed(_) | StoreError::Sqlite(_) => "database",
            _ => return false,
        };
        self.metrics
            .inc_labelled("lichen_store_errors_total", reason, 1);
        // While the disk stays full every anti-entropy round fails again: one line per
        // STORAGE_LOG_EVERY, with how many were left out (the metric counts each).
        let now = Instant::now();
        let (last, quiet) = self.storage_log.get();
        if last.is_some_and(|t| now.duration_since(t) < STORAGE_LOG_EVERY) {
            self.storage_log.set((last, quiet + 1));
        } else {
            tracing::error!(error = %e, data_dir = %self.store.path().display(), similar_failures_not_logged = quiet, "{what} not stored");
            self.storage_log.set((Some(now), 0));
        }
        true
    }

    /// A refused write; on a node that is not a member yet, say what to run.
    fn write_error(&self, e: StoreError) -> ApiError {
        let me = self.key.node_id();
        let removed = self
            .store
            .membership()
            .get(&me)
            .is_some_and(|x| x.role == Role::Removed);
        if matches!(e, StoreError::Denied(_)) && removed {
            return ApiError::new(
                403,
                format!(
                    "this node's key was revoked: an admin removed it from the cluster, so it can no longer write ({e}); to write again, start this machine with a new data directory (a new key) and ask an admin to add it"
                ),
            );
        }
        if matches!(e, StoreError::Denied(_)) && !self.store.membership().is_active(&me) {
            return ApiError::new(
                403,
                format!(
                    "this node is not a member of the cluster yet, so it cannot write: on an admin node run `lichen members add {me} --role writer --name {}`, then retry",
                    self.name
                ),
            );
        }
        self.change_error(e, "write")
    }

    /// The API's answer to a local change (`what`) the store refused or could not store: a
    /// storage failure is counted and logged, and a full disk names the data directory.
    fn change_error(&self, e: StoreError, what: &str) -> ApiError {
        self.storage_failure(&e, what);
        if matches!(e, StoreError::DiskFull) {
            let dir = self.store.path().parent().unwrap_or(Path::new("/"));
            return ApiError::new(507, format!("{e} (data directory {})", dir.display()));
        }
        ApiError::from(e)
    }

    fn member_change(
        &mut self,
        r: Result<lichen_crdt::SignedChange, StoreError>,
    ) -> Result<String, ApiError> {
        let ch = r.map_err(|e| self.change_error(e, "membership change"))?;
        self.committed = true;
        let now = self.now();
        let _ = self
            .engine
            .local_commit(now, std::slice::from_ref(&ch), &mut self.store);
        self.doc_changed(MEMBERSHIP_DOC.to_string());
        self.refresh_membership();
        Ok(ch.hash().map(|h| NodeId(h).to_string()).unwrap_or_default())
    }

    fn handle_command(&mut self, c: Command) {
        let now_wall = wall_ms();
        match c {
            Command::Write { .. } => {}
            Command::Past { req, reply } => self.past(req, reply),
            Command::Get { doc, path, reply } => {
                let r = (|| {
                    let v = self.store.get(&doc, &path)?;
                    let heads = heads_string(&self.store.heads(&doc)?);
                    Ok(v.map(|v| (v, heads)))
                })();
                let _ = reply.send(r.map_err(|e: StoreError| e.into()));
            }
            Command::Ls { doc, path, reply } => {
                let r = match doc {
                    None => self
                        .store
                        .list_docs()
                        .map(|d| json!(d))
                        .map_err(ApiError::from),
                    Some(d) => match self.store.keys(&d, &path) {
                        Ok(Some(k)) => Ok(json!(k)),
                        Ok(None) => Err(ApiError::new(
                            404,
                            format!(
                                "`{d}` has nothing at `{}` (list documents with `lichen ls`)",
                                format_path(&path)
                            ),
                        )),
                        Err(e) => Err(e.into()),
                    },
                };
                let _ = reply.send(r);
            }
            Command::History {
                doc,
                path,
                limit,
                reply,
            } => {
                let _ = reply.send(self.store.history(&doc, &path, limit).map_err(Into::into));
            }
            Command::Conflicts { doc, path, reply } => {
                let _ = reply.send(self.store.conflicts(&doc, &path).map_err(Into::into));
            }
            Command::OwnSeq { doc, reply } => {
                let me = self.key.node_id();
                let r = self
                    .store
                    .clock(&doc)
                    .map(|c| c.get(&me).copied().unwrap_or(0));
                let _ = reply.send(r.map_err(Into::into));
            }
            Command::Members { reply } => {
                let m = self.store.membership();
                let list: Vec<Value> = m
                    .members
                    .iter()
                    .map(|(id, mm)| member_json(id, mm, m.root == Some(*id)))
                    .collect();
                let _ = reply.send(Ok(json!(list)));
            }
            Command::MemberAdd {
                id,
                name,
                role,
                addrs,
                scopes,
                reply,
            } => {
                let r = self
                    .store
                    .add_member(&self.key, id, &name, role, addrs, scopes, now_wall);
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::MemberRemove { id, reply } => {
                let r = self.store.remove_member(&self.key, id, now_wall);
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::MemberRole { id, role, reply } => {
                let r = if role == Role::Removed {
                    self.store.remove_member(&self.key, id, now_wall)
                } else {
                    self.store.set_role(&self.key, id, role, now_wall)
                };
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Watch { doc, path, reply } => {
                // Forget watchers whose stream has ended (on any document).
                self.watchers.retain(|_, list| {
                    list.retain(|w| !w.tx.is_closed());
                    !list.is_empty()
                });
                let r = self.snapshot(&doc, &path, &mut None).map(|snap| {
                    let (tx, rx) = watch::channel(Arc::new(snap));
                    self.watchers
                        .entry(doc)
                        .or_default()
                        .push(Watcher { path, tx });
                    rx
                });
                let _ = reply.send(r.map_err(ApiError::from));
            }
        }
    }

    /// Copy the store's corruption counters into the metrics.
    fn update_scrub_metrics(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        match self.store.scrub_status() {
            Ok(s) => {
                self.metrics.corrupt_changes.store(s.corrupt_found, Relaxed);
                self.metrics
                    .quarantined_changes
                    .store(s.quarantined, Relaxed);
                self.metrics.healed_changes.store(s.healed, Relaxed);
                self.metrics
                    .snapshots_dropped
                    .store(s.snapshots_dropped, Relaxed);
                self.metrics.scrubbed_changes.store(s.checked, Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "reading the scrub counters failed"),
        }
    }

    fn status(&self) -> Result<Value, ApiError> {
        let me = self.key.node_id();
        let m = self.store.membership();
        let now = self.now();
        let conns = self.endpoint.connections();
        let peers: Vec<Value> = self
            .known_peers
            .iter()
            .map(|id| {
                let c = conns.iter().find(|c| c.peer == id.0);
                json!({
                    "id": id.to_string(),
                    "name": m.name_of(id),
                    "connected": c.is_some(),
                    "addr": c.map(|c| c.remote_addr.to_string()),
                    "rtt_ms": c.map(|c| c.rtt.as_secs_f64() * 1000.0),
                    "last_sync_ms_ago": self.last_caught_up.get(id).map(|t| now.saturating_sub(*t)),
                })
            })
            .collect();
        let mut docs = self.store.list_docs()?;
        docs.push(MEMBERSHIP_DOC.to_string());
        let docs: Vec<Value> = docs
            .iter()
            .map(|d| {
                Ok(json!({
                    "doc": d,
                    "heads": self.store.heads(d)?.iter().map(|h| NodeId(*h).to_string()).collect::<Vec<_>>(),
                    "changes": self.store.change_count(d)?,
                }))
            })
            .collect::<Result<_, StoreError>>()?;
        let stats = self.engine.stats();
        let scrub = self.store.scrub_status()?;
        let quarantined: BTreeMap<String, Vec<String>> = self
            .store
            .quarantined()?
            .into_iter()
            .map(|(d, hs)| (d, hs.iter().map(|h| NodeId(*h).to_string()).collect()))
            .collect();
        Ok(json!({
            "node": {
                "id": me.to_string(),
                "name": self.name,
                "role": m.get(&me).map(|x| x.role.as_str()).unwrap_or("not a member"),
                "revoked": m.get(&me).is_some_and(|x| x.role == Role::Removed),
                "listen": self.endpoint.local_addr().to_string(),
            },
            "cluster": NodeId(self.store.cluster_id()).to_string(),
            "join_token": self.join_token,
            "peers": peers,
            "docs": docs,
            "pending_changes": self.store.pending_len(),
            "writes_held": self.hold_until.map(|_| self.held.len()),
            "sync_lag_ms": self.metrics.sync_lag_ms.load(std::sync::atomic::Ordering::Relaxed),
            "rejected": self.metrics.labelled("lichen_changes_rejected_total"),
            "store_errors": self.metrics.labelled("lichen_store_errors_total"),
            "sync": {
                "messages_sent": stats.sent_messages,
                "messages_received": stats.received_messages,
                "bytes_sent": stats.sent_bytes,
                "bytes_received": stats.received_bytes,
                "applied": stats.applied,
                "rejected": stats.rejected,
                "dropped_pushes": stats.dropped_pushes,
            },
            "storage": {
                "corrupt_found": scrub.corrupt_found,
                "corrupt_ever": scrub.corrupt_ever,
                "quarantined": scrub.quarantined,
                "healed": scrub.healed,
                "snapshots_dropped": scrub.snapshots_dropped,
                "scrubbed": scrub.checked,
                "scrub_passes": scrub.passes,
                "quarantined_changes": quarantined,
            },
            "voided": self.metrics.labelled("lichen_changes_voided_total").into_iter().filter(|(_, v)| *v > 0).collect::<BTreeMap<_, _>>(),
            "carried_forward": self.metrics.carried_forward.load(std::sync::atomic::Ordering::Relaxed),
            "equivocators": self.store.equivocators()?.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        }))
    }
}

fn member_json(id: &NodeId, m: &Member, root: bool) -> Value {
    json!({
        "id": id.to_string(),
        "name": m.name,
        "role": m.role.as_str(),
        "addrs": m.addrs,
        "scopes": m.scopes,
        "root": root,
    })
}
