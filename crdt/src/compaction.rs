//! Compaction: cutting a document's history at a point every node agrees on, without consensus.
//!
//! Why it exists: Automerge keeps every change, and so does the store, so a key rewritten once a
//! second grows the database, the in-memory document and the load time without bound. A **cut**
//! replaces the history in a document's causal past up to some heads with one deterministic
//! *base* change holding the JSON value at those heads; nodes then drop the folded changes from
//! disk and memory. This module holds the signed cut record, its encoding, the base builder and
//! the pure rule that sorts a document's changes against a cut. The store keeps records in their
//! own table (schema 6, see `crate::schema`), not in the document (a cut must outlive the
//! history it folds) nor in membership (membership is never cut, and records are per document).
//!
//! # The cut record (signed data alone decides)
//! An admin signs a [`CutRecord`]: the document, an **epoch** (one more than the epoch of the
//! cut it builds on, 1 for the first), the record hash of that **parent** cut, the **heads** it
//! folds, the **folded clock** (each author's highest seq in the causal past of the heads) and
//! the hash of the **base** change. The signature covers a domain tag, the cluster id and every
//! field, so a record cannot be replayed into another cluster or document. A record is valid if
//! its signature verifies and its author is an admin in the current membership
//! ([`CutRecord::verify`]); like any admin write, the admin vouches for the content of the base.
//!
//! # The base (byte-identical everywhere)
//! The base is one Automerge change with no dependencies, made by a fixed actor derived from
//! (document, epoch, heads) ([`base_actor`]), at time 0, with the document's name as message
//! (like every root change), whose operations write the JSON value at the heads into an empty
//! document ([`build_base`]). Its bytes depend only on that value and those fields, so every
//! node that holds the history computes the same bytes, checks their hash against the record,
//! and two admins cutting the same heads at the same epoch make the same base. A node without
//! the history accepts base bytes from any peer when their hash is the one the signed record
//! names (sync serves the record with the base to a peer that lacks it).
//!
//! # Which cut wins (deterministic whatever the arrival order)
//! Of all valid records of a document, the **winner** is the one with the highest epoch, then
//! the lowest record hash ([`CutRecord::wins_over`], [`winner`]). Two admins cutting
//! concurrently produce two records of one epoch; every node picks the same one. A record that
//! loses is kept as evidence and has no other effect: what it folded is either folded by the
//! winner too or is late for the winner (below), and nothing is dropped on its account beyond
//! what the winner folds (see retention).
//!
//! # Sorting changes against the winning cut ([`classify`])
//! A record is applied only once its chain of parents is held (records are small and kept
//! forever; a peer sends the chain with the winner's base). A change's *lineage* is the base
//! it descends from (none: the history before the chain's first cut). Walking a document's
//! changes in causal order, each is:
//! * **kept** if its lineage is the winner's base (the base itself included): it was written
//!   on the new base by a node that knew the cut;
//! * otherwise **folded** if the record of the chain built on its lineage folds its seq (its
//!   seq is at most its author's entry in that record's folded clock, and no dependency is
//!   late): an author's changes form a chain (each depends on the previous seq), so the causal
//!   past of the heads holds exactly each author's prefix up to that seq, and the record
//!   decides this without the history; seqs are compared within one epoch only;
//! * otherwise **late**: made concurrently with the cut (not in its causal past) on a node that
//!   had not seen it, built on such a change, or built on a losing cut's base.
//!
//! At ingest, a change without dependencies in a document that has a cut is refused
//! (`RejectReason::Compacted`): every change made after a cut descends from its base, so such
//! a change predates the cut, and its seq belongs to an earlier epoch (compared with the
//! current chain it would look like a fork). Other pre-cut changes depend on a folded or late
//! change (refused as depending on a void change) or on one already deleted (they wait in the
//! bounded pending set).
//!
//! The document after the cut is the base plus the kept changes: a function of the winning
//! record and the set of changes, so nodes never diverge.
//!
//! # Late changes are carried forward, never silently lost
//! A late change is void (it cannot be applied on the base: its dependencies are gone) and is
//! noted like any voided change (`Store::take_voided`, reason `late_for_cut`). Its **author**
//! carries it forward exactly as the carry-forward rule of [`crate::membership`] does for writes
//! built on a void change: the JSON difference the change made to the state it was built on is
//! written again as a new change on the base, signed by the author itself. The author computes
//! that difference *before* it drops anything: it learns of the cut by applying it, and the
//! apply carries its own late changes first, then drops. A node that is not the author never
//! re-signs; it keeps the late change (void) until the author's new change arrives or a later
//! cut drops it. The carried value is the author's latest intent for the paths it wrote, so
//! every acknowledged write is either present after quiescence or superseded by a later write
//! to the same key.
//!
//! # Retention (concurrent cuts lose nothing)
//! A node applying a winning cut marks the folded changes *retained*, not deleted, and deletes
//! retained changes only when a later winner names the current one as its parent (its author had
//! applied it). If instead a concurrent record of the same epoch (or a higher epoch not built on
//! it) wins, the changes the old winner folded are still held, so those the new winner does not
//! fold are late and their authors carry them forward. The store therefore holds at most the
//! history of one epoch beyond the current base. A losing cut's base is never carried (its
//! actor is no member); its content comes back through the carried changes it folded.
//!
//! # Seqs after a cut
//! The base replaces every author's earlier changes, so in the new Automerge document an
//! author's next change starts at seq 1 again. Seq checks (contiguity, equivocation) therefore
//! apply per epoch: a change is judged against the author's chain among the *kept* changes,
//! which descend from the base. Folded and late changes are never compared with kept ones.
//!
//! # Catching up
//! A node offline across several cuts receives the records and keeps only the winner's base
//! (the newest): the bases of earlier epochs are folded by the later records. It applies the
//! winner (its own late changes first carried forward, from its own history) and then the kept
//! changes.
//!
//! # Limits of this build
//! * The sync engine does not carry cut records and bases, and the agent does not cut: a
//!   cut is applied through `Store::compact` / `Store::apply_cut` only (tests, tools). A
//!   node that cut would otherwise write changes its peers cannot apply.
//! * A record is judged against the *current* membership: a record by an admin who was
//!   removed since is refused by a node that receives it afterwards, while nodes that applied
//!   it earlier keep it. Cuts must be made by admins that stay admins until the cut has
//!   spread (the root admin cannot be removed).
//! * A cut folds equivocation evidence (status-3 rows) with the rest: a key flagged in a
//!   document is no longer flagged there once a cut folds its fork.
//! * Audit bundles of a compacted document and `backup verify` of a store holding a cut are
//!   refused as not supported (the base is not a signed change; verifying it means replaying
//!   the cut records).
//!
//! # Encoding (versioned, golden bytes in the tests)
//! `u8 version=1 | u16be doc_len | doc | u64be epoch | u8 has_parent | parent[32]? |
//! u16be n_heads | heads[32]* (strictly ascending) | u32be n_clock | (author[32] u64be seq)*
//! (authors strictly ascending) | base_hash[32] | author[32] | sig[64]`. Every length is checked
//! against the input before anything is allocated; a decoded record re-encodes to the same bytes.

use std::collections::{BTreeMap, HashMap};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::header;
use crate::identity::{self, NodeId, SecretKey};
use crate::membership::{Membership, Role};
use crate::signed::{valid_doc_name, ClusterId, DecodeError, MAX_DOC_NAME};
use crate::store::panic_safe;

const DOMAIN: &[u8] = b"lichen/cut/v1\0";
const BASE_DOMAIN: &[u8] = b"lichen/cut-base/v1\0";
const ENCODING_VERSION: u8 = 1;
/// Most heads a cut record may name.
pub const MAX_CUT_HEADS: usize = 1_024;
/// Most authors a cut record's folded clock may hold.
pub const MAX_CUT_CLOCK: usize = 65_536;

/// An admin-signed cut of one document's history (see the module docs).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CutRecord {
    /// The document cut.
    pub doc: String,
    /// One more than the parent's epoch (1 for a document's first cut).
    pub epoch: u64,
    /// The record hash of the cut this one builds on (`None` for the first).
    pub parent: Option<[u8; 32]>,
    /// The heads whose causal past is folded (sorted, distinct).
    pub heads: Vec<[u8; 32]>,
    /// Each author's highest seq in the causal past of the heads.
    pub folded: BTreeMap<NodeId, u64>,
    /// Hash of the base change (see [`build_base`]).
    pub base_hash: [u8; 32],
    /// The admin who signed the record.
    pub author: NodeId,
    /// Signature over the domain tag, the cluster id and every field above.
    pub sig: [u8; 64],
}

/// Why a cut record or a base was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CutError {
    /// The record does not decode.
    #[error("cut record does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// The signature does not verify for this cluster.
    #[error("cut record signature does not verify")]
    BadSignature,
    /// The signer is not an admin.
    #[error("cut record is not signed by an admin")]
    NotAdmin,
    /// The document name is not valid.
    #[error("invalid document name")]
    BadDocument,
    /// The base bytes do not hash to what the record names.
    #[error("base hash does not match the cut record")]
    BaseMismatch,
    /// The value at the heads is not a JSON object, or Automerge refused it.
    #[error("base cannot be built: {0}")]
    Base(String),
}

impl CutRecord {
    /// Make and sign a record with `key` (the caller checks that `key` is an admin's).
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        key: &SecretKey,
        cluster: &ClusterId,
        doc: &str,
        epoch: u64,
        parent: Option<[u8; 32]>,
        mut heads: Vec<[u8; 32]>,
        folded: BTreeMap<NodeId, u64>,
        base_hash: [u8; 32],
    ) -> CutRecord {
        heads.sort_unstable();
        heads.dedup();
        let mut r = CutRecord {
            doc: doc.to_string(),
            epoch,
            parent,
            heads,
            folded,
            base_hash,
            author: key.node_id(),
            sig: [0; 64],
        };
        r.sig = key.sign(&r.signing_message(cluster));
        r
    }

    fn signing_message(&self, cluster: &ClusterId) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + 32 + self.encoded_len());
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(cluster);
        self.encode_body(&mut m);
        m
    }

    /// Check the signature and that the signer is an admin in `membership`.
    pub fn verify(&self, cluster: &ClusterId, membership: &Membership) -> Result<(), CutError> {
        if !valid_doc_name(&self.doc) || self.doc == crate::MEMBERSHIP_DOC {
            return Err(CutError::BadDocument);
        }
        if !identity::verify(&self.author, &self.signing_message(cluster), &self.sig) {
            return Err(CutError::BadSignature);
        }
        match membership.get(&self.author) {
            Some(m) if m.role == Role::Admin => Ok(()),
            _ => Err(CutError::NotAdmin),
        }
    }

    /// The record hash: SHA-256 of its encoding.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// Whether this record wins over `other`: higher epoch, then lower record hash.
    pub fn wins_over(&self, other: &CutRecord) -> bool {
        match self.epoch.cmp(&other.epoch) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.hash() < other.hash(),
        }
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        1 + 2
            + self.doc.len()
            + 8
            + 1
            + if self.parent.is_some() { 32 } else { 0 }
            + 2
            + 32 * self.heads.len()
            + 4
            + 40 * self.folded.len()
            + 32
            + 32
            + 64
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&(self.doc.len() as u16).to_be_bytes());
        out.extend_from_slice(self.doc.as_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        match &self.parent {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(p);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.heads.len() as u16).to_be_bytes());
        for h in &self.heads {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&(self.folded.len() as u32).to_be_bytes());
        for (a, s) in &self.folded {
            out.extend_from_slice(&a.0);
            out.extend_from_slice(&s.to_be_bytes());
        }
        out.extend_from_slice(&self.base_hash);
        out.extend_from_slice(&self.author.0);
    }

    /// The versioned encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_body(&mut v);
        v.extend_from_slice(&self.sig);
        v
    }

    /// Decode a whole record (trailing bytes are refused). Lengths are checked against the
    /// input before anything is allocated; heads and authors must be strictly ascending, so
    /// a decoded record re-encodes to the same bytes.
    pub fn decode(buf: &[u8]) -> Result<CutRecord, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8()?;
        if version != ENCODING_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let doc_len = r.u16()? as usize;
        if doc_len > MAX_DOC_NAME {
            return Err(DecodeError::TooLong("document name"));
        }
        let doc = std::str::from_utf8(r.take(doc_len)?)
            .map_err(|_| DecodeError::Invalid("document name is not UTF-8"))?
            .to_string();
        let epoch = r.u64()?;
        let parent = match r.u8()? {
            0 => None,
            1 => Some(r.h32()?),
            _ => return Err(DecodeError::Invalid("parent flag")),
        };
        let n_heads = r.u16()? as usize;
        if n_heads > MAX_CUT_HEADS {
            return Err(DecodeError::TooLong("cut heads"));
        }
        if r.left() < n_heads * 32 {
            return Err(DecodeError::Truncated);
        }
        let mut heads = Vec::with_capacity(n_heads);
        for _ in 0..n_heads {
            let h = r.h32()?;
            if heads.last().is_some_and(|l| *l >= h) {
                return Err(DecodeError::Invalid("cut heads not strictly ascending"));
            }
            heads.push(h);
        }
        let n_clock = r.u32()? as usize;
        if n_clock > MAX_CUT_CLOCK {
            return Err(DecodeError::TooLong("cut clock"));
        }
        if r.left() < n_clock * 40 {
            return Err(DecodeError::Truncated);
        }
        let mut folded = BTreeMap::new();
        let mut last: Option<NodeId> = None;
        for _ in 0..n_clock {
            let a = NodeId(r.h32()?);
            if last.is_some_and(|l| l >= a) {
                return Err(DecodeError::Invalid("cut clock not strictly ascending"));
            }
            last = Some(a);
            folded.insert(a, r.u64()?);
        }
        let base_hash = r.h32()?;
        let author = NodeId(r.h32()?);
        let sig: [u8; 64] = r.take(64)?.try_into().map_err(|_| DecodeError::Truncated)?;
        if r.left() != 0 {
            return Err(DecodeError::Trailing);
        }
        Ok(CutRecord {
            doc,
            epoch,
            parent,
            heads,
            folded,
            base_hash,
            author,
            sig,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.left() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        Ok(u64::from_be_bytes(b))
    }
    fn h32(&mut self) -> Result<[u8; 32], DecodeError> {
        self.take(32)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)
    }
}

/// The winning record among `records` (highest epoch, then lowest record hash), whatever
/// their order. The caller passes verified records of one document.
pub fn winner<'a, I: IntoIterator<Item = &'a CutRecord>>(records: I) -> Option<&'a CutRecord> {
    let mut best: Option<(&CutRecord, [u8; 32])> = None;
    for r in records {
        let h = r.hash();
        best = match best {
            Some((b, bh)) if b.epoch > r.epoch || (b.epoch == r.epoch && bh <= h) => Some((b, bh)),
            _ => Some((r, h)),
        };
    }
    best.map(|(b, _)| b)
}

/// The actor of a cut's base change: derived from (document, epoch, heads), so it is the same
/// on every node and distinct from every member key and every other cut.
pub fn base_actor(doc: &str, epoch: u64, heads: &[[u8; 32]]) -> [u8; 32] {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Sha256::new();
    h.update(BASE_DOMAIN);
    h.update((doc.len() as u16).to_be_bytes());
    h.update(doc.as_bytes());
    h.update(epoch.to_be_bytes());
    for x in &sorted {
        h.update(x);
    }
    h.finalize().into()
}

/// Build the base change of a cut: the JSON object `value` written into an empty document by
/// [`base_actor`], at time 0, with the document's name as message. Returns the change bytes
/// and their hash. Deterministic: the same arguments give the same bytes on every node.
pub fn build_base(
    doc: &str,
    epoch: u64,
    heads: &[[u8; 32]],
    value: &Value,
) -> Result<(Vec<u8>, [u8; 32]), CutError> {
    if !value.is_object() {
        return Err(CutError::Base("the document value is not an object".into()));
    }
    let actor = base_actor(doc, epoch, heads);
    let made = panic_safe(|| -> Result<Vec<u8>, String> {
        let mut am = Automerge::new().with_actor(ActorId::from(actor.as_slice()));
        let mut tx = am.transaction();
        crate::json::reconcile_root(&mut tx, value).map_err(|e| e.to_string())?;
        // An empty object still makes a change, so every cut has a base to depend on.
        if tx.pending_ops() == 0 {
            tx.put(automerge::ROOT, "_", ())
                .map_err(|e| e.to_string())?;
            tx.delete(automerge::ROOT, "_").map_err(|e| e.to_string())?;
        }
        tx.commit_with(
            CommitOptions::default()
                .with_time(0)
                .with_message(doc.to_string()),
        );
        let change = am
            .get_last_local_change()
            .ok_or_else(|| "no change was made".to_string())?;
        Ok(change.raw_bytes().to_vec())
    })
    .ok_or_else(|| CutError::Base("Automerge panicked".into()))?
    .map_err(CutError::Base)?;
    let h = header::parse(&made).map_err(|e| CutError::Base(e.to_string()))?;
    Ok((made, h.hash))
}

/// Check base bytes received from a peer against a record: they must hash to `base_hash`.
pub fn check_base(record: &CutRecord, bytes: &[u8]) -> Result<(), CutError> {
    match header::parse(bytes) {
        Ok(h) if h.hash == record.base_hash => Ok(()),
        _ => Err(CutError::BaseMismatch),
    }
}

/// What a cut does to one change (see "Sorting changes" in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fate {
    /// The base itself, or built on it: stays in the document.
    Kept,
    /// In the causal past of the cut's heads: replaced by the base, dropped.
    Folded,
    /// Neither: void, carried forward by its author.
    Late,
}

/// One change as [`classify`] sees it.
#[derive(Debug, Clone)]
pub struct CutRow {
    /// Change hash.
    pub hash: [u8; 32],
    /// Author.
    pub author: NodeId,
    /// Seq.
    pub seq: u64,
    /// Dependencies.
    pub deps: Vec<[u8; 32]>,
}

/// Sort a document's changes (in causal order: every change after its dependencies) against
/// the winning cut. `chain` is the winner's ancestry, oldest first, the winner last (each
/// record's `parent` is the hash of the one before it; the first has none, or is the oldest
/// record this node holds). A change's *lineage* is the base it descends from (none: the
/// history before the first cut of the chain); it is
/// * kept if its lineage is the winner's base (the base itself included);
/// * folded if the record built on its lineage folds its seq (and none of its dependencies is
///   late): the folded clock is read in the change's own epoch, where seqs are comparable;
/// * late otherwise: concurrent with a cut, mixed lineages, or built on a losing cut's base.
///
/// A function of the chain and the set of rows only. The second value of each entry is the
/// index in `chain` of the record that folds the change (the winner's index: folded by the
/// winner itself, retained one epoch; lower: folded by an earlier cut, dropped).
pub fn classify(chain: &[CutRecord], rows: &[CutRow]) -> Vec<(Fate, usize)> {
    // Lineage key: None = before the chain's first cut; Some(i) = base of chain[i].
    let base_of: HashMap<[u8; 32], usize> = chain
        .iter()
        .enumerate()
        .map(|(i, r)| (r.base_hash, i))
        .collect();
    let last = chain.len().saturating_sub(1);
    // Per known row: its lineage (Err: unknown or mixed), and whether it is late.
    type Lineage = Result<Option<usize>, ()>;
    let mut seen: HashMap<[u8; 32], (Lineage, bool)> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let lineage: Result<Option<usize>, ()> = if let Some(&i) = base_of.get(&row.hash) {
            Ok(Some(i))
        } else if row.deps.is_empty() {
            Ok(None)
        } else {
            let mut l: Option<Result<Option<usize>, ()>> = None;
            let mut dep_late = false;
            for d in &row.deps {
                let Some((dl, late)) = seen.get(d) else {
                    continue; // dropped already: folded by an earlier cut
                };
                dep_late |= *late;
                l = match l {
                    None => Some(*dl),
                    Some(prev) if prev == *dl => Some(prev),
                    Some(_) => Some(Err(())),
                };
            }
            if dep_late {
                Err(())
            } else {
                l.unwrap_or(Err(()))
            }
        };
        let fate = match lineage {
            Ok(Some(i)) if i == last && !chain.is_empty() => (Fate::Kept, last),
            Ok(l) => {
                // The record built on this lineage: chain[0] for the history before it,
                // chain[i + 1] for the base of chain[i].
                let folder = match l {
                    None => 0,
                    Some(i) => i + 1,
                };
                match chain.get(folder) {
                    Some(r) if r.folded.get(&row.author).is_some_and(|s| row.seq <= *s) => {
                        (Fate::Folded, folder)
                    }
                    _ => (Fate::Late, last),
                }
            }
            Err(()) => (Fate::Late, last),
        };
        seen.insert(row.hash, (lineage, fate.0 == Fate::Late));
        out.push(fate);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Member;
    use serde_json::json;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn record(k: &SecretKey, epoch: u64, heads: Vec<[u8; 32]>) -> CutRecord {
        let mut folded = BTreeMap::new();
        folded.insert(NodeId([7; 32]), 3);
        folded.insert(NodeId([9; 32]), 1);
        CutRecord::sign(
            k,
            &[1; 32],
            "app/x",
            epoch,
            (epoch > 1).then_some([5; 32]),
            heads,
            folded,
            [6; 32],
        )
    }

    fn admin_membership(admin: NodeId, writer: NodeId) -> Membership {
        let mut m = Membership {
            root: Some(admin),
            ..Default::default()
        };
        let member = |role| Member {
            name: String::new(),
            role,
            addrs: vec![],
            scopes: vec![],
            cutoff: BTreeMap::new(),
        };
        m.members.insert(admin, member(Role::Admin));
        m.members.insert(writer, member(Role::Writer));
        m
    }

    #[test]
    fn golden_bytes_pin_the_encoding() {
        let r = record(&key(2), 2, vec![[0xbb; 32], [0xaa; 32]]);
        let enc = r.encode();
        let mut expected = vec![1u8, 0, 5];
        expected.extend_from_slice(b"app/x");
        expected.extend_from_slice(&2u64.to_be_bytes());
        expected.push(1);
        expected.extend_from_slice(&[5; 32]);
        expected.extend_from_slice(&[0, 2]);
        expected.extend_from_slice(&[0xaa; 32]);
        expected.extend_from_slice(&[0xbb; 32]);
        expected.extend_from_slice(&[0, 0, 0, 2]);
        expected.extend_from_slice(&[7; 32]);
        expected.extend_from_slice(&3u64.to_be_bytes());
        expected.extend_from_slice(&[9; 32]);
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.extend_from_slice(&[6; 32]);
        expected.extend_from_slice(&key(2).node_id().0);
        expected.extend_from_slice(&r.sig);
        assert_eq!(enc, expected);
        assert_eq!(enc.len(), r.encoded_len());
        // ed25519 is deterministic: the signature (and so the record hash) is pinned too.
        assert_eq!(
            identity::hex(&r.hash()),
            "20c05d6e627367271de59c9421244de061f05bafde1384e1fd495db993617086"
        );
        assert_eq!(CutRecord::decode(&enc).unwrap(), r);
        for cut in 0..enc.len() {
            assert!(CutRecord::decode(&enc[..cut]).is_err(), "prefix {cut}");
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert_eq!(CutRecord::decode(&trailing), Err(DecodeError::Trailing));
        let mut v2 = enc.clone();
        v2[0] = 2;
        assert_eq!(CutRecord::decode(&v2), Err(DecodeError::UnknownVersion(2)));
    }

    #[test]
    fn verify_needs_the_signature_cluster_and_an_admin() {
        let admin = key(2);
        let writer = key(3);
        let m = admin_membership(admin.node_id(), writer.node_id());
        let r = record(&admin, 1, vec![[0xaa; 32]]);
        assert_eq!(r.verify(&[1; 32], &m), Ok(()));
        assert_eq!(r.verify(&[2; 32], &m), Err(CutError::BadSignature));
        let mut tampered = r.clone();
        tampered.epoch = 9;
        assert_eq!(tampered.verify(&[1; 32], &m), Err(CutError::BadSignature));
        let by_writer = record(&writer, 1, vec![[0xaa; 32]]);
        assert_eq!(by_writer.verify(&[1; 32], &m), Err(CutError::NotAdmin));
    }

    #[test]
    fn the_winner_does_not_depend_on_order() {
        let a = record(&key(2), 1, vec![[1; 32]]);
        let b = record(&key(2), 1, vec![[2; 32]]);
        let c = record(&key(3), 2, vec![[3; 32]]);
        let low = if a.hash() < b.hash() { &a } else { &b };
        assert_eq!(winner([&a, &b]), Some(low));
        assert_eq!(winner([&b, &a]), Some(low));
        for order in [[&a, &b, &c], [&c, &b, &a], [&b, &c, &a]] {
            assert_eq!(winner(order), Some(&c));
        }
        assert!(c.wins_over(&a) && !a.wins_over(&c));
        assert!(low.wins_over(if low == &a { &b } else { &a }));
        assert_eq!(winner(std::iter::empty()), None);
    }

    #[test]
    fn the_base_is_byte_identical_and_depends_on_the_value() {
        let v = json!({"b": {"x": [1, 2, "s"]}, "a": true, "n": null});
        let (b1, h1) = build_base("app/x", 1, &[[1; 32]], &v).unwrap();
        let (b2, h2) = build_base("app/x", 1, &[[1; 32]], &v).unwrap();
        assert_eq!((&b1, h1), (&b2, h2));
        // Pinned: nodes of different builds must make the same base (an Automerge upgrade that
        // changes these bytes needs a new base format, not a silent divergence).
        let (_, pinned) = build_base("app/x", 1, &[[1; 32]], &json!({"k": 1})).unwrap();
        assert_eq!(
            identity::hex(&pinned),
            "a8b08189785e6c6982d8b375c54bc37857379967ccbc9ad4f823f285ab6e7c37"
        );
        let (_, h3) = build_base("app/x", 1, &[[1; 32]], &json!({"a": false})).unwrap();
        let (_, h4) = build_base("app/x", 2, &[[1; 32]], &v).unwrap();
        assert!(h1 != h3 && h1 != h4);
        let (_, empty) = build_base("app/x", 1, &[], &json!({})).unwrap();
        assert_ne!(empty, h1);
        assert!(build_base("app/x", 1, &[], &json!([1])).is_err());
        // The base reads back as the value, and its hash is what a record names.
        let c = automerge::Change::try_from(b1.as_slice()).unwrap();
        let mut am = Automerge::new();
        am.apply_changes([c]).unwrap();
        assert_eq!(crate::json::to_json(&am, &automerge::ROOT).unwrap(), v);
        let mut r = record(&key(2), 1, vec![[1; 32]]);
        r.base_hash = h1;
        assert_eq!(check_base(&r, &b1), Ok(()));
        assert_eq!(
            check_base(&r, &b1[..b1.len() - 1]),
            Err(CutError::BaseMismatch)
        );
    }

    #[test]
    fn changes_are_kept_folded_or_late() {
        let a = NodeId([7; 32]);
        let b = NodeId([8; 32]);
        let row = |h: u8, author, seq, deps: Vec<u8>| CutRow {
            hash: [h; 32],
            author,
            seq,
            deps: deps.into_iter().map(|d| [d; 32]).collect(),
        };
        let mut folded = BTreeMap::new();
        folded.insert(a, 2);
        let r = CutRecord::sign(
            &key(2),
            &[1; 32],
            "app/x",
            1,
            None,
            vec![[2; 32]],
            folded,
            [50; 32],
        );
        let rows = vec![
            row(1, a, 1, vec![]),                // folded
            row(2, a, 2, vec![1]),               // folded (the cut's head)
            row(3, b, 1, vec![1]), // late: concurrent with the cut, b not in the clock
            row(4, a, 3, vec![2]), // late: a wrote past the cut without knowing it
            row(50, NodeId([0; 32]), 1, vec![]), // the base
            row(5, b, 1, vec![50]), // kept: written on the base (seqs restart per epoch)
            row(6, a, 1, vec![5]), // kept
            row(7, b, 2, vec![3]), // late: built on a late change
        ];
        let fates: Vec<Fate> = classify(std::slice::from_ref(&r), &rows)
            .into_iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(
            fates,
            vec![
                Fate::Folded,
                Fate::Folded,
                Fate::Late,
                Fate::Late,
                Fate::Kept,
                Fate::Kept,
                Fate::Kept,
                Fate::Late
            ]
        );
        // A second cut built on the first: seqs are read in each change's own epoch. The
        // first base and `a`'s epoch-1 change are folded by it; `b`'s later change is late.
        let mut folded2 = BTreeMap::new();
        folded2.insert(NodeId([0; 32]), 1);
        folded2.insert(b, 1);
        let r2 = CutRecord::sign(
            &key(2),
            &[1; 32],
            "app/x",
            2,
            Some(r.hash()),
            vec![[5; 32]],
            folded2,
            [60; 32],
        );
        let rows2 = vec![
            row(50, NodeId([0; 32]), 1, vec![]),
            row(5, b, 1, vec![50]),
            row(6, a, 1, vec![5]), // a not in the second clock: late
            row(60, NodeId([1; 32]), 1, vec![]),
            row(8, a, 1, vec![60]), // kept, same seq as `6` in another epoch
        ];
        let fates2 = classify(&[r.clone(), r2], &rows2);
        assert_eq!(
            fates2,
            vec![
                (Fate::Folded, 1),
                (Fate::Folded, 1),
                (Fate::Late, 1),
                (Fate::Kept, 1),
                (Fate::Kept, 1)
            ]
        );
    }
}
