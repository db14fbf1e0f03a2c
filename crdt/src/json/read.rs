//! Automerge → JSON, the read direction: a path is followed from the root, slot by slot
//! (`walk`, `read_child`, which the write side navigates with too), and what is found is
//! built into a [`serde_json::Value`] (`to_json`, `get_path`, `conflicts_at`), scalars by
//! `scalar_to_json`, refusing documents nested deeper than `MAX_DEPTH`.

use automerge::{ObjId, ObjType, Prop, ScalarValue, Value, ROOT};

use super::at::Slots;
use serde_json::Value as Json;

#[cfg(test)]
use super::is_map;
use super::{format_path, is_container, prop_for, Child, JsonError, PathSeg, MAX_DEPTH};
use crate::identity::hex;

/// The JSON a scalar reads as: `Counter`/`Timestamp` as numbers, `Bytes` as
/// lowercase hex, non-finite floats and unknown types as `null`.
pub(crate) fn scalar_to_json(sv: &ScalarValue) -> Json {
    match sv {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(bytes) => Json::String(hex(bytes)),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// Read one slot; `None` when the key is absent or the index is past the end.
pub(super) fn read_child<R: Slots>(
    doc: &R,
    obj: &ObjId,
    prop: &Prop,
) -> Result<Option<Child>, JsonError> {
    if let Prop::Seq(i) = prop {
        if *i >= doc.len_of(obj) {
            return Ok(None);
        }
    }
    Ok(doc.slot(obj, prop.clone())?.map(|(v, id)| match v {
        Value::Object(t) => Child::Obj(id, t),
        Value::Scalar(s) => Child::Scalar(s.into_owned()),
    }))
}

/// Follow every segment of `path` from the root; each must land on a map or
/// list. `Ok(None)` when something along the way is absent.
pub(super) fn walk<R: Slots>(
    doc: &R,
    path: &[PathSeg],
) -> Result<Option<(ObjId, ObjType)>, JsonError> {
    let mut obj = ROOT;
    let mut typ = ObjType::Map;
    for i in 0..path.len() {
        let prop = prop_for(typ, path, i)?;
        match read_child(doc, &obj, &prop)? {
            None => return Ok(None),
            Some(Child::Obj(id, t)) if is_container(t) => {
                obj = id;
                typ = t;
            }
            Some(_) => {
                return Err(JsonError::NotAContainer {
                    path: format_path(path.get(..=i).unwrap_or(path)),
                })
            }
        }
    }
    Ok(Some((obj, typ)))
}

/// Convert a whole object (and everything below it) to JSON.
///
/// Map keys come out sorted; `Text` objects become strings, `Counter` and
/// `Timestamp` numbers, `Bytes` lowercase hex strings.
pub(crate) fn to_json<R: Slots>(doc: &R, obj: &ObjId) -> Result<Json, JsonError> {
    let typ = doc.type_of(obj)?;
    object_to_json(doc, obj, typ, 1)
}

/// `depth` counts the containers from the root down to and including `obj`.
fn object_to_json<R: Slots>(
    doc: &R,
    obj: &ObjId,
    typ: ObjType,
    depth: usize,
) -> Result<Json, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    match typ {
        ObjType::Map | ObjType::Table => {
            let mut keys: Vec<String> = doc.keys_of(obj);
            // Sorted insertion keeps the output sorted even if serde_json's
            // "preserve_order" feature is enabled somewhere in the build.
            keys.sort();
            let mut out = serde_json::Map::new();
            for key in keys {
                let prop = Prop::Map(key);
                if let Some(child) = read_child(doc, obj, &prop)? {
                    if let Prop::Map(key) = prop {
                        out.insert(key, child_to_json(doc, child, depth)?);
                    }
                }
            }
            Ok(Json::Object(out))
        }
        ObjType::List => {
            let len = doc.len_of(obj);
            let mut out = Vec::new();
            for i in 0..len {
                if let Some(child) = read_child(doc, obj, &Prop::Seq(i))? {
                    out.push(child_to_json(doc, child, depth)?);
                }
            }
            Ok(Json::Array(out))
        }
        ObjType::Text => Ok(Json::String(doc.text_of(obj)?)),
    }
}

/// `parent_depth` is the depth of the container holding `child`.
fn child_to_json<R: Slots>(doc: &R, child: Child, parent_depth: usize) -> Result<Json, JsonError> {
    match child {
        Child::Scalar(sv) => Ok(scalar_to_json(&sv)),
        Child::Obj(id, t) => object_to_json(doc, &id, t, parent_depth + 1),
    }
}

/// The value at `path`, or `None` if absent. The empty path is the whole
/// root map.
pub(crate) fn get_path<R: Slots>(doc: &R, path: &[PathSeg]) -> Result<Option<Json>, JsonError> {
    let Some((_, parents)) = path.split_last() else {
        return to_json(doc, &ROOT).map(Some);
    };
    let Some((obj, typ)) = walk(doc, parents)? else {
        return Ok(None);
    };
    let prop = prop_for(typ, path, parents.len())?;
    match read_child(doc, &obj, &prop)? {
        None => Ok(None),
        Some(child) => child_to_json(doc, child, path.len()).map(Some),
    }
}

/// Every concurrent value at `path` (Automerge `get_all`): empty when absent,
/// one value when there is no conflict, several on a conflict. The value
/// [`get_path`] reports (the deterministic winner) comes first.
pub(crate) fn conflicts_at<R: Slots>(doc: &R, path: &[PathSeg]) -> Result<Vec<Json>, JsonError> {
    let Some((_, parents)) = path.split_last() else {
        return Ok(vec![to_json(doc, &ROOT)?]);
    };
    let Some((obj, typ)) = walk(doc, parents)? else {
        return Ok(Vec::new());
    };
    let prop = prop_for(typ, path, parents.len())?;
    if let Prop::Seq(i) = prop {
        if i >= doc.len_of(&obj) {
            return Ok(Vec::new());
        }
    }
    let children: Vec<Child> = doc
        .slot_all(&obj, prop)?
        .into_iter()
        .map(|(v, id)| match v {
            Value::Object(t) => Child::Obj(id, t),
            Value::Scalar(s) => Child::Scalar(s.into_owned()),
        })
        .collect();
    // Automerge's `get` returns the last of `get_all`; put it first.
    children
        .into_iter()
        .rev()
        .map(|child| child_to_json(doc, child, path.len()))
        .collect()
}

/// The keys at `path`: sorted map keys, or list indices as strings. Empty when nothing is at
/// `path`. (Reads are served from the store's materialized view; this is kept for tests.)
#[cfg(test)]
pub(super) fn keys_at<R: Slots>(doc: &R, path: &[PathSeg]) -> Result<Vec<String>, JsonError> {
    match walk(doc, path)? {
        None => Ok(Vec::new()),
        Some((obj, typ)) if is_map(typ) => {
            let mut keys: Vec<String> = doc.keys_of(&obj);
            keys.sort();
            Ok(keys)
        }
        Some((obj, _)) => Ok((0..doc.len_of(&obj)).map(|i| i.to_string()).collect()),
    }
}
