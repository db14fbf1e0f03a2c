//! Applying compaction cuts (the rule is in [`crate::compaction`]).
//!
//! Why it exists: to drop a document's folded history from disk and memory at a point every
//! node agrees on, without losing a write made concurrently with the cut.
//!
//! # Data flow
//! [`Store::compact`] (an admin): the document's heads, its JSON value and folded clock (each
//! author's highest valid seq) → the base change ([`crate::compaction::build_base`]) → a
//! signed [`CutRecord`] → [`Store::apply_cut`], as any node does with a record received from a
//! peer: verify (signature, admin) → check the base bytes' hash → store the record → pick the
//! winner among the document's records; if it changed: read the winner's chain of records →
//! sort every stored change ([`crate::compaction::classify`]) → compute this node's own late
//! changes' intended operations *while their history is still held* → one transaction: insert
//! the base as a valid row, mark the cut won (not yet `installed`), mark folded rows retained (status 5) and late rows void (status 4),
//! delete what an earlier cut of the chain folded and the late rows of earlier epochs → rebuild
//! the document from the valid rows (the base and what was written on it) → write the carried
//! operations as a new change on the base, signed by this node → retry pending changes (some
//! were waiting for the base). The cut is marked `installed` after the rebuild; a crash
//! before that is finished at the next open (`finish_cuts_at_open`), and the own late writes
//! it left uncarried (status 4) are carried by `Store::carry_forward`, which the agent runs
//! at start-up. A record whose parent is not held waits: it is stored and
//! applied when the parent arrives (records of a chain are small and peers hold them all).

use std::collections::BTreeMap;

use automerge::Change;
use rusqlite::{params, OptionalExtension};

use super::{blob_to_hashes, hashes_to_blob, panic_safe, Op, Store};
use crate::compaction::{self, CutError, CutRecord, CutRow, Fate};
use crate::error::StoreError;
use crate::header;
use crate::identity::{NodeId, SecretKey};
use crate::membership::Role;
use crate::signed::SignedChange;

/// What [`Store::apply_cut`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CutApplied {
    /// Whether the record is now the document's winning cut.
    pub won: bool,
    /// Changes left out of the document because the cut folds them.
    pub folded: usize,
    /// Changes deleted from disk (folded by an earlier cut of the chain, or late one epoch).
    pub dropped: usize,
    /// Changes that became void because they are late for the cut.
    pub late: usize,
    /// This node's own late changes carried forward onto the base (the new change, durable),
    /// if any of them changed a value.
    pub carried: Option<SignedChange>,
}

impl Store {
    /// The cut records held for `doc`, oldest epoch first, with whether each is the winner.
    pub fn cut_records(&self, doc: &str) -> Result<Vec<(CutRecord, bool)>, StoreError> {
        let rows: Vec<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT record, won FROM cuts WHERE doc = ?1 ORDER BY epoch, hash")?
            .query_map(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(b, won)| Some((CutRecord::decode(&b).ok()?, won != 0)))
            .collect())
    }

    /// Finish installing cuts that a crash interrupted (the statuses are committed, the
    /// document not yet rebuilt on the base): rebuild those documents. Own late writes left
    /// uncarried are status 4, which [`Store::carry_forward`] carries.
    pub(super) fn finish_cuts_at_open(&mut self) -> Result<(), StoreError> {
        let docs: Vec<String> = self
            .conn
            .prepare("SELECT doc FROM cuts WHERE won = 1 AND installed = 0")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for doc in docs {
            self.rebuild(&doc)?;
            self.conn.execute(
                "UPDATE cuts SET installed = 1 WHERE doc = ?1 AND won = 1",
                params![doc],
            )?;
        }
        Ok(())
    }

    /// The history a document holds on disk: (changes, bytes of their change chunks), every
    /// status included (retained and late changes count: they are what a cut frees). For a
    /// compaction policy and per-document metrics.
    pub fn history_size(&self, doc: &str) -> Result<(u64, u64), StoreError> {
        let (n, b): (i64, Option<i64>) = self
            .conn
            .prepare_cached("SELECT COUNT(*), SUM(length(bytes)) FROM changes WHERE doc = ?1")?
            .query_row(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((n.max(0) as u64, b.unwrap_or(0).max(0) as u64))
    }

    /// The documents whose history exceeds `max_changes` changes or `max_bytes` bytes
    /// ([`Store::history_size`]), for an automatic compaction policy run by one admin node.
    pub fn docs_due_for_cut(
        &self,
        max_changes: u64,
        max_bytes: u64,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT doc, COUNT(*), SUM(length(bytes)) FROM changes WHERE doc != ?1
                 GROUP BY doc ORDER BY doc",
            )?
            .query_map(params![crate::MEMBERSHIP_DOC], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows
            .into_iter()
            .filter(|(_, n, b)| *n as u64 > max_changes || *b as u64 > max_bytes)
            .map(|(d, _, _)| d)
            .collect())
    }

    /// Whether `doc` has a winning cut.
    pub(super) fn has_cut(&self, doc: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM cuts WHERE doc = ?1 AND won = 1")?
            .exists(params![doc])?)
    }

    /// The winning cut of `doc` and its base bytes (what a peer without the history needs).
    pub fn current_cut(&self, doc: &str) -> Result<Option<(CutRecord, Vec<u8>)>, StoreError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached("SELECT record, base FROM cuts WHERE doc = ?1 AND won = 1")?
            .query_row(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((rec, Some(base))) => CutRecord::decode(&rec).ok().map(|r| (r, base)),
            _ => None,
        })
    }

    /// Cut `doc` at its current heads, as the admin `key` (see [`crate::compaction`]); the
    /// record is applied here and returned with the base bytes for the caller to send to peers.
    pub fn compact(
        &mut self,
        key: &SecretKey,
        doc: &str,
        now_ms: i64,
    ) -> Result<(CutRecord, Vec<u8>, CutApplied), StoreError> {
        let me = key.node_id();
        if self.membership.get(&me).map(|m| m.role) != Some(Role::Admin) {
            return Err(StoreError::Denied(
                "only an admin may cut a document's history".into(),
            ));
        }
        let value = self
            .get(doc, &[])?
            .ok_or_else(|| StoreError::NoSuchDocument(doc.to_string()))?;
        let heads = self.heads(doc)?;
        let folded: BTreeMap<NodeId, u64> = self
            .conn
            .prepare_cached(
                "SELECT author, MAX(seq) FROM changes WHERE doc = ?1 AND status = 0 GROUP BY author",
            )?
            .query_map(params![doc], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?
            .filter_map(|r| {
                let (a, s) = r.ok()?;
                Some((NodeId::from_slice(&a)?, s as u64))
            })
            .collect();
        let parent = self.current_cut(doc)?.map(|(r, _)| r);
        let epoch = parent.as_ref().map_or(1, |p| p.epoch + 1);
        let (base, base_hash) = compaction::build_base(doc, epoch, &heads, &value)?;
        let record = CutRecord::sign(
            key,
            &self.cluster,
            doc,
            epoch,
            parent.map(|p| p.hash()),
            heads,
            folded,
            base_hash,
        );
        let applied = self.apply_cut(&record, Some(&base), Some(key), now_ms)?;
        Ok((record, base, applied))
    }

    /// Apply a cut record (made here or received) with its base bytes, if given: see the
    /// module docs. A record without its base is kept (evidence, and the ancestry of later
    /// records); the winner is installed once its base and its chain of parents are held.
    /// `me` is this node's key, to carry its own late changes forward (`None`: a store
    /// without a key, or a test).
    pub fn apply_cut(
        &mut self,
        record: &CutRecord,
        base: Option<&[u8]>,
        me: Option<&SecretKey>,
        now_ms: i64,
    ) -> Result<CutApplied, StoreError> {
        record.verify(&self.cluster, &self.membership)?;
        if let Some(base) = base {
            compaction::check_base(record, base)?;
        }
        let doc = record.doc.clone();
        let rhash = record.hash();
        self.conn.execute(
            "INSERT INTO cuts (hash, doc, epoch, record, base) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (hash) DO UPDATE SET base = COALESCE(base, excluded.base)",
            params![
                rhash.to_vec(),
                doc,
                record.epoch as i64,
                record.encode(),
                base.map(<[u8]>::to_vec)
            ],
        )?;
        let records: Vec<CutRecord> = self.cut_records(&doc)?.into_iter().map(|r| r.0).collect();
        let by_hash: BTreeMap<[u8; 32], &CutRecord> =
            records.iter().map(|r| (r.hash(), r)).collect();
        // Candidates: records whose chain of parents is held (a record waits for its parent).
        let complete = |r: &CutRecord| -> Option<Vec<CutRecord>> {
            let mut chain = vec![r.clone()];
            let mut at = r.parent;
            while let Some(p) = at {
                let pr = by_hash.get(&p)?;
                chain.push((*pr).clone());
                at = pr.parent;
                if chain.len() > records.len() {
                    return None;
                }
            }
            chain.reverse();
            Some(chain)
        };
        let mut candidates: Vec<(&CutRecord, Vec<CutRecord>)> = records
            .iter()
            .filter_map(|r| Some((r, complete(r)?)))
            .collect();
        let Some(winner) = compaction::winner(candidates.iter().map(|c| c.0)).cloned() else {
            return Ok(CutApplied::default());
        };
        let whash = winner.hash();
        let prev: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT hash FROM cuts WHERE doc = ?1 AND won = 1")?
            .query_row(params![doc], |r| r.get(0))
            .optional()?;
        if prev.as_deref() == Some(whash.as_slice()) {
            return Ok(CutApplied {
                won: whash == rhash,
                ..CutApplied::default()
            });
        }
        let Some(pos) = candidates.iter().position(|c| c.0.hash() == whash) else {
            return Ok(CutApplied::default());
        };
        let chain = candidates.swap_remove(pos).1;
        let wbase: Vec<u8> = if let (true, Some(base)) = (whash == rhash, base) {
            base.to_vec()
        } else {
            // The winner's base arrived with it earlier (before its parent): apply it now.
            let b: Option<Option<Vec<u8>>> = self
                .conn
                .prepare_cached("SELECT base FROM cuts WHERE hash = ?1")?
                .query_row(params![whash.to_vec()], |r| r.get(0))
                .optional()?;
            match b.flatten() {
                Some(b) => b,
                None => return Ok(CutApplied::default()),
            }
        };
        let extends = winner.parent.map(|p| p.to_vec()) == prev;
        self.install_cut(&doc, &chain, &wbase, extends, me, now_ms)
            .map(|mut a| {
                a.won = whash == rhash;
                a
            })
    }

    /// Install the winning cut (the last of `chain`) with its base bytes: see the module docs.
    fn install_cut(
        &mut self,
        doc: &str,
        chain: &[CutRecord],
        base: &[u8],
        extends: bool,
        me: Option<&SecretKey>,
        now_ms: i64,
    ) -> Result<CutApplied, StoreError> {
        let Some(winner) = chain.last() else {
            return Ok(CutApplied::default());
        };
        let bh = header::parse(base).map_err(|_| CutError::BaseMismatch)?;
        let max_op = match panic_safe(|| Change::try_from(base)) {
            Some(Ok(c)) => c.max_op(),
            _ => return Err(CutError::Base("the base does not parse".into()).into()),
        };
        type Row = (Vec<u8>, Vec<u8>, i64, Vec<u8>, i64);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT hash, author, seq, deps, status FROM changes WHERE doc = ?1 ORDER BY id",
            )?
            .query_map(params![doc], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let cut_rows: Vec<CutRow> = rows
            .iter()
            .filter_map(|(h, a, s, d, _)| {
                Some(CutRow {
                    hash: <[u8; 32]>::try_from(h.as_slice()).ok()?,
                    author: NodeId::from_slice(a).unwrap_or(NodeId([0; 32])),
                    seq: *s as u64,
                    deps: blob_to_hashes(d),
                })
            })
            .collect();
        if cut_rows.len() != rows.len() {
            return Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                reason: format!("a stored change of {doc} has a malformed hash"),
            });
        }
        // The base is inserted with the statuses below, in one transaction; it sorts last
        // here (nothing stored yet can be built on it).
        let base_held = cut_rows.iter().any(|r| r.hash == bh.hash);
        let mut cut_rows = cut_rows;
        let mut rows = rows;
        if !base_held {
            cut_rows.push(CutRow {
                hash: bh.hash,
                author: NodeId::from_slice(&bh.actor).unwrap_or(NodeId([0; 32])),
                seq: bh.seq,
                deps: bh.deps.clone(),
            });
            rows.push((
                bh.hash.to_vec(),
                bh.actor.clone(),
                bh.seq as i64,
                Vec::new(),
                0,
            ));
        }
        let fates = compaction::classify(chain, &cut_rows);
        let last = chain.len() - 1;
        // This node's own late changes, carried forward from the history still held.
        let mine = me.map(|k| k.node_id());
        let todo: Vec<([u8; 32], Vec<[u8; 32]>)> = cut_rows
            .iter()
            .zip(&fates)
            .zip(&rows)
            .filter(|((r, f), row)| {
                f.0 == Fate::Late && Some(r.author) == mine && (row.4 == 0 || row.4 == 5)
            })
            .map(|((r, _), _)| (r.hash, r.deps.clone()))
            .collect();
        let ops: Vec<Op> = if todo.is_empty() {
            Vec::new()
        } else {
            self.intended_ops(doc, &todo)?
        };
        let mut out = CutApplied::default();
        let mut newly_void = Vec::new();
        let tx = self.conn.transaction()?;
        {
            tx.execute(
                "INSERT OR IGNORE INTO changes
                    (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, x'', ?8, 0)",
                params![
                    bh.hash.to_vec(),
                    doc,
                    bh.actor,
                    bh.seq as i64,
                    bh.start_op as i64,
                    max_op as i64,
                    hashes_to_blob(&bh.deps),
                    base.to_vec()
                ],
            )?;
            let mut set = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            let mut del = tx.prepare_cached("DELETE FROM changes WHERE hash = ?1")?;
            for ((r, (fate, folder)), row) in cut_rows.iter().zip(&fates).zip(&rows) {
                let status = row.4;
                match fate {
                    Fate::Folded if *folder < last => {
                        del.execute(params![r.hash.to_vec()])?;
                        out.dropped += 1;
                    }
                    Fate::Folded => {
                        if status != 5 {
                            set.execute(params![r.hash.to_vec(), 5])?;
                        }
                        out.folded += 1;
                    }
                    Fate::Late if extends && status == 4 => {
                        // Late one epoch already: its author has carried it (or holds it).
                        del.execute(params![r.hash.to_vec()])?;
                        out.dropped += 1;
                    }
                    Fate::Late if status != 4 => {
                        set.execute(params![r.hash.to_vec(), 4])?;
                        out.late += 1;
                        if status == 0 {
                            newly_void.push((r.author, r.hash));
                        }
                    }
                    _ => {}
                }
            }
            tx.execute(
                "UPDATE cuts SET won = (hash = ?2), installed = 0 WHERE doc = ?1",
                params![doc, chain[last].hash().to_vec()],
            )?;
        }
        tx.commit()?;
        for (author, hash) in newly_void {
            self.note_voided(doc, author, hash, "late_for_cut");
        }
        self.rebuild(doc)?;
        if !ops.is_empty() {
            if let Some(key) = me {
                let batch: Vec<(String, Op)> =
                    ops.into_iter().map(|o| (doc.to_string(), o)).collect();
                for r in self.write_batch(key, &batch, now_ms) {
                    match r {
                        Ok(Some(c)) => out.carried = Some(c),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(doc, error = %e, "carrying a late write forward failed");
                            return Err(e);
                        }
                    }
                }
                self.carried_total += 1;
            }
        }
        self.conn.execute(
            "UPDATE cuts SET installed = 1 WHERE doc = ?1 AND won = 1",
            params![doc],
        )?;
        // Changes waiting for the base can apply now.
        let mut report = super::IngestReport::default();
        let mut progress = true;
        while progress && !self.pending.queue.is_empty() {
            let retry = self.pending.drain();
            progress = self.ingest_round(Vec::new(), retry, &mut report, false)?;
        }
        tracing::info!(
            doc,
            epoch = winner.epoch,
            folded = out.folded,
            dropped = out.dropped,
            late = out.late,
            "history cut"
        );
        Ok(out)
    }
}
