//! Committing accepted changes, the last step of both local writes and ingest: one SQLite
//! transaction inserts the changes (`insert_changes`) and refreshes the materialized `kv`
//! rows and `docs` heads of the documents they touched (`Touched` says which keys), then the
//! cached version vectors are updated. The view rows are read from the loaded Automerge
//! documents (or given, for a fast forward); the documents themselves are not changed here.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{Automerge, Change, ChangeHash, ROOT};
use rusqlite::params;
use serde_json::Value;

use super::{hashes_to_blob, panic_safe, Op, Store};
use crate::error::StoreError;
use crate::header::ChangeHeader;
use crate::json::{self, PathSeg};
use crate::signed::SignedChange;

/// Which top-level keys of a document's materialized view need refreshing.
pub(super) enum Touched {
    /// Whatever changed since these heads (remote batches; found with an Automerge diff),
    /// and these keys.
    Since(Vec<ChangeHash>, BTreeSet<String>),
    /// These keys (local edits know what they touched).
    Keys(BTreeSet<String>),
    /// Every key.
    All,
    /// Rows computed without Automerge (a fast-forward batch) and the heads after it.
    FastForward {
        heads: Vec<[u8; 32]>,
        rows: BTreeMap<String, Row>,
    },
}

/// A view row: the key's JSON value and the ids of the ops behind it ([`op_ids_blob`]).
pub(super) type Row = (String, Vec<u8>);

/// The `kv.ops` encoding of op ids: sorted, each an 8-byte big-endian counter, a 1-byte actor
/// length and the actor's bytes.
pub(super) fn op_ids_blob(mut ids: Vec<(u64, Vec<u8>)>) -> Vec<u8> {
    ids.sort();
    let mut out = Vec::with_capacity(ids.len() * 41);
    for (counter, actor) in ids {
        out.extend_from_slice(&counter.to_be_bytes());
        out.push(actor.len().min(255) as u8);
        out.extend_from_slice(&actor[..actor.len().min(255)]);
    }
    out
}

/// The op ids of a `kv.ops` blob ([`op_ids_blob`]); `None` if it does not parse.
pub(super) fn op_ids_from_blob(mut b: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let counter = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let len = usize::from(*b.get(8)?);
        out.push((counter, b.get(9..9 + len)?.to_vec()));
        b = b.get(9 + len..)?;
    }
    Some(out)
}

/// The ids of the ops whose values are visible at root key `key` of `am`.
pub(super) fn visible_op_ids(am: &Automerge, key: &str) -> Result<Vec<u8>, StoreError> {
    use automerge::{ObjId, ReadDoc};
    let all = panic_safe(|| am.get_all(ROOT, key))
        .ok_or_else(|| StoreError::Automerge(format!("reading key {key} panicked")))?
        .map_err(|e| StoreError::Automerge(e.to_string()))?;
    Ok(op_ids_blob(
        all.into_iter()
            .filter_map(|(_, id)| match id {
                ObjId::Id(counter, actor, _) => Some((counter, actor.to_bytes().to_vec())),
                ObjId::Root => None,
            })
            .collect(),
    ))
}

impl Touched {
    pub(super) fn of_op(op: &Op) -> Touched {
        let first = match op {
            Op::Put { path, .. } | Op::Delete { path } => path.first(),
            Op::Replace { .. } => None,
        };
        match first {
            Some(PathSeg::Key(k)) => Touched::Keys([k.clone()].into()),
            _ => Touched::All,
        }
    }

    pub(super) fn merge(self, other: Touched) -> Touched {
        match (self, other) {
            (Touched::Keys(mut a), Touched::Keys(b)) => {
                a.extend(b);
                Touched::Keys(a)
            }
            _ => Touched::All,
        }
    }
}

/// Row data of a change accepted for insertion.
pub(super) struct Accepted {
    pub(super) signed: SignedChange,
    pub(super) header: ChangeHeader,
    pub(super) change: Change,
    pub(super) max_op: u64,
}

impl Store {
    /// Record newly stored valid changes in the cached version vectors.
    fn note_valid(&self, accepted: &[&Accepted]) {
        if let Some(c) = self.clocks.borrow_mut().as_mut() {
            for a in accepted {
                let e = c
                    .entry(a.signed.doc.clone())
                    .or_default()
                    .entry(a.signed.author)
                    .or_insert(0);
                *e = (*e).max(a.header.seq);
            }
        }
    }

    /// Insert accepted changes and refresh the materialized view of the touched documents in
    /// one transaction. `touched` maps each document to its heads before these changes.
    pub(super) fn persist(
        &mut self,
        accepted: &[&Accepted],
        touched: &BTreeMap<String, Touched>,
    ) -> Result<(), StoreError> {
        // Compute the view updates before opening the transaction.
        type ViewUpdate = (String, Vec<u8>, BTreeMap<String, Option<Row>>);
        let mut updates: Vec<ViewUpdate> = Vec::new();
        for (doc, t) in touched {
            if let Touched::FastForward { heads, rows } = t {
                let rows = rows.iter().map(|(k, r)| (k.clone(), Some(r.clone())));
                updates.push((doc.clone(), hashes_to_blob(heads), rows.collect()));
                continue;
            }
            let Some(l) = self.loaded.get(doc) else {
                continue;
            };
            let after = l.am.get_heads();
            let keys = match t {
                Touched::Since(before, also) => {
                    let mut k = touched_keys(&l.am, before, &after);
                    k.extend(also.iter().cloned());
                    k
                }
                Touched::Keys(k) => k.clone(),
                Touched::FastForward { .. } => BTreeSet::new(),
                Touched::All => {
                    let mut k: BTreeSet<String> = self
                        .conn
                        .prepare_cached("SELECT key FROM kv WHERE doc = ?1")?
                        .query_map(params![doc], |r| r.get::<_, String>(0))?
                        .collect::<Result<_, _>>()?;
                    if let Value::Object(m) = json::to_json(&l.am, &ROOT)? {
                        k.extend(m.keys().cloned());
                    }
                    k
                }
            };
            let mut rows = BTreeMap::new();
            for k in keys {
                let row = match json::get_path(&l.am, &[PathSeg::Key(k.clone())])? {
                    Some(v) => Some((v.to_string(), visible_op_ids(&l.am, &k)?)),
                    None => None,
                };
                rows.insert(k, row);
            }
            let heads: Vec<[u8; 32]> = after.iter().map(|h| h.0).collect();
            updates.push((doc.clone(), hashes_to_blob(&heads), rows));
        }
        let tx = self.conn.transaction()?;
        {
            insert_changes(&tx, accepted.iter().copied(), 0)?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO kv (doc, key, value, ops) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM kv WHERE doc = ?1 AND key = ?2")?;
            let mut docs = tx.prepare_cached(
                "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads, n_changes = n_changes + excluded.n_changes",
            )?;
            for (doc, heads, rows) in &updates {
                for (k, row) in rows {
                    match row {
                        Some((v, ops)) => put.execute(params![doc, k, v, ops])?,
                        None => del.execute(params![doc, k])?,
                    };
                }
                let n = accepted.iter().filter(|a| &a.signed.doc == doc).count() as i64;
                docs.execute(params![doc, heads, n])?;
            }
        }
        tx.commit()?;
        self.note_valid(accepted);
        Ok(())
    }
}

/// Insert accepted changes with `status` (0: valid); the caller owns the transaction.
pub(super) fn insert_changes<'a>(
    tx: &rusqlite::Transaction<'_>,
    accepted: impl Iterator<Item = &'a Accepted>,
    status: i64,
) -> Result<(), StoreError> {
    let mut ins = tx.prepare_cached(
        "INSERT INTO changes (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for a in accepted {
        ins.execute(params![
            a.header.hash.to_vec(),
            a.signed.doc,
            a.signed.author.0.to_vec(),
            a.header.seq as i64,
            a.header.start_op as i64,
            a.max_op as i64,
            a.header.time,
            hashes_to_blob(&a.header.deps),
            a.signed.sig.to_vec(),
            a.signed.bytes,
            status,
        ])?;
    }
    Ok(())
}

/// Top-level keys touched between two sets of heads.
fn touched_keys(am: &Automerge, before: &[ChangeHash], after: &[ChangeHash]) -> BTreeSet<String> {
    let patches = panic_safe(|| am.diff(before, after)).unwrap_or_default();
    let mut keys = BTreeSet::new();
    for p in patches {
        let key = match p.path.first() {
            Some((_, automerge::Prop::Map(k))) => Some(k.clone()),
            Some(_) => None,
            None => match &p.action {
                automerge::PatchAction::PutMap { key, .. } => Some(key.clone()),
                automerge::PatchAction::DeleteMap { key } => Some(key.clone()),
                automerge::PatchAction::Increment {
                    prop: automerge::Prop::Map(k),
                    ..
                } => Some(k.clone()),
                automerge::PatchAction::Conflict {
                    prop: automerge::Prop::Map(k),
                } => Some(k.clone()),
                _ => None,
            },
        };
        if let Some(k) = key {
            keys.insert(k);
        }
    }
    keys
}
