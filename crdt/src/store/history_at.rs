//! Reading the past: a document (or the value at a path) as it was at given heads
//! ([`Store::get_at`]), and the structured difference between two states
//! ([`Store::diff`]).
//!
//! Heads are the hashes `get`, `status`, `history` and watch events print (comma-separated
//! hex; the empty string is the empty document before its first change). Every head must be
//! a valid change of the document: otherwise the caller gets [`HistoryError::UnknownHeads`]
//! naming the document's current heads, to start again from. The past is read in place,
//! through Automerge's `*_at` reads on the loaded document (`json::At`), never by replaying
//! the history into a fork, so the cost does not grow with the number of changes after the
//! heads. The diff compares the two JSON values: added, removed and changed paths with the
//! old and new values, map keys in sorted order, list items by index.

use automerge::{ChangeHash, ReadDoc};
use serde::Serialize;
use serde_json::Value;

use super::Store;
use crate::error::StoreError;
use crate::identity::hex;
use crate::json::{self, At, JsonError, PathSeg};

/// Why a request about a document's past could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The heads are not all valid changes of the document.
    #[error("`{doc}` has no change {unknown}; its current heads are `{current}` (heads are printed by `get`, `status`, `history` and watch events)")]
    UnknownHeads {
        /// The document.
        doc: String,
        /// The first head that is not one of its changes (hex).
        unknown: String,
        /// The document's current heads (comma-separated hex).
        current: String,
    },
    /// The heads do not parse.
    #[error("`{given}` is not a list of change hashes: {reason} (heads are 64 hex digits, separated by commas)")]
    BadHeads {
        /// The text given.
        given: String,
        /// What is wrong.
        reason: String,
    },
    /// The change to undo is not a valid change of the document.
    #[error("`{doc}` has no valid change {hash} (see `lichen history {doc}`)")]
    UnknownChange {
        /// The document.
        doc: String,
        /// The hash (or prefix) given.
        hash: String,
    },
    /// The document does not exist.
    #[error("document `{0}` does not exist")]
    NoSuchDocument(String),
    /// A path problem.
    #[error(transparent)]
    Json(#[from] JsonError),
    /// The store failed (or refused a write).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parse heads as printed (`h1,h2`, 64 hex digits each; empty: the empty document).
pub fn parse_heads(s: &str) -> Result<Vec<[u8; 32]>, HistoryError> {
    let bad = |reason: String| HistoryError::BadHeads {
        given: s.chars().take(200).collect(),
        reason,
    };
    let s = s.trim().trim_matches('"');
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.len() != 64 {
            return Err(bad(format!("`{part}` is {} characters long", part.len())));
        }
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = part
                .get(2 * i..2 * i + 2)
                .and_then(|x| u8::from_str_radix(x, 16).ok())
                .ok_or_else(|| bad(format!("`{part}` is not hexadecimal")))?;
        }
        out.push(h);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Heads as printed: sorted hex hashes joined by commas.
pub fn format_heads(heads: &[[u8; 32]]) -> String {
    let mut h = heads.to_vec();
    h.sort();
    h.iter().map(|x| hex(x)).collect::<Vec<_>>().join(",")
}

/// What happened at one path between two states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// Present only in the newer state.
    Added,
    /// Present only in the older state.
    Removed,
    /// Present in both with different values.
    Changed,
}

/// One difference between two states of a document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffEntry {
    /// Path (as `format_path` prints it; empty for the document itself).
    pub path: String,
    /// Added, removed or changed.
    pub kind: DiffKind,
    /// The value in the older state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    /// The value in the newer state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// Differences between `old` and `new` under `base`, appended to `out` (maps key by key,
/// lists item by item, anything else as one changed value).
pub(crate) fn json_diff(
    base: &mut Vec<PathSeg>,
    old: Option<&Value>,
    new: Option<&Value>,
    out: &mut Vec<DiffEntry>,
) {
    match (old, new) {
        (None, None) => {}
        (Some(o), Some(n)) if o == n => {}
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                base.push(PathSeg::Key(k.clone()));
                json_diff(base, o.get(k), n.get(k), out);
                base.pop();
            }
        }
        (Some(Value::Array(o)), Some(Value::Array(n))) => {
            for i in 0..o.len().max(n.len()) {
                base.push(PathSeg::Index(i));
                json_diff(base, o.get(i), n.get(i), out);
                base.pop();
            }
        }
        (o, n) => out.push(DiffEntry {
            path: json::format_path(base),
            kind: match (o, n) {
                (None, _) => DiffKind::Added,
                (_, None) => DiffKind::Removed,
                _ => DiffKind::Changed,
            },
            old: o.cloned(),
            new: n.cloned(),
        }),
    }
}

impl Store {
    /// Load `doc` and check that every one of `heads` is a valid change of it.
    pub(super) fn check_heads(
        &mut self,
        doc: &str,
        heads: &[[u8; 32]],
    ) -> Result<(), HistoryError> {
        self.repair()?;
        if !self.has_doc(doc)? {
            return Err(HistoryError::NoSuchDocument(doc.to_string()));
        }
        let am = &self.loaded_doc_repaired(doc)?.am;
        let missing = heads
            .iter()
            .find(|h| am.get_change_by_hash(&ChangeHash(**h)).is_none());
        if let Some(h) = missing {
            return Err(HistoryError::UnknownHeads {
                doc: doc.to_string(),
                unknown: hex(h),
                current: format_heads(&self.heads(doc)?),
            });
        }
        Ok(())
    }

    /// The value at `path` in `doc` as it was at `heads` (the whole document for an empty
    /// path; `None` where nothing was there). See the module docs.
    pub fn get_at(
        &mut self,
        doc: &str,
        path: &[PathSeg],
        heads: &[[u8; 32]],
    ) -> Result<Option<Value>, HistoryError> {
        self.check_heads(doc, heads)?;
        let am = &self.loaded_doc_repaired(doc)?.am;
        let heads: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        Ok(json::get_path(
            &At {
                doc: am,
                heads: &heads,
            },
            path,
        )?)
    }

    /// The differences at `path` in `doc` from its state at `from` to its state at `to`
    /// (now if `None`), in path order.
    pub fn diff(
        &mut self,
        doc: &str,
        path: &[PathSeg],
        from: &[[u8; 32]],
        to: Option<&[[u8; 32]]>,
    ) -> Result<Vec<DiffEntry>, HistoryError> {
        let old = self.get_at(doc, path, from)?;
        let new = match to {
            Some(to) => self.get_at(doc, path, to)?,
            None => self.get(doc, path)?,
        };
        let mut out = Vec::new();
        json_diff(&mut path.to_vec(), old.as_ref(), new.as_ref(), &mut out);
        Ok(out)
    }
}
