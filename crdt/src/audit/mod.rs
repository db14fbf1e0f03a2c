//! Audit bundles: a document's verified history in one self-contained file that anyone can
//! check offline, with no agent and no data directory, against nothing but the cluster id.
//!
//! A bundle ([`Bundle`], format below) holds every valid change of one document with its
//! author's signature, every valid change of the membership document (the chain, rooted in
//! the genesis change whose hash is the cluster id, that says who could write what), the
//! heads of both at export time, and the exporting node's signature over all of it.
//!
//! # Verification ([`verify`])
//! The bundle is judged by the very code that judges changes a node receives: its changes
//! are ingested, in bundle order, into an empty in-memory [`Store`](crate::Store) of the
//! cluster, membership first. So every signature (over cluster, document and change hash),
//! every hash, every actor = signer, every authorization against the membership chain
//! (role, scopes, revocation cut-offs), every dependency, sequence number, `start_op` and
//! equivocation is checked by the same rules as on ingest, and a change that a node would not
//! apply makes the bundle fail with the change and the reason. Then:
//! * the changes must come in the canonical order (below): a reordered bundle fails naming
//!   the first change out of place;
//! * a change whose dependency is not in the bundle fails (a truncated bundle);
//! * the heads reached must be the heads the bundle names: a bundle missing its last changes
//!   fails naming a missing head;
//! * the exporter must be a key the membership chain records, and its signature over the
//!   whole bundle must verify: a single changed byte anywhere fails.
//!
//! # Format (version 1, all integers big-endian)
//! ```text
//! magic      8 bytes  "LCHAUDIT"
//! version    u8       1
//! cluster    32 bytes the cluster id
//! doc        u16 length, then the document name (UTF-8)
//! exporter   32 bytes the exporting node's id (ed25519 public key)
//! exported   i64      export time claimed by the exporter, ms since the epoch
//! since      u16 count, then 32-byte hashes: the heads the audit starts after (may be empty)
//! heads      u16 count, then 32-byte hashes: the document's heads at export
//! mheads     u16 count, then 32-byte hashes: the membership document's heads at export
//! nmembers   u32      number of membership changes
//! nchanges   u32      number of document changes
//! changes    nmembers + nchanges signed changes in the envelope of `crate::signed`
//!            (u8 version=1 | u16 doc_len | doc | author[32] | sig[64] | u32 len | change),
//!            membership changes first, each part in canonical order
//! signature  64 bytes ed25519 signature by `exporter` over
//!            "lichen/audit/v1\0" || SHA-256(every byte before the signature)
//! ```
//! The canonical order of a part is a topological order of its changes (every change after
//! the changes it depends on), ties broken by the smaller hash: Kahn's algorithm with the
//! ready changes in a min-heap of hashes. `--since` does not shorten the bundle (a change
//! cannot be checked without its causal past); it records where the audit starts, and the
//! verified history printed begins after it.
//!
//! The fixture `crdt/tests/fixtures/audit_bundle_v1.bin` pins the format; the fuzz target
//! `fuzz/fuzz_targets/audit_bundle.rs` checks that decoding never panics and round-trips.

mod bundle;
mod verify;

pub use bundle::{canonical_order, Bundle, BundleDecodeError, BUNDLE_VERSION};
pub use verify::{verify, AuditError, VerifiedBundle};
