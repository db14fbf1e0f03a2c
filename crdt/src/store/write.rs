//! Local writes: authorize this node's key → make one Automerge change per document on the
//! cached document → sign it → commit all of a batch in one transaction (`persist`, one
//! fsync: group commit) → only then return the signed changes, for the caller to announce.
//! If the commit fails, the in-memory documents that ran ahead of disk are dropped.

use std::collections::BTreeMap;

use automerge::ActorId;

use super::persist::{Accepted, Touched};
use super::{Op, Store};
use crate::error::StoreError;
use crate::identity::{NodeId, SecretKey};
use crate::json;
use crate::signed::{valid_doc_name, SignedChange, MEMBERSHIP_DOC};

impl Store {
    /// Make one local edit signed by `key`. Returns the committed signed change, or `None` if
    /// the edit changed nothing. The change is durable when this returns.
    pub fn write(
        &mut self,
        key: &SecretKey,
        doc: &str,
        op: &Op,
        now_ms: i64,
    ) -> Result<Option<SignedChange>, StoreError> {
        self.write_batch(key, &[(doc.to_string(), op.clone())], now_ms)
            .pop()
            .unwrap_or_else(|| Err(StoreError::Invalid("empty batch".into())))
    }

    /// Make several local edits in one SQLite transaction (one fsync): group commit.
    /// Each edit gets its own result; a failed edit does not affect the others.
    pub fn write_batch(
        &mut self,
        key: &SecretKey,
        ops: &[(String, Op)],
        now_ms: i64,
    ) -> Vec<Result<Option<SignedChange>, StoreError>> {
        let me = key.node_id();
        // Quarantine what reads found damaged first (see `scrub`); a failure here shows
        // again as the failure of the write that needs the document.
        if let Err(e) = self.repair() {
            tracing::error!(error = %e, "quarantining damaged changes failed");
        }
        let mut results: Vec<Result<Option<SignedChange>, StoreError>> =
            (0..ops.len()).map(|_| Ok(None)).collect();
        let mut made: Vec<(Vec<usize>, Accepted)> = Vec::new();
        let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
        // Writes to the same document share one change (one signature, one Automerge
        // commit, one change for every peer to verify and apply), in request order.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (doc, _)) in ops.iter().enumerate() {
            match groups.iter_mut().find(|(d, _)| *d == doc.as_str()) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((doc.as_str(), vec![i])),
            }
        }
        for (doc, idx) in groups {
            let group: Vec<&Op> = idx.iter().map(|&i| &ops[i].1).collect();
            let attempt = self.make_local_change(key, &me, doc, &group, now_ms, true);
            type Made = Result<Option<LocalChange>, StoreError>;
            let outcomes: Vec<(Vec<usize>, Made)> = match attempt {
                Ok(acc) => vec![(idx, Ok(acc))],
                // One of them failed: redo them one by one so that each caller gets
                // its own answer (through Automerge: the fast path reads the heads on
                // disk, which do not have this batch's earlier changes).
                Err(_) if idx.len() > 1 => idx
                    .iter()
                    .map(|&i| {
                        let r = self.make_local_change(key, &me, doc, &[&ops[i].1], now_ms, false);
                        (vec![i], r)
                    })
                    .collect(),
                Err(e) => vec![(idx, Err(e))],
            };
            for (idx, r) in outcomes {
                match r {
                    Ok(Some((acc, _, Some(fast)))) => {
                        // The only change to this document in this batch.
                        for &i in &idx {
                            results[i] = Ok(Some(acc.signed.clone()));
                        }
                        touched.insert(doc.to_string(), fast);
                        made.push((idx, acc));
                    }
                    Ok(Some((acc, changed, None))) => {
                        for (&i, &c) in idx.iter().zip(&changed) {
                            if c {
                                results[i] = Ok(Some(acc.signed.clone()));
                                let t = match touched.remove(doc) {
                                    Some(prev) => prev.merge(Touched::of_op(&ops[i].1)),
                                    None => Touched::of_op(&ops[i].1),
                                };
                                touched.insert(doc.to_string(), t);
                            }
                        }
                        made.push((idx, acc));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        let mut e = Some(e);
                        for &i in &idx {
                            results[i] =
                                Err(e.take().unwrap_or_else(|| StoreError::Invalid(msg.clone())));
                        }
                    }
                }
            }
        }
        if made.is_empty() {
            return results;
        }
        let accepted: Vec<&Accepted> = made.iter().map(|(_, a)| a).collect();
        if let Err(e) = self
            .sync_for(true)
            .and_then(|()| self.persist(&accepted, &touched))
        {
            // Nothing was committed: forget the in-memory documents that ran ahead of disk.
            for doc in touched.keys() {
                self.loaded.remove(doc);
            }
            let msg = e.to_string();
            for (idx, _) in &made {
                for &i in idx {
                    results[i] = Err(match e {
                        StoreError::DiskFull => StoreError::DiskFull,
                        _ => StoreError::CommitFailed(msg.clone()),
                    });
                }
            }
        }
        results
    }

    /// One signed change for `ops` on `doc`: through the fast path if `fast` allows and the
    /// edit qualifies (see `local_fast`; then with its view rows), else through Automerge.
    fn make_local_change(
        &mut self,
        key: &SecretKey,
        me: &NodeId,
        doc: &str,
        ops: &[&Op],
        now_ms: i64,
        fast: bool,
    ) -> Result<Option<LocalChange>, StoreError> {
        if !valid_doc_name(doc) || doc == MEMBERSHIP_DOC {
            return Err(StoreError::Invalid(format!(
                "`{doc}` is not a valid document name (lowercase a-z 0-9 . _ - separated by /)"
            )));
        }
        if let Some(f) = self.forks.get(&(doc.to_string(), *me)) {
            return Err(StoreError::Denied(format!(
                "this key signed two different changes at seq {f} of `{doc}` (a cloned key?), so \
                 its changes there from seq {f} on are void everywhere; remove this member and \
                 join again with a new key"
            )));
        }
        self.refuse_if_repairing(doc, me)?;
        let next_seq = self.last_seq(doc, me)? + 1;
        self.membership
            .authorize_write(me, doc, next_seq)
            .map_err(|r| StoreError::Denied(format!("this node may not write `{doc}`: {r}")))?;
        if fast {
            if let Some((acc, t)) = self.local_fast_change(key, me, doc, ops, now_ms)? {
                return Ok(Some((acc, vec![true; ops.len()], Some(t))));
            }
        }
        let cluster = self.cluster;
        let loaded = self.loaded_doc_or_new(doc)?;
        loaded.am.set_actor(ActorId::from(me.0.as_slice()));
        // A document's first change names the document (as its Automerge message): Automerge
        // hashes a change's content only, and a key's first put of the same value into two
        // new documents in one millisecond would otherwise be one change, stored twice.
        let first = loaded.am.get_heads().is_empty();
        let mut tx = loaded.am.transaction();
        let mut changed = Vec::with_capacity(ops.len());
        for op in ops {
            let res = match op {
                Op::Put { path, value } => json::put_path(&mut tx, path, value),
                Op::Delete { path } => json::delete_path(&mut tx, path),
                Op::Replace { value } => json::reconcile_root(&mut tx, value),
            };
            match res {
                Ok(c) => changed.push(c),
                Err(e) => {
                    tx.rollback();
                    return Err(e.into());
                }
            }
        }
        if !changed.iter().any(|c| *c) {
            tx.rollback();
            return Ok(None);
        }
        let mut options = automerge::transaction::CommitOptions::default().with_time(now_ms);
        if first {
            options = options.with_message(doc.to_string());
        }
        tx.commit_with(options);
        let change = loaded
            .am
            .get_last_local_change()
            .ok_or_else(|| StoreError::Automerge("no change after commit".into()))?;
        let header = crate::header::parse(change.raw_bytes())
            .map_err(|e| StoreError::Automerge(format!("own change does not parse: {e}")))?;
        let signed = SignedChange::sign_hashed(
            key,
            &cluster,
            doc,
            &header.hash,
            change.raw_bytes().to_vec(),
        );
        if let Some(owners) = loaded.owners.as_mut() {
            // Remember the objects this change creates (the keys are known from `op`).
            let _ = owners.touched([&change]);
        }
        let max_op = header.start_op - 1 + change.len() as u64;
        Ok(Some((
            Accepted {
                signed,
                header,
                change,
                max_op,
            },
            changed,
            None,
        )))
    }
}

/// A local change, which of its edits changed something, and its view rows if it took the
/// fast path (else the keys its edits name are refreshed from Automerge).
type LocalChange = (Accepted, Vec<bool>, Option<Touched>);
