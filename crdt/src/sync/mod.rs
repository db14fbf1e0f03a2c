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
//! **Eager push (gossip).** A local commit is sent at once as `Push` to every connected peer.
//! A node that *newly applies* changes from a `Push` relays them to `fanout` random peers other
//! than the sender: small batches (≤ `relay_inline_bytes`) in full as `Push`, larger ones as a
//! `Have` announcement (document, author, seq) that a peer lacking them answers with `Want`,
//! which is answered with `Push`. Duplicates are never relayed, so gossip terminates. When a
//! push leaves changes waiting in the store's pending set (unknown author: its membership has
//! not arrived; missing dependencies; a sequence gap), the receiver immediately pulls from the
//! pusher with `Clocks` (at most once per `pull_gap_ms` per peer).
//!
//! **Anti-entropy.** Every `anti_entropy_interval_ms` (± jitter) a node picks one random
//! connected peer (and every peer that comes up) and sends `Digest` (SHA-256 of its full
//! version vector, see [`clocks_digest`]):
//! 1. A → B `Digest(d_A)`. If `d_A = d_B`, B does nothing: an idle round costs 34 bytes.
//! 2. Otherwise B → A `Clocks{reply}` (per document, per author, highest seq held).
//! 3. A → B `Changes` with exactly the changes B lacks, found per (document, author) by seq,
//!    membership document first, each document in causal order (by `start_op`), within
//!    `batch_bytes` / `batch_changes`. If B has something A lacks, A also sends its `Clocks`,
//!    and B answers with the `Changes` A lacks.
//! 4. A batch that had to be cut says `more`; the receiver ingests it and answers with its
//!    updated `Clocks`, getting the next batch, until caught up: after a long partition the
//!    number of round trips is ⌈missing bytes / batch_bytes⌉.
//!
//! **Membership first.** Membership changes lead every batch, and the store ingests them before
//! config changes. A config change whose author is not yet known waits in the store's bounded
//! pending set and is applied as soon as the membership change arrives.
//!
//! **Bounds.** Messages: 8 MiB hard limit on decode, 1 MiB target per batch. Per-peer queues
//! bounded in messages and bytes (a full queue drops pushes for that peer only, counted in
//! [`Stats::dropped_pushes`]; anti-entropy repairs it). The pending set is bounded by the store.
//! A stalled peer therefore costs at most one queue's worth of memory and slows no one else.
//!
//! ## Wire format
//! See [`wire`]: `version | type | body`, big-endian lengths, canonical, every count checked
//! before allocating, pinned by golden byte fixtures.
//!
//! ## Scale
//! `cargo run --release -p lichen-crdt --example sim_scale -- --nodes 1000` runs the simulator
//! with real SQLite stores (`set_fsync(false)`), each node connected to a bounded random set of
//! peers. See the table at the end of `crdt/examples/sim_scale.rs`'s docs, reproduced here:
//!
//! SCALE_TABLE_PLACEHOLDER

mod engine;
pub mod rng;
pub mod wire;

use sha2::{Digest as _, Sha256};

pub use engine::{Config, Event, Stats, SyncEngine};
pub use wire::{Clocks, SyncMessage, VersionVector};

use crate::error::StoreError;
use crate::identity::NodeId;
use crate::signed::SignedChange;
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

    fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        Store::ingest(self, batch)
    }
}

/// Errors of the sync engine: only local failures (the store). Bad network input is never an
/// error; it is counted and reported as [`Event::Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The store failed (disk, database).
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The anti-entropy digest: SHA-256 over a domain tag and the canonical clock encoding.
pub fn clocks_digest(clocks: &Clocks) -> [u8; 32] {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(b"lichen/clocks/v1\0");
    wire::encode_clocks(clocks, &mut buf);
    Sha256::digest(&buf).into()
}
