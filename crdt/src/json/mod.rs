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
//!
//! # Layout
//!
//! One file per direction: `path` parses and prints textual paths, `read` turns Automerge
//! into JSON and `write` reconciles JSON into Automerge (the tests are in `tests`). This
//! file holds [`PathSeg`], [`JsonError`], the depth limit and the navigation helpers that
//! both directions share (turning a path segment into an Automerge property).

mod at;
mod path;
mod read;
#[cfg(test)]
mod tests;
mod write;

use automerge::{AutomergeError, ObjId, ObjType, Prop, ScalarValue};

pub(crate) use at::At;
pub use path::{format_path, parse_path};
pub(crate) use read::{conflicts_at, get_path, scalar_to_json, to_json};
pub(crate) use write::{delete_path, json_to_scalar, put_path, reconcile_root};

/// Maximum number of nested containers (the root map counts as one), both
/// when reading a document and when writing a JSON value.
pub(crate) const MAX_DEPTH: usize = 64;

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
#[non_exhaustive]
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
