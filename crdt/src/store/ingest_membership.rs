//! Received membership changes: the membership document is evaluated again by the
//! deterministic rule of `crate::membership` (extending the cached evaluation when possible)
//! → new changes, status flips and the membership view are committed in one transaction →
//! if the membership changed, the stored changes of the affected authors in every document
//! are judged again (`reevaluate_authors`) and those documents rebuilt.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{Change, ROOT};
use rusqlite::params;
use serde_json::Value;

use super::ingest::order_by_deps;
use super::persist::{insert_changes, Accepted};
use super::{hashes_to_blob, IngestReport, Outcome, Store};
use crate::error::{RejectReason, StoreError};
use crate::header::ChangeHeader;
use crate::identity::NodeId;
use crate::json;
use crate::membership::{self, MemberChange};
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

impl Store {
    pub(super) fn ingest_membership(
        &mut self,
        changes: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        // Order within the batch by dependencies (parents first), then check structure.
        let ordered = order_by_deps(changes);
        let mut batch_info = HashMap::new();
        let mut batch_seq = HashMap::new();
        let mut batch_at = HashMap::new();
        let mut variant_slots: HashSet<(NodeId, u64)> = HashSet::new();
        let mut candidates: Vec<(SignedChange, ChangeHeader, Change, u64)> = Vec::new();
        for (c, h) in ordered {
            if self.membership.root.is_none() && h.deps.is_empty() && h.hash != self.cluster {
                outcome(
                    report,
                    &c,
                    Some(h.hash),
                    Outcome::Rejected(RejectReason::WrongCluster),
                );
                continue;
            }
            match self.check_structure(&c, &h, &batch_info, &batch_seq, &batch_at)? {
                Ok((_, _, true)) if !variant_slots.insert((c.author, h.seq)) => {
                    // One variant per (author, seq) per batch: judging a variant costs a
                    // replay of the membership document, so a flood of variants must not
                    // multiply it. A fork needs only two; a valid variant dropped here comes
                    // back with the next anti-entropy exchange (the heads differ).
                    outcome(
                        report,
                        &c,
                        Some(h.hash),
                        Outcome::Rejected(RejectReason::Equivocation),
                    );
                }
                Ok((change, max_op, variant)) => {
                    // A variant (a second change at a used seq: a cloned admin key?) is judged
                    // with the rest by the membership evaluation, which applies the fork rule
                    // of `crate::equivocation` to the membership document too.
                    batch_info.insert(h.hash, max_op);
                    if !variant {
                        batch_seq.insert(c.author, h.seq);
                        batch_at.insert((c.author, h.seq), h.hash);
                    }
                    candidates.push((c, h, change, max_op));
                }
                Err(r) if r.is_transient() => {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                }
                Err(r) => outcome(report, &c, Some(h.hash), Outcome::Rejected(r)),
            }
        }
        if candidates.is_empty() {
            return Ok(false);
        }
        let mut all = self.member_changes.clone();
        let mut new = Vec::with_capacity(candidates.len());
        for (c, h, change, _) in &candidates {
            new.push(MemberChange {
                hash: h.hash,
                author: c.author,
                seq: h.seq,
                start_op: h.start_op,
                deps: h.deps.clone(),
                change: change.clone(),
            });
        }
        all.extend(new.iter().cloned());
        let eval = self.evaluate_with(&all, &new);
        let new_valid: HashSet<[u8; 32]> = eval.valid.iter().copied().collect();
        // New changes: valid ones are stored; equivocation variants are stored void (status
        // 3: the proof sync ships to peers); other void ones rejected (not stored). A void
        // change whose author is not (yet) a member waits in the pending set.
        let mut accepted = Vec::new();
        let mut variants = Vec::new();
        for (c, h, change, max_op) in candidates {
            let reason = eval.void.get(&h.hash).cloned();
            let valid = new_valid.contains(&h.hash);
            if valid || reason == Some(RejectReason::Equivocation) {
                let a = Accepted {
                    signed: c,
                    header: h,
                    change,
                    max_op,
                };
                if valid { &mut accepted } else { &mut variants }.push(a);
            } else {
                let reason = reason.unwrap_or(RejectReason::NotAMember);
                all.retain(|m| m.hash != h.hash);
                if reason == RejectReason::NotAMember {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(reason));
                    self.pending.insert(c, h);
                } else {
                    outcome(report, &c, Some(h.hash), Outcome::Rejected(reason));
                }
            }
        }
        // Stored changes whose status changes: (hash, new status code, was valid).
        let flips: Vec<([u8; 32], i64, bool)> = self
            .member_changes
            .iter()
            .filter_map(|m| {
                let was = member_status(&self.member_valid, self.member_eval.as_ref(), &m.hash);
                let now = member_status(&new_valid, Some(&eval), &m.hash);
                (was != now).then_some((m.hash, now, was == 0))
            })
            .collect();
        let changed_members: BTreeSet<NodeId> = eval
            .state
            .members
            .iter()
            .filter(|(id, m)| self.membership.members.get(id) != Some(m))
            .map(|(id, _)| *id)
            .chain(
                self.membership
                    .members
                    .keys()
                    .filter(|id| !eval.state.members.contains_key(id))
                    .copied(),
            )
            .collect();
        // Persist: new membership changes, status flips, and the membership view.
        let tx = self.conn.transaction()?;
        {
            insert_changes(&tx, accepted.iter(), 0)?;
            insert_changes(&tx, variants.iter(), 3)?;
            let mut flip = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (h, status, _) in &flips {
                flip.execute(params![h.to_vec(), status])?;
            }
            let heads: Vec<[u8; 32]> = eval.doc.get_heads().iter().map(|h| h.0).collect();
            tx.execute(
                "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads, n_changes = excluded.n_changes",
                params![MEMBERSHIP_DOC, hashes_to_blob(&heads), eval.valid.len() as i64],
            )?;
            tx.execute("DELETE FROM kv WHERE doc = ?1", params![MEMBERSHIP_DOC])?;
            if let Ok(Value::Object(root)) = json::to_json(&eval.doc, &ROOT) {
                let mut put =
                    tx.prepare_cached("INSERT INTO kv (doc, key, value) VALUES (?1, ?2, ?3)")?;
                for (k, v) in root {
                    put.execute(params![MEMBERSHIP_DOC, k, v.to_string()])?;
                }
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        for a in &accepted {
            outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
        }
        if !variants.is_empty() {
            tracing::warn!(
                count = variants.len(),
                "equivocation in the membership document: a key signed two different changes \
                 at one seq; both variants and the key's later membership changes are void"
            );
        }
        for a in &variants {
            outcome(
                report,
                &a.signed,
                Some(a.header.hash),
                Outcome::Rejected(RejectReason::Equivocation),
            );
        }
        for (h, status, was_valid) in &flips {
            match (*was_valid, *status == 0) {
                (false, true) => report.revived.push(*h),
                (true, false) => {
                    report.voided.push(*h);
                    let reason = eval.void.get(h).map(|r| r.label()).unwrap_or("revoked");
                    if let Some(m) = all.iter().find(|m| m.hash == *h) {
                        self.note_voided(MEMBERSHIP_DOC, m.author, *h, reason);
                    }
                }
                _ => {}
            }
        }
        self.forks.retain(|(d, _), _| d != MEMBERSHIP_DOC);
        for (a, f) in &eval.forks {
            self.forks.insert((MEMBERSHIP_DOC.to_string(), *a), *f);
        }
        let changed = self.membership != eval.state;
        self.member_changes = all;
        self.member_valid = new_valid;
        self.membership = eval.state.clone();
        self.member_eval = Some(eval);
        if changed {
            report.membership_changed = true;
            report.changed_docs.insert(MEMBERSHIP_DOC.to_string());
            self.reevaluate_authors(&changed_members, report)?;
        }
        Ok(!accepted.is_empty() || !variants.is_empty() || changed)
    }

    /// After membership changed: re-judge stored changes by `authors` in every document;
    /// rebuild documents in which any change flipped between valid and void.
    fn reevaluate_authors(
        &mut self,
        authors: &BTreeSet<NodeId>,
        report: &mut IngestReport,
    ) -> Result<(), StoreError> {
        // (doc, hash, valid now as far as membership goes, was valid)
        let mut flips: Vec<(String, [u8; 32], bool, bool)> = Vec::new();
        let mut flip_author: HashMap<[u8; 32], NodeId> = HashMap::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT doc, hash, seq, status FROM changes WHERE author = ?1 AND doc != ?2 AND status < 4 ORDER BY id",
            )?;
            for a in authors {
                let rows = stmt.query_map(params![a.0.to_vec(), MEMBERSHIP_DOC], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
                for row in rows {
                    let (doc, hash, seq, status) = row?;
                    let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                        continue;
                    };
                    let mut ok = self.membership.authorize_write(a, &doc, seq as u64).is_ok();
                    // A void change whose seq was reused by a valid one stays void.
                    if ok && status == 1 {
                        ok = self.hash_at(&doc, a, seq as u64)?.is_none();
                    }
                    // Statuses 2 and 3 (equivocation) are not about membership: `rebuild`
                    // decides them again; here they count as "not revoked".
                    if ok != (status != 1) {
                        flip_author.insert(hash, *a);
                        flips.push((doc, hash, ok, status == 0));
                    }
                }
            }
        }
        if flips.is_empty() {
            return Ok(());
        }
        let docs: BTreeSet<String> = flips.iter().map(|f| f.0.clone()).collect();
        let tx = self.conn.transaction()?;
        {
            let mut up = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (_, h, ok, _) in &flips {
                up.execute(params![h.to_vec(), if *ok { 0 } else { 1 }])?;
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        let mut revived = Vec::new();
        for (_, h, ok, was_valid) in &flips {
            if *ok {
                revived.push(*h);
            } else if *was_valid {
                report.voided.push(*h);
            }
        }
        for (doc, h, ok, was_valid) in &flips {
            if !*ok && *was_valid {
                if let Some(a) = flip_author.get(h) {
                    self.note_voided(doc, *a, *h, "revoked");
                }
            }
        }
        for doc in docs {
            let (voided, again) = self.rebuild(&doc)?;
            // A revived change the equivocation rule voids again was never valid.
            revived.retain(|h| !voided.contains(h));
            report.voided.extend(
                voided
                    .into_iter()
                    .filter(|h| !flips.iter().any(|f| f.1 == *h)),
            );
            revived.extend(again);
            report.changed_docs.insert(doc);
        }
        report.revived.extend(revived);
        Ok(())
    }
}

/// The `changes.status` code of a membership change under an evaluation: 0 valid, 3 void as
/// an equivocation (a fork variant or later by a flagged key), 1 void for another reason.
fn member_status(
    valid: &HashSet<[u8; 32]>,
    eval: Option<&membership::Evaluation>,
    hash: &[u8; 32],
) -> i64 {
    if valid.contains(hash) {
        0
    } else if eval.and_then(|e| e.void.get(hash)) == Some(&RejectReason::Equivocation) {
        3
    } else {
        1
    }
}
