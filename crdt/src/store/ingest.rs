//! Received changes: authenticate every change without Automerge → membership changes go to
//! `ingest_membership` → per document: authorize, structural checks (deps, seq, equivocation
//! variants, `start_op`, parse) → apply the batch to the Automerge document, or fast-forward
//! the view without it → `persist` → report. Changes that may become valid later wait in the
//! bounded `PendingSet` and are retried while a round makes progress.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use automerge::Change;
use rusqlite::{params, OptionalExtension};

use super::persist::{insert_changes, op_ids_blob, op_ids_from_blob, Accepted, Row, Touched};
use super::{
    panic_safe, IngestReport, Outcome, Store, MAX_DEFERRED, MAX_PENDING, MAX_PENDING_BYTES,
};
use crate::error::{RejectReason, StoreError};
use crate::header::ChangeHeader;
use crate::identity::NodeId;
use crate::json;
use crate::owners::Owners;
use crate::signed::{ClusterId, SignedChange, MEMBERSHIP_DOC};

/// Changes that may become valid later, already authenticated (their signatures are not
/// checked again on retry), bounded in count and bytes: the oldest are dropped first (peers
/// offer them again through anti-entropy).
pub(super) struct PendingSet {
    pub(super) queue: VecDeque<(SignedChange, ChangeHeader)>,
    pub(super) hashes: HashSet<[u8; 32]>,
    pub(super) bytes: usize,
}

impl PendingSet {
    pub(super) fn insert(&mut self, c: SignedChange, h: ChangeHeader) {
        if !self.hashes.insert(h.hash) {
            return;
        }
        self.bytes += c.bytes.len();
        self.queue.push_back((c, h));
        while self.queue.len() > MAX_PENDING || self.bytes > MAX_PENDING_BYTES {
            if let Some((old, oh)) = self.queue.pop_front() {
                self.bytes -= old.bytes.len();
                self.hashes.remove(&oh.hash);
            }
        }
    }

    pub(super) fn drain(&mut self) -> Vec<(SignedChange, ChangeHeader)> {
        self.hashes.clear();
        self.bytes = 0;
        self.queue.drain(..).collect()
    }
}

impl Store {
    /// Verify and apply a batch of received changes (see module docs). Returns a per-change
    /// report; `Err` only for local failures (disk), in which case nothing was stored.
    pub fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        self.sync_for(false)?;
        // Quarantine what reads found damaged first (see `scrub`): the documents it touched
        // changed (the caller's cached version vectors are stale).
        let repaired = self.repair()?;
        let mut report = self.ingest_inner(batch)?;
        report
            .changed_docs
            .extend(repaired.into_iter().map(|(doc, _)| doc));
        Ok(report)
    }

    pub(super) fn ingest_inner(
        &mut self,
        batch: Vec<SignedChange>,
    ) -> Result<IngestReport, StoreError> {
        let mut report = IngestReport::default();
        let mut progress = self.ingest_round(batch, Vec::new(), &mut report, true)?;
        while progress && !self.pending.queue.is_empty() {
            let retry = self.pending.drain();
            progress = self.ingest_round(Vec::new(), retry, &mut report, false)?;
        }
        Ok(report)
    }

    pub(super) fn ingest_round(
        &mut self,
        batch: Vec<SignedChange>,
        preauthed: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        record: bool,
    ) -> Result<bool, StoreError> {
        let cluster = self.cluster;
        // 1. Authenticate without Automerge (in parallel for big batches); changes retried
        //    from the pending set were authenticated when they arrived.
        let mut authed = authenticate_all(&batch, &cluster);
        let mut batch = batch;
        for (c, h) in preauthed {
            batch.push(c);
            authed.push(Ok(h));
        }
        let mut members: Vec<(SignedChange, ChangeHeader)> = Vec::new();
        let mut others: Vec<(SignedChange, ChangeHeader)> = Vec::new();
        let mut seen = HashSet::new();
        let mut outcome =
            |report: &mut IngestReport, c: &SignedChange, h: Option<[u8; 32]>, o: Outcome| {
                // Pending changes retried silently do not repeat their outcome.
                if record || !matches!(o, Outcome::Pending(_)) {
                    report.outcomes.push((c.doc.clone(), c.author, h, o));
                }
            };
        for (c, r) in batch.into_iter().zip(authed) {
            match r {
                Err(reason) => {
                    let h = c.hash();
                    outcome(report, &c, h, Outcome::Rejected(reason));
                }
                Ok(h) => {
                    if !seen.insert(h.hash) || self.has_change(&h.hash)? {
                        outcome(report, &c, Some(h.hash), Outcome::Duplicate);
                    } else if c.doc == MEMBERSHIP_DOC {
                        members.push((c, h));
                    } else {
                        others.push((c, h));
                    }
                }
            }
        }
        let mut progress = false;
        // 2. Membership first.
        if !members.is_empty() {
            progress |= self.ingest_membership(members, report, &mut outcome)?;
        }
        // 3. Config documents, grouped per document.
        let mut by_doc: BTreeMap<String, Vec<(SignedChange, ChangeHeader)>> = BTreeMap::new();
        for (c, h) in others {
            by_doc.entry(c.doc.clone()).or_default().push((c, h));
        }
        for (doc, changes) in by_doc {
            progress |= self.ingest_doc(&doc, changes, report, &mut outcome)?;
        }
        Ok(progress)
    }

    /// Whether a valid change with this hash is stored (an index probe; reads no bytes).
    pub fn has_valid_change(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM changes WHERE hash = ?1 AND status = 0")?
            .exists(params![hash.to_vec()])?)
    }

    pub(super) fn has_change(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM changes WHERE hash = ?1")?
            .exists(params![hash.to_vec()])?)
    }

    /// Status and max_op of a stored change: `Some((valid, max_op))`.
    /// A stored dependency of a change of `doc`: (valid, its max_op, whether it is a change
    /// of `doc` too).
    pub(super) fn dep_info(
        &self,
        doc: &str,
        hash: &[u8; 32],
    ) -> Result<Option<(bool, u64, bool)>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT status, max_op, doc = ?2 FROM changes WHERE hash = ?1")?
            .query_row(params![hash.to_vec(), doc], |r| {
                Ok((
                    r.get::<_, i64>(0)? == 0,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, bool>(2)?,
                ))
            })
            .optional()?)
    }

    /// The hash of the stored valid change at (doc, author, seq), if any.
    pub(super) fn hash_at(
        &self,
        doc: &str,
        author: &NodeId,
        seq: u64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT hash FROM changes WHERE doc = ?1 AND author = ?2 AND seq = ?3 AND status = 0",
            )?
            .query_row(params![doc, author.0.to_vec(), seq as i64], |r| r.get(0))
            .optional()?;
        Ok(h.and_then(|h| h.try_into().ok()))
    }

    /// Structural checks shared by all documents: deps, seq, equivocation, start_op, parse.
    /// `batch_info` holds (valid, max_op) of changes accepted earlier in this batch,
    /// `batch_seq` the last seq per author accepted in this batch and `batch_at` their hashes
    /// by (author, seq). Returns the parsed change, its max_op, and whether it is a *variant*:
    /// a second change at a seq where its author already has a valid change (equivocation
    /// evidence, see [`crate::equivocation`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_structure(
        &self,
        c: &SignedChange,
        h: &ChangeHeader,
        batch_info: &HashMap<[u8; 32], u64>,
        batch_seq: &HashMap<NodeId, u64>,
        batch_at: &HashMap<(NodeId, u64), [u8; 32]>,
    ) -> Result<Result<(Change, u64, bool), RejectReason>, StoreError> {
        // Dependencies.
        let mut max_dep_op = 0u64;
        let mut missing = 0usize;
        for d in &h.deps {
            if let Some(m) = batch_info.get(d) {
                max_dep_op = max_dep_op.max(*m);
                continue;
            }
            match self.dep_info(&c.doc, d)? {
                // Automerge would wait forever for a dependency this document never gets.
                Some((_, _, false)) => {
                    return Ok(Err(RejectReason::Malformed(
                        "depends on a change of another document",
                    )))
                }
                Some((true, m, true)) => max_dep_op = max_dep_op.max(m),
                Some((false, _, true)) => return Ok(Err(RejectReason::DependsOnVoid)),
                None => missing += 1,
            }
        }
        // After a cut every new change descends from its base: a change without dependencies
        // is from before it (folded or late; see `crate::compaction`), and its seq belongs to
        // an earlier epoch, so it must not be compared with the current chain (it would look
        // like a fork).
        if h.deps.is_empty() && c.doc != MEMBERSHIP_DOC && self.has_cut(&c.doc)? {
            return Ok(Err(RejectReason::Compacted));
        }
        // Seq and equivocation.
        let last = match batch_seq.get(&c.author) {
            Some(s) => *s,
            None => self.last_seq(&c.doc, &c.author)?,
        };
        // A key flagged for equivocation in this document writes nothing more there.
        if !self.forks.is_empty()
            && self
                .forks
                .get(&(c.doc.clone(), c.author))
                .is_some_and(|f| h.seq >= *f)
        {
            return Ok(Err(RejectReason::Equivocation));
        }
        let mut variant = false;
        if h.seq <= last {
            let other = match batch_at.get(&(c.author, h.seq)) {
                Some(o) => Some(*o),
                None => self.hash_at(&c.doc, &c.author, h.seq)?,
            };
            match other {
                Some(o) if o != h.hash => variant = true,
                _ => return Ok(Err(RejectReason::Equivocation)),
            }
        }
        if missing > 0 {
            return Ok(Err(RejectReason::MissingDeps(missing)));
        }
        if !variant && h.seq > last + 1 {
            return Ok(Err(RejectReason::SeqGap { seq: h.seq, last }));
        }
        let expected = max_dep_op + 1;
        if h.start_op != expected {
            return Ok(Err(RejectReason::BadStartOp {
                got: h.start_op,
                expected,
            }));
        }
        // Only now, authenticated and structurally sound, does Automerge parse the bytes.
        let parsed = panic_safe(|| Change::try_from(c.bytes.as_slice()));
        let change = match parsed {
            None => return Ok(Err(RejectReason::AutomergePanic)),
            Some(Err(e)) => return Ok(Err(RejectReason::Automerge(e.to_string()))),
            Some(Ok(ch)) => ch,
        };
        if change.hash().0 != h.hash
            || change.seq() != h.seq
            || change.start_op().get() != h.start_op
        {
            return Ok(Err(RejectReason::Malformed(
                "automerge reads a different header",
            )));
        }
        let max_op = h.start_op - 1 + change.len() as u64;
        Ok(Ok((change, max_op, variant)))
    }

    fn ingest_doc(
        &mut self,
        doc: &str,
        changes: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        let ordered = order_by_deps(changes);
        let mut batch_info: HashMap<[u8; 32], u64> = HashMap::new();
        let mut batch_seq: HashMap<NodeId, u64> = HashMap::new();
        let mut batch_at: HashMap<(NodeId, u64), [u8; 32]> = HashMap::new();
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut variants: Vec<Accepted> = Vec::new();
        for (c, h) in ordered {
            if let Err(r) = self.membership.authorize_write(&c.author, doc, h.seq) {
                if r.is_transient() {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                } else {
                    outcome(report, &c, Some(h.hash), Outcome::Rejected(r));
                }
                continue;
            }
            match self.check_structure(&c, &h, &batch_info, &batch_seq, &batch_at)? {
                Ok((change, max_op, true)) => variants.push(Accepted {
                    signed: c,
                    header: h,
                    change,
                    max_op,
                }),
                Ok((change, max_op, false)) => {
                    batch_info.insert(h.hash, max_op);
                    batch_seq.insert(c.author, h.seq);
                    batch_at.insert((c.author, h.seq), h.hash);
                    accepted.push(Accepted {
                        signed: c,
                        header: h,
                        change,
                        max_op,
                    });
                }
                Err(r) if r.is_transient() => {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                }
                Err(r) => outcome(report, &c, Some(h.hash), Outcome::Rejected(r)),
            }
        }
        if accepted.is_empty() {
            return self.ingest_variants(doc, variants, report, outcome);
        }
        // Fast forward: a chain on top of our heads made only of root-level scalar puts needs
        // no Automerge to know the new view; it is applied to the in-memory document later,
        // in one batch, if and when that is needed (hot keys make single applies costly).
        // Changes concurrent with ours, made the same way, need no Automerge either
        // (`ingest_cross`).
        let now_heads = self.heads(doc)?;
        let fast = match self.fast_forward_rows(doc, &now_heads, &accepted)? {
            Some(rows) => Some((vec![accepted[accepted.len() - 1].header.hash], rows)),
            None => self.crossing_rows(doc, &now_heads, &accepted)?,
        };
        if let Some((heads, rows)) = fast {
            let mut flush = false;
            if let Some(l) = self.loaded.get_mut(doc) {
                l.deferred.extend(accepted.iter().map(|a| a.change.clone()));
                flush = l.deferred.len() >= MAX_DEFERRED;
            }
            let mut touched = BTreeMap::new();
            touched.insert(doc.to_string(), Touched::FastForward { heads, rows });
            let refs: Vec<&Accepted> = accepted.iter().collect();
            if let Err(e) = self.persist(&refs, &touched) {
                self.loaded.remove(doc);
                return Err(e);
            }
            if flush {
                self.loaded_doc(doc)?;
            }
            for a in &accepted {
                outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
            }
            report.changed_docs.insert(doc.to_string());
            self.ingest_variants(doc, variants, report, outcome)?;
            return Ok(true);
        }
        // Apply the whole batch to the in-memory document, containing any panic.
        let before = self.loaded_doc_or_new(doc)?.am.get_heads();
        let all: Vec<Change> = accepted.iter().map(|a| a.change.clone()).collect();
        let ok = {
            let l = self.loaded_doc_or_new(doc)?;
            matches!(panic_safe(|| l.am.apply_changes(all)), Some(Ok(())))
        };
        if !ok {
            // Find the culprits one by one on a fresh copy (rare path).
            self.loaded.remove(doc);
            let mut good = Vec::new();
            let mut bad: HashSet<[u8; 32]> = HashSet::new();
            for a in accepted {
                if a.header.deps.iter().any(|d| bad.contains(d)) {
                    outcome(
                        report,
                        &a.signed,
                        Some(a.header.hash),
                        Outcome::Rejected(RejectReason::DependsOnVoid),
                    );
                    bad.insert(a.header.hash);
                    continue;
                }
                let l = self.loaded_doc_or_new(doc)?;
                let mut trial = l.am.clone();
                match panic_safe(|| trial.apply_changes([a.change.clone()])) {
                    Some(Ok(())) => {
                        l.am = trial;
                        good.push(a);
                    }
                    Some(Err(e)) => {
                        outcome(
                            report,
                            &a.signed,
                            Some(a.header.hash),
                            Outcome::Rejected(RejectReason::Automerge(e.to_string())),
                        );
                        bad.insert(a.header.hash);
                    }
                    None => {
                        tracing::warn!(doc, author = %a.signed.author, "automerge panicked on an authenticated change; rejected");
                        outcome(
                            report,
                            &a.signed,
                            Some(a.header.hash),
                            Outcome::Rejected(RejectReason::AutomergePanic),
                        );
                        bad.insert(a.header.hash);
                    }
                }
            }
            accepted = good;
            if accepted.is_empty() {
                return self.ingest_variants(doc, variants, report, outcome);
            }
        }
        // The keys these changes touched, from their ops (Automerge's diff is the slow path).
        let found = {
            let l = self.loaded_doc_or_new(doc)?;
            let am = &l.am;
            let owners = l.owners.get_or_insert_with(|| Owners::of_doc(am));
            owners.touched_partly(accepted.iter().map(|a| &a.change))
        };
        let touched_doc = if found.complete {
            Touched::Keys(found.keys)
        } else {
            // Add the rows that list an overwritten op the map did not know. Every op's own
            // key is already in `keys`, so if every op's key is known (`unplaced` is false) and
            // every row knows its ops, that is exact: such an op is either visible, and then
            // the row of its key lists it (`kv.ops` is exact), or already overwritten, and
            // overwriting it again changes nothing visible. Then no diff (which walks the
            // whole history) is needed: the common case of crossing concurrent puts on a hot
            // key. Otherwise the diff finds where visible values changed, and the keys added
            // here cover a key whose winner stayed while a losing (conflicting) value was
            // overwritten, which the diff does not name, so that every row's `kv.ops` stays
            // exact (the writer's fast path builds its `pred` from it).
            let (listing, all_known) = self.keys_listing_ops(doc, &found.unknown_preds)?;
            let mut keys = found.keys;
            keys.extend(listing);
            if !found.unplaced && all_known {
                Touched::Keys(keys)
            } else {
                Touched::Since(before, keys)
            }
        };
        let mut touched = BTreeMap::new();
        touched.insert(doc.to_string(), touched_doc);
        let refs: Vec<&Accepted> = accepted.iter().collect();
        if let Err(e) = self.persist(&refs, &touched) {
            self.loaded.remove(doc);
            return Err(e);
        }
        for a in &accepted {
            outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
        }
        report.changed_docs.insert(doc.to_string());
        self.ingest_variants(doc, variants, report, outcome)?;
        Ok(true)
    }

    /// Store equivocation variants (see [`crate::equivocation`]) and re-judge the document:
    /// the fork rule voids both variants and what depends on them, whatever order they came
    /// in. A variant is reported `Applied` only if it ends up valid (an honest author's reuse
    /// of a seq whose first change turned out void), else `Rejected(Equivocation)`.
    fn ingest_variants(
        &mut self,
        doc: &str,
        variants: Vec<Accepted>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        if variants.is_empty() {
            return Ok(false);
        }
        tracing::warn!(
            doc,
            count = variants.len(),
            "equivocation: a key signed two different changes at one seq; keeping both as evidence"
        );
        let tx = self.conn.transaction()?;
        insert_changes(&tx, variants.iter(), 3)?;
        tx.commit()?;
        let (voided, revived) = self.rebuild(doc)?;
        report.voided.extend(voided);
        report.revived.extend(revived.iter().copied());
        report.changed_docs.insert(doc.to_string());
        for v in &variants {
            let o = if revived.contains(&v.header.hash) {
                Outcome::Applied
            } else {
                Outcome::Rejected(RejectReason::Equivocation)
            };
            outcome(report, &v.signed, Some(v.header.hash), o);
        }
        Ok(true)
    }
}

/// Authenticate every change; big batches use all cores (signature checks dominate).
fn authenticate_all(
    batch: &[SignedChange],
    cluster: &ClusterId,
) -> Vec<Result<ChangeHeader, RejectReason>> {
    // Small batches first: `available_parallelism` reads cgroup files (about ten system calls),
    // which would cost more than checking one pushed change.
    if batch.len() < 64 {
        return batch.iter().map(|c| c.authenticate(cluster)).collect();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if threads < 2 {
        return batch.iter().map(|c| c.authenticate(cluster)).collect();
    }
    let chunk = batch.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|c| c.authenticate(cluster))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Order changes so that a change comes after those of its dependencies present in the batch
/// (stable otherwise).
pub(super) fn order_by_deps(
    changes: Vec<(SignedChange, ChangeHeader)>,
) -> Vec<(SignedChange, ChangeHeader)> {
    let in_batch: HashSet<[u8; 32]> = changes.iter().map(|(_, h)| h.hash).collect();
    let mut done: HashSet<[u8; 32]> = HashSet::new();
    let mut rest = changes;
    let mut out = Vec::with_capacity(rest.len());
    loop {
        let before = rest.len();
        let mut next = Vec::new();
        for (c, h) in rest {
            if h.deps
                .iter()
                .all(|d| !in_batch.contains(d) || done.contains(d))
            {
                done.insert(h.hash);
                out.push((c, h));
            } else {
                next.push((c, h));
            }
        }
        rest = next;
        if rest.is_empty() || rest.len() == before {
            out.extend(rest);
            return out;
        }
    }
}

impl Store {
    /// The view rows after `accepted` if it is a fast forward: a chain (each change depends on
    /// the previous one, the first on every one of `heads`; any other dependency is a change
    /// already held, as when Automerge adds the author's previous change that the heads do not
    /// name, so the causal past is still the whole document) whose ops are all puts of
    /// scalars at keys of the root map, each overwriting exactly the values visible at its key
    /// (its `pred` is the key's `kv.ops`; none for a key without a value). Then each op has a
    /// higher counter than every op the document holds (its `start_op` was checked against its
    /// causal past, which is the whole document), so it is the one visible value at its key,
    /// the row is that scalar, and no other key changes. A `pred` naming any other op (which
    /// Automerge would take as overwriting a value elsewhere) or a key whose ops are not known
    /// takes the Automerge path, as do deletes, increments, nested objects and concurrent
    /// changes.
    fn fast_forward_rows(
        &self,
        doc: &str,
        heads: &[[u8; 32]],
        accepted: &[Accepted],
    ) -> Result<Option<BTreeMap<String, Row>>, StoreError> {
        use automerge::legacy::{Key, ObjectId, OpType};
        let mut prev: BTreeSet<[u8; 32]> = heads.iter().copied().collect();
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for a in accepted {
            // Every dependency was found held (or earlier in this batch) before `accepted`
            // was built, and everything held is in the past of the heads.
            let deps: BTreeSet<[u8; 32]> = a.header.deps.iter().copied().collect();
            if !prev.is_subset(&deps) || deps.len() != a.header.deps.len() {
                return Ok(None);
            }
            let Some(expanded) = panic_safe(|| a.change.decode()) else {
                return Ok(None);
            };
            let actor = expanded.actor_id.to_bytes().to_vec();
            for (i, op) in expanded.operations.iter().enumerate() {
                let (ObjectId::Root, Key::Map(k), OpType::Put(v), false) =
                    (&op.obj, &op.key, &op.action, op.insert)
                else {
                    return Ok(None);
                };
                let visible = match rows.get(k.as_str()) {
                    Some((_, ops)) => Some(ops.clone()),
                    None => self.view_ops(doc, k)?,
                };
                let pred = op_ids_blob(
                    op.pred
                        .iter()
                        .map(|p| (p.0, p.1.to_bytes().to_vec()))
                        .collect(),
                );
                if visible.as_ref() != Some(&pred) {
                    return Ok(None);
                }
                let v = json::scalar_to_json(v).to_string();
                let id = op_ids_blob(vec![(a.header.start_op + i as u64, actor.clone())]);
                rows.insert(k.to_string(), (v, id));
            }
            prev = [a.header.hash].into();
        }
        Ok(Some(rows))
    }

    /// The keys whose `kv.ops` list any of `ops`, and whether every row of `doc` knows its ops
    /// (one scan of the document's rows; only for overwritten ops the owners map did not know).
    fn keys_listing_ops(
        &self,
        doc: &str,
        ops: &[(u64, Vec<u8>)],
    ) -> Result<(BTreeSet<String>, bool), StoreError> {
        let mut keys = BTreeSet::new();
        if ops.is_empty() {
            return Ok((keys, true));
        }
        let rows: Vec<(String, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached("SELECT key, ops FROM kv WHERE doc = ?1")?
            .query_map(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut all_known = true;
        for (key, blob) in rows {
            match blob.as_deref().and_then(op_ids_from_blob) {
                Some(listed) if ops.iter().any(|o| listed.contains(o)) => {
                    keys.insert(key);
                }
                Some(_) => {}
                None => all_known = false,
            }
        }
        Ok((keys, all_known))
    }

    /// The `kv.ops` of a key: empty without a row, `None` where not known.
    fn view_ops(&self, doc: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT ops FROM kv WHERE doc = ?1 AND key = ?2")?
            .query_row(params![doc, key], |r| r.get(0))
            .optional()?;
        Ok(match row {
            None => Some(Vec::new()),
            Some(ops) => ops,
        })
    }
}
