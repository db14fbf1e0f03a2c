//! Voided changes, and carrying this node's own writes forward when they were void only
//! because they were built on a void change.
//!
//! Why it exists: a change becomes void after it was applied when its author is revoked
//! (`crate::membership`), when its key equivocates (`crate::equivocation`), or when a change it
//! depends on becomes void for either reason (the void-descendants rule). The last case hits
//! honest writers: a member that received a removed key's post-cut-off write, or one variant of
//! a cloned key's fork, and then wrote on top of it had its write acknowledged, and that write is
//! void everywhere once the removal or the fork is known. Nothing may be lost silently, so:
//!
//! * every change that turns void on this node is noted (`Store::take_voided`), with its
//!   reason (`revoked`, `depends_on_void` or `equivocation`), for the agent to log and count;
//! * the **author** of such a write re-applies its own operations as a new change on the valid
//!   state ([`Store::carry_forward`]): the values it intended (the difference its void change
//!   made to the state it was built on: puts and deletes at the paths it wrote), written by the
//!   ordinary local write path, signed by itself. Other nodes never re-sign someone else's
//!   operations; they wait for the author's new change.
//!
//! # Data flow
//! rebuild / membership re-judgement → `note_voided` (bounded queue) → the agent (or the
//! simulator) drains it with `take_voided`; when one of the voided changes is its own, it calls
//! `carry_forward(key)`: own changes with status 1 (revocation-void) or 2 (void because of a
//! fork) that the current membership still authorizes, not yet carried (stored after this
//! key's last valid change in that document), are replayed with their causal past in a
//! scratch Automerge document; the JSON difference each made becomes `Op`s; `write_batch`
//! commits them as one change per document (durable before it returns), which the caller then
//! pushes like any local write.
//!
//! # Determinism and idempotence
//! Which writes are carried is a function of the stored changes and the membership, and only
//! their author carries them, so no two nodes re-sign the same operations. The new change
//! reuses the seq of the void one (the author's valid chain ends before it): a change void
//! because of its dependencies is not "otherwise valid", so this is no fork (see
//! `crate::equivocation`), and a void change whose seq a valid one reused stays void. The new
//! change is its own marker: own void changes stored before this key's last valid change in a
//! document count as carried, so a restart or a second call carries nothing twice. A write
//! that changes nothing (the valid state already holds the values) makes no change. Concurrent
//! writes of others merge with the new change as with any new change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::{Automerge, Change, ChangeHash, ROOT};
use rusqlite::params;
use serde_json::Value;

use super::{blob_to_hashes, panic_safe, Op, Store};
use crate::error::StoreError;
use crate::identity::{NodeId, SecretKey};
use crate::json::{self, PathSeg};
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

/// Most voided-change notes kept until [`Store::take_voided`] drains them (the oldest are
/// dropped beyond; [`Store::voided_counts`] still counts them).
pub(super) const MAX_VOIDED_NOTES: usize = 4_096;

/// A change that was valid on this node and became void.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voided {
    /// Its document.
    pub doc: String,
    /// Its author.
    pub author: NodeId,
    /// Its hash.
    pub hash: [u8; 32],
    /// Why: `revoked` (its author's role or scopes no longer allow it), `depends_on_void`
    /// (built on a void change) or `equivocation` (its key signed two changes at one seq).
    pub reason: &'static str,
}

/// A void change to carry forward: its hash and its dependencies.
type ToCarry = ([u8; 32], Vec<[u8; 32]>);

/// This node's own writes carried forward in one document.
#[derive(Debug, Clone)]
pub struct CarriedForward {
    /// The document whose void writes were carried forward.
    pub doc: String,
    /// This node's void changes whose operations were re-applied.
    pub voided: Vec<[u8; 32]>,
    /// The new change (already durable), or `None` if the valid state already held every
    /// value they wrote.
    pub change: Option<SignedChange>,
}

impl Store {
    /// Note that a change became void (see the module docs).
    pub(super) fn note_voided(
        &mut self,
        doc: &str,
        author: NodeId,
        hash: [u8; 32],
        reason: &'static str,
    ) {
        *self.voided_counts.entry(reason).or_insert(0) += 1;
        if self.voided_notes.len() >= MAX_VOIDED_NOTES {
            self.voided_notes.pop_front();
        }
        self.voided_notes.push_back(Voided {
            doc: doc.to_string(),
            author,
            hash,
            reason,
        });
    }

    /// The changes that became void on this node since the last call (at most
    /// 4,096, `MAX_VOIDED_NOTES`; older ones are dropped but still counted).
    pub fn take_voided(&mut self) -> Vec<Voided> {
        self.voided_notes.drain(..).collect()
    }

    /// How many changes became void on this node since the store was opened, by reason.
    pub fn voided_counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.voided_counts
    }

    /// Re-apply `key`'s own operations that are void only because they were built on a void
    /// change, as new changes on the valid state signed by `key` (see the module docs).
    /// Returns one entry per document carried; each new change is durable when this returns.
    pub fn carry_forward(
        &mut self,
        key: &SecretKey,
        now_ms: i64,
    ) -> Result<Vec<CarriedForward>, StoreError> {
        let me = key.node_id();
        let docs: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT doc FROM changes WHERE author = ?1 AND status IN (1, 2, 4) AND doc != ?2",
            )?
            .query_map(params![me.0.to_vec(), MEMBERSHIP_DOC], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for doc in docs {
            if self.forks.contains_key(&(doc.clone(), me)) {
                // This key is flagged in `doc`: it may not write there any more.
                continue;
            }
            let todo = self.to_carry(&doc, &me)?;
            if todo.is_empty() {
                continue;
            }
            let ops = self.intended_ops(&doc, &todo)?;
            let voided: Vec<[u8; 32]> = todo.iter().map(|(h, _)| *h).collect();
            let mut change: Option<SignedChange> = None;
            if !ops.is_empty() {
                let batch: Vec<(String, Op)> = ops.into_iter().map(|o| (doc.clone(), o)).collect();
                let mut seen = HashSet::new();
                for r in self.write_batch(key, &batch, now_ms) {
                    match r {
                        Ok(Some(c)) => {
                            if seen.insert(c.hash()) {
                                // Several only if an edit failed alone; keep the last.
                                change = Some(c);
                            }
                        }
                        Ok(None) => {}
                        Err(e @ (StoreError::DiskFull | StoreError::CommitFailed(_))) => {
                            return Err(e)
                        }
                        Err(e) => {
                            tracing::warn!(doc = %doc, error = %e, "an operation of a void write could not be re-applied");
                        }
                    }
                }
            }
            self.carried_total += voided.len() as u64;
            out.push(CarriedForward {
                doc,
                voided,
                change,
            });
        }
        Ok(out)
    }

    /// How many of this node's void writes were carried forward since the store was opened.
    pub fn carried_forward_count(&self) -> u64 {
        self.carried_total
    }

    /// `me`'s changes of `doc` to carry: void (status 1 or 2, or 4: late for a compaction
    /// cut, normally carried by `Store::apply_cut` itself, here after a crash), stored after `me`'s last valid
    /// change there, and at a seq the current membership lets `me` write (else the change is
    /// void because `me` itself was revoked, and stays so). (hash, deps) in storage order.
    fn to_carry(&self, doc: &str, me: &NodeId) -> Result<Vec<ToCarry>, StoreError> {
        type Row = (i64, Vec<u8>, i64, i64, Vec<u8>);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT id, hash, seq, status, deps FROM changes WHERE doc = ?1 AND author = ?2 ORDER BY id",
            )?
            .query_map(params![doc, me.0.to_vec()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let last_valid = rows
            .iter()
            .filter(|r| r.3 == 0)
            .map(|r| r.0)
            .max()
            .unwrap_or(i64::MIN);
        let mut out = Vec::new();
        for (id, hash, seq, status, deps) in rows {
            if id < last_valid || !matches!(status, 1 | 2 | 4) {
                continue;
            }
            if self
                .membership
                .authorize_write(me, doc, seq as u64)
                .is_err()
            {
                continue;
            }
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            out.push((hash, blob_to_hashes(&deps)));
        }
        Ok(out)
    }

    /// The operations that carry `todo` forward: for each change in turn, the JSON difference
    /// it made to the state it was built on (its causal past, void changes included), as puts
    /// and deletes at the paths it wrote.
    pub(super) fn intended_ops(&self, doc: &str, todo: &[ToCarry]) -> Result<Vec<Op>, StoreError> {
        let rows: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT hash, deps, bytes FROM changes WHERE doc = ?1 ORDER BY id")?
            .query_map(params![doc], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let index: HashMap<[u8; 32], usize> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((<[u8; 32]>::try_from(r.0.as_slice()).ok()?, i)))
            .collect();
        // The causal past of every change to carry.
        let mut past: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<[u8; 32]> = todo.iter().map(|(h, _)| *h).collect();
        while let Some(h) = stack.pop() {
            let Some(&i) = index.get(&h) else { continue };
            if past.insert(i) {
                stack.extend(blob_to_hashes(&rows[i].1));
            }
        }
        let mut changes = Vec::with_capacity(past.len());
        for i in past {
            match panic_safe(|| Change::try_from(rows[i].2.as_slice())) {
                Some(Ok(c)) => changes.push(c),
                _ => tracing::warn!(
                    doc,
                    "a stored change does not parse; left out of the carry-forward"
                ),
            }
        }
        let mut am = Automerge::new();
        if !matches!(panic_safe(|| am.apply_changes(changes)), Some(Ok(()))) {
            tracing::warn!(
                doc,
                "the void writes' history does not replay; nothing carried forward"
            );
            return Ok(Vec::new());
        }
        let state = |heads: &[[u8; 32]]| -> Option<Value> {
            let heads: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
            let at = panic_safe(|| am.fork_at(&heads))?.ok()?;
            json::to_json(&at, &ROOT).ok()
        };
        let mut ops = Vec::new();
        for (hash, deps) in todo {
            let (Some(before), Some(after)) = (state(deps), state(&[*hash])) else {
                tracing::warn!(
                    doc,
                    "a void write's state cannot be read; not carried forward"
                );
                continue;
            };
            diff(&mut Vec::new(), Some(&before), Some(&after), &mut ops);
        }
        Ok(ops)
    }
}

/// The edits that turn `before` into `after` at `path`: maps are compared key by key, any
/// other differing value is put whole, a value gone is deleted.
fn diff(path: &mut Vec<PathSeg>, before: Option<&Value>, after: Option<&Value>, out: &mut Vec<Op>) {
    match (before, after) {
        (Some(Value::Object(b)), Some(Value::Object(a))) => {
            let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for k in keys {
                path.push(PathSeg::Key(k.clone()));
                diff(path, b.get(k), a.get(k), out);
                path.pop();
            }
        }
        (b, Some(a)) if b != Some(a) => out.push(Op::Put {
            path: path.clone(),
            value: a.clone(),
        }),
        (Some(_), None) if !path.is_empty() => out.push(Op::Delete { path: path.clone() }),
        _ => {}
    }
}
