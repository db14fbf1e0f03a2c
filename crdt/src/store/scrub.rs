//! Finding and healing changes damaged on disk (bit rot on an SD card, a stray write, a row
//! edited behind the agent's back, with or without SQLite's page checksums recomputed).
//!
//! Why it exists: a stored change is trusted once it was verified at ingest, but the disk
//! may alter it later. A damaged change that is applied or served makes the node disagree
//! with itself (the view says one thing, Automerge another) and with its peers, and if the
//! node still *claims* to hold the change (in its version vectors and heads), no peer ever
//! sends the good copy again. So:
//!
//! * **Every change read back is checked** ([`check_row`]): loading a document
//!   (`cache::valid_changes_after`), rebuilding one, loading membership, and serving peers
//!   (`changes_after`, `get_change`, fork evidence) verify that the bytes frame and hash to
//!   the stored hash and name the stored author (one SHA-256, which these paths mostly paid
//!   anyway). A row that fails is never applied nor served: it is logged at error level with
//!   its hash and document and remembered as a *suspect*.
//! * **A slow background scrub** ([`Store::scrub_step`]) checks `budget` rows per call from a
//!   cursor over `changes.id` (wrapping around), fully: the signature too (over cluster id,
//!   document and hash), and the stored seq, start_op, time and dependencies against the
//!   bytes. The agent calls it from a timer, a few hundred rows per second.
//! * **Quarantine** ([`Store::repair`], run at the start of every ingest, write, scrub step
//!   and load that needs it): a bad row, and every stored change of its document that depends
//!   on it (directly or not; Automerge could not apply them without it), move from `changes`
//!   to the `quarantine` table in one transaction. The document is then rebuilt from what is
//!   left (view, heads, snapshot dropped; for the membership document, the evaluation), so
//!   the node's version vectors and heads stop claiming those changes: anti-entropy finds the
//!   difference and a peer sends the good copies. The dependents' own bytes are good: they
//!   are offered to ingest again at once (and at every open while not healed) and wait in
//!   the pending set, whose wanted dependencies name the damaged hash to peers.
//! * **Healed**: a quarantined change held again in `changes` (a peer's copy, verified by
//!   ingest like any other) is marked healed and its bytes dropped.
//! * **No sequence number reuse**: while one of this node's own changes of a document is
//!   quarantined and not healed, this node refuses to write that document (its next write
//!   would reuse the quarantined change's seq, which peers hold: an equivocation that would
//!   flag the key). A damaged own change that no peer ever received cannot be healed; the
//!   refusal says so.
//!
//! Snapshots are checked when a document is loaded: a snapshot that does not load, or whose
//! document (with the changes after it) does not end at the stored heads, is dropped and the
//! document loaded from its changes (`maintenance` saves a new snapshot later).
//!
//! Counters for metrics and `status`: [`Store::scrub_status`].

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashSet};

use automerge::{Automerge, ROOT};
use rusqlite::params;
use serde_json::Value;

use super::{blob_to_hashes, hashes_to_blob, Store};
use crate::error::StoreError;
use crate::header::{self, ChangeHeader};
use crate::identity::{hex, NodeId};
use crate::json;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

/// The scrub's state in a [`Store`] (nothing of it is durable but the `quarantine` table).
#[derive(Default)]
pub(super) struct Scrub {
    /// Next `changes.id` the background scrub checks is above this one.
    cursor: i64,
    /// Rows a read found damaged: hash → (document, reason). Reads take `&self`, so they
    /// only record; the next `&mut` call quarantines them ([`Store::repair`]).
    suspects: RefCell<BTreeMap<[u8; 32], (String, String)>>,
    /// Changes found damaged (and quarantined) since the store was opened.
    found: u64,
    /// Snapshots dropped as unusable since the store was opened.
    snapshots_dropped: Cell<u64>,
    /// Rows checked by the background scrub since the store was opened.
    checked: u64,
    /// Completed passes over the whole table since the store was opened.
    passes: u64,
}

/// What the background scrub and the read checks found (see [`Store::scrub_status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubStatus {
    /// Changes found damaged on disk since the store was opened.
    pub corrupt_found: u64,
    /// Changes found damaged on disk ever (rows of the `quarantine` table marked corrupt).
    pub corrupt_ever: u64,
    /// Quarantined changes not held again yet (damaged ones and those depending on them).
    pub quarantined: u64,
    /// Quarantined changes held again (a good copy arrived from a peer).
    pub healed: u64,
    /// Document snapshots dropped as unusable since the store was opened.
    pub snapshots_dropped: u64,
    /// Rows checked by the background scrub since the store was opened.
    pub checked: u64,
    /// Completed background passes over all stored changes since the store was opened.
    pub passes: u64,
}

/// What one [`Store::scrub_step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubStep {
    /// Rows checked.
    pub checked: usize,
    /// Changes quarantined as damaged (by this step's checks or earlier reads): (document,
    /// hash).
    pub corrupt: Vec<(String, [u8; 32])>,
    /// Quarantined changes found held again.
    pub healed: usize,
    /// Whether the cursor wrapped around (a pass ended).
    pub wrapped: bool,
}

/// The cheap check of a row read back for loading or serving: its bytes are a well-framed
/// change whose hash is the stored hash and whose actor is the stored author.
pub(super) fn check_row(hash: &[u8], author: &[u8], bytes: &[u8]) -> Result<ChangeHeader, String> {
    let h = header::parse(bytes).map_err(|e| format!("bytes do not parse: {e}"))?;
    if h.hash.as_slice() != hash {
        return Err(format!(
            "bytes hash to {}, not to the stored hash",
            hex(&h.hash)
        ));
    }
    if h.actor.as_slice() != author {
        return Err("the change's actor is not the stored author".into());
    }
    Ok(h)
}

/// A quarantined dependent offered to ingest again: hash, author, signature, bytes.
type Dependent = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// One stored row, as the scrub reads it.
struct FullRow {
    id: i64,
    hash: Vec<u8>,
    doc: String,
    author: Vec<u8>,
    seq: i64,
    start_op: i64,
    time: i64,
    deps: Vec<u8>,
    sig: Vec<u8>,
    bytes: Vec<u8>,
}

impl Store {
    /// Record a row a read found damaged (it was not used); quarantined by the next
    /// [`Store::repair`].
    pub(super) fn note_suspect(&self, doc: &str, hash: &[u8], reason: &str) {
        let Ok(h) = <[u8; 32]>::try_from(hash) else {
            tracing::error!(doc, hash = %hex(hash), reason, "a stored change row has a malformed hash");
            return;
        };
        if let std::collections::btree_map::Entry::Vacant(e) =
            self.scrub.suspects.borrow_mut().entry(h)
        {
            tracing::error!(doc, hash = %hex(&h), reason, "a stored change is damaged; it is not used and will be quarantined");
            e.insert((doc.to_string(), reason.to_string()));
        }
    }

    /// Count a snapshot dropped by a load.
    pub(super) fn note_snapshot_dropped(&self) {
        self.scrub
            .snapshots_dropped
            .set(self.scrub.snapshots_dropped.get() + 1);
    }

    /// Whether reads recorded damaged rows not yet quarantined.
    pub(super) fn has_suspects(&self) -> bool {
        !self.scrub.suspects.borrow().is_empty()
    }

    /// Quarantine what reads found damaged and finish rebuilds a crash interrupted; cheap when
    /// there is nothing to do. Returns the quarantined damaged changes.
    pub fn repair(&mut self) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let mut out = Vec::new();
        if self.has_suspects() {
            let suspects = std::mem::take(&mut *self.scrub.suspects.borrow_mut());
            let mut by_doc: BTreeMap<String, Vec<([u8; 32], String)>> = BTreeMap::new();
            for (h, (doc, reason)) in suspects {
                by_doc.entry(doc).or_default().push((h, reason));
            }
            for (doc, bad) in by_doc {
                for (h, _) in &bad {
                    out.push((doc.clone(), *h));
                }
                self.quarantine(&doc, bad)?;
            }
        }
        Ok(out)
    }

    /// Check up to `budget` stored changes fully (signature included), continuing where the
    /// previous call stopped and wrapping around at the end; quarantine what fails (and
    /// what reads found since the last call), and mark quarantined changes that are held
    /// again as healed. Call it slowly from a timer: a few hundred rows per second keep a
    /// small device's disk and CPU idle and still pass over 100k changes in minutes.
    pub fn scrub_step(&mut self, budget: usize) -> Result<ScrubStep, StoreError> {
        let mut step = ScrubStep {
            corrupt: self.repair()?,
            ..ScrubStep::default()
        };
        let rows: Vec<FullRow> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, hash, doc, author, seq, start_op, time, deps, sig, bytes FROM changes
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![self.scrub.cursor, budget.max(1) as i64], |r| {
                Ok(FullRow {
                    id: r.get(0)?,
                    hash: r.get(1)?,
                    doc: r.get(2)?,
                    author: r.get(3)?,
                    seq: r.get(4)?,
                    start_op: r.get(5)?,
                    time: r.get(6)?,
                    deps: r.get(7)?,
                    sig: r.get(8)?,
                    bytes: r.get(9)?,
                })
            })?;
            rows.collect::<Result<_, _>>()?
        };
        step.checked = rows.len();
        self.scrub.checked += rows.len() as u64;
        step.wrapped = rows.len() < budget.max(1);
        self.scrub.cursor = if step.wrapped {
            self.scrub.passes += 1;
            0
        } else {
            rows.last().map(|r| r.id).unwrap_or(0)
        };
        for row in &rows {
            if let Err(reason) = self.check_full(row) {
                self.note_suspect(&row.doc, &row.hash, &reason);
            }
        }
        step.corrupt.extend(self.repair()?);
        step.healed = self.mark_healed()?;
        Ok(step)
    }

    /// Everything about a row that its bytes and signature determine.
    fn check_full(&self, row: &FullRow) -> Result<(), String> {
        let author = NodeId::from_slice(&row.author).ok_or("the stored author is malformed")?;
        let sig: [u8; 64] = row
            .sig
            .as_slice()
            .try_into()
            .map_err(|_| "the stored signature is malformed")?;
        let h = check_row(&row.hash, &row.author, &row.bytes)?;
        let signed = SignedChange {
            doc: row.doc.clone(),
            author,
            sig,
            bytes: row.bytes.clone(),
        };
        signed
            .authenticate(&self.cluster)
            .map_err(|e| format!("does not authenticate: {e}"))?;
        if h.seq != row.seq as u64
            || h.start_op != row.start_op as u64
            || h.time != row.time
            || hashes_to_blob(&h.deps) != row.deps
        {
            return Err(
                "the stored seq, start_op, time or dependencies differ from the change's".into(),
            );
        }
        Ok(())
    }

    /// Move the damaged changes `bad` of `doc` and every stored change of `doc` that depends
    /// on one of them to `quarantine`, rebuild the document without them, and offer the
    /// dependents (whose bytes are good) to ingest again. Returns how many rows moved.
    fn quarantine(&mut self, doc: &str, bad: Vec<([u8; 32], String)>) -> Result<usize, StoreError> {
        type Row = (Vec<u8>, Vec<u8>, i64, Vec<u8>, Vec<u8>, Vec<u8>, i64);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT hash, author, seq, deps, sig, bytes, status FROM changes
                 WHERE doc = ?1 ORDER BY id",
            )?
            .query_map(params![doc], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let reasons: BTreeMap<[u8; 32], String> = bad.into_iter().collect();
        let mut out: HashSet<Vec<u8>> = reasons.keys().map(|h| h.to_vec()).collect();
        // Dependents, to a fixed point (ids follow causal order, so one pass nearly always).
        loop {
            let before = out.len();
            for (hash, _, _, deps, ..) in &rows {
                if !out.contains(hash) && blob_to_hashes(deps).iter().any(|d| out.contains(&d[..]))
                {
                    out.insert(hash.clone());
                }
            }
            if out.len() == before {
                break;
            }
        }
        let moved: Vec<&Row> = rows.iter().filter(|r| out.contains(&r.0)).collect();
        if moved.is_empty() {
            return Ok(0);
        }
        let mut dependents = Vec::new();
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO quarantine (hash, doc, author, seq, sig, bytes, reason, corrupt, healed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (hash) DO UPDATE SET sig = excluded.sig, bytes = excluded.bytes,
                    reason = excluded.reason, corrupt = excluded.corrupt, rebuilt = 0,
                    healed = excluded.healed",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM changes WHERE hash = ?1")?;
            for (hash, author, seq, _, sig, bytes, status) in &moved {
                let damaged = <[u8; 32]>::try_from(hash.as_slice())
                    .ok()
                    .and_then(|h| reasons.get(&h));
                let reason = damaged
                    .cloned()
                    .unwrap_or_else(|| "depends on a damaged change".to_string());
                // A void change is not awaited from peers (they only send valid ones).
                let healed = *status != 0;
                ins.execute(params![
                    hash,
                    doc,
                    author,
                    seq,
                    sig,
                    bytes,
                    reason,
                    damaged.is_some() as i64,
                    healed as i64,
                ])?;
                del.execute(params![hash])?;
                if damaged.is_none() && !healed {
                    dependents.push((hash.clone(), author.clone(), sig.clone(), bytes.clone()));
                }
            }
        }
        tx.commit()?;
        for (hash, reason) in &reasons {
            if out.contains(&hash[..]) {
                self.scrub.found += 1;
                tracing::error!(
                    doc,
                    hash = %hex(hash),
                    reason = reason.as_str(),
                    dependents = moved.len() - reasons.len().min(moved.len()),
                    "quarantined a change damaged on disk (and the changes depending on it); waiting for a peer's good copy"
                );
            }
        }
        self.finish_rebuilds()?;
        self.reoffer(doc, dependents)?;
        Ok(moved.len())
    }

    /// Rebuild every document with quarantined rows it was not rebuilt without yet (a crash
    /// may have come between the move and the rebuild).
    pub(super) fn finish_rebuilds(&mut self) -> Result<(), StoreError> {
        let docs: Vec<String> = self
            .conn
            .prepare_cached("SELECT DISTINCT doc FROM quarantine WHERE rebuilt = 0")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for doc in docs {
            self.loaded.remove(&doc);
            *self.clocks.borrow_mut() = None;
            if doc == MEMBERSHIP_DOC {
                self.load_membership()?;
                self.rewrite_membership_view()?;
            } else {
                self.rebuild(&doc)?;
            }
            self.conn
                .prepare_cached("UPDATE quarantine SET rebuilt = 1 WHERE doc = ?1")?
                .execute(params![doc])?;
        }
        Ok(())
    }

    /// The membership document's heads, change count and view rows from its evaluation.
    fn rewrite_membership_view(&mut self) -> Result<(), StoreError> {
        let Some(eval) = self.member_eval.as_ref() else {
            return Ok(());
        };
        let heads: Vec<[u8; 32]> = eval.doc.get_heads().iter().map(|h| h.0).collect();
        let n = eval.valid.len() as i64;
        let root = json::to_json(&eval.doc, &ROOT).unwrap_or(Value::Null);
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
             ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads, n_changes = excluded.n_changes",
            params![MEMBERSHIP_DOC, hashes_to_blob(&heads), n],
        )?;
        tx.execute("DELETE FROM kv WHERE doc = ?1", params![MEMBERSHIP_DOC])?;
        if let Value::Object(m) = root {
            for (k, v) in m {
                tx.execute(
                    "INSERT INTO kv (doc, key, value) VALUES (?1, ?2, ?3)",
                    params![MEMBERSHIP_DOC, k, v.to_string()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Offer quarantined dependents (good bytes) to ingest: they wait in the pending set for
    /// the damaged change they depend on, which the pending set's wanted dependencies then
    /// name to peers.
    fn reoffer(&mut self, doc: &str, rows: Vec<Dependent>) -> Result<(), StoreError> {
        let batch: Vec<SignedChange> = rows
            .into_iter()
            .filter_map(|(_, author, sig, bytes)| {
                Some(SignedChange {
                    doc: doc.to_string(),
                    author: NodeId::from_slice(&author)?,
                    sig: sig.try_into().ok()?,
                    bytes,
                })
            })
            .collect();
        if !batch.is_empty() {
            self.ingest_inner(batch)?;
        }
        Ok(())
    }

    /// At open: finish interrupted rebuilds, quarantine what loading membership found
    /// damaged, and offer the quarantined dependents not healed yet to ingest again (the
    /// pending set is not durable).
    pub(super) fn repair_at_open(&mut self) -> Result<(), StoreError> {
        self.finish_rebuilds()?;
        self.repair()?;
        self.mark_healed()?;
        type Row = (String, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT doc, hash, author, sig, bytes FROM quarantine
                 WHERE corrupt = 0 AND healed = 0 ORDER BY doc, seq",
            )?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut by_doc: BTreeMap<String, Vec<Dependent>> = BTreeMap::new();
        for (doc, hash, author, sig, bytes) in rows {
            by_doc
                .entry(doc)
                .or_default()
                .push((hash, author, sig, bytes));
        }
        for (doc, rows) in by_doc {
            self.reoffer(&doc, rows)?;
        }
        Ok(())
    }

    /// Mark quarantined changes that are held again as healed (dropping their bytes).
    fn mark_healed(&mut self) -> Result<usize, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE quarantine SET healed = 1, bytes = x''
                 WHERE healed = 0 AND hash IN (SELECT hash FROM changes)",
            )?
            .execute([])?;
        if n > 0 {
            tracing::info!(
                healed = n,
                "quarantined changes are held again (good copies from peers)"
            );
        }
        Ok(n)
    }

    /// Refuse a local write to `doc` while one of `me`'s own changes there is quarantined and
    /// not held again: the write would reuse its seq.
    pub(super) fn refuse_if_repairing(&self, doc: &str, me: &NodeId) -> Result<(), StoreError> {
        let waiting: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT MIN(seq) FROM quarantine q WHERE doc = ?1 AND author = ?2 AND healed = 0
                   AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.hash = q.hash)",
            )?
            .query_row(params![doc, me.0.to_vec()], |r| r.get(0))?;
        match waiting {
            None => Ok(()),
            Some(seq) => Err(StoreError::Denied(format!(
                "this node's change at seq {seq} of `{doc}` was found damaged on disk and is \
                 quarantined until a peer sends its good copy; writing `{doc}` now would reuse \
                 that seq. Retry once this node has synced with a peer (`lichen status` shows \
                 the quarantined changes)"
            ))),
        }
    }

    /// Counters of the checks, the scrub and the quarantine.
    pub fn scrub_status(&self) -> Result<ScrubStatus, StoreError> {
        let (ever, waiting, healed): (i64, i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(SUM(corrupt), 0),
                        COALESCE(SUM(healed = 0 AND NOT EXISTS
                            (SELECT 1 FROM changes c WHERE c.hash = q.hash)), 0),
                        COALESCE(SUM(healed = 1 OR EXISTS
                            (SELECT 1 FROM changes c WHERE c.hash = q.hash)), 0)
                 FROM quarantine q",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(ScrubStatus {
            corrupt_found: self.scrub.found,
            corrupt_ever: ever as u64,
            quarantined: waiting as u64,
            healed: healed as u64,
            snapshots_dropped: self.scrub.snapshots_dropped.get(),
            checked: self.scrub.checked,
            passes: self.scrub.passes,
        })
    }

    /// Hashes of the quarantined changes not held again, by document (for tests and
    /// operators).
    pub fn quarantined(&self) -> Result<BTreeMap<String, BTreeSet<[u8; 32]>>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT doc, hash FROM quarantine q WHERE healed = 0
                   AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.hash = q.hash)",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out: BTreeMap<String, BTreeSet<[u8; 32]>> = BTreeMap::new();
        for (doc, h) in rows {
            if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                out.entry(doc).or_default().insert(h);
            }
        }
        Ok(out)
    }

    /// Whether a loaded document ends at the stored heads of `doc` (a snapshot check).
    pub(super) fn heads_match(&self, doc: &str, am: &Automerge) -> Result<bool, StoreError> {
        let mut stored = self.heads(doc)?;
        stored.sort();
        let mut held: Vec<[u8; 32]> = am.get_heads().iter().map(|h| h.0).collect();
        held.sort();
        Ok(stored == held)
    }
}
