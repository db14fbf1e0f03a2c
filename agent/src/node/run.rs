//! The node task's event loop.
//!
//! One loop `select!`s on commands, transport events, the engine's timer, the write hold's
//! deadline and the periodic jobs (see `maintenance`). After each step it drains every engine
//! output (`Node::drain`): messages go to the transport (bounded per-peer queues; a full
//! queue drops the message and anti-entropy repairs it), events go to metrics and to
//! watchers. Then it trims the store's in-memory documents to their cap.

use std::time::{Duration, Instant};

use lichen_crdt::sync::Event as SyncEvent;
use lichen_crdt::{NodeId, Store, MEMBERSHIP_DOC};
use lichen_transport::Event as NetEvent;
use tokio::sync::{mpsc, watch};

use super::command::{refuse, Command};
use super::maintenance::{IDLE_CHECKPOINT, MAINTENANCE_EVERY, SCRUB_EVERY};
use super::Node;

/// How long the node waits at most, after answering a batch of writes, for those writers'
/// next writes to join the next batch (see [`gather_returning`]): as long as that batch took
/// to commit, within these bounds.
const RETURN_WINDOW_MIN: Duration = Duration::from_micros(300);
const RETURN_WINDOW_MAX: Duration = Duration::from_millis(1);

/// Most commands taken into one batch.
const MAX_BATCH: usize = 256;

/// A batch of writes just answered: when, how long to wait for its writers, how many, and
/// how many commands were already queued behind it then.
#[derive(Clone, Copy)]
struct Answered {
    at: Instant,
    window: Duration,
    writes: usize,
    queued: usize,
}

/// Move every command already queued into `batch` (at most [`MAX_BATCH`] in all).
fn take_queued(rx: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
}

/// Group commit across the thread boundary: let the writers just answered join this batch.
///
/// The HTTP side runs on another thread, so the node takes a batch as soon as its first
/// command arrives, and the writers it has just answered are still on their way back (the
/// answer goes out, the client sends its next write, the API parses it: 0.1-0.3 ms). Without
/// waiting for them, concurrent writers split into two groups that commit in turn, each
/// batch half as large as it could be, and the commits (one fsync and one signed change
/// each, the same rate either way) carry half the writes. So when a batch starts within the
/// window of the last answer (as long as that commit took, 0.3 to 1 ms: waiting longer than
/// a commit would cost the queued writes more than it saves the returning ones) and fewer
/// commands than the writes answered then have come in since, the node waits for the rest,
/// at most until the window closes. A lone writer is never held back: its next write is the
/// one returning command expected.
fn gather_returning(rx: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>, last: Answered) {
    let until = last.at + last.window;
    loop {
        // Commands beyond those already queued at the answer came in since.
        let returned = batch.len().saturating_sub(last.queued);
        if returned >= last.writes || batch.len() >= MAX_BATCH {
            return;
        }
        let now = Instant::now();
        if now >= until {
            return;
        }
        // The node's own thread: sleeping here holds back nothing but this node's loop.
        std::thread::sleep((until - now).min(Duration::from_micros(50)));
        take_queued(rx, batch);
    }
}

impl Node {
    pub(super) async fn run(
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
        // The last batch of writes answered, for `gather_returning`.
        let mut answered: Option<Answered> = None;
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
                    take_queued(&mut rx, &mut batch);
                    if let Some(last) = answered.take() {
                        gather_returning(&mut rx, &mut batch, last);
                    }
                    let writes = batch.iter().filter(|c| c.writes()).count();
                    let started = Instant::now();
                    self.handle_commands(batch);
                    if writes > 0 {
                        let at = Instant::now();
                        answered = Some(Answered {
                            at,
                            window: (at - started).clamp(RETURN_WINDOW_MIN, RETURN_WINDOW_MAX),
                            writes,
                            queued: rx.len(),
                        });
                    }
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
                    self.idle_checkpoint();
                }
                _ = scrub.tick(), if self.scrub_rows > 0 => self.scrub_step(),
                _ = maintenance.tick() => self.save_snapshots(),
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
                    let handled = match &e {
                        lichen_crdt::sync::SyncError::Store(se) => self
                            .storage_failure(se, "received changes (they will be fetched again)"),
                        _ => false,
                    };
                    if !handled {
                        tracing::error!(error = %e, peer = %NodeId(peer), "applying received changes failed; they will be fetched again");
                    }
                }
                self.metrics.apply_latency.observe(t.elapsed());
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
                    if let Some(marker) = self.restored.take() {
                        if let Err(e) = std::fs::remove_file(&marker) {
                            tracing::warn!(error = %e, path = %marker.display(), "cannot remove the restore marker; the next start will wait for a peer again");
                        }
                    }
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
        self.metrics
            .peer_resolve_failures
            .store(self.endpoint.stats().resolve_failures, Relaxed);
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
}
