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

use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use super::rng::SplitMix64;
use super::wire::{
    change_id, clocks_entry_len, frontier_entry_len, ChangeId, Clocks, DocRange, Frontiers,
    SyncMessage, VersionVector, AUTHOR_ENTRY,
};
use super::{clocks_digest, Replica, SyncError};
use crate::identity::NodeId;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};
use crate::store::Outcome;

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
    /// abandoned (the peer may be gone) and another peer may be asked.
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
}

#[derive(Debug, Default)]
struct Peer {
    up: bool,
    ready: bool,
    queue: VecDeque<SyncMessage>,
    queued_bytes: usize,
    last_pull: Option<u64>,
}

/// The store's version vectors, frontiers and their digest, cached until the store changes.
#[derive(Debug, Clone)]
struct Summary {
    clocks: Clocks,
    frontiers: Frontiers,
    digest: [u8; 32],
}

/// A pull under way: from whom, until when, and which page of our clocks it is at.
#[derive(Debug, Clone)]
struct Pull {
    peer: NodeId,
    until: u64,
    page: DocRange,
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

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Peers currently up.
    pub fn peers_up(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.up)
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
        p.ready = true;
        p.last_pull = None;
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
        let _ = &*store;
        self.cache = None;
        if changes.is_empty() {
            return Ok(());
        }
        let targets = self.peers_up();
        for c in changes {
            if let Some(h) = c.hash() {
                self.note_recent(now, change_id(&h));
                for t in &targets {
                    self.note_holder(now, change_id(&h), *t);
                }
            }
        }
        for chunk in self.chunks(changes.to_vec()) {
            for t in &targets {
                self.enqueue(*t, push(chunk.clone()));
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

    /// `from` pushed changes: apply them, relay the new ones, pull what they wait for.
    fn pushed(
        &mut self,
        now: u64,
        from: NodeId,
        changes: Vec<SignedChange>,
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        // A full relay (not from the changes' author, not asked for) that brings nothing new:
        // tell the relayer to announce this author's changes to us instead.
        let n = changes.len();
        let mut prune = None;
        for c in &changes {
            if let Some(h) = c.hash() {
                let id = change_id(&h);
                self.note_holder(now, id, from);
                if c.author != from && !self.fetched.contains_key(&id) {
                    prune = Some(id);
                }
            }
        }
        let outcome = self.ingest(from, changes, store)?;
        if let Some(id) = prune {
            if n > 0 && outcome.duplicates == n {
                self.enqueue(from, SyncMessage::Prune { id });
            }
        }
        if !outcome.applied.is_empty() {
            self.relay(now, from, outcome.applied);
        }
        if outcome.waiting > 0 {
            self.pull(now, from, store)?;
        }
        Ok(())
    }

    /// `from` announced changes by id: fetch those we lack and nobody else is fetching.
    fn announced(
        &mut self,
        now: u64,
        from: NodeId,
        ids: Vec<ChangeId>,
        store: &impl Replica,
    ) -> Result<(), SyncError> {
        let wait = self.cfg.pull_gap_ms;
        self.fetched.retain(|_, t| now < *t + wait);
        let mut want = Vec::new();
        for id in ids.into_iter().take(MAX_WANTED) {
            self.note_holder(now, id, from);
            // Asked another announcer recently: wait for its answer.
            if self.fetched.contains_key(&id) || store.holds_id(&id)? {
                continue;
            }
            if self.fetched.len() < MAX_WANTED {
                self.fetched.insert(id, now);
            }
            want.push(id);
        }
        if let [id] = want.as_slice() {
            self.enqueue(from, SyncMessage::FetchOne { id: *id });
        } else if !want.is_empty() {
            self.enqueue(from, SyncMessage::Fetch { ids: want });
        }
        Ok(())
    }

    /// `from` asked for changes by id: push those we hold.
    fn fetch(
        &mut self,
        now: u64,
        from: NodeId,
        ids: &[ChangeId],
        store: &impl Replica,
    ) -> Result<(), SyncError> {
        let mut changes = Vec::new();
        for id in ids.iter().take(self.cfg.batch_changes) {
            let c = store.change_by_id(id)?;
            if c.is_some() {
                self.note_holder(now, *id, from);
            }
            changes.extend(c);
        }
        for chunk in self.chunks(changes) {
            self.enqueue(from, push(chunk));
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

    /// A `ShortDigest` of our state with a fresh nonce.
    fn short_digest(&mut self, store: &impl Replica) -> Result<SyncMessage, SyncError> {
        let digest = self.summary(store)?.digest;
        let nonce = (self.rng.next_u64() as u32).to_be_bytes();
        Ok(SyncMessage::ShortDigest {
            nonce,
            tag: short_tag(&nonce, &digest),
        })
    }

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

    fn enqueue(&mut self, peer: NodeId, msg: SyncMessage) {
        let len = msg.encoded_len();
        let (qm, qb) = (self.cfg.queue_messages, self.cfg.queue_bytes);
        let Some(p) = self.peers.get_mut(&peer).filter(|p| p.up) else {
            return;
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
            return;
        }
        p.queued_bytes += len;
        p.queue.push_back(msg);
    }

    /// The store's version vectors, frontiers and digest, cached until the store changes.
    fn summary(&mut self, store: &impl Replica) -> Result<Summary, SyncError> {
        if let Some(c) = &self.cache {
            return Ok(c.clone());
        }
        let clocks = store.clocks()?;
        let frontiers = store.frontiers()?;
        let digest = clocks_digest(&clocks, &frontiers);
        let sum = Summary {
            clocks,
            frontiers,
            digest,
        };
        self.cache = Some(sum.clone());
        Ok(sum)
    }

    /// Send `peer` the page of our clocks that starts at position `start` (with our missing
    /// dependencies), asking for what we lack in it; remember the page if we are pulling
    /// from `peer`.
    fn send_page(
        &mut self,
        peer: NodeId,
        store: &impl Replica,
        start: &Pos,
        reply: bool,
    ) -> Result<(), SyncError> {
        let sum = self.summary(store)?;
        let (range, clocks, frontiers) = page(&sum, start, self.cfg.clocks_page_bytes);
        let wants = store.wanted(MAX_WANTS)?;
        if let Some(p) = self.pulling.as_mut().filter(|p| p.peer == peer) {
            p.page = range.clone();
        }
        self.enqueue(
            peer,
            SyncMessage::Clocks {
                reply,
                pull: true,
                range,
                clocks,
                frontiers,
                wants,
            },
        );
        Ok(())
    }

    /// Ask `peer` for what we lack (its answer is a `Changes` batch), at most once per gap.
    fn pull(&mut self, now: u64, peer: NodeId, store: &impl Replica) -> Result<(), SyncError> {
        let gap = self.cfg.pull_gap_ms;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        if p.last_pull.is_some_and(|t| now < t + gap) {
            return Ok(());
        }
        p.last_pull = Some(now);
        if !self.start_pull(now, peer) {
            return Ok(());
        }
        self.send_page(peer, store, &Pos::default(), false)
    }

    /// Start pulling from `peer` unless a pull is still in progress: at most one peer sends
    /// us a bulk transfer at a time, so after a partition heals a node receives what it lacks
    /// once, not once per neighbour.
    fn start_pull(&mut self, now: u64, peer: NodeId) -> bool {
        match &self.pulling {
            Some(p) if now < p.until => false,
            _ => {
                self.pulling = Some(Pull {
                    peer,
                    until: now + self.cfg.pull_timeout_ms,
                    page: DocRange::default(),
                });
                true
            }
        }
    }

    /// Split changes into messages within the batch limits.
    fn chunks(&self, changes: Vec<SignedChange>) -> Vec<Vec<SignedChange>> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut bytes = 0;
        for c in changes {
            let len = c.encoded_len();
            if !cur.is_empty()
                && (bytes + len > self.cfg.batch_bytes || cur.len() >= self.cfg.batch_changes)
            {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += len;
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Whether a change announced to us was fetched less than `pull_gap_ms` ago and has not
    /// arrived yet.
    fn fetching(&self, now: u64, store: &impl Replica) -> Result<bool, SyncError> {
        for (id, t) in &self.fetched {
            if now < *t + self.cfg.pull_gap_ms && !store.holds_id(id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The peer of a periodic round: a random one among those not known to hold every change
    /// applied here in the last interval (they may have been missed by gossip; the others
    /// almost surely hold the same as we do), else a random one.
    fn round_peer(&mut self, now: u64, up: &[NodeId]) -> NodeId {
        let ttl = self.cfg.anti_entropy_interval_ms + self.cfg.anti_entropy_jitter_ms;
        while self.recent.front().is_some_and(|(t, _)| now >= *t + ttl) {
            self.recent.pop_front();
        }
        if self.cfg.ae_prefer_unknown && !self.recent.is_empty() {
            let unknown: Vec<NodeId> = up
                .iter()
                .filter(|p| {
                    !self.recent.iter().all(|(_, id)| {
                        self.holders
                            .get(id)
                            .is_some_and(|(_, peers)| peers.contains(p))
                    })
                })
                .copied()
                .collect();
            if !unknown.is_empty() {
                return unknown[self.rng.below(unknown.len() as u64) as usize];
            }
        }
        up[self.rng.below(up.len() as u64) as usize]
    }

    /// Remember that `id` was applied or committed here at `now`.
    fn note_recent(&mut self, now: u64, id: ChangeId) {
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((now, id));
    }

    /// Remember that `peer` holds the change `id` (it pushed or announced it to us).
    fn note_holder(&mut self, now: u64, id: ChangeId, peer: NodeId) {
        if !self.holders.contains_key(&id) && self.holders.len() >= MAX_WANTED {
            let ttl = self.cfg.anti_entropy_interval_ms;
            self.holders.retain(|_, (t, _)| now < *t + ttl);
            if self.holders.len() >= MAX_WANTED {
                self.holders.clear();
            }
        }
        let (_, peers) = self.holders.entry(id).or_insert((now, Vec::new()));
        if !peers.contains(&peer) && peers.len() < MAX_HOLDERS {
            peers.push(peer);
        }
    }

    /// Send the held announcements that are due (all that are full or due with `full`):
    /// one `Announce` per peer, without the ids the peer is known to hold by now.
    fn send_held(&mut self, now: u64, full: bool) {
        let max = self.cfg.announce_max;
        let due: Vec<NodeId> = self
            .held
            .iter()
            .filter(|(_, (t, ids))| now >= *t || (full && ids.len() >= max))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some((_, mut ids)) = self.held.remove(&peer) else {
                continue;
            };
            ids.sort_unstable();
            ids.dedup();
            ids.retain(|id| {
                !self
                    .holders
                    .get(id)
                    .is_some_and(|(_, peers)| peers.contains(&peer))
            });
            for chunk in ids.chunks(max.max(1)) {
                self.enqueue(peer, announce(chunk));
            }
        }
    }

    /// Relay newly applied changes to `fanout` random peers other than the sender and other
    /// than those known to hold them all already (they pushed or announced them to us).
    fn relay(&mut self, now: u64, from: NodeId, applied: Vec<SignedChange>) {
        let ids: Vec<ChangeId> = applied
            .iter()
            .filter_map(|c| c.hash().map(|h| change_id(&h)))
            .collect();
        for id in &ids {
            self.note_recent(now, *id);
        }
        let holds_all = |peer: &NodeId| {
            !ids.is_empty()
                && ids.iter().all(|id| {
                    self.holders
                        .get(id)
                        .is_some_and(|(_, peers)| peers.contains(peer))
                })
        };
        let all = self
            .peers
            .iter()
            .filter(|(id, p)| p.up && **id != from)
            .count();
        let others: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.up && **id != from && !(self.cfg.relay_skip_holders && holds_all(id))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut fanout = self.cfg.fanout;
        if self.cfg.relay_proportional && all > 0 {
            // Each peer not known to hold the changes is picked with the same probability
            // as without that knowledge (fanout / others): same coverage, fewer messages.
            let scaled = fanout * others.len();
            fanout = scaled / all + usize::from(self.rng.below(all as u64) < (scaled % all) as u64);
        }
        let mut targets = self.rng.choose(&others, fanout);
        // A change pushed by its own author is on its first relay: few nodes hold it yet, so
        // pushing it in full costs few duplicates and saves two message delays.
        let first_hop = applied.iter().all(|c| c.author == from);
        // In a mesh where the author pushes to everyone, the announcements to peers that
        // pruned the author are insurance: hold and batch them (see
        // `Config::pruned_announce_delay_ms`).
        if first_hop
            && self.cfg.eager_first_hop
            && self.cfg.pruned_announce_delay_ms > 0
            && all < self.cfg.fanout
            && !self.pruned.is_empty()
        {
            let delay = self.cfg.pruned_announce_delay_ms;
            let mut full = false;
            targets.retain(|t| {
                if !self.pruned.contains(&(*t, from)) {
                    return true;
                }
                let (_, held) = self.held.entry(*t).or_insert((now + delay, Vec::new()));
                held.extend(ids.iter().copied());
                full |= held.len() >= self.cfg.announce_max;
                false
            });
            if full {
                self.send_held(now, true);
            }
        }
        if targets.is_empty() {
            return;
        }
        for id in &ids {
            for t in &targets {
                self.note_holder(now, *id, *t);
            }
        }
        let bytes: usize = applied.iter().map(SignedChange::encoded_len).sum();
        let (eager, targets): (Vec<NodeId>, Vec<NodeId>) = if bytes <= self.cfg.relay_inline_bytes {
            (targets, Vec::new())
        } else if first_hop && self.cfg.eager_first_hop && bytes <= self.cfg.batch_bytes {
            // Peers that pruned this author (they hold its changes first-hand) get announcements.
            targets
                .into_iter()
                .partition(|t| !self.pruned.contains(&(*t, from)))
        } else {
            (Vec::new(), targets)
        };
        if !eager.is_empty() {
            for chunk in self.chunks(applied.clone()) {
                for t in &eager {
                    self.enqueue(*t, push(chunk.clone()));
                }
            }
        }
        if targets.is_empty() {
            return;
        }
        if applied.len() <= self.cfg.announce_max {
            let mut ids = ids;
            ids.sort_unstable();
            ids.dedup();
            for t in targets {
                self.enqueue(t, announce(&ids));
            }
        } else {
            let mut have = Clocks::new();
            for c in &applied {
                if let Ok(h) = crate::header::parse(&c.bytes) {
                    let e = have
                        .entry(c.doc.clone())
                        .or_default()
                        .entry(c.author)
                        .or_insert(0);
                    *e = (*e).max(h.seq);
                }
            }
            for t in targets {
                self.enqueue(
                    t,
                    SyncMessage::Have {
                        clocks: have.clone(),
                    },
                );
            }
        }
    }

    /// Give received changes to the store: drop those already held (so duplicates cost no
    /// signature check), ingest the rest, report.
    fn ingest(
        &mut self,
        from: NodeId,
        changes: Vec<SignedChange>,
        store: &mut impl Replica,
    ) -> Result<Ingested, SyncError> {
        let mut fresh = Vec::with_capacity(changes.len());
        let mut seen = HashSet::new();
        let mut dups = 0;
        for c in changes {
            if let Ok(h) = crate::header::parse(&c.bytes) {
                if !seen.insert(h.hash) || store.contains(&h.hash)? {
                    self.stats.duplicates += 1;
                    dups += 1;
                    continue;
                }
            }
            fresh.push(c);
        }
        if fresh.is_empty() {
            return Ok(Ingested {
                duplicates: dups,
                ..Ingested::default()
            });
        }
        let mut by_hash: BTreeMap<[u8; 32], SignedChange> = BTreeMap::new();
        for c in &fresh {
            if let Ok(h) = crate::header::parse(&c.bytes) {
                by_hash.insert(h.hash, c.clone());
            }
        }
        let report = store.ingest(fresh)?;
        let mut out = Ingested {
            duplicates: dups,
            ..Ingested::default()
        };
        let mut rejected: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (_, _, hash, o) in &report.outcomes {
            match o {
                Outcome::Applied => {
                    let Some(h) = hash else { continue };
                    let c = match by_hash.remove(h) {
                        Some(c) => Some(c),
                        None => store.get_change(h)?,
                    };
                    out.applied.extend(c);
                }
                Outcome::Duplicate => {
                    self.stats.duplicates += 1;
                    out.duplicates += 1;
                }
                Outcome::Pending(_) => {
                    out.waiting += 1;
                    if let Some(h) = hash {
                        if self.seen_waiting.len() >= MAX_WANTED {
                            self.seen_waiting.clear();
                        }
                        out.progress |= self.seen_waiting.insert(*h);
                    }
                }
                Outcome::Rejected(r) => *rejected.entry(r.label()).or_default() += 1,
            }
        }
        out.progress |= !out.applied.is_empty()
            || !report.voided.is_empty()
            || !report.revived.is_empty()
            || report.membership_changed;
        if out.progress || !report.changed_docs.is_empty() {
            self.cache = None;
        }
        if !out.applied.is_empty() {
            // Membership first, then in the order applied: relaying keeps dependencies ahead.
            out.applied.sort_by_key(|c| c.doc != MEMBERSHIP_DOC);
            self.stats.applied += out.applied.len() as u64;
            self.event(Event::Applied {
                from,
                docs: report.changed_docs.clone(),
                count: out.applied.len(),
            });
        }
        for (label, count) in rejected {
            self.stats.rejected += count as u64;
            self.event(Event::Rejected { from, label, count });
        }
        Ok(out)
    }

    /// Answer to `Want`: the changes after the given seqs, for exactly the listed
    /// (document, author) pairs.
    fn wanted_by(
        &mut self,
        store: &impl Replica,
        clocks: &Clocks,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        let mine = self.summary(store)?;
        let none = Frontiers::new();
        let all = DocRange::all();
        let theirs = Theirs {
            clocks,
            frontiers: &none,
            range: &all,
            wants: &[],
        };
        self.collect(store, &mine, &theirs, true)
    }

    /// The changes a peer lacks, given one page of its clocks, within the batch limits:
    /// first the dependencies it asked for by hash, the proof of forks it does not know, and
    /// our heads of documents where our version vectors agree but our heads do not (variants
    /// of one seq); then, by version vector, membership first and each document in causal
    /// order. Returns the batch and whether more was left out.
    fn missing(
        &self,
        store: &impl Replica,
        mine: &Summary,
        theirs: &Theirs<'_>,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        self.collect(store, mine, theirs, false)
    }

    /// See [`SyncEngine::missing`]; with `partial` (a `Want`), only the listed
    /// (document, author) pairs count and nothing else is added.
    fn collect(
        &self,
        store: &impl Replica,
        sum: &Summary,
        theirs: &Theirs<'_>,
        partial: bool,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        let mine = &sum.clocks;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let limit = self.cfg.batch_changes.max(1);
        let mut sent: HashSet<[u8; 32]> = HashSet::new();
        if !partial {
            let mut extra = Vec::new();
            for h in theirs.wants.iter().take(MAX_WANTS) {
                extra.extend(store.get_any(h)?);
            }
            for (doc, f) in sum
                .frontiers
                .iter()
                .filter(|(d, _)| theirs.range.contains(d))
            {
                let their_f = theirs.frontiers.get(doc);
                for (author, seq) in &f.forks {
                    if their_f.and_then(|t| t.forks.get(author)) != Some(seq) {
                        extra.extend(store.fork_evidence(doc, author)?);
                    }
                }
                let their_heads = their_f.map(|t| t.heads.as_slice()).unwrap_or(&[]);
                let same_vv = if theirs.range.covers(doc) {
                    theirs.clocks.get(doc).is_some() && theirs.clocks.get(doc) == mine.get(doc)
                } else {
                    // This page holds only part of the document's version vector: compare
                    // that part (equal whole vectors are equal in every part, so no fork is
                    // missed; an unequal rest costs at most a few heads sent twice).
                    same_in_range(mine.get(doc), theirs.clocks.get(doc), doc, theirs.range)
                };
                if same_vv && their_heads != f.heads.as_slice() {
                    for h in &f.heads {
                        if their_heads.binary_search(h).is_err() {
                            extra.extend(store.get_change(h)?);
                        }
                    }
                }
            }
            for c in extra {
                if let Some(h) = c.hash() {
                    if sent.insert(h) {
                        bytes += c.encoded_len();
                        out.push(c);
                    }
                }
            }
        }
        let docs = mine
            .keys()
            .filter(|d| d.as_str() == MEMBERSHIP_DOC)
            .chain(mine.keys().filter(|d| d.as_str() != MEMBERSHIP_DOC))
            .filter(|d| theirs.range.touches(d));
        for doc in docs {
            let vv = &mine[doc];
            let their_vv = theirs.clocks.get(doc);
            if partial && their_vv.is_none() {
                continue;
            }
            // (start_op, change) for every change of this document they lack.
            let mut fetched: Vec<(u64, SignedChange)> = Vec::new();
            // Lowest last start_op among authors whose list was cut by the limit.
            let mut horizon = u64::MAX;
            let whole = theirs.range.covers(doc);
            for (author, seq) in vv {
                if !whole && !theirs.range.contains_entry(doc, author) {
                    continue;
                }
                let theirs_seq = match their_vv.and_then(|v| v.get(author)) {
                    Some(s) => *s,
                    None if partial => continue,
                    None => 0,
                };
                if *seq <= theirs_seq {
                    continue;
                }
                let room = limit.saturating_sub(out.len()).max(1);
                let list = store.changes_after(doc, author, theirs_seq, room)?;
                let cut = list.len() >= room && (*seq - theirs_seq) as usize > list.len();
                let mut last = 0;
                for c in list {
                    let Ok(h) = crate::header::parse(&c.bytes) else {
                        continue;
                    };
                    last = h.start_op;
                    if !sent.contains(&h.hash) {
                        fetched.push((h.start_op, c));
                    }
                }
                if cut {
                    horizon = horizon.min(last);
                }
            }
            // start_op exceeds the start_op of every dependency, so this order is causal.
            fetched.sort_by_key(|a| a.0);
            let mut complete = horizon == u64::MAX;
            for (start_op, c) in fetched {
                if start_op > horizon {
                    break;
                }
                let len = c.encoded_len();
                if !out.is_empty() && (bytes + len > self.cfg.batch_bytes || out.len() >= limit) {
                    return Ok((out, true));
                }
                bytes += len;
                out.push(c);
            }
            if out.len() >= limit {
                complete = false;
            }
            if !complete {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }
}

/// One page of a peer's clocks, as received.
struct Theirs<'a> {
    clocks: &'a Clocks,
    frontiers: &'a Frontiers,
    range: &'a DocRange,
    wants: &'a [[u8; 32]],
}

/// A position in a node's clocks where a page starts or ends: a document, and an author
/// within it (`None`: the document itself, before its first author; see [`DocRange`]).
type Pos = (String, Option<NodeId>);

/// The page of `sum` starting at position `start`: as many clock entries and frontiers as fit
/// in about `max_bytes` (at least one), cut between documents or, within a document with
/// more authors than fit, between two authors.
fn page(sum: &Summary, start: &Pos, max_bytes: usize) -> (DocRange, Clocks, Frontiers) {
    let (start_doc, start_author) = start;
    let docs: BTreeSet<&String> = sum
        .clocks
        .keys()
        .chain(sum.frontiers.keys())
        .filter(|d| d.as_str() >= start_doc.as_str())
        .collect();
    let mut clocks = Clocks::new();
    let mut frontiers = Frontiers::new();
    let mut bytes = 0usize;
    let mut end: Option<Pos> = None;
    'docs: for doc in docs {
        // Where this document starts in the page: itself, or (the page's first document
        // only) an author of it.
        let from = if doc == start_doc {
            start_author.as_ref()
        } else {
            None
        };
        if from.is_none() {
            let vv_head = if sum.clocks.contains_key(doc) {
                clocks_entry_len(doc, &VersionVector::new())
            } else {
                0
            };
            let f = sum.frontiers.get(doc);
            let len = vv_head + f.map_or(0, |f| frontier_entry_len(doc, f));
            if bytes > 0 && bytes + len > max_bytes {
                end = Some((doc.clone(), None));
                break;
            }
            bytes += len;
            if let Some(f) = f {
                frontiers.insert(doc.clone(), f.clone());
            }
            if let Some(v) = sum.clocks.get(doc) {
                if v.is_empty() {
                    clocks.insert(doc.clone(), VersionVector::new());
                }
            }
        } else {
            // The document's entry header again, in this page.
            bytes += clocks_entry_len(doc, &VersionVector::new());
        }
        let Some(vv) = sum.clocks.get(doc) else {
            continue;
        };
        let authors = match from {
            Some(a) => vv.range(*a..),
            None => vv.range(..),
        };
        for (author, seq) in authors {
            if bytes > 0 && bytes + AUTHOR_ENTRY > max_bytes {
                end = Some((doc.clone(), Some(*author)));
                break 'docs;
            }
            bytes += AUTHOR_ENTRY;
            clocks.entry(doc.clone()).or_default().insert(*author, *seq);
        }
    }
    let range = DocRange {
        start: start_doc.clone(),
        start_author: *start_author,
        end: end.as_ref().map(|e| e.0.clone()),
        end_author: end.and_then(|e| e.1),
    };
    (range, clocks, frontiers)
}

/// Whether `mine` and `theirs` agree on every entry of `doc` that `range` holds.
fn same_in_range(
    mine: Option<&VersionVector>,
    theirs: Option<&VersionVector>,
    doc: &str,
    range: &DocRange,
) -> bool {
    let part = |v: Option<&VersionVector>| {
        v.into_iter()
            .flatten()
            .filter(|(a, _)| range.contains_entry(doc, a))
            .map(|(a, s)| (*a, *s))
            .collect::<Vec<_>>()
    };
    part(mine) == part(theirs)
}

/// Most outstanding `Want` entries remembered (older ones expire after `pull_gap_ms`).
const MAX_WANTED: usize = 4_096;
/// Most missing-dependency hashes sent with one `Clocks`, or served from one.
const MAX_WANTS: usize = 64;
/// `Push` of `changes`, as `PushOne` when there is one.
fn push(mut changes: Vec<SignedChange>) -> SyncMessage {
    match changes.pop() {
        Some(change) if changes.is_empty() => SyncMessage::PushOne { change },
        Some(last) => {
            changes.push(last);
            SyncMessage::Push { changes }
        }
        None => SyncMessage::Push { changes },
    }
}

/// The announcement of `ids`: `AnnounceOne` for one, `Announce` for more.
fn announce(ids: &[ChangeId]) -> SyncMessage {
    match ids {
        [id] => SyncMessage::AnnounceOne { id: *id },
        _ => SyncMessage::Announce { ids: ids.to_vec() },
    }
}

/// The tag of `ShortDigest`: SHA-256(nonce ‖ digest), first 6 bytes (see the message's docs).
fn short_tag(nonce: &[u8; 4], d: &[u8; 32]) -> [u8; 6] {
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(d);
    let full = h.finalize();
    let mut s = [0; 6];
    s.copy_from_slice(&full[..6]);
    s
}

/// Most recently applied changes remembered for choosing the peer of a round.
const MAX_RECENT: usize = 64;
/// Most holders remembered per change.
const MAX_HOLDERS: usize = 32;
/// Most consecutive pulls made only to fetch missing dependencies.
const MAX_WANT_ROUNDS: u32 = 64;

#[derive(Default)]
struct Ingested {
    /// Changes already held (not verified again).
    duplicates: usize,
    /// Newly applied changes (for relaying).
    applied: Vec<SignedChange>,
    /// Changes held in the pending set (their dependencies or author are not known yet).
    waiting: usize,
    /// Something changed in the store (applied, voided, revived, or a change newly waiting).
    progress: bool,
}

fn seq_of(clocks: &Clocks, doc: &str, author: &NodeId) -> u64 {
    clocks
        .get(doc)
        .and_then(|v| v.get(author))
        .copied()
        .unwrap_or(0)
}

/// Whether `mine` lacks something a page of a peer's clocks shows: a higher seq, a fork we
/// have not flagged, or other heads for the same version vector.
fn lacks(mine: &Summary, theirs: &Clocks, their_f: &Frontiers, range: &DocRange) -> bool {
    let higher = theirs
        .iter()
        .any(|(doc, vv)| vv.iter().any(|(a, s)| *s > seq_of(&mine.clocks, doc, a)));
    let fork = their_f.iter().any(|(doc, f)| {
        f.forks
            .iter()
            .any(|(a, s)| mine.frontiers.get(doc).and_then(|m| m.forks.get(a)) != Some(s))
    });
    let heads = theirs
        .keys()
        .chain(their_f.keys())
        .filter(|doc| range.contains(doc))
        .any(|doc| {
            let same = if range.covers(doc) {
                theirs.get(doc).is_some() && mine.clocks.get(doc) == theirs.get(doc)
            } else {
                same_in_range(mine.clocks.get(doc), theirs.get(doc), doc, range)
            };
            same && mine.frontiers.get(doc).map(|f| &f.heads) != their_f.get(doc).map(|f| &f.heads)
        });
    higher || fork || heads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StoreError;
    use crate::store::IngestReport;

    /// A replica with fixed clocks and no changes: enough to drive the control flow.
    #[derive(Default)]
    struct Fake {
        clocks: Clocks,
        ingested: usize,
    }

    impl Replica for Fake {
        fn clocks(&self) -> Result<Clocks, StoreError> {
            Ok(self.clocks.clone())
        }
        fn changes_after(
            &self,
            _: &str,
            _: &NodeId,
            _: u64,
            _: usize,
        ) -> Result<Vec<SignedChange>, StoreError> {
            Ok(Vec::new())
        }
        fn get_change(&self, _: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
            Ok(None)
        }
        fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
            self.ingested += batch.len();
            Ok(IngestReport::default())
        }
    }

    fn change(i: u8) -> SignedChange {
        SignedChange {
            doc: "app/x".into(),
            author: NodeId([i; 32]),
            sig: [0; 64],
            bytes: vec![i; 100],
        }
    }

    fn drain(e: &mut SyncEngine) -> Vec<(NodeId, SyncMessage)> {
        std::iter::from_fn(|| e.poll_transmit()).collect()
    }

    #[test]
    fn a_stalled_peers_queue_is_bounded_and_drops_are_counted() {
        let cfg = Config {
            queue_messages: 2,
            ..Config::default()
        };
        let (me, slow, fast) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let mut e = SyncEngine::new(me, cfg, 7);
        let mut r = Fake::default();
        e.peer_up(0, slow, &mut r).unwrap();
        e.peer_up(0, fast, &mut r).unwrap();
        e.set_peer_ready(slow, false);
        for i in 0..5 {
            e.local_commit(i, &[change(i as u8)], &mut r).unwrap();
            // The fast peer's queue is drained as it goes; the slow one's is not.
            assert!(drain(&mut e).iter().all(|(p, _)| *p == fast));
        }
        assert_eq!(e.queued(&slow).0, 2);
        // Digest + 1 push fit; 4 pushes were dropped for the slow peer only.
        assert_eq!(e.stats().dropped_pushes, 4);
        e.set_peer_ready(slow, true);
        assert_eq!(drain(&mut e).len(), 2);
        // A peer that goes down loses its queue.
        e.local_commit(9, &[change(9)], &mut r).unwrap();
        e.peer_down(9, slow);
        assert_eq!(e.queued(&slow), (0, 0));
    }

    #[test]
    fn large_clocks_are_sent_in_pages_under_the_message_limit() {
        // 300 documents × 1,000 authors: 300,000 entries, ~12 MB as one clock list.
        let mut clocks = Clocks::new();
        for d in 0..300u32 {
            let vv: super::super::VersionVector = (0..1_000u32)
                .map(|a| {
                    let mut id = [0u8; 32];
                    id[..4].copy_from_slice(&a.to_be_bytes());
                    (NodeId(id), u64::from(a) + 1)
                })
                .collect();
            clocks.insert(format!("app/d{d:03}"), vv);
        }
        let mut frontiers = Frontiers::new();
        frontiers.insert("app/d007".into(), Default::default());
        frontiers.entry("app/d007".into()).or_default().heads = vec![[9; 32]];
        let sum = Summary {
            digest: super::super::clocks_digest(&clocks, &frontiers),
            clocks: clocks.clone(),
            frontiers: frontiers.clone(),
        };
        let (pages, got, got_f) = walk_pages(&sum, Config::default().clocks_page_bytes);
        assert!(pages >= 12, "{pages} pages");
        assert_eq!(got, clocks);
        assert_eq!(got_f, frontiers);
    }

    /// Every page of `sum` from the first, each checked under the size bound and through the
    /// wire; the number of pages and the clocks and frontiers they carried, merged.
    fn walk_pages(sum: &Summary, page_bytes: usize) -> (usize, Clocks, Frontiers) {
        let (mut start, mut pages) = (Pos::default(), 0);
        let (mut got, mut got_f) = (Clocks::new(), Frontiers::new());
        loop {
            let (range, c, f) = page(sum, &start, page_bytes);
            let msg = SyncMessage::Clocks {
                reply: false,
                pull: true,
                range: range.clone(),
                clocks: c.clone(),
                frontiers: f.clone(),
                wants: Vec::new(),
            };
            let bytes = msg.encode();
            assert!(bytes.len() <= page_bytes + 64 * 1024, "{}", bytes.len());
            assert!(bytes.len() < super::super::wire::MAX_MESSAGE_BYTES);
            assert_eq!(SyncMessage::decode(&bytes).unwrap(), msg);
            pages += 1;
            for (doc, vv) in c {
                got.entry(doc).or_default().extend(vv);
            }
            for (doc, fr) in f {
                assert!(got_f.insert(doc, fr).is_none(), "a frontier sent twice");
            }
            match range.end {
                Some(e) => {
                    let next = (e, range.end_author);
                    assert!(next > start, "no progress");
                    start = next;
                }
                None => return (pages, got, got_f),
            }
        }
    }

    fn author(a: u32) -> NodeId {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&a.to_be_bytes());
        NodeId(id)
    }

    #[test]
    fn one_document_with_more_authors_than_a_message_holds_is_split_across_pages() {
        // 250,000 authors in one document: 10 MB as one version vector, over the 8 MiB
        // message limit. Pages cut the document between authors.
        let vv: VersionVector = (0..250_000u32).map(|a| (author(a), 1)).collect();
        let mut clocks = Clocks::new();
        clocks.insert("app/big".into(), vv);
        clocks.insert("app/small".into(), [(author(7), 3)].into_iter().collect());
        let mut frontiers = Frontiers::new();
        frontiers.entry("app/big".into()).or_default().heads = vec![[9; 32]];
        let sum = Summary {
            digest: super::super::clocks_digest(&clocks, &frontiers),
            clocks: clocks.clone(),
            frontiers: frontiers.clone(),
        };
        let (pages, got, got_f) = walk_pages(&sum, Config::default().clocks_page_bytes);
        assert!(pages >= 10, "{pages} pages");
        assert_eq!(got, clocks);
        assert_eq!(got_f, frontiers);
        // The same at a tiny page size: every page holds a few authors.
        let (pages, got, got_f) = walk_pages(&sum, 200);
        assert!(pages > 50_000, "{pages} pages");
        assert_eq!(got, clocks);
        assert_eq!(got_f, frontiers);
    }

    #[test]
    fn a_pull_walks_every_page_then_catches_up() {
        let cfg = Config {
            clocks_page_bytes: 200,
            ..Config::default()
        };
        let (a_id, b_id) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut a = SyncEngine::new(a_id, cfg, 1);
        let mut ra = Fake::default();
        for d in 0..10 {
            ra.clocks
                .entry(format!("app/d{d}"))
                .or_default()
                .insert(a_id, 1);
        }
        a.peer_up(0, b_id, &mut ra).unwrap();
        drain(&mut a);
        // B's digest differs: A pulls, one page at a time.
        a.handle(1, b_id, SyncMessage::Digest { digest: [0; 32] }, &mut ra)
            .unwrap();
        let mut seen = Clocks::new();
        for step in 0..20 {
            let out = drain(&mut a);
            let [(_, SyncMessage::Clocks { range, clocks, .. })] = out.as_slice() else {
                panic!("step {step}: {out:?}")
            };
            seen.extend(clocks.clone());
            let last = range.end.is_none();
            a.handle(
                2 + step,
                b_id,
                SyncMessage::Changes {
                    more: false,
                    changes: Vec::new(),
                },
                &mut ra,
            )
            .unwrap();
            if last {
                assert!(drain(&mut a).is_empty());
                assert!(step >= 3, "only {step} pages");
                assert_eq!(seen, ra.clocks);
                assert_eq!(a.poll_event(), Some(Event::CaughtUp { peer: b_id }));
                return;
            }
        }
        panic!("never reached the last page");
    }

    #[test]
    fn a_steady_stream_of_announcements_does_not_starve_anti_entropy() {
        let (me, peer) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut e = SyncEngine::new(me, Config::default(), 3);
        let mut r = Fake::default();
        e.peer_up(0, peer, &mut r).unwrap();
        drain(&mut e);
        let (mut digests, mut ignored, mut pulls) = (0, 0, 0);
        for k in 0..20u8 {
            // A new change is announced (and fetched, never delivered) just before every
            // round and every digest from the peer.
            let due = e.poll_timeout().unwrap();
            e.handle(
                due - 1,
                peer,
                SyncMessage::AnnounceOne { id: [k; 8] },
                &mut r,
            )
            .unwrap();
            assert!(matches!(
                drain(&mut e).as_slice(),
                [(_, SyncMessage::FetchOne { .. })]
            ));
            e.handle_timeout(due, &mut r).unwrap();
            let out = drain(&mut e);
            digests += out
                .iter()
                .filter(|(_, m)| matches!(m, SyncMessage::ShortDigest { .. }))
                .count();
            // A mismatched digest from the peer while the fetch is under way.
            e.handle(
                due + 1,
                peer,
                SyncMessage::ShortDigest {
                    nonce: [k; 4],
                    tag: [k; 6],
                },
                &mut r,
            )
            .unwrap();
            let out = drain(&mut e);
            if out.is_empty() {
                ignored += 1;
            } else {
                pulls += 1;
            }
            // The pull gets its answer, so the next mismatch may start another.
            e.handle(
                due + 2,
                peer,
                SyncMessage::Changes {
                    more: false,
                    changes: Vec::new(),
                },
                &mut r,
            )
            .unwrap();
            drain(&mut e);
        }
        // Rounds are skipped while fetching, but never two in a row; mismatched digests are
        // ignored at most once per interval (rounds are about one interval apart).
        assert!(digests >= 10, "{digests} digests in 20 rounds");
        assert!(digests < 20, "no round was ever skipped");
        assert!(pulls >= 6, "{pulls} pulls, {ignored} ignored");
        assert!(ignored > 0, "no digest was ever ignored");
    }

    #[test]
    fn garbage_from_the_network_is_an_event_not_an_error() {
        let mut e = SyncEngine::new(NodeId([1; 32]), Config::default(), 1);
        let mut r = Fake::default();
        let peer = NodeId([2; 32]);
        for bytes in [
            &[][..],
            &[9, 9],
            &[1, 2, 0xff],
            &[1, 4, 0xff, 0xff, 0xff, 0xff],
        ] {
            e.handle_bytes(0, peer, bytes, &mut r).unwrap();
        }
        assert_eq!(e.stats().decode_errors, 4);
        assert!(matches!(
            e.poll_event(),
            Some(Event::Rejected {
                label: "decode",
                ..
            })
        ));
        assert_eq!(r.ingested, 0);
    }

    #[test]
    fn equal_digests_cost_one_message_and_mean_caught_up() {
        let (a_id, b_id) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut a = SyncEngine::new(a_id, Config::default(), 1);
        let mut b = SyncEngine::new(b_id, Config::default(), 2);
        let mut ra = Fake::default();
        let mut rb = Fake::default();
        a.peer_up(0, b_id, &mut ra).unwrap();
        b.peer_up(0, a_id, &mut rb).unwrap();
        drain(&mut b);
        // A's timer fires: one Digest to its only peer.
        let due = a.poll_timeout().unwrap();
        drain(&mut a);
        a.handle_timeout(due, &mut ra).unwrap();
        let out = drain(&mut a);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0].1, SyncMessage::ShortDigest { .. }));
        b.handle(due + 1, a_id, out[0].1.clone(), &mut rb).unwrap();
        assert!(drain(&mut b).is_empty(), "nothing to say when in sync");
        assert_eq!(b.poll_event(), Some(Event::CaughtUp { peer: a_id }));
        // Different clocks: B answers with its clocks and asks to pull.
        rb.clocks.entry("app/x".into()).or_default().insert(b_id, 3);
        b.invalidate();
        b.handle(due + 2, a_id, out[0].1.clone(), &mut rb).unwrap();
        let reply = drain(&mut b);
        assert!(matches!(
            reply.as_slice(),
            [(
                _,
                SyncMessage::Clocks {
                    reply: true,
                    pull: true,
                    ..
                }
            )]
        ));
        assert!(a.poll_timeout().unwrap() > due);
    }
}
