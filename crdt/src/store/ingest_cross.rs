//! Crossing changes without Automerge. When several nodes write one document at once, most
//! received changes are concurrent with this node's own (they do not build on its heads), so
//! they are not a fast forward. Applying such a change to the in-memory Automerge document
//! walks every op of the object it edits (`automerge` 0.12's batch apply merges the change's
//! ops into the object's whole op list), and for the root map of a document written at many
//! keys that is the whole history: about a millisecond per change at 10,000 keys, paid by
//! every receiver for every change.
//!
//! A change made only of scalar puts at top-level keys needs none of that to know the new
//! view: per key, the visible ops after it are the visible ops before it (`kv.ops`, exact)
//! minus the ops it names as overwritten (`pred`), plus its own op, and the value shown is
//! that of the greatest op id (counter, then actor), as Automerge picks it. The heads lose
//! the change's dependencies and gain the change. The changes are then stored as a fast
//! forward is (`Touched::FastForward`, and `Loaded::deferred` if the document is in memory,
//! applied in one batch when it is next needed). Automerge's path takes the batch instead when
//! a key's value would become that of an op whose value the row does not hold (a conflict's
//! losing value, uncovered when the winner is overwritten), or when a `pred` op that is no
//! longer visible at the key is not an op at that key (a crafted change can name another
//! key's op, and Automerge then drops that value too).

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{params, OptionalExtension};

use super::persist::{op_ids_blob, op_ids_from_blob, Accepted, Row};
use super::{panic_safe, Store};
use crate::error::StoreError;
use crate::json;

/// An op id as `kv.ops` lists it: (counter, actor bytes); ordered as Automerge orders them.
type OpKey = (u64, Vec<u8>);

/// A key's shown value (JSON text; `None`: no value) and its visible ops.
type Shown = (Option<String>, Vec<OpKey>);

/// The heads and the view rows after a batch.
type Crossed = (Vec<[u8; 32]>, BTreeMap<String, Row>);

impl Store {
    /// The heads and the view rows after `accepted` (in dependency order; every dependency is
    /// held or earlier in the batch) on top of `heads`, if every change is made only of scalar
    /// puts at top-level keys and the rows can be computed (see the module docs); `None`
    /// sends the batch down Automerge's path.
    pub(super) fn crossing_rows(
        &self,
        doc: &str,
        heads: &[[u8; 32]],
        accepted: &[Accepted],
    ) -> Result<Option<Crossed>, StoreError> {
        use automerge::legacy::{Key, ObjectId, OpType};
        let mut heads: BTreeSet<[u8; 32]> = heads.iter().copied().collect();
        let mut rows: BTreeMap<String, Shown> = BTreeMap::new();
        for a in accepted {
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
                let (shown, visible) = match rows.get(k.as_str()) {
                    Some(r) => r.clone(),
                    None => match self.row_with_ops(doc, k)? {
                        Some(r) => r,
                        None => return Ok(None),
                    },
                };
                let pred: BTreeSet<OpKey> = op
                    .pred
                    .iter()
                    .map(|p| (p.0, p.1.to_bytes().to_vec()))
                    .collect();
                // An overwritten op no longer visible here (a concurrent change overwrote it
                // first) must still be an op at this key: a crafted `pred` naming another
                // key's op makes Automerge drop that value too, so that takes its path.
                for p in &pred {
                    if !visible.contains(p) && !self.op_is_at_key(doc, p, k)? {
                        return Ok(None);
                    }
                }
                let own: OpKey = (a.header.start_op + i as u64, actor.clone());
                let old_winner = visible.iter().max().cloned();
                let mut after: Vec<OpKey> =
                    visible.into_iter().filter(|o| !pred.contains(o)).collect();
                after.push(own.clone());
                after.sort();
                let winner = after.last().cloned();
                let value = if winner.as_ref() == Some(&own) {
                    Some(json::scalar_to_json(v).to_string())
                } else if winner.is_some() && winner == old_winner && shown.is_some() {
                    shown
                } else {
                    return Ok(None);
                };
                rows.insert(k.to_string(), (value, after));
            }
            for d in &a.header.deps {
                heads.remove(d);
            }
            heads.insert(a.header.hash);
        }
        let mut out = BTreeMap::new();
        for (k, (value, ops)) in rows {
            // Every touched key ends with the op just put visible, so with a value.
            let Some(value) = value else {
                return Ok(None);
            };
            out.insert(k, (value, op_ids_blob(ops)));
        }
        Ok(Some((heads.into_iter().collect(), out)))
    }

    /// Whether op `id` is a put or delete at top-level key `key` of a valid stored change of
    /// `doc` (an op's actor is its change's author).
    fn op_is_at_key(&self, doc: &str, id: &OpKey, key: &str) -> Result<bool, StoreError> {
        use automerge::legacy::{Key, ObjectId};
        let bytes: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached(
                "SELECT bytes, start_op FROM changes WHERE doc = ?1 AND author = ?2
                   AND start_op <= ?3 AND max_op >= ?3 AND status = 0",
            )?
            .query_row(params![doc, id.1, id.0 as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((bytes, start)) = bytes else {
            return Ok(false);
        };
        let Some(Ok(change)) = panic_safe(|| automerge::Change::try_from(bytes.as_slice())) else {
            return Ok(false);
        };
        let Some(expanded) = panic_safe(|| change.decode()) else {
            return Ok(false);
        };
        let at =
            id.0.checked_sub(start as u64)
                .and_then(|i| usize::try_from(i).ok());
        Ok(at
            .and_then(|i| expanded.operations.get(i))
            .is_some_and(|op| {
                matches!((&op.obj, &op.key), (ObjectId::Root, Key::Map(k)) if k.as_str() == key)
                    && !op.insert
            }))
    }

    /// A key's shown value and visible ops: no row is no value and no ops; `None` if the row
    /// does not know its ops.
    fn row_with_ops(&self, doc: &str, key: &str) -> Result<Option<Shown>, StoreError> {
        let row: Option<(String, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached("SELECT value, ops FROM kv WHERE doc = ?1 AND key = ?2")?
            .query_row(params![doc, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            None => Some((None, Vec::new())),
            Some((value, Some(ops))) => op_ids_from_blob(&ops).map(|ops| (Some(value), ops)),
            Some((_, None)) => None,
        })
    }
}
