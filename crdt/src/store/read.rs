//! Reads: the materialized view (`kv`), stored changes and their metadata, version vectors
//! and equivocation flags, served from SQLite (or the in-memory copies of it: version
//! vectors, flagged forks, the pending set) without Automerge; only `check_view`, `conflicts`
//! and `history` load the document, through the cache. Data flows one way: rows → JSON
//! values, signed changes or hashes for the caller (the agent's API and its sync engine).

use std::collections::{BTreeMap, BTreeSet};

use automerge::{Automerge, ChangeHash, ROOT};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::{blob_to_hashes, corrupt, panic_safe, Clocks, Edit, HistoryEntry, Store};
use crate::error::StoreError;
use crate::identity::{hex, NodeId};
use crate::json::{self, PathSeg};
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

impl Store {
    /// Names of all documents (not including the membership document).
    pub fn list_docs(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT doc FROM docs WHERE doc != ?1 ORDER BY doc")?;
        let rows = stmt.query_map(params![MEMBERSHIP_DOC], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Names of the documents that hold at least one value (not including the membership
    /// document): a document whose values were all deleted is not listed.
    pub fn list_docs_with_values(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT doc FROM docs WHERE doc != ?1 AND EXISTS (SELECT 1 FROM kv WHERE kv.doc = docs.doc) ORDER BY doc",
        )?;
        let rows = stmt.query_map(params![MEMBERSHIP_DOC], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a document exists.
    pub fn has_doc(&self, doc: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM docs WHERE doc = ?1")?
            .exists(params![doc])?)
    }

    /// The value at `path` in `doc` (the whole document for an empty path), from the
    /// materialized view. `None` if the document or path does not exist.
    pub fn get(&self, doc: &str, path: &[PathSeg]) -> Result<Option<Value>, StoreError> {
        if !self.has_doc(doc)? {
            return Ok(None);
        }
        let Some((first, rest)) = path.split_first() else {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT key, value FROM kv WHERE doc = ?1 ORDER BY key")?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut map = serde_json::Map::new();
            for row in rows {
                let (k, v) = row?;
                map.insert(
                    k,
                    serde_json::from_str(&v).map_err(|e| corrupt(&self.path, e.to_string()))?,
                );
            }
            return Ok(Some(Value::Object(map)));
        };
        let key = match first {
            PathSeg::Key(k) => k.clone(),
            PathSeg::Index(_) => return Ok(None),
        };
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE doc = ?1 AND key = ?2")?
            .query_row(params![doc, key], |r| r.get(0))
            .optional()?;
        let Some(text) = text else { return Ok(None) };
        let mut value: Value =
            serde_json::from_str(&text).map_err(|e| corrupt(&self.path, e.to_string()))?;
        for seg in rest {
            let next = match (seg, value) {
                (PathSeg::Key(k), Value::Object(mut m)) => m.remove(k),
                (PathSeg::Key(k), Value::Array(mut a)) => match k.parse::<usize>() {
                    Ok(i) if i < a.len() => Some(a.swap_remove(i)),
                    _ => None,
                },
                (PathSeg::Index(i), Value::Array(mut a)) if *i < a.len() => Some(a.swap_remove(*i)),
                _ => None,
            };
            match next {
                Some(v) => value = v,
                None => return Ok(None),
            }
        }
        Ok(Some(value))
    }

    /// Keys of the object (or indices of the list) at `path`.
    pub fn keys(&self, doc: &str, path: &[PathSeg]) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self.get(doc, path)?.map(|v| match v {
            Value::Object(m) => m.keys().cloned().collect(),
            Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
            _ => Vec::new(),
        }))
    }

    /// Check that the materialized view of `doc` equals its Automerge document, and that the
    /// ops each row names (where it knows them) are the ones visible there: `Ok(None)` if so,
    /// otherwise both sides (view, document; for ops, `{"ops": {key: hex}}`). A consistency check for tests and
    /// operators; it loads the document.
    pub fn check_view(&mut self, doc: &str) -> Result<Option<(Value, Value)>, StoreError> {
        self.repair()?;
        let was_loaded = self.loaded.contains_key(doc);
        if self.has_doc(doc)? {
            // Quarantine what loading finds damaged before the view is read.
            self.loaded_doc_repaired(doc)?;
        }
        let view = self
            .get(doc, &[])?
            .unwrap_or(Value::Object(Default::default()));
        // Leave the cache as it was (this check is not a use of the document).
        let found = self.view_mismatch(doc, view);
        if !was_loaded {
            self.loaded.remove(doc);
        }
        found
    }

    fn view_mismatch(
        &mut self,
        doc: &str,
        view: Value,
    ) -> Result<Option<(Value, Value)>, StoreError> {
        let truth = if self.has_doc(doc)? {
            json::to_json(&self.loaded_doc_repaired(doc)?.am, &ROOT)?
        } else {
            Value::Object(Default::default())
        };
        if view != truth {
            return Ok(Some((view, truth)));
        }
        // And the ops behind each row, where the row knows them (`kv.ops`).
        for (key, ops) in self.known_view_ops(doc)? {
            let held = super::persist::visible_op_ids(&self.loaded_doc(doc)?.am, &key)?;
            if held != ops {
                let ops_of = |b: &[u8]| serde_json::json!({ "ops": { key.clone(): crate::identity::hex(b) } });
                return Ok(Some((ops_of(&ops), ops_of(&held))));
            }
        }
        Ok(None)
    }

    /// Every `kv` row of `doc` whose ops are known: (key, `kv.ops`).
    pub(super) fn known_view_ops(&self, doc: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT key, ops FROM kv WHERE doc = ?1 AND ops IS NOT NULL")?
            .query_map(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    /// All concurrent values at `path` (winner first): more than one means a conflict.
    pub fn conflicts(&mut self, doc: &str, path: &[PathSeg]) -> Result<Vec<Value>, StoreError> {
        self.repair()?;
        if !self.has_doc(doc)? {
            return Err(StoreError::NoSuchDocument(doc.to_string()));
        }
        let am = &self.loaded_doc_repaired(doc)?.am;
        Ok(json::conflicts_at(am, path)?)
    }

    /// Current heads of a document (sorted).
    pub fn heads(&self, doc: &str) -> Result<Vec<[u8; 32]>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT heads FROM docs WHERE doc = ?1")?
            .query_row(params![doc], |r| r.get(0))
            .optional()?;
        Ok(blob.map(|b| blob_to_hashes(&b)).unwrap_or_default())
    }

    /// Number of valid changes in a document.
    pub fn change_count(&self, doc: &str) -> Result<u64, StoreError> {
        let n: Option<i64> = self
            .conn
            .prepare_cached("SELECT n_changes FROM docs WHERE doc = ?1")?
            .query_row(params![doc], |r| r.get(0))
            .optional()?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Per-author highest valid seq of a document: its version vector.
    pub fn clock(&self, doc: &str) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        self.with_clocks(|c| c.get(doc).cloned().unwrap_or_default())
    }

    /// Version vectors of every document, including the membership document.
    pub fn all_clocks(&self) -> Result<BTreeMap<String, BTreeMap<NodeId, u64>>, StoreError> {
        self.with_clocks(|c| c.clone())
    }

    /// Run `f` on the cached version vectors, computing them from disk if needed.
    fn with_clocks<T>(&self, f: impl FnOnce(&Clocks) -> T) -> Result<T, StoreError> {
        if let Some(c) = self.clocks.borrow().as_ref() {
            return Ok(f(c));
        }
        let mut out: Clocks = BTreeMap::new();
        for (d, id, seq) in self.doc_author_seqs(
            "SELECT doc, author, MAX(seq) FROM changes WHERE status = 0 GROUP BY doc, author",
        )? {
            out.entry(d).or_default().insert(id, seq);
        }
        let r = f(&out);
        *self.clocks.borrow_mut() = Some(out);
        Ok(r)
    }

    /// Highest seq of a valid change by `author` in `doc` (0 if none), from the cached
    /// version vectors (every write and ingest asks, so this must not be a query).
    pub(super) fn last_seq(&self, doc: &str, author: &NodeId) -> Result<u64, StoreError> {
        self.with_clocks(|c| c.get(doc).and_then(|m| m.get(author)).copied().unwrap_or(0))
    }

    /// Valid changes of `author` in `doc` with seq > `after`, in seq order, at most `limit`.
    pub fn changes_after(
        &self,
        doc: &str,
        author: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, StoreError> {
        self.signed_rows(
            "SELECT sig, bytes, hash FROM changes WHERE doc = ?1 AND author = ?2 AND seq > ?3 AND status = 0
                AND length(sig) = 64
             ORDER BY seq LIMIT ?4",
            doc,
            author,
            params![doc, author.0.to_vec(), after as i64, limit as i64],
        )
    }

    /// Changes of one (doc, author) from a `SELECT sig, bytes, hash …` query. A row whose
    /// bytes do not hash to its hash (damaged on disk) is left out and recorded for
    /// quarantine (see `scrub`): it is never served.
    fn signed_rows(
        &self,
        sql: &str,
        doc: &str,
        author: &NodeId,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (sig, bytes, hash) = row?;
            if let Err(reason) = super::scrub::check_row(&hash, &author.0, &bytes) {
                self.note_suspect(doc, &hash, &reason);
                continue;
            }
            out.push(SignedChange {
                doc: doc.to_string(),
                author: *author,
                sig: sig
                    .try_into()
                    .map_err(|_| corrupt(&self.path, "bad signature length"))?,
                bytes,
            });
        }
        Ok(out)
    }

    /// A stored valid change by hash.
    pub fn get_change(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.get_with(hash, true)
    }

    /// A stored change by hash, valid or void.
    pub fn get_stored(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.get_with(hash, false)
    }

    fn get_with(&self, hash: &[u8; 32], valid: bool) -> Result<Option<SignedChange>, StoreError> {
        let sql = if valid {
            "SELECT doc, author, sig, bytes FROM changes WHERE hash = ?1 AND status = 0"
        } else {
            "SELECT doc, author, sig, bytes FROM changes WHERE hash = ?1"
        };
        let row = self
            .conn
            .prepare_cached(sql)?
            .query_row(params![hash.to_vec()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .optional()?;
        let Some((doc, author, sig, bytes)) = row else {
            return Ok(None);
        };
        if let Err(reason) = super::scrub::check_row(hash, &author, &bytes) {
            // Damaged on disk: never served; quarantined by the next `repair`.
            self.note_suspect(&doc, hash, &reason);
            return Ok(None);
        }
        Ok(Some(SignedChange {
            doc,
            author: NodeId::from_slice(&author).ok_or_else(|| corrupt(&self.path, "bad author"))?,
            sig: sig
                .try_into()
                .map_err(|_| corrupt(&self.path, "bad signature length"))?,
            bytes,
        }))
    }

    /// Keys flagged for equivocation (two different changes at the same doc, author and seq;
    /// see [`crate::equivocation`]), sorted.
    pub fn equivocators(&self) -> Result<Vec<NodeId>, StoreError> {
        let mut out: BTreeSet<NodeId> = self.forks.keys().map(|(_, a)| *a).collect();
        // Evidence kept by schema 1 (and for the membership document).
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT author FROM evidence")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        for r in rows {
            out.extend(NodeId::from_slice(&r?));
        }
        Ok(out.into_iter().collect())
    }

    /// Flagged forks: (document, author) → the seq from which the author's changes are void.
    pub fn forks(&self) -> &BTreeMap<(String, NodeId), u64> {
        &self.forks
    }

    /// Proof of a flagged fork: up to two stored variants of `author` at its fork seq in `doc`
    /// (what sync sends a peer that does not know the fork yet).
    pub fn fork_evidence(
        &self,
        doc: &str,
        author: &NodeId,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let Some(seq) = self.forks.get(&(doc.to_string(), *author)) else {
            return Ok(Vec::new());
        };
        self.signed_rows(
            "SELECT sig, bytes, hash FROM changes WHERE doc = ?1 AND author = ?2 AND seq = ?3 AND status = 3
             ORDER BY hash LIMIT 2",
            doc,
            author,
            params![doc, author.0.to_vec(), *seq as i64],
        )
    }

    /// Current heads of every document (membership included), by name.
    pub fn all_heads(&self) -> Result<BTreeMap<String, Vec<[u8; 32]>>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT doc, heads FROM docs")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (doc, heads) = row?;
            let mut h = blob_to_hashes(&heads);
            h.sort();
            out.insert(doc, h);
        }
        Ok(out)
    }

    /// The hash of a stored change (only valid ones if `valid`) whose hash starts with
    /// `prefix` (through the hash index).
    pub fn find_by_prefix(
        &self,
        prefix: &[u8],
        valid: bool,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        let n = prefix.len().min(32);
        lo[..n].copy_from_slice(&prefix[..n]);
        hi[..n].copy_from_slice(&prefix[..n]);
        let sql = if valid {
            "SELECT hash FROM changes WHERE hash BETWEEN ?1 AND ?2 AND status = 0 LIMIT 1"
        } else {
            "SELECT hash FROM changes WHERE hash BETWEEN ?1 AND ?2 LIMIT 1"
        };
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached(sql)?
            .query_row(params![lo.to_vec(), hi.to_vec()], |r| r.get(0))
            .optional()?;
        Ok(h.and_then(|h| h.try_into().ok()))
    }

    /// Dependencies that the newest 1,024 changes waiting in the pending set lack (neither
    /// stored nor pending themselves), at most `limit`: what to ask a peer for by hash.
    pub fn wanted_deps(&self, limit: usize) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut out = BTreeSet::new();
        // The newest waiting changes only: this runs for every pull.
        for (_, h) in self.pending.queue.iter().rev().take(1024) {
            for d in &h.deps {
                if out.len() >= limit {
                    return Ok(out.into_iter().collect());
                }
                if !self.pending.hashes.contains(d) && !out.contains(d) && !self.has_change(d)? {
                    out.insert(*d);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Verified history of a document, optionally only the edits under `path`, newest last,
    /// at most `limit` entries (the newest ones).
    pub fn history(
        &mut self,
        doc: &str,
        path: &[PathSeg],
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.repair()?;
        if self.has_doc(doc)? {
            // Quarantine what loading finds damaged before the rows are read.
            self.loaded_doc_repaired(doc)?;
        }
        if !self.has_doc(doc)? {
            return Err(StoreError::NoSuchDocument(doc.to_string()));
        }
        type Row = (Vec<u8>, Vec<u8>, i64, i64, Vec<u8>);
        let rows: Vec<Row> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT hash, author, seq, time, deps FROM changes WHERE doc = ?1 AND status = 0 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let prefix = json::format_path(path);
        let names = self.membership.clone();
        // The verified history starts at the winning cut's base, if any: named for the cut.
        let cut = self.current_cut(doc)?.map(|(r, _)| r);
        let am = &self.loaded_doc_repaired(doc)?.am;
        let mut out = Vec::new();
        for (hash, author, seq, time, deps) in rows {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            let Some(author) = NodeId::from_slice(&author) else {
                continue;
            };
            let before: Vec<ChangeHash> =
                blob_to_hashes(&deps).into_iter().map(ChangeHash).collect();
            let patches = panic_safe(|| am.diff(&before, &[ChangeHash(hash)])).unwrap_or_default();
            let edits: Vec<Edit> = patches
                .into_iter()
                .filter_map(|p| patch_to_edit(am, p))
                .filter(|e| {
                    prefix.is_empty()
                        || e.path == prefix
                        || e.path.starts_with(&format!("{prefix}."))
                        || prefix.starts_with(&format!("{}.", e.path))
                })
                .collect();
            if !path.is_empty() && edits.is_empty() {
                continue;
            }
            let author_name = match &cut {
                Some(c) if c.base_hash == hash => format!(
                    "cut {} by {} (history before it folded)",
                    c.epoch,
                    names.name_of(&c.author)
                ),
                _ => names.name_of(&author),
            };
            out.push(HistoryEntry {
                hash: hex(&hash),
                author,
                author_name,
                seq: seq as u64,
                time_ms: time,
                edits,
            });
        }
        let skip = out.len().saturating_sub(limit);
        Ok(out.split_off(skip))
    }
}

fn patch_to_edit(am: &Automerge, p: automerge::Patch) -> Option<Edit> {
    use automerge::{PatchAction, Prop};
    let mut segs: Vec<PathSeg> = p
        .path
        .iter()
        .map(|(_, prop)| match prop {
            Prop::Map(k) => PathSeg::Key(k.clone()),
            Prop::Seq(i) => PathSeg::Index(*i),
        })
        .collect();
    let (action, value) = match p.action {
        PatchAction::PutMap { key, value, .. } => {
            segs.push(PathSeg::Key(key));
            ("put", Some(value_json(am, &value.0, &value.1)))
        }
        PatchAction::PutSeq { index, value, .. } => {
            segs.push(PathSeg::Index(index));
            ("put", Some(value_json(am, &value.0, &value.1)))
        }
        PatchAction::Insert { index, values, .. } => {
            segs.push(PathSeg::Index(index));
            let vals: Vec<Value> = values
                .iter()
                .map(|(v, id, _)| value_json(am, v, id))
                .collect();
            ("insert", Some(Value::Array(vals)))
        }
        PatchAction::DeleteMap { key } => {
            segs.push(PathSeg::Key(key));
            ("delete", None)
        }
        PatchAction::DeleteSeq { index, .. } => {
            segs.push(PathSeg::Index(index));
            ("delete", None)
        }
        PatchAction::Increment { prop, value } => {
            segs.push(match prop {
                Prop::Map(k) => PathSeg::Key(k),
                Prop::Seq(i) => PathSeg::Index(i),
            });
            ("increment", Some(Value::from(value)))
        }
        PatchAction::SpliceText { index, value, .. } => {
            segs.push(PathSeg::Index(index));
            ("splice", Some(Value::String(value.make_string())))
        }
        _ => return None,
    };
    Some(Edit {
        path: json::format_path(&segs),
        action,
        value,
    })
}

fn value_json(am: &Automerge, v: &automerge::Value<'_>, id: &automerge::ObjId) -> Value {
    match v {
        automerge::Value::Object(_) => json::to_json(am, id).unwrap_or(Value::Null),
        automerge::Value::Scalar(s) => json::scalar_to_json(s),
    }
}
