//! Ingest (`sync` mode): a saved edit of the bound file becomes a signed change of the
//! document.
//!
//! Why it exists: in `sync` mode the file is also an input. The binding task calls
//! [`decode`] when the file's bytes differ from the last bytes it wrote or read (so its own
//! renders are never re-ingested), then [`merge`] and [`op_for`], and sends the op to the
//! node task, which signs, commits and propagates it.
//!
//! * [`decode`] refuses content that must not reach the document: empty files (a save in
//!   progress), non-UTF-8, syntax errors (with line and column), and a value of the wrong
//!   type at the top (a whole-document binding needs a map). A refused edit changes nothing:
//!   the last good document stays, nothing propagates, and the user's file is left exactly as
//!   written until the document changes again.
//! * [`merge`] is a three-way merge of the edit into the *current* document: `base` is what
//!   the file held before the edit (the last render or ingest), `ours` is the edit, `theirs`
//!   is the document now. Keys the edit did not touch keep the document's current value, so a
//!   peer's change that arrived after the last render is not reverted by saving an older file.
//!   When the document has not moved (`theirs == base`) the result is simply the edit.
//! * [`op_for`] makes the write: `Op::Replace` for a whole-document binding, `Op::Put` at the
//!   path otherwise. The store reconciles either with minimal CRDT operations (per map key,
//!   nested maps in place, lists by common prefix/suffix), so an edit of one key is a change
//!   of one key, and concurrent edits of different keys on two nodes all survive the merge.

use lichen_crdt::Op;
use serde_json::{Map, Value};

use super::binding::Binding;
use super::format::{self, ParseError};

/// Largest file ingested, as for a value written through the API (config files are small;
/// anything bigger is a mistake). The size is checked before the file is read.
pub(super) const MAX_FILE: usize = crate::api::MAX_BODY;

/// Why a file over [`MAX_FILE`] is refused.
pub(super) fn too_large(len: u64) -> ParseError {
    ParseError::new(
        "too_large",
        format!(
            "the file is {len} bytes, larger than {} MiB",
            MAX_FILE >> 20
        ),
    )
}

/// Parse an edited file for `b`, refusing what must not reach the document.
pub(super) fn decode(b: &Binding, bytes: &[u8]) -> Result<Value, ParseError> {
    if bytes.len() > MAX_FILE {
        return Err(too_large(bytes.len() as u64));
    }
    let v = format::parse(b.format, bytes)?;
    let max = crate::api::MAX_WRITE_NODES;
    if crate::api::count_nodes(&v, max) > max {
        return Err(ParseError::new(
            "too_large",
            format!("the file holds more than {max} map keys and list items; bind parts of the document to separate files"),
        ));
    }
    if b.path.is_empty() && !v.is_object() {
        return Err(ParseError::new(
            "root",
            format!(
                "the document `{}` must be a map at the top, the file holds {}",
                b.doc,
                kind(&v)
            ),
        ));
    }
    Ok(v)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// Three-way merge (see the module docs). `None` means absent.
pub(super) fn merge(base: Option<&Value>, ours: &Value, theirs: Option<&Value>) -> Value {
    match (base, ours, theirs) {
        (Some(Value::Object(b)), Value::Object(o), Some(Value::Object(t))) => {
            let mut out: Map<String, Value> = Map::new();
            // Keys of the current document: kept unless the edit changed or removed them.
            for (k, tv) in t {
                match (b.get(k), o.get(k)) {
                    (Some(_), None) => {} // removed by the edit
                    (bv, Some(ov)) => {
                        out.insert(k.clone(), merge(bv, ov, Some(tv)));
                    }
                    (None, None) => {
                        out.insert(k.clone(), tv.clone()); // added by a peer
                    }
                }
            }
            // Keys the edit has and the document lacks: added by the edit, or removed by a
            // peer and left unchanged by the edit (then the removal stands).
            for (k, ov) in o {
                if t.contains_key(k) {
                    continue;
                }
                if b.get(k) != Some(ov) {
                    out.insert(k.clone(), ov.clone());
                }
            }
            Value::Object(out)
        }
        (Some(b), o, Some(t)) if b == o => t.clone(),
        _ => ours.clone(),
    }
}

/// The write that makes the document (or the path) equal to `value`.
pub(super) fn op_for(b: &Binding, value: Value) -> Op {
    if b.path.is_empty() {
        Op::Replace { value }
    } else {
        Op::Put {
            path: b.path.clone(),
            value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::binding::{BindingFile, Format};
    use serde_json::json;

    fn binding(path: Option<&str>) -> Binding {
        let mut f: BindingFile = toml::from_str("doc = \"d\"\nfile = \"/x/c.json\"").unwrap();
        f.path = path.map(str::to_string);
        Binding::resolve(&f, std::path::Path::new("/")).unwrap()
    }

    #[test]
    fn wrong_root_and_bad_syntax_are_refused() {
        let b = binding(None);
        assert_eq!(decode(&b, b"[1, 2]").unwrap_err().reason, "root");
        assert_eq!(decode(&b, b"{\"a\": ").unwrap_err().reason, "syntax");
        assert_eq!(decode(&b, b"{\"a\": 1}").unwrap(), json!({"a": 1}));
        // A path binding may hold any value.
        let b = binding(Some("servers"));
        assert_eq!(decode(&b, b"[1, 2]").unwrap(), json!([1, 2]));
        assert_eq!(b.format, Format::Json);
    }

    #[test]
    fn merge_keeps_concurrent_document_changes() {
        let base = json!({"a": 1, "b": {"x": 1, "y": 1}, "c": 1, "gone": 1});
        // The user edited a and b.x and removed c; meanwhile a peer set b.y, added d and
        // removed `gone`.
        let ours = json!({"a": 2, "b": {"x": 2, "y": 1}, "gone": 1});
        let theirs = json!({"a": 1, "b": {"x": 1, "y": 9}, "c": 1, "d": 4});
        assert_eq!(
            merge(Some(&base), &ours, Some(&theirs)),
            json!({"a": 2, "b": {"x": 2, "y": 9}, "d": 4})
        );
        // The document has not moved: the result is the edit.
        assert_eq!(merge(Some(&base), &ours, Some(&base)), ours);
        // No base, or no document: the edit.
        assert_eq!(merge(None, &ours, Some(&theirs)), ours);
        assert_eq!(merge(Some(&base), &ours, None), ours);
        // Scalars and lists: the edit wins only where it changed something.
        assert_eq!(
            merge(Some(&json!([1])), &json!([1]), Some(&json!([2]))),
            json!([2])
        );
        assert_eq!(
            merge(Some(&json!([1])), &json!([3]), Some(&json!([2]))),
            json!([3])
        );
    }

    #[test]
    fn whole_documents_are_replaced_and_paths_put() {
        assert!(matches!(
            op_for(&binding(None), json!({})),
            Op::Replace { .. }
        ));
        assert!(matches!(
            op_for(&binding(Some("a.b")), json!(1)),
            Op::Put { .. }
        ));
    }
}
