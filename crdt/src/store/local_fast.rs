//! The writer's fast path. A local edit made only of scalar puts at top-level keys (the
//! common "set a value" write) is built as an Automerge change straight from what the store
//! already has on disk: the document's heads (the change's dependencies, with this node's
//! previous change if they do not name it, as Automerge does), their largest op (one less
//! than its first op), this node's sequence number, and each key's `kv.ops` (the ops the put
//! overwrites, its `pred`). It is for documents that are not in memory: they stay on disk, and
//! the view rows are the written scalars. A document in memory is edited through Automerge,
//! which keeps it current for less than replaying the change into it later would cost.
//!
//! Automerge would make the same change from the same document, byte for byte (story
//! `crdt/tests/store_fast_path.rs`), so peers cannot tell the paths apart.
//! Everything else takes Automerge's path: nested paths, deletes, whole-document writes,
//! values that are objects or arrays, a key whose ops are not known, and a put of the value
//! a key already shows (Automerge's reconciliation decides whether that changes anything).

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use automerge::legacy::{Key, ObjectId, Op as LegacyOp, OpId, OpType};
use automerge::{ActorId, Change, ChangeHash, ExpandedChange};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::persist::{op_ids_blob, op_ids_from_blob, Accepted, Row, Touched};
use super::{panic_safe, Op, Store};
use crate::error::StoreError;
use crate::identity::{NodeId, SecretKey};
use crate::json::{self, PathSeg};
use crate::signed::SignedChange;

/// A `kv` row as stored: the JSON text and the ops behind it (`None`: not known).
type ViewRow = (String, Option<Vec<u8>>);

impl Store {
    /// The change (every op of which changes something) and its view rows, if `ops` can take
    /// the fast path on `doc`; `None` sends them down Automerge's path. The caller has authorized the
    /// write and made no other change to `doc` in this batch (the heads and sequence numbers
    /// read here are the ones on disk).
    pub(super) fn local_fast_change(
        &mut self,
        key: &SecretKey,
        me: &NodeId,
        doc: &str,
        ops: &[&Op],
        now_ms: i64,
    ) -> Result<Option<(Accepted, Touched)>, StoreError> {
        // A document in memory is edited there: an Automerge put costs less than replaying
        // the change into it later (an apply walks the edited object's ops, a hot key's whole
        // history; `cargo run --release -p lichen-crdt --example hot_key`).
        if !self.local_fast_path || self.loaded.contains_key(doc) {
            return Ok(None);
        }
        let mut puts = Vec::with_capacity(ops.len());
        for op in ops {
            let Op::Put { path, value } = op else {
                return Ok(None);
            };
            let [PathSeg::Key(k)] = path.as_slice() else {
                return Ok(None);
            };
            let Some(scalar) = json::json_to_scalar(value) else {
                return Ok(None);
            };
            puts.push((k, value, scalar));
        }
        let heads = self.heads(doc)?;
        // Every op of the document is in the causal past of a head, and a change's ops come
        // after all of its past: the largest op is the largest `max_op` of the heads.
        let mut max_op = 0;
        for h in &heads {
            match self.dep_info(doc, h)? {
                Some((true, m, true)) => max_op = max_op.max(m),
                _ => return Ok(None),
            }
        }
        let actor = me.0.to_vec();
        let mut rows: BTreeMap<String, (Value, Vec<u8>)> = BTreeMap::new();
        let mut operations = Vec::with_capacity(puts.len());
        for (i, (k, value, scalar)) in puts.into_iter().enumerate() {
            let (shown, pred) = match rows.get(k.as_str()) {
                Some((v, ops)) => (Some(v.clone()), ops.clone()),
                None => match self.view_row(doc, k)? {
                    None => (None, Vec::new()),
                    Some((_, None)) => return Ok(None),
                    Some((v, Some(ops))) => (serde_json::from_str::<Value>(&v).ok(), ops),
                },
            };
            if shown.as_ref() == Some(value) {
                return Ok(None);
            }
            let Some(pred) = op_ids_from_blob(&pred) else {
                return Ok(None);
            };
            let pred: Vec<OpId> = pred
                .into_iter()
                .map(|(c, a)| OpId(c, ActorId::from(a.as_slice())))
                .collect();
            let counter = max_op + 1 + i as u64;
            rows.insert(
                k.clone(),
                (
                    json::scalar_to_json(&scalar),
                    op_ids_blob(vec![(counter, actor.clone())]),
                ),
            );
            operations.push(LegacyOp {
                action: OpType::Put(scalar),
                obj: ObjectId::Root,
                key: Key::Map(k.as_str().into()),
                pred: pred.into(),
                insert: false,
            });
        }
        let n = operations.len() as u64;
        let Some(start_op) = NonZeroU64::new(max_op + 1) else {
            return Ok(None);
        };
        // As Automerge does, a change also names its actor's previous change when the heads
        // do not (it is then their ancestor: the ops count above is unchanged).
        let seq = self.last_seq(doc, me)? + 1;
        let mut deps: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        if seq > 1 {
            let Some(last) = self.hash_at(doc, me, seq - 1)? else {
                return Ok(None);
            };
            if !heads.contains(&last) {
                deps.push(ChangeHash(last));
            }
        }
        let expanded = ExpandedChange {
            operations,
            actor_id: ActorId::from(actor.as_slice()),
            hash: None,
            seq,
            start_op,
            time: now_ms,
            // A document's first change names it (see `write`).
            message: heads.is_empty().then(|| doc.to_string()),
            deps,
            extra_bytes: Vec::new(),
            author: None,
        };
        let Some(change) = panic_safe(|| Change::from(expanded)) else {
            return Ok(None);
        };
        let header = crate::header::parse(change.raw_bytes())
            .map_err(|e| StoreError::Automerge(format!("own change does not parse: {e}")))?;
        let signed = SignedChange::sign_hashed(
            key,
            &self.cluster,
            doc,
            &header.hash,
            change.raw_bytes().to_vec(),
        );
        let touched = Touched::FastForward {
            heads: vec![header.hash],
            rows: rows
                .into_iter()
                .map(|(k, (v, ops))| (k, (v.to_string(), ops)))
                .collect::<BTreeMap<String, Row>>(),
        };
        Ok(Some((
            Accepted {
                signed,
                header,
                change,
                max_op: max_op + n,
            },
            touched,
        )))
    }

    /// The `kv` row of a key: its JSON text and its ops (`None` where not known).
    fn view_row(&self, doc: &str, key: &str) -> Result<Option<ViewRow>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value, ops FROM kv WHERE doc = ?1 AND key = ?2")?
            .query_row(params![doc, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }
}
