//! JSON view of Lichen configuration documents stored as Automerge documents.
//!
//! # Why this module exists
//!
//! Every Lichen configuration document (for example `app/nginx`) is a JSON
//! object on the outside and an Automerge document on the inside. Users and
//! tools read and write JSON; replication and merging happen on Automerge
//! operations. This module is the only place that translates between the two,
//! so the storage conventions are decided once, here:
//!
//! * JSON objects are Automerge `Map` objects, JSON arrays are `List` objects.
//! * JSON strings are *scalar* strings ([`ScalarValue::Str`]), never `Text`
//!   objects, so concurrent edits of one key resolve last-writer-wins instead
//!   of interleaving characters.
//! * Numbers: integers that fit `i64` become `Int`, larger ones `Uint`, every
//!   other number `F64` (and an `F64` always reads back as a JSON float, even
//!   when it is integral). `null` is `ScalarValue::Null`.
//!
//! # How data flows
//!
//! * **Automerge → JSON** ([`to_json`], [`get_path`], [`conflicts_at`]): walk the object tree and build a [`serde_json::Value`].
//!   Values this module never writes are still readable: `Text` objects read
//!   as strings, `Counter`/`Timestamp` as numbers, `Bytes` as lowercase hex,
//!   values of unknown type as `null`. Map keys are emitted in sorted order
//!   whatever map representation serde_json was compiled with.
//! * **JSON → Automerge** ([`put_path`], [`reconcile_root`], [`delete_path`]):
//!   instead of overwriting, the desired JSON is *reconciled* against what the
//!   document already holds and only the minimal set of operations is made:
//!   unchanged scalars produce nothing, maps are compared key by key, lists
//!   keep their longest common prefix and suffix and only touch the middle
//!   (with a small edit-distance diff there), and nested containers of the
//!   same kind are updated in place. That is
//!   what lets two nodes that edit different keys of the same file merge
//!   cleanly, and what keeps a save of an unchanged file from producing a
//!   change at all.
//!
//! Paths such as `servers[0].host` are parsed by [`parse_path`] and printed by
//! [`format_path`]. Nesting is limited to [`MAX_DEPTH`] containers in both
//! directions so hostile documents or inputs cannot exhaust the stack.

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::Value as Json;

/// Maximum number of nested containers (the root map counts as one), both
/// when reading a document and when writing a JSON value.
pub(crate) const MAX_DEPTH: usize = 64;
/// Maximum number of segments in a parsed path.
pub(crate) const MAX_PATH_SEGMENTS: usize = 64;
/// Maximum length in bytes of a textual path.
pub(crate) const MAX_PATH_BYTES: usize = 1024;

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathSeg {
    /// A map key. A key made only of ASCII digits also addresses a list
    /// element when the container turns out to be a list.
    Key(String),
    /// A list index, written `[n]`.
    Index(usize),
}

/// Errors from path parsing, navigation and conversion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The textual path is malformed (or asks for something impossible, such
    /// as deleting the root).
    #[error("invalid path `{path}`: {reason}")]
    InvalidPath {
        /// The path as given (or formatted).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path segment tries to descend into a scalar (or a text object).
    #[error("`{path}` is not a map or a list")]
    NotAContainer {
        /// Path of the value that is not a container.
        path: String,
    },
    /// A path segment does not fit the kind of container found, e.g. `[0]`
    /// applied to a map or a non-numeric key applied to a list.
    #[error("`{path}` is a {found}, expected a {expected}")]
    KindMismatch {
        /// Path of the container.
        path: String,
        /// The kind of container the segment needs (`"map"` or `"list"`).
        expected: &'static str,
        /// The kind of container found.
        found: &'static str,
    },
    /// A list index beyond the end of the list (`path` names the list).
    #[error("index {index} is out of range for `{path}` (length {len})")]
    IndexOutOfRange {
        /// Path of the list.
        path: String,
        /// The index asked for.
        index: usize,
        /// The list's length.
        len: usize,
    },
    /// The value given for the whole document is not a JSON object.
    #[error("the document root must be a JSON object")]
    RootNotObject,
    /// An error reported by Automerge.
    #[error("automerge error: {0}")]
    Automerge(String),
    /// The value or document is nested deeper than 64 containers.
    #[error("nesting deeper than {} levels", MAX_DEPTH)]
    TooDeep,
}

impl From<AutomergeError> for JsonError {
    fn from(e: AutomergeError) -> Self {
        JsonError::Automerge(e.to_string())
    }
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// Parse a dotted path: `""` (root), `workers`, `limits.rate`,
/// `servers.0.host`, `servers[0].host`, `"a.b".c`.
///
/// Only the `[n]` syntax yields [`PathSeg::Index`]; a bare numeric segment
/// such as `0` is [`PathSeg::Key`] and is resolved as an index at run time
/// when the container is a list. Keys may be double-quoted to contain `.`,
/// `[`, `]`, or be empty; inside quotes `\"` and `\\` are the only escapes.
pub fn parse_path(s: &str) -> Result<Vec<PathSeg>, JsonError> {
    let err = |reason: &str| JsonError::InvalidPath {
        path: s.to_string(),
        reason: reason.to_string(),
    };
    if s.len() > MAX_PATH_BYTES {
        return Err(err(&format!("longer than {MAX_PATH_BYTES} bytes")));
    }
    let mut segs = Vec::new();
    if s.is_empty() {
        return Ok(segs);
    }
    let mut chars = s.chars().peekable();
    let mut first = true;
    loop {
        // One dot-separated component: an optional key (only the very first
        // component may omit it) followed by any number of `[n]` indices.
        match chars.peek().copied() {
            None | Some('.') => return Err(err("empty segment")),
            Some(']') => return Err(err("unbalanced `]`")),
            Some('[') if !first => return Err(err("empty segment before `[`")),
            Some('[') => {}
            Some('"') => {
                chars.next();
                let mut key = String::new();
                loop {
                    match chars.next() {
                        None => return Err(err("unbalanced `\"`")),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => key.push(c),
                            _ => return Err(err("invalid escape in quoted key")),
                        },
                        Some(c) => key.push(c),
                    }
                }
                segs.push(PathSeg::Key(key));
            }
            Some(_) => {
                let mut key = String::new();
                while let Some(&c) = chars.peek() {
                    match c {
                        '.' | '[' => break,
                        ']' => return Err(err("unbalanced `]`")),
                        '"' => return Err(err("`\"` inside an unquoted key")),
                        _ => {
                            key.push(c);
                            chars.next();
                        }
                    }
                }
                segs.push(PathSeg::Key(key));
            }
        }
        first = false;
        while chars.peek() == Some(&'[') {
            chars.next();
            let mut digits = String::new();
            loop {
                match chars.next() {
                    None => return Err(err("unbalanced `[`")),
                    Some(']') => break,
                    Some(c) if c.is_ascii_digit() => digits.push(c),
                    Some(_) => return Err(err("index must be a non-negative integer")),
                }
            }
            if digits.is_empty() {
                return Err(err("empty index `[]`"));
            }
            let index = digits
                .parse::<usize>()
                .map_err(|_| err("index is too large"))?;
            segs.push(PathSeg::Index(index));
        }
        if segs.len() > MAX_PATH_SEGMENTS {
            return Err(err(&format!("more than {MAX_PATH_SEGMENTS} segments")));
        }
        match chars.next() {
            None => return Ok(segs),
            Some('.') => {}
            Some(']') => return Err(err("unbalanced `]`")),
            Some(_) => return Err(err("expected `.` or `[` after a segment")),
        }
    }
}

/// Format a path so that [`parse_path`] gives it back unchanged.
pub fn format_path(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        match seg {
            PathSeg::Key(k) => {
                if i > 0 {
                    out.push('.');
                }
                let needs_quotes =
                    k.is_empty() || k.chars().any(|c| matches!(c, '.' | '[' | ']' | '"' | '\\'));
                if needs_quotes {
                    out.push('"');
                    for c in k.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(k);
                }
            }
            PathSeg::Index(n) => {
                out.push('[');
                out.push_str(&n.to_string());
                out.push(']');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------

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

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The scalar a JSON scalar is stored as; `None` for arrays and objects.
fn json_to_scalar(v: &Json) -> Option<ScalarValue> {
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

// ---------------------------------------------------------------------------
// Navigation
// ---------------------------------------------------------------------------

/// An owned copy of what sits in one slot of a map or list.
enum Child {
    Obj(ObjId, ObjType),
    Scalar(ScalarValue),
}

fn is_map(t: ObjType) -> bool {
    matches!(t, ObjType::Map | ObjType::Table)
}

fn is_container(t: ObjType) -> bool {
    is_map(t) || t == ObjType::List
}

fn kind_name(t: ObjType) -> &'static str {
    match t {
        ObjType::Map | ObjType::Table => "map",
        ObjType::List => "list",
        ObjType::Text => "text",
    }
}

/// The Automerge property addressed by `path[i]` inside a container of type
/// `typ` (the container found at `path[..i]`).
fn prop_for(typ: ObjType, path: &[PathSeg], i: usize) -> Result<Prop, JsonError> {
    let here = || format_path(path.get(..i).unwrap_or(path));
    let mismatch = |expected| JsonError::KindMismatch {
        path: here(),
        expected,
        found: kind_name(typ),
    };
    match (typ, path.get(i)) {
        (ObjType::Map | ObjType::Table, Some(PathSeg::Key(k))) => Ok(Prop::Map(k.clone())),
        (ObjType::Map | ObjType::Table, Some(PathSeg::Index(_))) => Err(mismatch("list")),
        (ObjType::List, Some(PathSeg::Index(n))) => Ok(Prop::Seq(*n)),
        (ObjType::List, Some(PathSeg::Key(k))) => {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
                return Err(mismatch("map"));
            }
            k.parse::<usize>()
                .map(Prop::Seq)
                .map_err(|_| JsonError::InvalidPath {
                    path: format_path(path),
                    reason: format!("index `{k}` is too large"),
                })
        }
        (ObjType::Text, _) => Err(JsonError::NotAContainer { path: here() }),
        (_, None) => Err(JsonError::InvalidPath {
            path: format_path(path),
            reason: "segment missing".to_string(),
        }),
    }
}

/// Read one slot; `None` when the key is absent or the index is past the end.
fn read_child<R: ReadDoc>(doc: &R, obj: &ObjId, prop: &Prop) -> Result<Option<Child>, JsonError> {
    if let Prop::Seq(i) = prop {
        if *i >= doc.length(obj) {
            return Ok(None);
        }
    }
    Ok(doc.get(obj, prop.clone())?.map(|(v, id)| match v {
        Value::Object(t) => Child::Obj(id, t),
        Value::Scalar(s) => Child::Scalar(s.into_owned()),
    }))
}

/// Follow every segment of `path` from the root; each must land on a map or
/// list. `Ok(None)` when something along the way is absent.
fn walk<R: ReadDoc>(doc: &R, path: &[PathSeg]) -> Result<Option<(ObjId, ObjType)>, JsonError> {
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

// ---------------------------------------------------------------------------
// Automerge -> JSON
// ---------------------------------------------------------------------------

/// Convert a whole object (and everything below it) to JSON.
///
/// Map keys come out sorted; `Text` objects become strings, `Counter` and
/// `Timestamp` numbers, `Bytes` lowercase hex strings.
pub(crate) fn to_json<R: ReadDoc>(doc: &R, obj: &ObjId) -> Result<Json, JsonError> {
    let typ = doc.object_type(obj)?;
    object_to_json(doc, obj, typ, 1)
}

/// `depth` counts the containers from the root down to and including `obj`.
fn object_to_json<R: ReadDoc>(
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
            let mut keys: Vec<String> = doc.keys(obj).collect();
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
            let len = doc.length(obj);
            let mut out = Vec::new();
            for i in 0..len {
                if let Some(child) = read_child(doc, obj, &Prop::Seq(i))? {
                    out.push(child_to_json(doc, child, depth)?);
                }
            }
            Ok(Json::Array(out))
        }
        ObjType::Text => Ok(Json::String(doc.text(obj)?)),
    }
}

/// `parent_depth` is the depth of the container holding `child`.
fn child_to_json<R: ReadDoc>(
    doc: &R,
    child: Child,
    parent_depth: usize,
) -> Result<Json, JsonError> {
    match child {
        Child::Scalar(sv) => Ok(scalar_to_json(&sv)),
        Child::Obj(id, t) => object_to_json(doc, &id, t, parent_depth + 1),
    }
}

/// The value at `path`, or `None` if absent. The empty path is the whole
/// root map.
pub(crate) fn get_path<R: ReadDoc>(doc: &R, path: &[PathSeg]) -> Result<Option<Json>, JsonError> {
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
pub(crate) fn conflicts_at<R: ReadDoc>(doc: &R, path: &[PathSeg]) -> Result<Vec<Json>, JsonError> {
    let Some((_, parents)) = path.split_last() else {
        return Ok(vec![to_json(doc, &ROOT)?]);
    };
    let Some((obj, typ)) = walk(doc, parents)? else {
        return Ok(Vec::new());
    };
    let prop = prop_for(typ, path, parents.len())?;
    if let Prop::Seq(i) = prop {
        if i >= doc.length(&obj) {
            return Ok(Vec::new());
        }
    }
    let children: Vec<Child> = doc
        .get_all(&obj, prop)?
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

// ---------------------------------------------------------------------------
// JSON -> Automerge (minimal reconciliation)
// ---------------------------------------------------------------------------

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

/// The keys at `path`: sorted map keys, or list indices as strings. Empty when nothing is at
/// `path`. (Reads are served from the store's materialized view; this is kept for tests.)
#[cfg(test)]
pub(crate) fn keys_at<R: ReadDoc>(doc: &R, path: &[PathSeg]) -> Result<Vec<String>, JsonError> {
    match walk(doc, path)? {
        None => Ok(Vec::new()),
        Some((obj, typ)) if is_map(typ) => {
            let mut keys: Vec<String> = doc.keys(&obj).collect();
            keys.sort();
            Ok(keys)
        }
        Some((obj, _)) => Ok((0..doc.length(&obj)).map(|i| i.to_string()).collect()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{AutoCommit, Automerge};
    use proptest::prelude::*;
    use serde_json::json;

    fn p(s: &str) -> Vec<PathSeg> {
        parse_path(s).expect("test path parses")
    }

    fn doc_with(v: &Json) -> AutoCommit {
        let mut doc = AutoCommit::new();
        reconcile_root(&mut doc, v).expect("reconcile into empty doc");
        doc.commit();
        doc
    }

    fn root(doc: &AutoCommit) -> Json {
        to_json(doc, &ROOT).expect("to_json")
    }

    /// Number of ops in the change made by `edit` (0 when no change at all).
    fn ops_made_by(doc: &mut AutoCommit, edit: impl FnOnce(&mut AutoCommit)) -> usize {
        let heads = doc.get_heads();
        edit(doc);
        if doc.commit().is_none() {
            assert_eq!(doc.get_heads(), heads);
            return 0;
        }
        doc.get_last_local_change().map(|c| c.len()).unwrap_or(0)
    }

    fn nginx() -> Json {
        json!({
            "workers": 4,
            "ratio": 2.0,
            "big": u64::MAX,
            "neg": -17,
            "enabled": true,
            "comment": null,
            "limits": {"rate": 10, "burst": 20},
            "servers": [
                {"host": "a.example", "port": 80},
                {"host": "b.example", "port": 8080, "tags": ["x", "y"]}
            ],
            "a.b": {"c": "quoted"},
            "empty": {},
            "nothing": []
        })
    }

    #[test]
    fn a_nested_document_round_trips_and_paths_reach_into_it() {
        let v = nginx();
        let doc = doc_with(&v);
        assert_eq!(root(&doc), v);

        // Integral floats stay floats, huge integers stay exact.
        assert_eq!(get_path(&doc, &p("ratio")).unwrap(), Some(json!(2.0)));
        assert!(get_path(&doc, &p("ratio")).unwrap().unwrap().is_f64());
        assert_eq!(get_path(&doc, &p("big")).unwrap(), Some(json!(u64::MAX)));

        // Both index spellings, quoted keys, and absent values.
        assert_eq!(
            get_path(&doc, &p("servers[1].port")).unwrap(),
            Some(json!(8080))
        );
        assert_eq!(
            get_path(&doc, &p("servers.1.tags[0]")).unwrap(),
            Some(json!("x"))
        );
        assert_eq!(
            get_path(&doc, &p("\"a.b\".c")).unwrap(),
            Some(json!("quoted"))
        );
        assert_eq!(get_path(&doc, &p("servers[7]")).unwrap(), None);
        assert_eq!(get_path(&doc, &p("missing.deeper")).unwrap(), None);
        assert_eq!(get_path(&doc, &[]).unwrap(), Some(v.clone()));

        assert_eq!(keys_at(&doc, &p("limits")).unwrap(), vec!["burst", "rate"]);
        assert_eq!(keys_at(&doc, &p("servers")).unwrap(), vec!["0", "1"]);
        assert_eq!(keys_at(&doc, &p("nope")).unwrap(), Vec::<String>::new());
        assert_eq!(
            keys_at(&doc, &[]).unwrap().first().map(String::as_str),
            Some("a.b")
        );

        // It survives save/load too.
        let loaded = Automerge::load(&doc.clone().save()).unwrap();
        assert_eq!(to_json(&loaded, &ROOT).unwrap(), v);
    }

    #[test]
    fn writing_what_is_already_there_makes_no_change() {
        let mut doc = doc_with(&nginx());
        let before = doc.get_heads();

        assert!(!put_path(&mut doc, &p("workers"), &json!(4)).unwrap());
        assert!(!put_path(&mut doc, &p("limits"), &json!({"rate": 10, "burst": 20})).unwrap());
        assert!(!put_path(&mut doc, &p("servers[0].host"), &json!("a.example")).unwrap());
        assert!(!reconcile_root(&mut doc, &nginx()).unwrap());
        assert_eq!(doc.pending_ops(), 0);
        assert_eq!(doc.commit(), None);
        assert_eq!(doc.get_heads(), before);

        // Same story through an explicit transaction on a plain Automerge.
        let mut plain = Automerge::load(&doc.save()).unwrap();
        let heads = plain.get_heads();
        let mut tx = plain.transaction();
        assert!(!reconcile_root(&mut tx, &nginx()).unwrap());
        assert_eq!(tx.pending_ops(), 0);
        let (hash, _) = tx.commit();
        assert_eq!(hash, None);
        assert_eq!(plain.get_heads(), heads);

        // A real change is exactly one op.
        let n = ops_made_by(&mut doc, |d| {
            assert!(put_path(d, &p("workers"), &json!(8)).unwrap());
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn two_nodes_editing_different_nested_keys_both_win() {
        let mut alice = doc_with(&nginx());
        let mut bob = alice.fork();

        // Each side saves the whole file with one nested key changed.
        let mut a_file = nginx();
        a_file["limits"]["rate"] = json!(11);
        assert_eq!(
            ops_made_by(&mut alice, |d| assert!(reconcile_root(d, &a_file).unwrap())),
            1
        );

        let mut b_file = nginx();
        b_file["limits"]["burst"] = json!(30);
        b_file["servers"][1]["tags"] = json!(["x", "y", "z"]);
        assert_eq!(
            ops_made_by(&mut bob, |d| assert!(reconcile_root(d, &b_file).unwrap())),
            2
        );

        alice.merge(&mut bob).unwrap();
        bob.merge(&mut alice).unwrap();

        let mut expected = nginx();
        expected["limits"] = json!({"rate": 11, "burst": 30});
        expected["servers"][1]["tags"] = json!(["x", "y", "z"]);
        assert_eq!(root(&alice), expected);
        assert_eq!(root(&bob), expected);
        assert_eq!(
            conflicts_at(&alice, &p("limits.rate")).unwrap(),
            vec![json!(11)]
        );
    }

    #[test]
    fn the_same_key_edited_on_both_nodes_is_a_visible_conflict() {
        let mut alice = doc_with(&nginx());
        let mut bob = alice.fork();
        put_path(&mut alice, &p("limits.rate"), &json!(100)).unwrap();
        alice.commit();
        put_path(&mut bob, &p("limits.rate"), &json!(200)).unwrap();
        bob.commit();
        alice.merge(&mut bob).unwrap();

        let all = conflicts_at(&alice, &p("limits.rate")).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.contains(&json!(100)) && all.contains(&json!(200)));
        // The winner is listed first and is what get_path shows.
        let winner = get_path(&alice, &p("limits.rate")).unwrap();
        assert_eq!(all.first(), winner.as_ref());

        // Untouched keys are not in conflict; absent keys have no values.
        assert_eq!(
            conflicts_at(&alice, &p("limits.burst")).unwrap(),
            vec![json!(20)]
        );
        assert!(conflicts_at(&alice, &p("limits.nope")).unwrap().is_empty());

        // Writing a different value settles it.
        put_path(&mut alice, &p("limits.rate"), &json!(150)).unwrap();
        assert_eq!(
            conflicts_at(&alice, &p("limits.rate")).unwrap(),
            vec![json!(150)]
        );
    }

    #[test]
    fn list_reconcile_only_touches_the_middle() {
        let letters: Vec<Json> = "abcdefghij".chars().map(|c| json!(c.to_string())).collect();
        let mut doc = doc_with(&json!({ "l": letters }));
        let edit_to = |doc: &mut AutoCommit, new: Json| {
            let n = ops_made_by(doc, |d| {
                put_path(d, &p("l"), &new).unwrap();
            });
            assert_eq!(get_path(doc, &p("l")).unwrap(), Some(new));
            n
        };

        // Insert one element in the middle: one op.
        assert_eq!(
            edit_to(
                &mut doc,
                json!(["a", "b", "c", "d", "e", "X", "f", "g", "h", "i", "j"])
            ),
            1
        );
        // Delete two in the middle: two ops.
        assert_eq!(
            edit_to(
                &mut doc,
                json!(["a", "b", "c", "d", "e", "g", "h", "i", "j"])
            ),
            2
        );
        // Replace one: one op.
        assert_eq!(
            edit_to(
                &mut doc,
                json!(["a", "b", "c", "D", "e", "g", "h", "i", "j"])
            ),
            1
        );
        // Prepend and append: one op each.
        assert_eq!(
            edit_to(
                &mut doc,
                json!(["0", "a", "b", "c", "D", "e", "g", "h", "i", "j", "k"])
            ),
            2
        );

        // A rotation costs no more than rewriting every element.
        let mut doc = doc_with(&json!({ "l": ["x1", "x2", "x3", "Y"] }));
        assert_eq!(edit_to(&mut doc, json!(["Y", "z1", "z2", "z3"])), 4);
        // Moving one element is one delete and one insert.
        let mut doc = doc_with(&json!({ "l": [1, 2, 3, 4, 5, 6] }));
        assert_eq!(edit_to(&mut doc, json!([1, 3, 4, 5, 2, 6])), 2);

        // Elements that are maps are updated in place, key by key.
        let mut doc = doc_with(&nginx());
        let n = ops_made_by(&mut doc, |d| {
            let servers = json!([
                {"host": "a.example", "port": 81},
                {"host": "b.example", "port": 8080, "tags": ["x", "y"]}
            ]);
            assert!(put_path(d, &p("servers"), &servers).unwrap());
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn put_creates_what_is_missing_and_delete_removes_it() {
        let mut doc = AutoCommit::new();
        assert!(put_path(&mut doc, &p("a.b.c"), &json!(1)).unwrap());
        assert!(put_path(&mut doc, &p("servers[0].host"), &json!("h")).unwrap());
        assert!(put_path(&mut doc, &p("servers[1]"), &json!({"host": "i"})).unwrap());
        assert!(put_path(&mut doc, &p("servers.1.port"), &json!(2)).unwrap());
        assert_eq!(
            root(&doc),
            json!({"a": {"b": {"c": 1}}, "servers": [{"host": "h"}, {"host": "i", "port": 2}]})
        );

        // Replacing a scalar by a container (and back) works.
        assert!(put_path(&mut doc, &p("a.b.c"), &json!([1, 2])).unwrap());
        assert!(put_path(&mut doc, &p("a.b"), &json!("flat")).unwrap());
        assert_eq!(get_path(&doc, &p("a")).unwrap(), Some(json!({"b": "flat"})));

        assert!(delete_path(&mut doc, &p("servers[0]")).unwrap());
        assert!(delete_path(&mut doc, &p("a.b")).unwrap());
        assert!(!delete_path(&mut doc, &p("a.b")).unwrap());
        assert!(!delete_path(&mut doc, &p("x.y.z")).unwrap());
        assert!(!delete_path(&mut doc, &p("servers[5]")).unwrap());
        assert_eq!(
            root(&doc),
            json!({"a": {}, "servers": [{"host": "i", "port": 2}]})
        );
    }

    #[test]
    fn navigation_mistakes_are_errors_not_panics() {
        let mut doc = doc_with(&nginx());
        let pending = doc.pending_ops();

        assert!(matches!(
            put_path(&mut doc, &p("workers.x"), &json!(1)),
            Err(JsonError::NotAContainer { path }) if path == "workers"
        ));
        assert!(matches!(
            get_path(&doc, &p("limits[0]")),
            Err(JsonError::KindMismatch {
                expected: "list",
                found: "map",
                ..
            })
        ));
        assert!(matches!(
            get_path(&doc, &p("servers.first")),
            Err(JsonError::KindMismatch {
                expected: "map",
                found: "list",
                ..
            })
        ));
        assert!(matches!(
            put_path(&mut doc, &p("servers[5]"), &json!(1)),
            Err(JsonError::IndexOutOfRange {
                index: 5,
                len: 2,
                ..
            })
        ));
        // Rejected before any intermediate container is created.
        assert!(matches!(
            put_path(&mut doc, &p("fresh.list[3]"), &json!(1)),
            Err(JsonError::IndexOutOfRange {
                index: 3,
                len: 0,
                ..
            })
        ));
        assert_eq!(doc.pending_ops(), pending);
        assert_eq!(
            reconcile_root(&mut doc, &json!([1])),
            Err(JsonError::RootNotObject)
        );
        assert!(matches!(
            delete_path(&mut doc, &[]),
            Err(JsonError::InvalidPath { .. })
        ));
        assert!(matches!(
            keys_at(&doc, &p("workers")),
            Err(JsonError::NotAContainer { .. })
        ));
    }

    #[test]
    fn nesting_is_limited_in_both_directions() {
        let nest = |levels: usize| {
            let mut v = json!(1);
            for _ in 0..levels {
                v = json!({ "n": v });
            }
            v
        };
        let mut doc = AutoCommit::new();
        // The root map counts as one level.
        assert!(reconcile_root(&mut doc, &nest(MAX_DEPTH)).is_ok());
        assert_eq!(to_json(&doc, &ROOT).unwrap(), nest(MAX_DEPTH));

        let mut doc = AutoCommit::new();
        assert_eq!(
            reconcile_root(&mut doc, &nest(MAX_DEPTH + 1)),
            Err(JsonError::TooDeep)
        );
        assert_eq!(
            put_path(&mut doc, &p("a"), &nest(MAX_DEPTH)),
            Err(JsonError::TooDeep)
        );
        assert_eq!(doc.pending_ops(), 0);

        // A document built deeper by other means is refused on read.
        let mut obj = ROOT;
        for _ in 0..MAX_DEPTH {
            obj = doc.put_object(&obj, "n", ObjType::Map).unwrap();
        }
        assert_eq!(to_json(&doc, &ROOT), Err(JsonError::TooDeep));
    }

    #[test]
    fn foreign_value_types_read_sensibly_and_reconcile_as_no_ops() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "motd", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "hello").unwrap();
        doc.put(ROOT, "hits", ScalarValue::counter(5)).unwrap();
        doc.put(ROOT, "at", ScalarValue::Timestamp(1_700_000_000))
            .unwrap();
        doc.put(ROOT, "key", ScalarValue::Bytes(vec![0x00, 0xab, 0xff]))
            .unwrap();
        doc.put(ROOT, "nan", ScalarValue::F64(f64::NAN)).unwrap();
        doc.commit();

        let v = root(&doc);
        assert_eq!(
            v,
            json!({"motd": "hello", "hits": 5, "at": 1_700_000_000, "key": "00abff", "nan": null})
        );
        // Saving back what was read changes nothing, except the NaN which
        // cannot be represented and so is replaced by a real null.
        let n = ops_made_by(&mut doc, |d| {
            reconcile_root(d, &v).unwrap();
        });
        assert_eq!(n, 1);
        assert_eq!(
            ops_made_by(&mut doc, |d| assert!(!reconcile_root(d, &v).unwrap())),
            0
        );

        // Changing the text stores a plain scalar string.
        put_path(&mut doc, &p("motd"), &json!("bye")).unwrap();
        assert!(matches!(
            doc.get(ROOT, "motd"),
            Ok(Some((Value::Scalar(_), _)))
        ));
    }

    #[test]
    fn paths_parse_as_documented() {
        use PathSeg::{Index, Key};
        let k = |s: &str| Key(s.to_string());
        assert_eq!(p(""), vec![]);
        assert_eq!(p("workers"), vec![k("workers")]);
        assert_eq!(p("limits.rate"), vec![k("limits"), k("rate")]);
        assert_eq!(p("servers.0.host"), vec![k("servers"), k("0"), k("host")]);
        assert_eq!(
            p("servers[0].host"),
            vec![k("servers"), Index(0), k("host")]
        );
        assert_eq!(p("m[1][2]"), vec![k("m"), Index(1), Index(2)]);
        assert_eq!(p("\"a.b\".c"), vec![k("a.b"), k("c")]);
        assert_eq!(p(r#""q\"\\"[3]"#), vec![k("q\"\\"), Index(3)]);
        assert_eq!(p("\"\""), vec![k("")]);
        assert_eq!(format_path(&p("servers[0].host")), "servers[0].host");
        assert_eq!(format_path(&[k("a.b"), k("c")]), "\"a.b\".c");
    }

    #[test]
    fn invalid_paths_are_rejected_with_a_reason() {
        let long_key = "k".repeat(MAX_PATH_BYTES + 1);
        let many = vec!["a"; MAX_PATH_SEGMENTS + 1].join(".");
        for bad in [
            "a..b",
            ".a",
            "a.",
            ".",
            "a[",
            "a]",
            "a[0",
            "a[x]",
            "a[]",
            "a[-1]",
            "[0",
            "\"abc",
            "a\"b",
            "\"a\"b",
            "a[0]b",
            "a.[0]",
            "\"a\\x\"",
            "a[99999999999999999999999]",
            long_key.as_str(),
            many.as_str(),
        ] {
            match parse_path(bad) {
                Err(JsonError::InvalidPath { path, reason }) => {
                    assert_eq!(path, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} should be invalid, got {other:?}"),
            }
        }
        // Exactly at the limits is fine.
        let ok = vec!["a"; MAX_PATH_SEGMENTS].join(".");
        assert_eq!(parse_path(&ok).map(|v| v.len()), Ok(MAX_PATH_SEGMENTS));
    }

    fn arb_seg() -> impl Strategy<Value = PathSeg> {
        prop_oneof![
            "\\PC{0,8}".prop_map(PathSeg::Key),
            "[a-z0-9.\\[\\]\"\\\\]{0,6}".prop_map(PathSeg::Key),
            (0usize..100_000).prop_map(PathSeg::Index),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            (i64::MAX as u64..=u64::MAX).prop_map(Json::from),
            (-3i64..3).prop_map(Json::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
            (-3i32..3).prop_map(|i| json!(f64::from(i))),
            "[a-c]{0,2}".prop_map(Json::String),
            "\\PC{0,6}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map("[a-e]", inner, 0..5)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_root() -> impl Strategy<Value = Json> {
        prop::collection::btree_map("[a-f]{1,2}", arb_json(), 0..6)
            .prop_map(|m| Json::Object(m.into_iter().collect()))
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(path in prop::collection::vec(arb_seg(), 0..12)) {
            let text = format_path(&path);
            prop_assert_eq!(parse_path(&text), Ok(path));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            if let Ok(path) = parse_path(&s) {
                prop_assert_eq!(parse_path(&format_path(&path)), Ok(path));
            }
        }

        #[test]
        fn reconciling_v1_into_v2_yields_exactly_v2(v1 in arb_root(), v2 in arb_root()) {
            let mut doc = doc_with(&v1);
            prop_assert_eq!(root(&doc), v1);
            reconcile_root(&mut doc, &v2).unwrap();
            prop_assert_eq!(root(&doc), v2.clone());
            doc.commit();
            // Doing it again is a no-op.
            prop_assert!(!reconcile_root(&mut doc, &v2).unwrap());
            prop_assert_eq!(doc.pending_ops(), 0);
        }

        #[test]
        fn list_edits_are_never_worse_than_rewriting(
            old in prop::collection::vec(0u8..4, 0..12),
            new in prop::collection::vec(0u8..4, 0..12),
        ) {
            let mut doc = doc_with(&json!({ "l": old.clone() }));
            let target = json!(new.clone());
            let n = ops_made_by(&mut doc, |d| {
                put_path(d, &p("l"), &target).unwrap();
            });
            prop_assert_eq!(get_path(&doc, &p("l")).unwrap(), Some(target));
            prop_assert!(n <= old.len().max(new.len()));
            prop_assert_eq!(n == 0, old == new);
        }

        #[test]
        fn put_path_then_get_path_agree(v1 in arb_root(), key in "[a-f]{1,2}", v in arb_json()) {
            let mut doc = doc_with(&v1);
            let path = vec![PathSeg::Key(key)];
            put_path(&mut doc, &path, &v).unwrap();
            prop_assert_eq!(get_path(&doc, &path).unwrap(), Some(v.clone()));
            prop_assert!(!put_path(&mut doc, &path, &v).unwrap());
        }
    }
}
