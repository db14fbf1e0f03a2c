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
//! ## Modules and data flow
//! * [`identity`]: keys, node ids, key files.
//! * [`header`]: reads and hashes a change chunk *without* Automerge, so signatures are checked
//!   before Automerge sees a byte.
//! * [`signed`]: the signed-change envelope and its encoding.
//! * [`membership`]: the membership document and the revocation rule (read its docs).
//! * [`store`]: SQLite persistence, verification pipeline, local writes, materialized reads.
//! * `json`: JSON ⇄ Automerge with minimal operations.
//!
//! Local write: [`Store::write`] → Automerge change → sign → SQLite commit → returned for
//! broadcast. Remote: [`Store::ingest`] → authenticate → authorize → structural checks →
//! Automerge (panic-contained, batched) → SQLite commit → report for relaying.
//!
//! ## Performance
//! See `crdt/benches/store.rs`; figures and the command are in the README of this crate's
//! benchmarks section below.

#![warn(missing_docs)]

pub mod error;
pub mod header;
pub mod identity;
mod json;
pub mod membership;
mod schema;
pub mod signed;
pub mod store;
pub mod sync;

pub use error::{KeyError, RejectReason, StoreError};
pub use identity::{NodeId, SecretKey};
pub use json::{format_path, parse_path, JsonError, PathSeg};
pub use membership::{Member, Membership, Role};
pub use signed::{valid_doc_name, ClusterId, DecodeError, SignedChange, MEMBERSHIP_DOC};
pub use store::{Edit, HistoryEntry, IngestReport, Op, Outcome, Store};
