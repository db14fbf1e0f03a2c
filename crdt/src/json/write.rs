//! JSON → Automerge, the write direction: [`put_path`], [`delete_path`] and [`reconcile_root`]
//! check the value's depth, then reconcile the desired JSON against what the document holds,
//! so only what differs becomes ops: equal scalars make none, maps are compared key by key,
//! lists keep their common prefix and suffix and diff the middle ([`edit_script`]), and what
//! is new is written from scratch ([`write_fresh`]).

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, ROOT};
use serde_json::Value as Json;

use super::read::{read_child, walk};
use super::{
    format_path, is_container, is_map, prop_for, scalar_to_json, Child, JsonError, PathSeg,
    MAX_DEPTH,
};

/// The scalar a JSON scalar is stored as; `None` for arrays and objects.
pub(crate) fn json_to_scalar(v: &Json) -> Option<ScalarValue> {
    Some(match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                n.as_f64().map_or(ScalarValue::Null, ScalarValue::F64)
            }
        }
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Whether an existing scalar already reads back as `new`, so writing `new`
/// would change nothing visible. Values that read back lossily (unknown
/// types, non-finite floats) never match, so writing replaces them.
fn scalar_matches(sv: &ScalarValue, new: &Json) -> bool {
    match sv {
        ScalarValue::Unknown { .. } => false,
        ScalarValue::F64(f) if !f.is_finite() => false,
        _ => scalar_to_json(sv) == *new,
    }
}

/// Fail with [`JsonError::TooDeep`] if `v` holds more than `budget` levels of
/// nested containers.
fn check_depth(v: &Json, budget: usize) -> Result<(), JsonError> {
    fn all<'a>(
        mut children: impl Iterator<Item = &'a Json>,
        budget: usize,
    ) -> Result<(), JsonError> {
        let rest = budget.checked_sub(1).ok_or(JsonError::TooDeep)?;
        children.try_for_each(|c| check_depth(c, rest))
    }
    match v {
        Json::Array(a) => all(a.iter(), budget),
        Json::Object(m) => all(m.values(), budget),
        _ => Ok(()),
    }
}

/// Where a brand-new value goes: over a map key / existing list element, or
/// inserted into a list.
enum Slot {
    Put(Prop),
    Insert(usize),
}

/// Write `new` from scratch (no existing value to reconcile with).
fn write_fresh<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    slot: Slot,
    new: &Json,
) -> Result<(), JsonError> {
    let make = |tx: &mut T, slot: Slot, typ: ObjType| -> Result<ObjId, JsonError> {
        Ok(match slot {
            Slot::Put(prop) => tx.put_object(parent, prop, typ)?,
            Slot::Insert(i) => tx.insert_object(parent, i, typ)?,
        })
    };
    match new {
        Json::Object(m) => {
            let id = make(tx, slot, ObjType::Map)?;
            for (k, v) in m {
                write_fresh(tx, &id, Slot::Put(Prop::Map(k.clone())), v)?;
            }
        }
        Json::Array(a) => {
            let id = make(tx, slot, ObjType::List)?;
            for (i, v) in a.iter().enumerate() {
                write_fresh(tx, &id, Slot::Insert(i), v)?;
            }
        }
        scalar => {
            let sv = json_to_scalar(scalar).unwrap_or(ScalarValue::Null);
            match slot {
                Slot::Put(prop) => tx.put(parent, prop, sv)?,
                Slot::Insert(i) => tx.insert(parent, i, sv)?,
            }
        }
    }
    Ok(())
}

/// Deep equality between an existing slot and a JSON value, without
/// hydrating the existing side (recursion is bounded by `new`'s depth).
fn matches_json<R: ReadDoc>(doc: &R, child: &Child, new: &Json) -> Result<bool, JsonError> {
    match (child, new) {
        (Child::Scalar(sv), _) => Ok(scalar_matches(sv, new)),
        (Child::Obj(id, t), Json::Object(m)) if is_map(*t) => {
            if doc.keys(id).count() != m.len() {
                return Ok(false);
            }
            for (k, v) in m {
                match read_child(doc, id, &Prop::Map(k.clone()))? {
                    Some(c) if matches_json(doc, &c, v)? => {}
                    _ => return Ok(false),
                }
            }
            Ok(true)
        }
        (Child::Obj(id, ObjType::List), Json::Array(a)) => {
            if doc.length(id) != a.len() {
                return Ok(false);
            }
            for (i, v) in a.iter().enumerate() {
                match read_child(doc, id, &Prop::Seq(i))? {
                    Some(c) if matches_json(doc, &c, v)? => {}
                    _ => return Ok(false),
                }
            }
            Ok(true)
        }
        (Child::Obj(id, ObjType::Text), Json::String(s)) => Ok(doc.text(id)? == *s),
        _ => Ok(false),
    }
}

/// Make the existing slot `prop` of `parent` equal `new` with minimal ops.
fn reconcile_slot<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    prop: Prop,
    new: &Json,
) -> Result<(), JsonError> {
    match (read_child(tx, parent, &prop)?, new) {
        (Some(Child::Obj(id, t)), Json::Object(m)) if is_map(t) => reconcile_map(tx, &id, m),
        (Some(Child::Obj(id, ObjType::List)), Json::Array(a)) => reconcile_list(tx, &id, a),
        (Some(Child::Obj(id, ObjType::Text)), Json::String(s)) if tx.text(&id)? == *s => Ok(()),
        (Some(Child::Scalar(sv)), _) if scalar_matches(&sv, new) => Ok(()),
        _ => write_fresh(tx, parent, Slot::Put(prop), new),
    }
}

fn reconcile_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    new: &serde_json::Map<String, Json>,
) -> Result<(), JsonError> {
    let stale: Vec<String> = tx.keys(obj).filter(|k| !new.contains_key(k)).collect();
    for key in stale {
        tx.delete(obj, key)?;
    }
    for (k, v) in new {
        reconcile_slot(tx, obj, Prop::Map(k.clone()), v)?;
    }
    Ok(())
}

/// Above this many element comparisons the middle of a list is not diffed
/// further and is updated pairwise instead (bounds time and memory).
const LIST_DIFF_BUDGET: usize = 4096;

/// Keep the longest common prefix and suffix untouched and only edit the
/// middle. When the middle is small (see [`LIST_DIFF_BUDGET`]) it is turned
/// into the shortest script of keeps, updates, deletes and inserts (unit-cost
/// edit distance); otherwise elements are updated pairwise and the surplus
/// deleted or inserted. Updates recurse into same-kind containers.
fn reconcile_list<T: Transactable>(tx: &mut T, obj: &ObjId, new: &[Json]) -> Result<(), JsonError> {
    let old_len = tx.length(obj);
    let shared = old_len.min(new.len());

    let mut prefix = 0;
    while prefix < shared {
        let (Some(child), Some(v)) = (read_child(tx, obj, &Prop::Seq(prefix))?, new.get(prefix))
        else {
            break;
        };
        if !matches_json(tx, &child, v)? {
            break;
        }
        prefix += 1;
    }

    let mut suffix = 0;
    while suffix < shared - prefix {
        let old_i = old_len - 1 - suffix;
        let new_i = new.len() - 1 - suffix;
        let (Some(child), Some(v)) = (read_child(tx, obj, &Prop::Seq(old_i))?, new.get(new_i))
        else {
            break;
        };
        if !matches_json(tx, &child, v)? {
            break;
        }
        suffix += 1;
    }

    let old_mid = old_len - suffix - prefix;
    let new_mid = new.get(prefix..new.len() - suffix).unwrap_or_default();
    let script = if old_mid > 0
        && !new_mid.is_empty()
        && old_mid.saturating_mul(new_mid.len()) <= LIST_DIFF_BUDGET
    {
        edit_script(tx, obj, prefix, old_mid, new_mid)?
    } else {
        let paired = old_mid.min(new_mid.len());
        let mut script: Vec<Edit> = (0..paired).map(Edit::Update).collect();
        script.extend((paired..old_mid).map(|_| Edit::Delete));
        script.extend((paired..new_mid.len()).map(Edit::Insert));
        script
    };

    // `pos` is the live list index the next edit applies to.
    let mut pos = prefix;
    for edit in script {
        match edit {
            Edit::Keep => pos += 1,
            Edit::Delete => tx.delete(obj, pos)?,
            Edit::Update(j) | Edit::Insert(j) => {
                let Some(v) = new_mid.get(j) else {
                    continue;
                };
                if matches!(edit, Edit::Update(_)) {
                    reconcile_slot(tx, obj, Prop::Seq(pos), v)?;
                } else {
                    write_fresh(tx, obj, Slot::Insert(pos), v)?;
                }
                pos += 1;
            }
        }
    }
    Ok(())
}

/// One step of a list edit script; indices point into the new middle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    /// The old element stays as it is.
    Keep,
    /// The old element is reconciled into new element `j`.
    Update(usize),
    /// The old element is deleted.
    Delete,
    /// New element `j` is inserted.
    Insert(usize),
}

/// The shortest edit script (unit cost for update, delete and insert) that
/// turns the old middle (list indices `start..start + old_mid`) into
/// `new_mid`, preferring to keep equal elements.
fn edit_script<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    start: usize,
    old_mid: usize,
    new_mid: &[Json],
) -> Result<Vec<Edit>, JsonError> {
    let (n, m) = (old_mid, new_mid.len());
    let mut equal = vec![false; n * m];
    for i in 0..n {
        let Some(child) = read_child(doc, obj, &Prop::Seq(start + i))? else {
            continue;
        };
        for (j, v) in new_mid.iter().enumerate() {
            if matches_json(doc, &child, v)? {
                if let Some(e) = equal.get_mut(i * m + j) {
                    *e = true;
                }
            }
        }
    }
    let eq = |i: usize, j: usize| equal.get(i * m + j).copied().unwrap_or(false);
    // cost[i][j] = edits needed to turn old[i..] into new[j..].
    let width = m + 1;
    let mut cost = vec![0usize; (n + 1) * width];
    let at = |c: &[usize], i: usize, j: usize| c.get(i * width + j).copied().unwrap_or(usize::MAX);
    for i in (0..=n).rev() {
        for j in (0..=m).rev() {
            let v = if i == n {
                m - j
            } else if j == m {
                n - i
            } else if eq(i, j) {
                at(&cost, i + 1, j + 1)
            } else {
                at(&cost, i + 1, j + 1)
                    .min(at(&cost, i + 1, j))
                    .min(at(&cost, i, j + 1))
                    .saturating_add(1)
            };
            if let Some(cell) = cost.get_mut(i * width + j) {
                *cell = v;
            }
        }
    }
    let mut script = Vec::with_capacity(n.max(m));
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        let here = at(&cost, i, j);
        if i < n && j < m && eq(i, j) {
            script.push(Edit::Keep);
            i += 1;
            j += 1;
        } else if i < n && j < m && here == at(&cost, i + 1, j + 1).saturating_add(1) {
            script.push(Edit::Update(j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || here == at(&cost, i + 1, j).saturating_add(1)) {
            script.push(Edit::Delete);
            i += 1;
        } else {
            script.push(Edit::Insert(j));
            j += 1;
        }
    }
    Ok(script)
}

/// Set the value at `path` with the minimal set of operations.
///
/// Missing intermediate containers are created (a map, or a list when the
/// next segment is `[n]`); a list index must exist or equal the list length
/// (append). Existing maps and lists are reconciled recursively rather than
/// replaced; a scalar equal to the existing one produces no op. Returns
/// whether any op was made. The empty path is [`reconcile_root`].
///
/// On error, nothing has been written unless Automerge itself failed midway;
/// callers should discard the transaction on any error.
pub(crate) fn put_path<T: Transactable>(
    tx: &mut T,
    path: &[PathSeg],
    value: &Json,
) -> Result<bool, JsonError> {
    let Some((_, parents)) = path.split_last() else {
        return reconcile_root(tx, value);
    };
    let budget = MAX_DEPTH
        .checked_sub(path.len())
        .ok_or(JsonError::TooDeep)?;
    check_depth(value, budget)?;
    let before = tx.pending_ops();

    let mut obj = ROOT;
    let mut typ = ObjType::Map;
    for i in 0..parents.len() {
        let prop = prop_for(typ, path, i)?;
        match read_child(tx, &obj, &prop)? {
            Some(Child::Obj(id, t)) if is_container(t) => {
                obj = id;
                typ = t;
            }
            Some(_) => {
                return Err(JsonError::NotAContainer {
                    path: format_path(path.get(..=i).unwrap_or(path)),
                })
            }
            None => {
                // Everything from here on is created fresh, so later indices
                // can only append to empty lists: check before writing.
                let rest = path.get(i + 1..).unwrap_or_default();
                for (j, seg) in rest.iter().enumerate() {
                    if let PathSeg::Index(n) = seg {
                        if *n != 0 {
                            return Err(JsonError::IndexOutOfRange {
                                path: format_path(path.get(..i + 1 + j).unwrap_or(path)),
                                index: *n,
                                len: 0,
                            });
                        }
                    }
                }
                let new_typ = match path.get(i + 1) {
                    Some(PathSeg::Index(_)) => ObjType::List,
                    _ => ObjType::Map,
                };
                let id = match prop {
                    Prop::Map(_) => tx.put_object(&obj, prop, new_typ)?,
                    Prop::Seq(n) => {
                        let len = tx.length(&obj);
                        if n != len {
                            return Err(JsonError::IndexOutOfRange {
                                path: format_path(path.get(..i).unwrap_or(path)),
                                index: n,
                                len,
                            });
                        }
                        tx.insert_object(&obj, n, new_typ)?
                    }
                };
                obj = id;
                typ = new_typ;
            }
        }
    }

    match prop_for(typ, path, parents.len())? {
        Prop::Seq(n) => {
            let len = tx.length(&obj);
            if n < len {
                reconcile_slot(tx, &obj, Prop::Seq(n), value)?;
            } else if n == len {
                write_fresh(tx, &obj, Slot::Insert(n), value)?;
            } else {
                return Err(JsonError::IndexOutOfRange {
                    path: format_path(parents),
                    index: n,
                    len,
                });
            }
        }
        prop => reconcile_slot(tx, &obj, prop, value)?,
    }
    Ok(tx.pending_ops() > before)
}

/// Delete the value at `path`. `Ok(false)` if nothing is there; the root
/// cannot be deleted.
pub(crate) fn delete_path<T: Transactable>(
    tx: &mut T,
    path: &[PathSeg],
) -> Result<bool, JsonError> {
    let Some((_, parents)) = path.split_last() else {
        return Err(JsonError::InvalidPath {
            path: String::new(),
            reason: "cannot delete the document root".to_string(),
        });
    };
    let Some((obj, typ)) = walk(tx, parents)? else {
        return Ok(false);
    };
    let prop = prop_for(typ, path, parents.len())?;
    if read_child(tx, &obj, &prop)?.is_none() {
        return Ok(false);
    }
    tx.delete(&obj, prop)?;
    Ok(true)
}

/// Make the whole root map equal `new` (a JSON object) with minimal ops.
/// Returns whether any op was made.
pub(crate) fn reconcile_root<T: Transactable>(tx: &mut T, new: &Json) -> Result<bool, JsonError> {
    let Json::Object(map) = new else {
        return Err(JsonError::RootNotObject);
    };
    check_depth(new, MAX_DEPTH)?;
    let before = tx.pending_ops();
    reconcile_map(tx, &ROOT, map)?;
    Ok(tx.pending_ops() > before)
}
