//! The sans-IO sync engine: a state machine that decides which messages to send when.
//!
//! Why it exists: sync logic is where distributed bugs live, so it must be testable under a
//! deterministic simulator. The engine therefore performs no I/O, reads no clock and draws no
//! global randomness. The caller (the agent's network task, or the simulator) feeds it inputs
//! and drains its outputs:
//!
//! ```text
//!  inputs                                   outputs (drained by the caller)
//!  handle(now, peer, msg, store)  ─┐       ┌─ poll_transmit() -> (peer, SyncMessage)
//!  local_commit(now, changes, store)├─ SyncEngine ─┼─ poll_timeout()  -> next deadline (ms)
//!  handle_timeout(now, store)      │       └─ poll_event()    -> applied / rejected / caught up
//!  peer_up / peer_down / set_peer_ready ┘
//! ```
//!
//! The store is passed by `&mut` to the calls that need it (it is not owned), through the
//! [`Replica`] trait, so the same engine runs on the SQLite [`crate::Store`] or a test double.
//! All verification happens in the store's `ingest`; the engine only routes bytes, so a
//! malicious peer can waste bounded bandwidth but cannot get an invalid change applied.
//!
//! Every buffer is bounded: each peer has its own outbound queue limited in messages and bytes
//! (a full queue drops pushes and announcements for that peer only, counted in [`Stats`], and
//! anti-entropy repairs the gap later), batches are limited in bytes and changes, and the
//! event queue drops its oldest entries when full.
//!
//! # Layout
//! This file holds the engine's state, its configuration, events and counters, its inputs
//! (with the dispatch of every received message in [`SyncEngine::handle`]) and outputs. The
//! protocol is in the children: `pull` (anti-entropy: digests, clock pages, pulling what we
//! lack and answering pulls), `relay` (gossip: pushes, relays, announcements, fetches, prunes
//! and who holds what) and `ingest` (handing received changes to the store); unit tests are
//! in `tests`.

mod ingest;
mod pull;
mod relay;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use super::rng::SplitMix64;
use super::wire::{change_id, ChangeId, Clocks, DocRange, SyncMessage};
use super::{Replica, SyncError};
use crate::identity::NodeId;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

use pull::{lacks, seq_of, short_tag, Pos, Pull, Summary, Theirs};
use relay::push;

/// Tuning knobs. The defaults suit a LAN or WAN cluster of up to tens of thousands of nodes.
#[derive(Debug, Clone)]
pub struct Config {
    /// Peers a node relays newly applied pushed changes to (not counting the sender).
    pub fanout: usize,
    /// Mean period of anti-entropy rounds, in milliseconds.
    pub anti_entropy_interval_ms: u64,
    /// Each period is drawn uniformly from `interval ± jitter` so nodes do not synchronize.
    pub anti_entropy_jitter_ms: u64,
    /// Target payload of one `Changes` batch (at least one change is always sent).
    pub batch_bytes: usize,
    /// Most changes in one batch.
    pub batch_changes: usize,
    /// Most messages queued for one peer.
    pub queue_messages: usize,
    /// Most bytes queued for one peer.
    pub queue_bytes: usize,
    /// Relayed changes go as a full `Push` when their encoding is at most this many bytes,
    /// else as an announcement (`Announce` by short id for up to [`Config::announce_max`]
    /// changes, `Have` by version vector beyond) that peers missing them answer with
    /// `Fetch`/`Want`.
    pub relay_inline_bytes: usize,
    /// Most changes announced one by one (`Announce`); larger relays use `Have`.
    pub announce_max: usize,
    /// Changes pushed by their own author are relayed in full (the second hop is eager too),
    /// except to a peer that answered such a relay with `Prune` (it gets that author's
    /// changes straight from the author): it gets announcements instead.
    pub eager_first_hop: bool,
    /// In a mesh small enough that an author pushes to every peer (at most `fanout` peers up
    /// here), the announcements of an author's changes to a peer that pruned that author are
    /// insurance only (the peer got them first-hand unless its link to the author failed):
    /// they are held this long, sent as one `Announce`, and skip ids the peer announced to
    /// us meanwhile. 0 sends each at once. Larger meshes always announce at once.
    pub pruned_announce_delay_ms: u64,
    /// Changes newly applied from an anti-entropy batch (`Changes`) of at most this many
    /// changes are relayed like pushed ones (0: never).
    pub relay_pulled_max: usize,
    /// Least time between two pulls (`Clocks` requests) triggered by pushes from one peer.
    pub pull_gap_ms: u64,
    /// A node pulls changes from one peer at a time; a pull with no answer for this long is
    /// abandoned (the peer may be gone) and another peer may be asked. One with no answer for
    /// `pull_gap_ms` already gives way to the next peer that offers an exchange (the request
    /// or its answer was most likely lost).
    pub pull_timeout_ms: u64,
    /// Most events kept until [`SyncEngine::poll_event`] drains them.
    pub max_events: usize,
    /// A node's version vectors are sent in pages of about this many bytes (by document
    /// range), so that any number of documents and authors stays within the message limit.
    pub clocks_page_bytes: usize,
    /// Relays skip peers known to hold the changes (they pushed or announced them to us, or
    /// fetched them from us), so announcements go where they may be news.
    pub relay_skip_holders: bool,
    /// With [`Config::relay_skip_holders`], relay to `fanout × candidates / others` peers
    /// (randomly rounded) instead of `fanout`: each peer not known to hold the changes is
    /// picked with the same probability as if nothing were known, so coverage is that of
    /// plain `fanout` with fewer announcements.
    pub relay_proportional: bool,
    /// The periodic digest goes to a random peer among those not known to hold the changes
    /// applied here during the last interval (a node gossip missed is found by the next
    /// round of a neighbour rather than after many), else to any random peer.
    pub ae_prefer_unknown: bool,
    /// While a fetch of an announced change is under way (the announced change has not
    /// arrived yet, less than `pull_gap_ms` after asking), a periodic round is skipped (never
    /// two in a row) and a mismatched digest ignored (at most one per
    /// `anti_entropy_interval_ms`): the difference is most likely that change, on its way.
    pub quiet_while_fetching: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            fanout: 6,
            anti_entropy_interval_ms: 1_000,
            anti_entropy_jitter_ms: 250,
            batch_bytes: 1 << 20,
            batch_changes: 4_096,
            queue_messages: 256,
            queue_bytes: 8 << 20,
            relay_inline_bytes: 64,
            announce_max: 64,
            eager_first_hop: true,
            pruned_announce_delay_ms: 50,
            relay_pulled_max: 0,
            pull_gap_ms: 200,
            pull_timeout_ms: 2_000,
            max_events: 4_096,
            clocks_page_bytes: 1 << 20,
            relay_skip_holders: true,
            relay_proportional: true,
            ae_prefer_unknown: true,
            quiet_while_fetching: true,
        }
    }
}

/// Something the caller may want to know (logs, metrics, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Changes received from `from` were verified and applied.
    Applied {
        /// The peer they came from.
        from: NodeId,
        /// Documents that changed.
        docs: BTreeSet<String>,
        /// Number of changes applied (including held changes that became applicable).
        count: usize,
    },
    /// Changes received from `from` were refused by the store (or a message did not decode).
    Rejected {
        /// The peer they came from.
        from: NodeId,
        /// Stable reason label ([`crate::RejectReason::label`], or `decode`).
        label: &'static str,
        /// How many changes of that message had this reason.
        count: usize,
    },
    /// This node holds everything `peer` had, as of the last exchange.
    CaughtUp {
        /// The peer.
        peer: NodeId,
    },
}

/// Counters, for metrics and for the simulator's bandwidth report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to the caller by `poll_transmit`.
    pub sent_messages: u64,
    /// Their encoded bytes.
    pub sent_bytes: u64,
    /// Messages received (decoded).
    pub received_messages: u64,
    /// Their encoded bytes.
    pub received_bytes: u64,
    /// Pushes or announcements dropped because a peer's queue was full.
    pub dropped_pushes: u64,
    /// Other messages dropped because a peer's queue was full.
    pub dropped_other: u64,
    /// Received messages that did not decode.
    pub decode_errors: u64,
    /// Changes applied from received messages.
    pub applied: u64,
    /// Received changes already held (not verified again).
    pub duplicates: u64,
    /// Received changes the store refused.
    pub rejected: u64,
    /// Anti-entropy rounds started by this node.
    pub rounds: u64,
    /// Times a former member was sent the proof of its removal (see "Former members" in
    /// [`crate::sync`]).
    pub former_served: u64,
    /// Messages from former members, refused.
    pub refused_former: u64,
}

#[derive(Debug, Default)]
struct Peer {
    up: bool,
    /// A former member: sent only the proof of its removal, its messages refused.
    restricted: bool,
    ready: bool,
    queue: VecDeque<SyncMessage>,
    queued_bytes: usize,
    last_pull: Option<u64>,
}

/// The sync engine of one node. See the module docs.
#[derive(Debug)]
pub struct SyncEngine {
    me: NodeId,
    cfg: Config,
    rng: SplitMix64,
    peers: BTreeMap<NodeId, Peer>,
    /// Round-robin cursor for `poll_transmit`.
    cursor: Option<NodeId>,
    next_round: Option<u64>,
    events: VecDeque<Event>,
    cache: Option<Summary>,
    /// The peer we are pulling changes from, when we give up on it, and the page.
    pulling: Option<Pull>,
    /// Consecutive pulls made only to fetch missing dependencies (bounded by
    /// [`MAX_WANT_ROUNDS`]); reset when nothing waits any more.
    want_rounds: u32,
    /// Hashes of changes already seen waiting (a pull that only brings them again is no
    /// progress). Bounded.
    seen_waiting: HashSet<[u8; 32]>,
    /// Announced changes already asked for: (doc, author) → (seq asked up to, when). Bounded.
    wanted: HashMap<(String, NodeId), (u64, u64)>,
    /// Changes announced by id already fetched: id → when. Bounded.
    fetched: HashMap<ChangeId, u64>,
    /// Peers known to hold a recent change (they pushed or announced it to us): id → (when
    /// first noted, peers). A relay skips them. Bounded; entries expire after an
    /// anti-entropy interval.
    holders: HashMap<ChangeId, (u64, Vec<NodeId>)>,
    /// Changes applied or committed here in the last anti-entropy interval: (when, id).
    /// Bounded.
    recent: VecDeque<(u64, ChangeId)>,
    /// (peer, author): `peer` pruned our eager relays of `author`'s changes. Bounded.
    pruned: HashSet<(NodeId, NodeId)>,
    /// Held announcements for peers that pruned the author (see
    /// [`Config::pruned_announce_delay_ms`]): peer → (when due, ids). At most `announce_max`
    /// ids per peer (then sent at once).
    held: BTreeMap<NodeId, (u64, Vec<ChangeId>)>,
    /// The last round was skipped because a fetch was under way (the next one is not).
    skipped_round: bool,
    /// When a mismatched digest was last ignored because a fetch was under way.
    ignored_digest: Option<u64>,
    stats: Stats,
}

impl SyncEngine {
    /// A new engine for node `me`. `seed` drives every random choice.
    pub fn new(me: NodeId, config: Config, seed: u64) -> SyncEngine {
        SyncEngine {
            me,
            cfg: config,
            rng: SplitMix64::new(seed),
            peers: BTreeMap::new(),
            cursor: None,
            next_round: None,
            events: VecDeque::new(),
            cache: None,
            pulling: None,
            want_rounds: 0,
            seen_waiting: HashSet::new(),
            wanted: HashMap::new(),
            fetched: HashMap::new(),
            holders: HashMap::new(),
            recent: VecDeque::new(),
            skipped_round: false,
            pruned: HashSet::new(),
            held: BTreeMap::new(),
            ignored_digest: None,
            stats: Stats::default(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// The intervals, fan-out and limits this engine was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Peers currently up (former members, which are only sent the proof of their
    /// removal, are not counted).
    pub fn peers_up(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.up && !p.restricted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Messages and bytes queued for `peer`.
    pub fn queued(&self, peer: &NodeId) -> (usize, usize) {
        self.peers
            .get(peer)
            .map(|p| (p.queue.len(), p.queued_bytes))
            .unwrap_or((0, 0))
    }

    /// Forget the cached version vector (call after changing the store behind the engine's
    /// back other than through [`SyncEngine::local_commit`]).
    pub fn invalidate(&mut self) {
        self.cache = None;
    }

    // ------------------------------------------------------------------ inputs

    /// A connection to `peer` is established: start an anti-entropy exchange with it at once.
    pub fn peer_up(
        &mut self,
        now: u64,
        peer: NodeId,
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        if peer == self.me {
            return Ok(());
        }
        let p = self.peers.entry(peer).or_default();
        p.up = true;
        p.restricted = false;
        p.ready = true;
        p.last_pull = None;
        if store.is_former_member(&peer) {
            return self.restrict(peer, store);
        }
        if self.next_round.is_none() {
            self.schedule_round(now);
        }
        let msg = self.short_digest(store)?;
        self.enqueue(peer, msg);
        Ok(())
    }

    /// The connection to `peer` is gone: drop what was queued for it.
    pub fn peer_down(&mut self, _now: u64, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.up = false;
            p.queue.clear();
            p.queued_bytes = 0;
        }
        if self.pulling.as_ref().is_some_and(|p| p.peer == peer) {
            self.pulling = None;
        }
        self.pruned.retain(|(p, _)| *p != peer);
        self.held.remove(&peer);
    }

    /// Flow control: while `ready` is false (the transport to `peer` is backed up),
    /// `poll_transmit` skips `peer` and its bounded queue fills, then drops.
    pub fn set_peer_ready(&mut self, peer: NodeId, ready: bool) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.ready = ready;
        }
    }

    /// Changes committed locally (already durable in `store`): push them to every connected
    /// peer at once.
    pub fn local_commit(
        &mut self,
        now: u64,
        changes: &[SignedChange],
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        self.cache = None;
        if changes.is_empty() {
            return Ok(());
        }
        if changes.iter().any(|c| c.doc == MEMBERSHIP_DOC) {
            self.check_former(store)?;
        }
        let targets = self.peers_up();
        for chunk in self.chunks(changes.to_vec()) {
            let ids: Vec<ChangeId> = chunk
                .iter()
                .filter_map(|c| c.hash())
                .map(|h| change_id(&h))
                .collect();
            for id in &ids {
                self.note_recent(now, *id);
            }
            for t in &targets {
                // A peer whose full queue dropped the push is not counted as holding these:
                // the next anti-entropy round prefers it.
                if self.enqueue(*t, push(chunk.clone())) {
                    for id in &ids {
                        self.note_holder(now, *id, *t);
                    }
                }
            }
        }
        Ok(())
    }

    /// Decode and handle a message received from `from`. Undecodable input is counted and
    /// reported as an event; it is never an error.
    pub fn handle_bytes(
        &mut self,
        now: u64,
        from: NodeId,
        bytes: &[u8],
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        match SyncMessage::decode(bytes) {
            Ok(msg) => self.handle(now, from, msg, store),
            Err(_) => {
                self.stats.decode_errors += 1;
                self.event(Event::Rejected {
                    from,
                    label: "decode",
                    count: 1,
                });
                Ok(())
            }
        }
    }

    /// Handle a message received from `from`.
    pub fn handle(
        &mut self,
        now: u64,
        from: NodeId,
        msg: SyncMessage,
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        self.stats.received_messages += 1;
        self.stats.received_bytes += msg.encoded_len() as u64;
        if from == self.me {
            return Ok(());
        }
        if self.peers.get(&from).is_some_and(|p| p.restricted) {
            self.stats.refused_former += 1;
            self.event(Event::Rejected {
                from,
                label: "former_member",
                count: 1,
            });
            return Ok(());
        }
        match msg {
            SyncMessage::Digest { .. } | SyncMessage::ShortDigest { .. } => {
                let mine = self.summary(store)?.digest;
                let equal = match &msg {
                    SyncMessage::Digest { digest } => *digest == mine,
                    SyncMessage::ShortDigest { nonce, tag } => *tag == short_tag(nonce, &mine),
                    _ => false,
                };
                if equal {
                    self.event(Event::CaughtUp { peer: from });
                } else if self.cfg.quiet_while_fetching
                    && self
                        .ignored_digest
                        .is_none_or(|t| now >= t + self.cfg.anti_entropy_interval_ms)
                    && self.fetching(now, store)?
                {
                    // Gossip is bringing us a change that this digest probably reflects: leave
                    // it to the fetch (at most one digest per interval is ignored this way, so a
                    // steady stream of announcements cannot starve anti-entropy).
                    self.ignored_digest = Some(now);
                } else if self.start_pull(now, from) {
                    // (While pulling from another peer we ignore it: that pull is bringing us
                    // up to date, and the next round will compare again.)
                    self.send_page(from, store, &Pos::default(), true)?;
                }
            }
            SyncMessage::Clocks {
                reply,
                pull,
                range,
                clocks,
                frontiers,
                wants,
            } => {
                let mine = self.summary(store)?;
                if pull {
                    // Always answered, even with nothing, so the puller can move on.
                    let (changes, more) = self.missing(
                        store,
                        &mine,
                        &Theirs {
                            clocks: &clocks,
                            frontiers: &frontiers,
                            range: &range,
                            wants: &wants,
                        },
                    )?;
                    self.enqueue(from, SyncMessage::Changes { more, changes });
                }
                if reply && lacks(&mine, &clocks, &frontiers, &range) && self.start_pull(now, from)
                {
                    self.send_page(from, store, &Pos::default(), false)?;
                }
            }
            SyncMessage::Changes { more, changes } => {
                let n = changes.len();
                let mut outcome = self.ingest(from, changes, store)?;
                if !outcome.applied.is_empty() && n <= self.cfg.relay_pulled_max {
                    // A small catch-up batch is likely news to our other peers too.
                    let applied = std::mem::take(&mut outcome.applied);
                    self.relay(now, from, applied);
                }
                let page = self
                    .pulling
                    .as_ref()
                    .filter(|p| p.peer == from)
                    .map(|p| p.page.clone());
                if more {
                    // Keep pulling this page from this peer until it has nothing more for us.
                    let start = page.map(|p| (p.start, p.start_author)).unwrap_or_default();
                    self.pulling = Some(Pull {
                        peer: from,
                        until: now + self.cfg.pull_timeout_ms,
                        page: DocRange::default(),
                    });
                    self.send_page(from, store, &start, false)?;
                } else if let Some(next) = page
                    .as_ref()
                    .and_then(|p| p.end.clone().map(|e| (e, p.end_author)))
                {
                    // This page is done; on to the next one.
                    if let Some(p) = self.pulling.as_mut() {
                        p.until = now + self.cfg.pull_timeout_ms;
                    }
                    self.send_page(from, store, &next, true)?;
                } else {
                    if page.is_some() {
                        self.pulling = None;
                    }
                    if outcome.waiting == 0 {
                        self.want_rounds = 0;
                        self.event(Event::CaughtUp { peer: from });
                    } else if outcome.progress
                        && self.want_rounds < MAX_WANT_ROUNDS
                        && self.start_pull(now, from)
                    {
                        // Changes wait for dependencies this peer may hold (for instance the
                        // other variant's chain of an equivocation): ask for them by hash.
                        self.want_rounds += 1;
                        self.send_page(from, store, &Pos::default(), false)?;
                    }
                }
            }
            SyncMessage::PushOne { change } => self.pushed(now, from, vec![change], store)?,
            SyncMessage::Push { changes } => self.pushed(now, from, changes, store)?,
            SyncMessage::Have { clocks } => {
                let mine = self.summary(store)?.clocks;
                let wait = self.cfg.pull_gap_ms;
                self.wanted.retain(|_, (_, t)| now < *t + wait);
                let mut want = Clocks::new();
                for (doc, vv) in &clocks {
                    for (author, seq) in vv {
                        let have = seq_of(&mine, doc, author);
                        let key = (doc.clone(), *author);
                        // Already asked another peer for these, recently: wait for its answer.
                        let asked = self.wanted.get(&key).is_some_and(|(s, _)| s >= seq);
                        if have < *seq && !asked {
                            want.entry(doc.clone()).or_default().insert(*author, have);
                            if self.wanted.len() < MAX_WANTED {
                                self.wanted.insert(key, (*seq, now));
                            }
                        }
                    }
                }
                if !want.is_empty() {
                    self.enqueue(from, SyncMessage::Want { clocks: want });
                }
            }
            SyncMessage::Want { clocks } => {
                let (changes, _) = self.wanted_by(store, &clocks)?;
                if !changes.is_empty() {
                    self.enqueue(from, push(changes));
                }
            }
            SyncMessage::Announce { ids } => self.announced(now, from, ids, store)?,
            SyncMessage::AnnounceOne { id } => self.announced(now, from, vec![id], store)?,
            SyncMessage::Prune { id } => {
                if let Some(c) = store.change_by_id(&id)? {
                    if c.author != from {
                        if self.pruned.len() >= MAX_WANTED {
                            self.pruned.clear();
                        }
                        self.pruned.insert((from, c.author));
                    }
                }
            }
            SyncMessage::Fetch { ids } => self.fetch(now, from, &ids, store)?,
            SyncMessage::FetchOne { id } => self.fetch(now, from, &[id], store)?,
        }
        Ok(())
    }

    /// Timers: start an anti-entropy round with one random connected peer when it is due.
    pub fn handle_timeout(&mut self, now: u64, store: &mut impl Replica) -> Result<(), SyncError> {
        self.send_held(now, false);
        let Some(due) = self.next_round else {
            return Ok(());
        };
        if now < due {
            return Ok(());
        }
        self.schedule_round(now);
        let up = self.peers_up();
        if up.is_empty() {
            return Ok(());
        }
        let peer = self.round_peer(now, &up);
        if self.cfg.quiet_while_fetching && !self.skipped_round && self.fetching(now, store)? {
            // A fetch under way: the round would most likely chase the same change. Skipped,
            // but never twice in a row.
            self.skipped_round = true;
            return Ok(());
        }
        self.skipped_round = false;
        let msg = self.short_digest(store)?;
        self.stats.rounds += 1;
        self.enqueue(peer, msg);
        Ok(())
    }

    // ------------------------------------------------------------------ outputs

    /// The next message to send, taken from the peers' queues in turn. Peers marked not
    /// ready are skipped.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, SyncMessage)> {
        let ids: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ready && !p.queue.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        let start = match self.cursor {
            Some(c) => ids.iter().position(|id| *id > c).unwrap_or(0),
            None => 0,
        };
        let id = ids[start];
        self.cursor = Some(id);
        self.poll_transmit_to(&id).map(|m| (id, m))
    }

    /// The next message queued for `peer` (whether or not it is marked ready).
    pub fn poll_transmit_to(&mut self, peer: &NodeId) -> Option<SyncMessage> {
        let p = self.peers.get_mut(peer)?;
        let msg = p.queue.pop_front()?;
        let len = msg.encoded_len();
        p.queued_bytes -= len;
        self.stats.sent_messages += 1;
        self.stats.sent_bytes += len as u64;
        Some(msg)
    }

    /// When [`SyncEngine::handle_timeout`] should next be called (ms, same epoch as `now`).
    pub fn poll_timeout(&self) -> Option<u64> {
        let held = self.held.values().map(|(due, _)| *due).min();
        match (self.next_round, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------------ internals

    fn schedule_round(&mut self, now: u64) {
        let base = self.cfg.anti_entropy_interval_ms.max(1);
        let j = self.cfg.anti_entropy_jitter_ms.min(base - 1);
        self.next_round = Some(now + self.rng.range(base - j, base + j));
    }

    fn event(&mut self, e: Event) {
        if self.events.len() >= self.cfg.max_events {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Re-judge which connected peers are former members (the membership changed): a peer
    /// that just became one is restricted and sent the proof; one that is a member again
    /// (its removal turned out void) is served normally again.
    pub(super) fn check_former(&mut self, store: &mut impl Replica) -> Result<(), SyncError> {
        let up: Vec<(NodeId, bool)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up)
            .map(|(id, p)| (*id, p.restricted))
            .collect();
        for (id, was) in up {
            let former = store.is_former_member(&id);
            if former && !was {
                self.restrict(id, store)?;
            } else if was && !former {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.restricted = false;
                }
                let msg = self.short_digest(store)?;
                self.enqueue(id, msg);
            }
        }
        Ok(())
    }

    /// `peer` is a former member: drop what was queued for it, stop pulling from it, and
    /// send it every valid membership change (the proof of its removal).
    fn restrict(&mut self, peer: NodeId, store: &mut impl Replica) -> Result<(), SyncError> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        p.restricted = true;
        p.queue.clear();
        p.queued_bytes = 0;
        if self.pulling.as_ref().is_some_and(|p| p.peer == peer) {
            self.pulling = None;
        }
        self.pruned.retain(|(p, _)| *p != peer);
        self.held.remove(&peer);
        let proof = store.membership_changes()?;
        for chunk in self.chunks(proof) {
            self.enqueue_any(peer, push(chunk), true);
        }
        self.stats.former_served += 1;
        Ok(())
    }

    /// Queue `msg` for `peer`; `false` if it was dropped (peer down or a former member, or
    /// its queue full).
    fn enqueue(&mut self, peer: NodeId, msg: SyncMessage) -> bool {
        self.enqueue_any(peer, msg, false)
    }

    /// [`SyncEngine::enqueue`]; with `proof`, also to a former member (its removal's proof).
    fn enqueue_any(&mut self, peer: NodeId, msg: SyncMessage, proof: bool) -> bool {
        let len = msg.encoded_len();
        let (qm, qb) = (self.cfg.queue_messages, self.cfg.queue_bytes);
        let Some(p) = self
            .peers
            .get_mut(&peer)
            .filter(|p| p.up && (proof || !p.restricted))
        else {
            return false;
        };
        if !p.queue.is_empty() && (p.queue.len() >= qm || p.queued_bytes + len > qb) {
            if matches!(
                msg,
                SyncMessage::Push { .. }
                    | SyncMessage::PushOne { .. }
                    | SyncMessage::Have { .. }
                    | SyncMessage::Announce { .. }
                    | SyncMessage::AnnounceOne { .. }
            ) {
                self.stats.dropped_pushes += 1;
            } else {
                self.stats.dropped_other += 1;
            }
            return false;
        }
        p.queued_bytes += len;
        p.queue.push_back(msg);
        true
    }
}

/// Bound on each of the engine's small memories: outstanding `Want`s, announced changes
/// fetched, ids announced at once, holders, prunes and changes seen waiting (older entries
/// expire or are dropped).
const MAX_WANTED: usize = 4_096;
/// Most consecutive pulls made only to fetch missing dependencies.
const MAX_WANT_ROUNDS: u32 = 64;
