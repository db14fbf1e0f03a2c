//! The node task's side of issue 19: reading the past (`get --at`, `diff`), blame, export,
//! audit bundles, and planning the writes of revert and import.
//!
//! A [`PastRequest`] arrives as one command to the node task (which owns the store); [`run`]
//! answers reads directly from the store and turns revert and import into an [`Op`] that
//! the node commits through its normal write path (group commit, scope check, durable before
//! the answer, pushed to peers). Everything here is a function of the store and the request;
//! the node adds the new change's hash to a write's report.

use lichen_crdt::{
    format_heads, import_content, parse_heads, HistoryError, Op, PathSeg, SecretKey, Store,
};
use serde::Serialize;

use crate::error::ErrorKind;
use serde_json::{json, Value};

/// What the Automerge or JSON export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    /// Automerge's binary document format.
    Automerge,
    /// The current value as JSON.
    Json,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "automerge" => Ok(ExportFormat::Automerge),
            "json" => Ok(ExportFormat::Json),
            other => Err(format!(
                "unknown export format `{other}` (expected automerge or json)"
            )),
        }
    }
}

/// A request about a document's past, or a write planned from it.
#[derive(Debug, Clone)]
pub(crate) enum PastRequest {
    /// The value at `path` as of `heads`.
    At {
        doc: String,
        path: Vec<PathSeg>,
        heads: String,
    },
    /// The differences from `from` to `to` (now if `None`).
    Diff {
        doc: String,
        path: Vec<PathSeg>,
        from: String,
        to: Option<String>,
    },
    /// Who set each leaf.
    Blame { doc: String, path: Vec<PathSeg> },
    /// The document's bytes.
    Export { doc: String, format: ExportFormat },
    /// An audit bundle.
    Audit { doc: String, since: Option<String> },
    /// Put the document (or the subtree at `path`) back to its state at `heads`.
    RevertTo {
        doc: String,
        path: Vec<PathSeg>,
        heads: String,
    },
    /// Undo one change.
    Undo {
        doc: String,
        hash: String,
        force: bool,
    },
    /// Make the document equal to a file's content.
    Import { doc: String, bytes: Vec<u8> },
}

impl PastRequest {
    /// Whether this request makes a change signed by this node.
    pub(crate) fn writes(&self) -> bool {
        matches!(
            self,
            PastRequest::RevertTo { .. } | PastRequest::Undo { .. } | PastRequest::Import { .. }
        )
    }
}

/// The answer to a [`PastRequest`].
#[derive(Debug)]
pub(crate) enum PastAnswer {
    /// A JSON answer.
    Json(Value),
    /// Bytes (an Automerge export, an audit bundle).
    Bytes(Vec<u8>),
}

/// What [`run`] decided.
pub(crate) enum Planned {
    /// Answer now.
    Answer(PastAnswer),
    /// Commit `op` on `doc` (nothing if `None`), then answer `report` with `"hash"` added.
    Write {
        doc: String,
        op: Option<Op>,
        report: serde_json::Map<String, Value>,
    },
}

/// Why a request failed: the store's error, or an import file refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PastError {
    /// About the document's history.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The file to import is not usable.
    #[error("cannot import this file: {0}")]
    Import(#[from] lichen_crdt::ImportError),
    /// The content to import is bigger than one write may be.
    #[error("the content holds more than {0} map keys and list items (the most one write may hold); import it in parts")]
    TooLarge(usize),
}

impl PastError {
    /// What kind of error it is for the API (its status) and the CLI (its exit code).
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            PastError::History(HistoryError::NoSuchDocument(_))
            | PastError::History(HistoryError::UnknownChange { .. }) => ErrorKind::NotFound,
            PastError::History(HistoryError::UnknownHeads { .. })
            | PastError::History(HistoryError::BadHeads { .. })
            | PastError::History(HistoryError::Json(_))
            | PastError::Import(_) => ErrorKind::Invalid,
            PastError::TooLarge(_) => ErrorKind::TooLarge,
            PastError::History(HistoryError::Store(_)) | PastError::History(_) => {
                ErrorKind::Internal
            }
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Answer a read, or plan a write (see the module docs).
pub(crate) fn run(
    store: &mut Store,
    key: &SecretKey,
    req: PastRequest,
    now_ms: i64,
) -> Result<Planned, PastError> {
    let answer = |v: Value| Ok(Planned::Answer(PastAnswer::Json(v)));
    match req {
        PastRequest::At { doc, path, heads } => {
            let h = parse_heads(&heads)?;
            let value = store.get_at(&doc, &path, &h)?;
            answer(json!({
                "doc": doc,
                "path": lichen_crdt::format_path(&path),
                "at": format_heads(&h),
                "value": value,
            }))
        }
        PastRequest::Diff {
            doc,
            path,
            from,
            to,
        } => {
            let from = parse_heads(&from)?;
            let to = to.as_deref().map(parse_heads).transpose()?;
            let changes = store.diff(&doc, &path, &from, to.as_deref())?;
            let to = match to {
                Some(t) => format_heads(&t),
                None => format_heads(&store.heads(&doc).map_err(HistoryError::from)?),
            };
            answer(json!({
                "doc": doc,
                "path": lichen_crdt::format_path(&path),
                "from": format_heads(&from),
                "to": to,
                "changes": to_json(&changes),
            }))
        }
        PastRequest::Blame { doc, path } => answer(to_json(&store.blame(&doc, &path)?)),
        PastRequest::Export { doc, format } => Ok(Planned::Answer(match format {
            ExportFormat::Automerge => PastAnswer::Bytes(store.export_automerge(&doc)?),
            ExportFormat::Json => PastAnswer::Json(store.export_json(&doc)?),
        })),
        PastRequest::Audit { doc, since } => {
            let since = since.as_deref().map(parse_heads).transpose()?;
            let bytes = store.audit_bundle(key, &doc, since.as_deref().unwrap_or(&[]), now_ms)?;
            Ok(Planned::Answer(PastAnswer::Bytes(bytes)))
        }
        PastRequest::RevertTo { doc, path, heads } => {
            let h = parse_heads(&heads)?;
            let op = store.revert_to_op(&doc, &path, &h)?;
            let mut report = serde_json::Map::new();
            report.insert("to".into(), json!(format_heads(&h)));
            report.insert("path".into(), json!(lichen_crdt::format_path(&path)));
            Ok(Planned::Write { doc, op, report })
        }
        PastRequest::Undo { doc, hash, force } => {
            let h = store.find_change(&doc, &hash)?;
            let plan = store.undo_plan(&doc, &h, force)?;
            let mut report = serde_json::Map::new();
            report.insert("undo".into(), json!(lichen_crdt::NodeId(h).to_string()));
            report.insert("undone".into(), json!(plan.undone));
            report.insert("skipped".into(), to_json(&plan.skipped));
            Ok(Planned::Write {
                doc,
                op: plan.op,
                report,
            })
        }
        PastRequest::Import { doc, bytes } => {
            let value = import_content(&bytes)?;
            // The bound of every write (`api::MAX_WRITE_NODES`), on the content as read: an
            // Automerge file expands.
            let max = crate::api::MAX_WRITE_NODES;
            if crate::api::count_nodes(&value, max) > max {
                return Err(PastError::TooLarge(max));
            }
            let mut report = serde_json::Map::new();
            report.insert("doc".into(), json!(doc));
            Ok(Planned::Write {
                doc,
                op: Some(Op::Replace { value }),
                report,
            })
        }
    }
}
