//! Reverting: put a document (or the subtree at a path) back to its state at some heads
//! ([`Store::revert_to_op`]), or undo one change ([`Store::undo_plan`]).
//!
//! Both only *plan*: they return the [`Op`] that makes the edit, and the caller commits it
//! through the normal write path ([`Store::write`]; the agent's group commit), so the new
//! change is signed by the reverting node, authorized against its own role and scopes,
//! durable before it is acknowledged and synced like any other write; concurrent edits merge
//! with it like with any change. ([`Store::revert_to`] and [`Store::undo`] plan and write in
//! one call.) The op reconciles the JSON target against the document with minimal
//! operations, so the change touches only what differs.
//!
//! # Undo
//! A change's effects are gathered into *slots*: the map keys it set or deleted (an edit
//! inside a list or a text counts for the map key that holds the outermost list, which goes
//! back as a whole). For each slot, three values are read: just before the change (at its
//! dependencies), just after it (at the change itself), and now. If the value now is still
//! the one just after, the slot goes back to the value before (a key that did not exist is
//! deleted). Otherwise a later or concurrent change has overwritten it since: the slot is
//! reported as skipped, or reverted anyway with `force`. The comparison is by value: a key
//! written over with the very value the change had set counts as not overwritten. A slot
//! inside another slot of the same change is covered by the outer one.

use automerge::{ChangeHash, Patch, PatchAction, Prop, ReadDoc};
use serde::Serialize;
use serde_json::Value;

use super::history_at::HistoryError;
use super::{Op, Store};
use crate::identity::{hex, SecretKey};
use crate::json::{self, At, PathSeg};
use crate::signed::SignedChange;

/// A value that [`Store::undo_plan`] did not put back because it changed since.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UndoSkipped {
    /// Path of the value.
    pub path: String,
    /// What the undone change had set (`None`: it deleted the value).
    pub set: Option<Value>,
    /// What is there now.
    pub now: Option<Value>,
}

/// What undoing a change does.
#[derive(Debug, Clone, PartialEq)]
pub struct UndoPlan {
    /// The edit to commit (`None`: nothing to change).
    pub op: Option<Op>,
    /// Paths put back to their value before the change.
    pub undone: Vec<String>,
    /// Paths overwritten since the change, left alone (empty with `force`).
    pub skipped: Vec<UndoSkipped>,
}

/// The map-key path that `p` edits, cut before the first list index (see module docs).
fn slot_of(p: &Patch) -> Option<Vec<PathSeg>> {
    let mut segs: Vec<PathSeg> = p
        .path
        .iter()
        .map(|(_, prop)| match prop {
            Prop::Map(k) => PathSeg::Key(k.clone()),
            Prop::Seq(i) => PathSeg::Index(*i),
        })
        .collect();
    match &p.action {
        PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
            segs.push(PathSeg::Key(key.clone()))
        }
        PatchAction::Increment {
            prop: Prop::Map(k), ..
        } => segs.push(PathSeg::Key(k.clone())),
        // Anything else edits inside a list or a text: the slot is the key holding it.
        _ => segs.push(PathSeg::Index(0)),
    }
    if let Some(i) = segs.iter().position(|s| matches!(s, PathSeg::Index(_))) {
        segs.truncate(i);
    }
    (!segs.is_empty()).then_some(segs)
}

/// Set (or delete, for `None`) the value at a map-key path in a JSON object, creating maps
/// on the way.
fn set_json(root: &mut Value, path: &[PathSeg], value: Option<Value>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = root;
    for seg in parents {
        let PathSeg::Key(k) = seg else { return };
        if !cur.is_object() {
            *cur = Value::Object(serde_json::Map::new());
        }
        let Value::Object(m) = cur else { return };
        cur = m
            .entry(k.clone())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    let PathSeg::Key(k) = last else { return };
    if let Value::Object(m) = cur {
        match value {
            Some(v) => {
                m.insert(k.clone(), v);
            }
            None => {
                m.remove(k);
            }
        }
    } else if let Some(v) = value {
        let mut m = serde_json::Map::new();
        m.insert(k.clone(), v);
        *cur = Value::Object(m);
    }
}

impl Store {
    /// The edit that makes the value at `path` in `doc` (the whole document for an empty
    /// path) equal to what it was at `heads`; `None` if it is equal already.
    pub fn revert_to_op(
        &mut self,
        doc: &str,
        path: &[PathSeg],
        heads: &[[u8; 32]],
    ) -> Result<Option<Op>, HistoryError> {
        let old = self.get_at(doc, path, heads)?;
        let now = self.get(doc, path)?;
        if old == now {
            return Ok(None);
        }
        Ok(Some(match (path.is_empty(), old) {
            (true, old) => Op::Replace {
                value: old.unwrap_or_else(|| Value::Object(serde_json::Map::new())),
            },
            (false, Some(value)) => Op::Put {
                path: path.to_vec(),
                value,
            },
            (false, None) => Op::Delete {
                path: path.to_vec(),
            },
        }))
    }

    /// Find the valid change of `doc` whose hash is `hash` or starts with it (hex).
    pub fn find_change(&mut self, doc: &str, hash: &str) -> Result<[u8; 32], HistoryError> {
        let unknown = || HistoryError::UnknownChange {
            doc: doc.to_string(),
            hash: hash.to_string(),
        };
        let h = hash.trim();
        if h.is_empty() || h.len() > 64 || h.len() % 2 != 0 {
            return Err(unknown());
        }
        let prefix: Vec<u8> = (0..h.len() / 2)
            .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2).unwrap_or("x"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| unknown())?;
        let found = self.find_by_prefix(&prefix, true)?.ok_or_else(unknown)?;
        self.check_heads(doc, &[found]).map_err(|e| match e {
            HistoryError::UnknownHeads { .. } => unknown(),
            e => e,
        })?;
        Ok(found)
    }

    /// Plan undoing the change `hash` of `doc` (see the module docs): each value it set goes
    /// back to what it replaced, unless it changed since (skipped, or reverted anyway with
    /// `force`).
    pub fn undo_plan(
        &mut self,
        doc: &str,
        hash: &[u8; 32],
        force: bool,
    ) -> Result<UndoPlan, HistoryError> {
        self.check_heads(doc, &[*hash])?;
        let am = &self.loaded_doc_repaired(doc)?.am;
        let unknown = || HistoryError::UnknownChange {
            doc: doc.to_string(),
            hash: hex(hash),
        };
        let change = am
            .get_change_by_hash(&ChangeHash(*hash))
            .ok_or_else(unknown)?;
        let before: Vec<ChangeHash> = change.deps().to_vec();
        let after = [ChangeHash(*hash)];
        let patches = super::panic_safe(|| am.diff(&before, &after)).unwrap_or_default();
        let mut slots: Vec<Vec<PathSeg>> = patches.iter().filter_map(slot_of).collect();
        slots.sort_by_key(|s| s.len());
        let mut kept: Vec<Vec<PathSeg>> = Vec::new();
        for s in slots {
            if !kept.iter().any(|k| s.starts_with(k)) {
                kept.push(s);
            }
        }
        let mut target = json::to_json(am, &automerge::ROOT)?;
        let original = target.clone();
        let mut plan = UndoPlan {
            op: None,
            undone: Vec::new(),
            skipped: Vec::new(),
        };
        for slot in kept {
            let then = json::get_path(
                &At {
                    doc: am,
                    heads: &before,
                },
                &slot,
            )?;
            let set = json::get_path(
                &At {
                    doc: am,
                    heads: &after,
                },
                &slot,
            )?;
            let now = json::get_path(am, &slot)?;
            if now != set && !force {
                plan.skipped.push(UndoSkipped {
                    path: json::format_path(&slot),
                    set,
                    now,
                });
                continue;
            }
            if now != then {
                plan.undone.push(json::format_path(&slot));
                set_json(&mut target, &slot, then);
            }
        }
        plan.undone.sort();
        if target != original {
            plan.op = Some(Op::Replace { value: target });
        }
        Ok(plan)
    }

    /// [`Store::revert_to_op`], committed as one change signed by `key` (`None`: nothing
    /// to change).
    pub fn revert_to(
        &mut self,
        key: &SecretKey,
        doc: &str,
        path: &[PathSeg],
        heads: &[[u8; 32]],
        now_ms: i64,
    ) -> Result<Option<SignedChange>, HistoryError> {
        match self.revert_to_op(doc, path, heads)? {
            Some(op) => Ok(self.write(key, doc, &op, now_ms)?),
            None => Ok(None),
        }
    }

    /// [`Store::undo_plan`], committed as one change signed by `key`.
    pub fn undo(
        &mut self,
        key: &SecretKey,
        doc: &str,
        hash: &[u8; 32],
        force: bool,
        now_ms: i64,
    ) -> Result<(Option<SignedChange>, UndoPlan), HistoryError> {
        let plan = self.undo_plan(doc, hash, force)?;
        let change = match &plan.op {
            Some(op) => self.write(key, doc, op, now_ms)?,
            None => None,
        };
        Ok((change, plan))
    }
}
