//! # lichen-crdt: signed Automerge documents, signed membership, a durable SQLite store
//!
//! Lichen replaces a coordination service with CRDTs: every node holds the cluster's
//! configuration documents and its membership as Automerge documents, persisted in SQLite,
//! and every change is signed by its author's ed25519 key.
//!
//! ## Trust model
//! A node trusts no transport, peer or relay: it trusts a change only if it carries a valid
//! signature, over the cluster id, document name and change hash, by a key that the signed
//! membership document authorizes for that document. Membership is itself a signed document
//! rooted in the genesis change, whose hash *is* the cluster id. So a change can be relayed by
//! anyone and forged by no one; a compromised non-admin key can write only inside its scopes
//! until an admin removes it, and then its writes past the revocation cut-off are void everywhere.
//!
//! ## Equivocation (a cloned key)
//! A key copied onto two machines (a VM image, a restored backup) can sign two *different*
//! changes at the same (document, seq), concurrently, each in a different part of the cluster.
//! Keeping whichever arrives first would split the cluster for good (equal version vectors,
//! different documents). The rule (`equivocation.rs`, decided from the set of changes alone,
//! so arrival order never matters):
//! * two otherwise valid changes by one key at one (document, seq) are a **fork**, a proof of
//!   equivocation; the key is **flagged** in that document ([`Store::equivocators`]);
//! * **both variants are void, and so is everything the key wrote in that document from the
//!   fork seq on**; its changes below the fork seq and in other documents stand. No variant
//!   "wins": any choice would reward whichever copy of the key wrote first or fastest, and
//!   the honest owner cannot be told from the clone. The owner can no longer write that
//!   document with that key (a local write is refused): an admin removes the key and re-admits
//!   the machine with a new one;
//! * **honest changes built on a void variant are void too** (Automerge cannot apply a change
//!   without its dependencies, and applying them would resurrect the variant). Only changes
//!   made concurrently with the fork, by nodes that held one variant, are affected; they are
//!   reported in `IngestReport::voided` so the values can be written again. Their authors'
//!   next changes reuse the voided seqs, which is not a fork (a change void because of its
//!   dependencies is not "otherwise valid"); forks are judged causally first to keep it so.
//!
//! Every node ends up with both variants: the anti-entropy digest covers each document's heads
//! and flagged forks, and sync ships the two variants to any peer that has not flagged the
//! fork (see [`sync`]). The membership document follows the same rule (a cloned *admin* key):
//! its replay sets a second change at a taken (author, seq) aside, judges it by a replay without
//! the other variant, and flags the key from the fork seq if both stand on their own; both
//! variants, the key's later membership changes and what was built on them are void, while
//! the key's earlier standing (an admin stays an admin until another admin removes it) and its
//! changes in other documents stand. A flagged admin key cannot edit membership any more.
//!
//! ## Compaction (cutting history)
//! History grows with every write; a **cut** folds a document's causal past up to some heads
//! into one deterministic base change (`compaction.rs`, decided from signed data alone):
//! * an admin signs a cut record naming the document, an epoch, the heads it folds, each
//!   author's highest folded seq and the hash of the base (the JSON value at the heads, written
//!   by an actor derived from the record's fields at time 0: byte-identical on every node);
//! * of all valid records of a document, the highest epoch wins, then the lowest record hash,
//!   whatever the arrival order; a losing record only stays as evidence;
//! * after the winning cut, a change is kept (the base or built on it), folded (in the cut's
//!   causal past, dropped) or **late** (concurrent with the cut): a late change is void and its
//!   author carries it forward onto the base, signed by itself, with the carry-forward machinery
//!   of the revocation rule, before it drops anything; folded changes are retained until a cut
//!   built on this one wins, so a concurrent cut that wins instead loses nothing.
//!
//! ## Modules and data flow
//! * [`identity`]: keys, node ids, key files.
//! * [`header`]: reads and hashes a change chunk *without* Automerge, so signatures are checked
//!   before Automerge sees a byte.
//! * [`signed`]: the signed-change envelope and its encoding.
//! * [`membership`]: the membership document and the revocation rule (read its docs).
//! * [`equivocation`]: the rule for a key that signs two different changes at one seq (a cloned
//!   key): both variants and what follows them are void, decided from the set of changes alone
//!   (see "Equivocation" below).
//! * [`compaction`]: cutting a document's history at an admin-signed point every node agrees
//!   on without consensus (the cut record, the deterministic base, which cut wins, and late
//!   changes carried forward by their authors; see "Compaction" below).
//! * [`store`]: SQLite persistence, verification pipeline, local writes, materialized reads;
//!   reading the past, diff, revert, blame, export and import (`store::history_at`,
//!   `revert`, `blame`, `export`); [`store::backup`]: online backups, their verification and
//!   restore.
//! * [`audit`]: audit bundles, a document's signed history with its membership chain,
//!   verified offline by the rules of ingest.
//! * `json`: JSON ⇄ Automerge with minimal operations.
//!
//! Local write: [`Store::write`] → Automerge change → sign → SQLite commit → returned for
//! broadcast. Remote: [`Store::ingest`] → authenticate → authorize → structural checks →
//! Automerge (panic-contained, batched) → SQLite commit → report for relaying.
//!
//! ## Performance
//! Figures for `cargo bench -p lichen-crdt --bench store` and the `hot_key` example are in
//! `docs/benchmarks.md`. What keeps the hot paths cheap:
//! * the keys a change touches are read off its ops (module `owners`) instead of an Automerge
//!   diff that costs time proportional to the document, and the per-author last seq comes from
//!   the cached version vectors;
//! * the writer builds a local edit made only of scalar puts at top-level keys without
//!   Automerge (`store::local_fast`: the change comes from the view's `kv.ops` and the heads,
//!   the very bytes Automerge would make); other edits go through the in-memory document;
//! * a replica applies a *fast forward* (a chain on top of its heads made only of root-level
//!   scalar puts, each overwriting exactly the values visible at its key: a single writer
//!   updating values) without Automerge; the in-memory document, if loaded, catches up in one
//!   batch when next needed. Concurrent writes, deletes and nested edits take the Automerge
//!   path, whose apply walks the ops of the object a change edits and so grows with the
//!   overwrites already held; crossing puts read their touched keys from the ops and the
//!   view's `kv.ops` instead of Automerge's diff (`ingest::ingest_doc`).
//!
//! Fsync policy: WAL with `synchronous=FULL` by default (survives power loss: every commit is
//! fsynced before it is acknowledged); `Store::set_fsync(false)` (agent `fsync = "never"`,
//! `synchronous=NORMAL`) survives a process crash (`kill -9`) but not a power loss, after which a
//! writer that writes again before fetching its lost change back from a peer equivocates
//! (`tests/store_crash.rs`); `Store::set_fsync_policy(true,
//! false)` (agent default `fsync = "local"`) fsyncs this node's own writes only, received
//! changes being fetched again from peers after a power loss (see [`store`]). Concurrent
//! writers share one fsync through `Store::write_batch` (group commit).

#![warn(missing_docs)]

pub mod audit;
pub mod compaction;
pub mod equivocation;
pub mod error;
pub mod header;
pub mod identity;
mod json;
pub mod membership;
mod owners;
mod schema;
pub mod signed;
pub mod store;
pub mod sync;

pub use error::{KeyError, RejectReason, StoreError};
pub use identity::{NodeId, SecretKey};
pub use json::{format_path, parse_path, JsonError, PathSeg};
pub use membership::{
    validate_addr, validate_member, validate_name, validate_scope, Member, Membership, Role,
};
pub use signed::{valid_doc_name, ClusterId, DecodeError, SignedChange, MEMBERSHIP_DOC};
pub use store::{
    format_heads, import_content, parse_heads, BlameLeaf, BlameSetter, CarriedForward, DiffEntry,
    DiffKind, Edit, HistoryEntry, HistoryError, ImportError, IngestReport, Op, Outcome,
    ScrubStatus, ScrubStep, Store, UndoPlan, UndoSkipped, Voided, DEFAULT_MAX_LOADED_DOCS,
};
