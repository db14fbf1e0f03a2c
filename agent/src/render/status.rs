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

pub(crate) use crate::views::{BindingView, CommandOutcomeView};

impl CommandOutcomeView {
    pub(crate) fn of(r: &Result<(), super::command::CommandError>) -> CommandOutcomeView {
        CommandOutcomeView {
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

struct Inner {
    node_id: String,
    node_name: String,
    bindings: Mutex<BTreeMap<PathBuf, BindingView>>,
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
    pub(crate) fn update(&self, file: &Path, f: impl FnOnce(&mut BindingView)) {
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
    pub(crate) fn snapshot(&self) -> Vec<BindingView> {
        self.inner
            .bindings
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
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
pub(crate) fn print_bindings(list: &[BindingView]) {
    if list.is_empty() {
        return;
    }
    println!("bindings");
    for b in list {
        println!("  {} ({}, {})", b.file, b.source, b.kind);
        let at = b
            .rendered_at_ms
            .map(|t| format!("{:.1} s ago", now_ms().saturating_sub(t) as f64 / 1000.0))
            .unwrap_or_else(|| "never".into());
        println!(
            "    rendered {at}, {} renders, {} writes, heads {}",
            b.renders,
            b.writes,
            b.heads.as_deref().filter(|h| !h.is_empty()).unwrap_or("-")
        );
        for (what, c) in [("check", &b.check), ("reload", &b.reload)] {
            let Some(c) = c else {
                continue;
            };
            let code = c
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            if c.ok {
                println!("    {what} ok (exit {code})");
            } else {
                println!(
                    "    {what} FAILED (exit {code}): {}",
                    c.error.as_deref().unwrap_or("")
                );
            }
        }
        if let Some(w) = &b.waiting {
            println!("    waiting: {w}");
        }
        for e in [&b.config_error, &b.error].into_iter().flatten() {
            println!("    ERROR: {e}");
        }
    }
}
