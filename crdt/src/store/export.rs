//! Export and import: a document leaves Lichen in the formats its ecosystem reads, and
//! content from elsewhere comes in as one change signed by this node.
//!
//! * [`Store::export_automerge`]: the document saved in Automerge's binary format (what
//!   `Automerge.load` of `@automerge/automerge` and `Automerge::load` of the Rust crate
//!   read), with its whole valid history; the actors are the authors' node ids.
//! * [`Store::export_json`]: the current value, as `get` returns it.
//! * [`import_content`]: a JSON object, or an Automerge document (recognised by its magic
//!   bytes), read into the JSON value it holds. The caller commits it with
//!   [`Op::Replace`](super::Op::Replace) through the normal write path ([`Store::import`]
//!   does both): the document becomes equal to the content through minimal operations, in
//!   one change signed by this node. The foreign document's changes and actors are never
//!   stored: they are not signed by members, and would not pass ingest.

use automerge::Automerge;
use serde_json::Value;

use super::history_at::HistoryError;
use super::{panic_safe, Op, Store};
use crate::identity::SecretKey;
use crate::json;
use crate::signed::SignedChange;

/// The first bytes of every Automerge document and chunk.
const AUTOMERGE_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Why a file could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The file is empty.
    #[error("the file is empty; expected a JSON object or an Automerge document")]
    Empty,
    /// It starts like an Automerge document but does not load.
    #[error("not a valid Automerge document: {0}")]
    BadAutomerge(String),
    /// It is neither an Automerge document nor JSON.
    #[error("not JSON ({0}) and not an Automerge document")]
    BadJson(String),
    /// The content is not an object (a document is a JSON object).
    #[error("the content is {0}, but a document is a JSON object (`{{...}}`)")]
    NotAnObject(&'static str),
    /// The content cannot be read as JSON (nested too deep, ...).
    #[error("the content cannot be read: {0}")]
    Unreadable(String),
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Read a file to import: a JSON object, or an Automerge document (see the module docs).
pub fn import_content(bytes: &[u8]) -> Result<Value, ImportError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ImportError::Empty);
    }
    let value = if bytes.starts_with(&AUTOMERGE_MAGIC) {
        let am = panic_safe(|| Automerge::load(bytes))
            .ok_or_else(|| ImportError::BadAutomerge("automerge panicked on it".into()))?
            .map_err(|e| ImportError::BadAutomerge(e.to_string()))?;
        json::to_json(&am, &automerge::ROOT).map_err(|e| ImportError::Unreadable(e.to_string()))?
    } else {
        serde_json::from_slice::<Value>(bytes).map_err(|e| ImportError::BadJson(e.to_string()))?
    };
    match value {
        Value::Object(_) => Ok(value),
        other => Err(ImportError::NotAnObject(kind(&other))),
    }
}

impl Store {
    /// The document in Automerge's binary format, with its whole valid history.
    pub fn export_automerge(&mut self, doc: &str) -> Result<Vec<u8>, HistoryError> {
        self.repair()?;
        if !self.has_doc(doc)? {
            return Err(HistoryError::NoSuchDocument(doc.to_string()));
        }
        Ok(self.loaded_doc_repaired(doc)?.am.save())
    }

    /// The document's current value as JSON.
    pub fn export_json(&mut self, doc: &str) -> Result<Value, HistoryError> {
        self.get(doc, &[])?
            .ok_or_else(|| HistoryError::NoSuchDocument(doc.to_string()))
    }

    /// Make `doc` equal to `content` (see [`import_content`]) in one change signed by `key`
    /// (`None`: it is equal already).
    pub fn import(
        &mut self,
        key: &SecretKey,
        doc: &str,
        content: Value,
        now_ms: i64,
    ) -> Result<Option<SignedChange>, HistoryError> {
        Ok(self.write(key, doc, &Op::Replace { value: content }, now_ms)?)
    }
}
