//! # Sync: how nodes exchange signed changes
//!
//! Why it exists: every node holds every configuration document and the membership document;
//! this module moves signed changes between nodes until all of them hold the same set. It is
//! *sans-IO*: [`SyncEngine`] is a deterministic state machine (no tokio, no sockets, no clock
//! reads, no global randomness: callers pass `now` in milliseconds and a seed), so the whole
//! protocol runs unchanged inside the cluster simulator (`crdt/tests/simulation.rs`) and inside
//! the agent's network task.
//!
//! ## Data flow
//! ```text
//!  local write ── Store::write ──► SignedChange ──► engine.local_commit ──► Push to every peer
//!  network ── bytes ──► engine.handle_bytes ──► wire::SyncMessage ──► Replica::ingest (verifies)
//!        ◄── engine.poll_transmit ◄── per-peer bounded queues ◄── replies, relays, rounds
//!  timer ── engine.poll_timeout / handle_timeout ──► anti-entropy round with one random peer
//! ```
//! The store is borrowed (`&mut`) by the calls that need it through the [`Replica`] trait,
//! which [`crate::Store`] implements. The engine never trusts content: every change is verified
//! by the store (signature, membership, structure) on ingest, and the signature travels with
//! the change, so any node can relay any change safely.
//!
//! ## Protocol
//! Two mechanisms, one for speed and one for completeness.
//!
//! **Push, then lazy push (gossip).** A local commit is sent at once as `Push` to every
//! connected peer. A node that *newly applies* changes from a `Push` relays them to `fanout`
//! random peers other than the sender. A change pushed by its own author (the second hop) is
//! relayed in full as `Push`; beyond that, relays are *announcements*: `Announce` with 8-byte
//! change ids (`AnnounceOne`, 10 bytes, for one change) for up to `announce_max` changes,
//! `Have` by version vector for larger relays. A peer lacking an announced change answers
//! `Fetch` (`FetchOne`) or `Want`, answered with `Push` (`PushOne` for one change); a node
//! fetches an announced change from one peer at a time (again after `pull_gap_ms`). So each
//! node receives a change in full about once, plus a few 10-byte announcements, at the price
//! of two extra message delays per hop beyond the second (`relay_inline_bytes` relays small
//! changes in full instead). A node remembers, for a while, which peers are known to hold a
//! recent change (they pushed or announced it to it, fetched it from it, or it told them):
//! relays skip them, and pick each remaining peer with the probability `fanout / peers`
//! they would have had knowing nothing (`relay_skip_holders`, `relay_proportional`): the
//! same coverage with fewer announcements. A full second-hop relay that brings a node
//! nothing new (it had the change straight from its author, as in a full mesh) is answered
//! with `Prune`: the relayer then announces that author's changes to it instead of pushing
//! them (Plumtree's prune; in a 3-node mesh each change then arrives in full once, not twice;
//! `a_full_mesh_prunes_the_eager_second_hop_after_one_duplicate`). In a mesh where the
//! author pushes to everyone (at most `fanout` peers up at the relayer), those announcements
//! are insurance for a failed author link only: they are held `pruned_announce_delay_ms`
//! (50), sent as one `Announce`, and skip what the peer announced meanwhile (a burst of 20
//! writes in a 3-node mesh: 2 announcements instead of 40; a cut author link is still
//! repaired within the delay; `a_small_mesh_batches_its_insurance_announcements_and_they_still_repair_a_cut_link`;
//! larger meshes are unchanged: `sim_scale` at 1,000 nodes still 1.43×). Duplicates are never relayed
//! (nor verified again), so gossip terminates. When a push leaves changes waiting in the
//! store's pending set (unknown author: its membership has not arrived; missing
//! dependencies; a sequence gap), the receiver immediately pulls from the pusher with
//! `Clocks` (at most once per `pull_gap_ms` per peer).
//!
//! Changes newly applied from an anti-entropy batch are *not* relayed by default
//! (`relay_pulled_max` = 0): when a partition heals every node pulls from a neighbour at once,
//! so relaying what a pull brought adds announcements without speeding convergence (`sim_scale`
//! at 1,000 nodes).
//!
//! **Anti-entropy.** Every `anti_entropy_interval_ms` (± jitter) a node picks one random
//! connected peer (and every peer that comes up) and sends `ShortDigest`: a fresh random
//! 4-byte nonce and the first 6 bytes of SHA-256(nonce ‖ d), where d is the SHA-256 of its
//! version vectors *and frontiers*, see [`clocks_digest`] (a full 32-byte `Digest` is still
//! understood; the nonce keeps a member from crafting two states whose short tags collide). The random peer is drawn among those not known to
//! hold the changes applied here in the last interval when there are any
//! (`ae_prefer_unknown`), so a node gossip missed is found by the next round of a neighbour.
//! While a fetch of an announced change is under way, a round is skipped (never two in a row)
//! and a mismatched digest ignored (at most one per interval): the difference is most likely
//! that change, already on its way (`quiet_while_fetching`).
//! 1. A → B `ShortDigest(d_A)`. If `d_A = d_B`, B does nothing: an idle round costs 12 bytes.
//! 2. Otherwise B → A `Clocks{reply, pull}`: per document, per author, the highest seq held;
//!    per document, the heads and the authors flagged for equivocation with their fork seq
//!    (the *frontier*); and the hashes of dependencies B's pending changes wait for.
//! 3. A → B `Changes` with what B lacks: first the wanted dependencies A holds, the proof (two
//!    variants) of every fork B has not flagged, and A's heads of every document whose version
//!    vectors are equal but whose heads differ; then, per (document, author) by seq, the
//!    changes B lacks, membership document first, each document in causal order (by
//!    `start_op`), within `batch_bytes` / `batch_changes` (an empty `Changes` if B lacks
//!    nothing, so B knows the pull is over). If B has something A lacks, A also sends its
//!    `Clocks{pull}`, and B answers with the `Changes` A lacks. One round trip in the common
//!    case.
//! 4. A batch that had to be cut says `more`; the receiver ingests it and answers with its
//!    updated `Clocks`, getting the next batch, until caught up: after a long partition the
//!    number of round trips is ⌈missing bytes / batch_bytes⌉. A batch that leaves changes
//!    waiting for dependencies (and made progress) is followed by another pull carrying their
//!    hashes, at most 64 in a row: this walks back a chain the version vectors cannot show.
//!
//! **Clocks in pages.** A node's version vectors are sent in pages of about
//! `clocks_page_bytes` (1 MiB; ~25,000 document × author entries), each with its range of
//! (document, author) positions; the puller sends page *k + 1* when page *k*'s transfer is
//! done. A page is cut between documents or, inside a document with more authors than fit,
//! between two authors (a document's frontier travels in the page where the document starts).
//! So any number of documents and of authors per document stays within the 8 MiB message
//! limit (tested in `one_document_with_more_authors_than_a_message_holds_is_split_across_pages`
//! and, end to end, `one_document_with_more_authors_than_a_page_holds_is_paged_between_authors`).
//! One limit is left: a single document's *heads* are not split, so a document with more than
//! ~250,000 concurrent heads would still exceed a message.
//!
//! **Equivocation (a cloned key).** Two nodes holding different variants of one (document,
//! author, seq) have equal version vectors, so version vectors alone would leave them split
//! forever. Heads in the frontier make their digests differ; the exchange above ships the
//! heads, then (through `wants`) the chains beneath them, until a store holds both variants.
//! The store then judges by the rule in `crate::equivocation` (both variants and the key's
//! later changes in that document void, the key flagged; decided from the set of changes
//! alone), and the flag, being part of the frontier, reaches every node with the two
//! variants as proof. Tested in `crdt/tests/simulation.rs`
//! (`concurrent_equivocation_in_two_partitions_converges_with_both_variants_void`).
//!
//! **One inbound transfer at a time.** A node pulls (sends `Clocks{pull}`) from one peer at a
//! time; a mismatched `Digest` that arrives meanwhile is ignored (the pull under way brings
//! the node up to date; the next round compares again), and a pull unanswered for
//! `pull_timeout_ms` is abandoned. So when a partition heals, a node receives what it lacks
//! once, not once per neighbour across the cut.
//!
//! **Former members.** A key the membership document lists as `removed` may still connect
//! (the agent's transport admits it), so that it learns of its removal: a node refusing it
//! outright would leave it signing writes every other node voids, unaware. The engine serves
//! such a peer only the proof: when it comes up, or when a membership change makes a connected
//! peer a former member, its queue is cleared and it is sent every valid membership change (in
//! causal order, as `Push`, from genesis: it verifies the removal itself). It is left out of
//! rounds, pulls, pushes and relays, and every message it sends is refused, counted in
//! [`Stats::refused_former`] and reported as [`Event::Rejected`] with label `former_member`.
//! If a later membership change makes it a member again (its removal turned out void), it is
//! served normally again.
//!
//! **Membership first.** Membership changes lead every batch, and the store ingests them before
//! config changes. A config change whose author is not yet known waits in the store's bounded
//! pending set and is applied as soon as the membership change arrives.
//!
//! **Bounds.** Messages: 8 MiB hard limit on decode, 1 MiB target per batch and per clocks
//! page. Per-peer queues bounded in messages and bytes (a full queue drops pushes and
//! announcements for that peer only, counted in [`Stats::dropped_pushes`]; anti-entropy
//! repairs it). The pending set is bounded by the store; remembered announcements and wants
//! are bounded. A stalled peer therefore costs at most one queue's worth of memory and slows
//! no one else.
//!
//! ## Wire format
//! See [`wire`]: `version | type | body`, big-endian lengths, canonical, every count checked
//! before allocating, pinned by golden byte fixtures. Version 2 (this one) added clock pages,
//! frontiers, wants and `Announce`/`Fetch`; version 1 peers are refused.
//!
//! ## Scale
//! The cluster simulator (`crdt/tests/sim`) runs at scale in `crdt/examples/sim_scale.rs`
//! (not in CI): every node a real SQLite [`crate::Store`] with `set_fsync(false)` and a
//! [`SyncEngine`] with the default [`Config`] (fanout 6, anti-entropy every 1 s ± 250 ms),
//! each node linked to ~12 random peers (a ring plus random links, at most 18), one-way latency
//! fixed at 20 ms so that time converts to message delays ("rounds"). Every 64th node is a
//! writer; all nodes replicate everything. Bytes per node count every message on the wire,
//! framing included, from the write until one second after the last node applied it, so they
//! include idle anti-entropy digests (12 B per node per second).
//!
//! ```text
//! cargo run --release -p lichen-crdt --example sim_scale -- --nodes 1000
//! cargo run --release -p lichen-crdt --example sim_scale -- --nodes 1000 --size 2000
//! cargo run --release -p lichen-crdt --example sim_scale -- --nodes 10000 --memory 1
//! ```
//!
//! Figures for these runs (latency in message delays, bytes per node against the bytes each
//! node was missing, at 1,000 and 10,000 nodes) are in `docs/benchmarks.md`. In short: each
//! node receives a change in full about once plus a few 10-byte announcements (≤ 1.5× the
//! change's bytes for a 215-byte change, ≤ 1.06× from 2 KB), 99 % of nodes have it after
//! ≈ 3 × log₆ N message delays, a node receives what it lacks after a healed partition about
//! once (it pulls from one peer at a time), and an idle node costs 12 bytes per second.

mod engine;
pub mod rng;
pub mod wire;

use sha2::{Digest as _, Sha256};

pub use engine::{Config, Event, Stats, SyncEngine};
pub use wire::{
    change_id, ChangeId, Clocks, DocRange, Frontier, Frontiers, SyncMessage, VersionVector,
};

use crate::error::StoreError;
use crate::identity::NodeId;
use crate::membership::Role;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};
use crate::store::{IngestReport, Store};

/// What the engine needs from a replica's storage. [`Store`] implements it; tests may wrap it
/// (to watch every ingest) or replace it.
pub trait Replica {
    /// Version vectors of every document, including the membership document: per author, the
    /// highest seq of a valid change held.
    fn clocks(&self) -> Result<Clocks, StoreError>;
    /// Valid changes of `author` in `doc` with seq > `after`, in seq order, at most `limit`.
    fn changes_after(
        &self,
        doc: &str,
        author: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, StoreError>;
    /// A valid change by hash.
    fn get_change(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError>;
    /// A stored change by hash, valid or void (a peer asked for it by hash: the
    /// dependency of a fork variant may be void here; the peer judges it itself).
    fn get_any(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.get_change(hash)
    }
    /// Whether a valid change with this hash is held (received copies are then not verified
    /// again).
    fn contains(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.get_change(hash)?.is_some())
    }
    /// Verify and apply received changes.
    fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError>;
    /// Names of the documents held (including the membership document).
    fn docs(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.clocks()?.into_keys().collect())
    }
    /// Per document: sorted heads and the authors flagged for equivocation (see
    /// [`Frontier`]). Part of the anti-entropy digest.
    fn frontiers(&self) -> Result<Frontiers, StoreError> {
        Ok(Frontiers::new())
    }
    /// Proof of a flagged fork of `author` in `doc`: two of its variants.
    fn fork_evidence(&self, doc: &str, author: &NodeId) -> Result<Vec<SignedChange>, StoreError> {
        let _ = (doc, author);
        Ok(Vec::new())
    }
    /// Hashes of dependencies that held-back changes are waiting for, at most `limit`.
    fn wanted(&self, limit: usize) -> Result<Vec<[u8; 32]>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }
    /// Whether a change whose hash starts with `id` is stored (valid or void): an announced
    /// change not worth fetching.
    fn holds_id(&self, id: &ChangeId) -> Result<bool, StoreError> {
        let _ = id;
        Ok(false)
    }
    /// A valid change whose hash starts with `id`.
    fn change_by_id(&self, id: &ChangeId) -> Result<Option<SignedChange>, StoreError> {
        let _ = id;
        Ok(None)
    }
    /// Whether `peer` is a *former member*: its key is in the membership document with role
    /// `removed`. The engine serves such a peer only the proof of its removal (see "Former
    /// members" in the module docs).
    fn is_former_member(&self, peer: &NodeId) -> bool {
        let _ = peer;
        false
    }
    /// Every valid change of the membership document, in causal order (by `start_op`): what
    /// a former member is sent, so that it can verify its removal itself.
    fn membership_changes(&self) -> Result<Vec<SignedChange>, StoreError> {
        let clocks = self.clocks()?;
        let mut out = Vec::new();
        if let Some(vv) = clocks.get(MEMBERSHIP_DOC) {
            for (author, seq) in vv {
                out.extend(self.changes_after(MEMBERSHIP_DOC, author, 0, *seq as usize)?);
            }
        }
        out.sort_by_cached_key(|c| {
            crate::header::parse(&c.bytes)
                .map(|h| (h.start_op, h.hash))
                .unwrap_or((u64::MAX, [0xff; 32]))
        });
        Ok(out)
    }
}

/// Per-document heads and flagged forks of a store (the [`Replica::frontiers`] of a
/// [`Store`]).
pub fn store_frontiers(store: &Store) -> Result<Frontiers, StoreError> {
    let mut out = Frontiers::new();
    for (doc, heads) in store.all_heads()? {
        out.entry(doc).or_default().heads = heads;
    }
    for ((doc, author), seq) in store.forks() {
        out.entry(doc.clone())
            .or_default()
            .forks
            .insert(*author, *seq);
    }
    Ok(out)
}

impl Replica for Store {
    fn clocks(&self) -> Result<Clocks, StoreError> {
        self.all_clocks()
    }

    fn changes_after(
        &self,
        doc: &str,
        author: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, StoreError> {
        Store::changes_after(self, doc, author, after, limit)
    }

    fn get_change(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        Store::get_change(self, hash)
    }

    fn contains(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Store::has_valid_change(self, hash)
    }

    fn get_any(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        Store::get_stored(self, hash)
    }

    fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        Store::ingest(self, batch)
    }

    fn frontiers(&self) -> Result<Frontiers, StoreError> {
        store_frontiers(self)
    }

    fn fork_evidence(&self, doc: &str, author: &NodeId) -> Result<Vec<SignedChange>, StoreError> {
        Store::fork_evidence(self, doc, author)
    }

    fn wanted(&self, limit: usize) -> Result<Vec<[u8; 32]>, StoreError> {
        self.wanted_deps(limit)
    }

    fn holds_id(&self, id: &ChangeId) -> Result<bool, StoreError> {
        Ok(self.find_by_prefix(id, false)?.is_some())
    }

    fn change_by_id(&self, id: &ChangeId) -> Result<Option<SignedChange>, StoreError> {
        match self.find_by_prefix(id, true)? {
            Some(h) => self.get_change(&h),
            None => Ok(None),
        }
    }

    fn is_former_member(&self, peer: &NodeId) -> bool {
        self.membership()
            .get(peer)
            .is_some_and(|m| m.role == Role::Removed)
    }
}

/// Errors of the sync engine: only local failures (the store). Bad network input is never an
/// error; it is counted and reported as [`Event::Rejected`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The store failed (disk, database).
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The anti-entropy digest: SHA-256 over a domain tag and the canonical encodings of the
/// version vectors and the frontiers (heads and flagged forks). Two nodes have equal digests
/// exactly when they hold the same valid changes (heads name the whole causal history) and
/// know the same forks.
pub fn clocks_digest(clocks: &Clocks, frontiers: &Frontiers) -> [u8; 32] {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(b"lichen/clocks/v2\0");
    wire::encode_clocks(clocks, &mut buf);
    wire::encode_frontiers(frontiers, &mut buf);
    Sha256::digest(&buf).into()
}
