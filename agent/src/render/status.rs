//! The binding board: what every file binding last did, for `lichen status`.
//!
//! Why it exists: an operator asking "which signed state is this file from, and why has it
//! not changed?" needs the binding's own view — the heads it last rendered, when, what the
//! check and reload commands answered, and the error or wait holding it back. Each binding
//! task updates its entry as it goes ([`Board::update`]); the manager adds and removes
//! entries as bindings start and stop; the API's status view reads a snapshot
//! ([`Board::snapshot`]). The board also carries this node's id and name, which template
//! bindings read as `node.id` and `node.name`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

/// The outcome of the last check or reload command.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct CommandOutcome {
    /// Whether it succeeded.
    pub ok: bool,
    /// Its exit code (0 on success; absent when it did not run or was killed).
    pub exit_code: Option<i32>,
    /// The failure, if any.
    pub error: Option<String>,
    /// When it finished, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl CommandOutcome {
    pub(crate) fn of(r: &Result<(), super::command::CommandError>) -> CommandOutcome {
        CommandOutcome {
            ok: r.is_ok(),
            exit_code: match r {
                Ok(()) => Some(0),
                Err(e) => e.code,
            },
            error: r.as_ref().err().map(|e| e.message.clone()),
            at_ms: now_ms(),
        }
    }
}

/// One binding's state as `lichen status` shows it.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub(crate) struct BindingState {
    /// The bound file.
    pub file: String,
    /// `doc`, `doc:path` or `template PATH`.
    pub source: String,
    /// `render`, `sync` (document bindings) or `template`.
    pub kind: String,
    /// The documents the last render read (a template's reads; the document otherwise).
    pub docs: Vec<String>,
    /// `LICHEN_HEADS` of the last render that reached the file (see `super::provenance`).
    pub heads: Option<String>,
    /// When the file was last found or made up to date, ms since the Unix epoch.
    pub rendered_at_ms: Option<u64>,
    /// Template evaluations (template bindings) or document reads (document bindings).
    pub renders: u64,
    /// Times the file was replaced.
    pub writes: u64,
    /// The last check command, if one ran.
    pub check: Option<CommandOutcome>,
    /// The last reload command, if one ran.
    pub reload: Option<CommandOutcome>,
    /// What holds the file back (a template error, a failed check or write), if anything.
    pub error: Option<String>,
    /// A new configuration of this binding that was not loaded (its template does not
    /// compile): the previous one keeps running.
    pub config_error: Option<String>,
    /// What the binding waits for (a document this node does not hold yet), if anything.
    pub waiting: Option<String>,
}

struct Inner {
    node_id: String,
    node_name: String,
    bindings: Mutex<BTreeMap<PathBuf, BindingState>>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub(crate) struct Board {
    inner: Arc<Inner>,
}

impl Board {
    /// An empty board for the node `node_id` named `node_name`.
    pub(crate) fn new(node_id: String, node_name: String) -> Board {
        Board {
            inner: Arc::new(Inner {
                node_id,
                node_name,
                bindings: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// This node's id (hex).
    pub(crate) fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// This node's name.
    pub(crate) fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// Change the entry of `file` (created if missing).
    pub(crate) fn update(&self, file: &Path, f: impl FnOnce(&mut BindingState)) {
        if let Ok(mut m) = self.inner.bindings.lock() {
            let e = m.entry(file.to_path_buf()).or_default();
            f(e);
        }
    }

    /// Forget the entry of `file` (its binding was removed).
    pub(crate) fn remove(&self, file: &Path) {
        if let Ok(mut m) = self.inner.bindings.lock() {
            m.remove(file);
        }
    }

    /// Every binding's state, ordered by file.
    pub(crate) fn snapshot(&self) -> Value {
        let list: Vec<BindingState> = self
            .inner
            .bindings
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        serde_json::to_value(list).unwrap_or(Value::Null)
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `lichen status`'s bindings section (from the status view's `bindings` list).
pub(crate) fn print_bindings(list: &Value) {
    let Some(list) = list.as_array().filter(|l| !l.is_empty()) else {
        return;
    };
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!("bindings");
    for b in list {
        println!(
            "  {} ({}, {})",
            s(&b["file"]),
            s(&b["source"]),
            s(&b["kind"])
        );
        let heads = s(&b["heads"]);
        let at = b["rendered_at_ms"]
            .as_u64()
            .map(|t| format!("{:.1} s ago", now_ms().saturating_sub(t) as f64 / 1000.0))
            .unwrap_or_else(|| "never".into());
        println!(
            "    rendered {at}, {} renders, {} writes, heads {}",
            b["renders"],
            b["writes"],
            if heads.is_empty() { "-" } else { &heads }
        );
        for what in ["check", "reload"] {
            let c = &b[what];
            if c.is_null() {
                continue;
            }
            let code = c["exit_code"]
                .as_i64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            if c["ok"] == Value::Bool(true) {
                println!("    {what} ok (exit {code})");
            } else {
                println!("    {what} FAILED (exit {code}): {}", s(&c["error"]));
            }
        }
        if !b["waiting"].is_null() {
            println!("    waiting: {}", s(&b["waiting"]));
        }
        for what in ["config_error", "error"] {
            if !b[what].is_null() {
                println!("    ERROR: {}", s(&b[what]));
            }
        }
    }
}
