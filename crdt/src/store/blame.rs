//! Blame: for every leaf of a document (or of the subtree at a path), its current value and
//! the change that set it ([`Store::blame`]).
//!
//! A leaf is a scalar, an empty map or list, a text, or a slot holding concurrent values (a
//! conflict). Each value in the current state carries the id of the Automerge op that wrote
//! it (counter, actor); the change holding that op is the author's valid change of the
//! document whose op range (`start_op ..= max_op`, stored with every change) contains the
//! counter (each author's ranges are read once, through the `(doc, author, seq)` index, and
//! searched by bisection). The author's name and whether it is still a member come from the evaluated
//! membership, so blame after a removal still names the removed node. A conflicted leaf
//! lists every concurrent value with its author, the value reads return first.

use std::collections::HashMap;

use automerge::{ObjId, ObjType, Prop, ReadDoc, Value as AmValue};
use rusqlite::params;
use serde::Serialize;
use serde_json::Value;

use super::history_at::HistoryError;
use super::Store;
use crate::error::StoreError;
use crate::identity::{hex, NodeId};
use crate::json::{self, PathSeg};

/// Who set a value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlameSetter {
    /// The value.
    pub value: Value,
    /// Hash of the change that set it (hex; empty if the change is not found).
    pub hash: String,
    /// Its author.
    pub author: NodeId,
    /// The author's name in the membership document.
    pub author_name: String,
    /// The author's sequence number of that change in this document.
    pub seq: u64,
    /// Time the author claims, in milliseconds since the epoch.
    pub time_ms: i64,
    /// Whether the author is a member now (not removed).
    pub member: bool,
}

/// One leaf and who set it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlameLeaf {
    /// Path of the leaf.
    pub path: String,
    /// Its value (the winner, on a conflict).
    pub value: Value,
    /// Who set it: one entry, or every concurrent value (the winner first) on a conflict.
    pub setters: Vec<BlameSetter>,
}

/// Leaves found: each path with its values and the ids of the ops that wrote them.
type Found = Vec<(Vec<PathSeg>, Vec<(Value, ObjId)>)>;

/// What one (actor, counter) op resolves to: hash, seq, time.
type OpChange = Option<([u8; 32], u64, i64)>;

impl Store {
    /// Every leaf under `path` in `doc` with the change that set it (see the module docs),
    /// in path order.
    pub fn blame(&mut self, doc: &str, path: &[PathSeg]) -> Result<Vec<BlameLeaf>, HistoryError> {
        self.repair()?;
        if !self.has_doc(doc)? {
            return Err(HistoryError::NoSuchDocument(doc.to_string()));
        }
        // Collect (path, [(value, op id)]) first: the document is borrowed from the store.
        let mut found: Found = Vec::new();
        {
            let am = &self.loaded_doc_repaired(doc)?.am;
            match path.split_last() {
                None => walk(
                    am,
                    &automerge::ROOT,
                    ObjType::Map,
                    &mut Vec::new(),
                    &mut found,
                    0,
                )?,
                Some((last, parents)) => {
                    let Some((obj, typ)) = walk_to(am, parents)? else {
                        return Ok(Vec::new());
                    };
                    let prop = match (typ, last) {
                        (ObjType::List, PathSeg::Index(i)) => Prop::Seq(*i),
                        (ObjType::List, PathSeg::Key(k)) => match k.parse() {
                            Ok(i) => Prop::Seq(i),
                            Err(_) => return Ok(Vec::new()),
                        },
                        (_, PathSeg::Key(k)) => Prop::Map(k.clone()),
                        (_, PathSeg::Index(_)) => return Ok(Vec::new()),
                    };
                    let mut here = path.to_vec();
                    slot(am, &obj, prop, &mut here, &mut found, path.len())?;
                }
            }
        }
        let membership = self.membership.clone();
        let mut ranges: HashMap<Vec<u8>, Vec<OpRange>> = HashMap::new();
        let mut out = Vec::with_capacity(found.len());
        for (segs, values) in found {
            let mut setters = Vec::with_capacity(values.len());
            for (value, id) in values {
                let ObjId::Id(counter, actor, _) = id else {
                    continue;
                };
                let actor = actor.to_bytes().to_vec();
                if !ranges.contains_key(&actor) {
                    let r = self.op_ranges(doc, &actor)?;
                    ranges.insert(actor.clone(), r);
                }
                let ch = ranges.get(&actor).and_then(|r| change_of_op(r, counter));
                let Some(author) = NodeId::from_slice(&actor) else {
                    continue;
                };
                let (hash, seq, time_ms) = ch.map(|(h, s, t)| (hex(&h), s, t)).unwrap_or_default();
                setters.push(BlameSetter {
                    value,
                    hash,
                    author,
                    author_name: membership.name_of(&author),
                    seq,
                    time_ms,
                    member: membership.is_active(&author),
                });
            }
            let value = setters
                .first()
                .map(|s| s.value.clone())
                .unwrap_or(Value::Null);
            out.push(BlameLeaf {
                path: json::format_path(&segs),
                value,
                setters,
            });
        }
        Ok(out)
    }

    /// The op ranges of every valid change of `doc` by `actor`, sorted by `start_op`: one
    /// index scan per author, then each op is found by binary search.
    fn op_ranges(&self, doc: &str, actor: &[u8]) -> Result<Vec<OpRange>, HistoryError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT start_op, max_op, hash, seq, time FROM changes
                 WHERE doc = ?1 AND author = ?2 AND status = 0 ORDER BY seq",
            )
            .map_err(StoreError::from)?;
        let rows = stmt
            .query_map(params![doc, actor], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(StoreError::from)?;
        let mut out = Vec::new();
        for row in rows {
            let (start, max, hash, seq, time) = row.map_err(StoreError::from)?;
            if let Ok(h) = <[u8; 32]>::try_from(hash.as_slice()) {
                out.push((start as u64, max as u64, h, seq as u64, time));
            }
        }
        out.sort_by_key(|r| r.0);
        Ok(out)
    }
}

/// One change's op range: start_op, max_op, hash, seq, time.
type OpRange = (u64, u64, [u8; 32], u64, i64);

/// The change among `ranges` (sorted by start_op) that holds op `counter`.
fn change_of_op(ranges: &[OpRange], counter: u64) -> OpChange {
    let i = ranges.partition_point(|r| r.0 <= counter).checked_sub(1)?;
    let (_, max, hash, seq, time) = ranges.get(i)?;
    (counter <= *max).then_some((*hash, *seq, *time))
}

/// Follow a path of containers from the root.
fn walk_to<R: ReadDoc>(am: &R, path: &[PathSeg]) -> Result<Option<(ObjId, ObjType)>, HistoryError> {
    let mut obj = automerge::ROOT;
    let mut typ = ObjType::Map;
    for seg in path {
        let prop = match (typ, seg) {
            (ObjType::List, PathSeg::Index(i)) => Prop::Seq(*i),
            (ObjType::List, PathSeg::Key(k)) => match k.parse() {
                Ok(i) => Prop::Seq(i),
                Err(_) => return Ok(None),
            },
            (ObjType::Map | ObjType::Table, PathSeg::Key(k)) => Prop::Map(k.clone()),
            _ => return Ok(None),
        };
        match am.get(&obj, prop).map_err(json::JsonError::from)? {
            Some((AmValue::Object(t), id))
                if matches!(t, ObjType::Map | ObjType::Table | ObjType::List) =>
            {
                obj = id;
                typ = t;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some((obj, typ)))
}

/// Collect the leaves under a container.
fn walk<R: ReadDoc>(
    am: &R,
    obj: &ObjId,
    typ: ObjType,
    here: &mut Vec<PathSeg>,
    out: &mut Found,
    depth: usize,
) -> Result<(), HistoryError> {
    if depth > 64 {
        return Err(json::JsonError::TooDeep.into());
    }
    match typ {
        ObjType::Map | ObjType::Table => {
            let mut keys: Vec<String> = am.keys(obj).collect();
            keys.sort();
            for k in keys {
                here.push(PathSeg::Key(k.clone()));
                slot(am, obj, Prop::Map(k), here, out, depth)?;
                here.pop();
            }
        }
        ObjType::List => {
            for i in 0..am.length(obj) {
                here.push(PathSeg::Index(i));
                slot(am, obj, Prop::Seq(i), here, out, depth)?;
                here.pop();
            }
        }
        ObjType::Text => {}
    }
    Ok(())
}

/// One slot: recurse into a lone non-empty container, else record a leaf.
fn slot<R: ReadDoc>(
    am: &R,
    obj: &ObjId,
    prop: Prop,
    here: &mut Vec<PathSeg>,
    out: &mut Found,
    depth: usize,
) -> Result<(), HistoryError> {
    let all = am.get_all(obj, prop).map_err(json::JsonError::from)?;
    if let [(AmValue::Object(t), id)] = all.as_slice() {
        let container = matches!(t, ObjType::Map | ObjType::Table | ObjType::List);
        let empty = match t {
            ObjType::List => am.length(id) == 0,
            _ => am.keys(id).next().is_none(),
        };
        if container && !empty {
            return walk(am, id, *t, here, out, depth + 1);
        }
    }
    let mut values = Vec::with_capacity(all.len());
    // Automerge lists the winner last; blame lists it first.
    for (v, id) in all.into_iter().rev() {
        let json = match &v {
            AmValue::Object(_) => json::to_json(am, &id)?,
            AmValue::Scalar(s) => json::scalar_to_json(s),
        };
        values.push((json, id));
    }
    if !values.is_empty() {
        out.push((here.clone(), values));
    }
    Ok(())
}
