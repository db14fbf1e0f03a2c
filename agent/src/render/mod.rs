//! File bindings: documents rendered into the files applications already read, and (in `sync`
//! mode) local edits of those files turned into signed changes.
//!
//! This module holds the binding configuration; the renderer and the watcher build on it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One `[[bind]]` table as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingFile {
    /// Document name.
    pub doc: String,
    /// Optional path inside the document (dotted); the whole document if absent.
    pub path: Option<String>,
    /// Target file (relative paths are relative to the config file's directory).
    pub file: PathBuf,
    /// `json`, `toml` or `yaml` (default: from the file extension).
    pub format: Option<String>,
    /// `render` (document → file, default) or `sync` (both ways).
    pub mode: Option<String>,
    /// Command run on the staged file (its path is appended as the last argument); a failure
    /// keeps the old file.
    pub check: Option<Vec<String>>,
    /// Command run after the file changed.
    pub reload: Option<Vec<String>>,
    /// Debounce window in milliseconds (default 200).
    pub debounce_ms: Option<u64>,
    /// Most time a check or reload command may take, in milliseconds (default 30000).
    pub command_timeout_ms: Option<u64>,
    /// Largest random delay before a reload, in milliseconds (default 1000), so a fleet does
    /// not reload in lockstep.
    pub reload_jitter_ms: Option<u64>,
    /// File mode, octal string (default "0644").
    pub file_mode: Option<String>,
    /// Owner as `user` or `uid` (optional; needs privileges).
    pub owner: Option<String>,
    /// Group as `group` or `gid` (optional).
    pub group: Option<String>,
}

/// File format of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    Yaml,
}

/// Direction of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Document → file.
    Render,
    /// Both ways.
    Sync,
}

/// A validated binding.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub doc: String,
    pub path: Vec<lichen_crdt::PathSeg>,
    pub file: PathBuf,
    pub format: Format,
    pub mode: Mode,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
    pub debounce: Duration,
    pub command_timeout: Duration,
    pub reload_jitter: Duration,
    pub file_mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl Binding {
    /// Validate one `[[bind]]` entry; relative files are resolved against `base`.
    pub fn resolve(b: &BindingFile, base: &Path) -> Result<Binding> {
        if !lichen_crdt::valid_doc_name(&b.doc) || b.doc == lichen_crdt::MEMBERSHIP_DOC {
            bail!("`{}` is not a valid document name", b.doc);
        }
        let path = match &b.path {
            Some(p) => lichen_crdt::parse_path(p).with_context(|| format!("invalid path `{p}`"))?,
            None => Vec::new(),
        };
        let file = if b.file.is_absolute() {
            b.file.clone()
        } else {
            base.join(&b.file)
        };
        if file.file_name().is_none() {
            bail!("`{}` is not a file path", b.file.display());
        }
        let format = match b
            .format
            .as_deref()
            .or_else(|| file.extension().and_then(|e| e.to_str()))
        {
            Some("json") => Format::Json,
            Some("toml") => Format::Toml,
            Some("yaml") | Some("yml") => Format::Yaml,
            Some(other) => bail!("format must be json, toml or yaml, not `{other}`"),
            None => bail!("cannot tell the format of {}: set `format`", file.display()),
        };
        let mode = match b.mode.as_deref().unwrap_or("render") {
            "render" => Mode::Render,
            "sync" => Mode::Sync,
            other => bail!("mode must be `render` or `sync`, not `{other}`"),
        };
        for (what, cmd) in [("check", &b.check), ("reload", &b.reload)] {
            if let Some(c) = cmd {
                if c.is_empty() || c[0].is_empty() {
                    bail!("`{what}` must be a non-empty list: [\"program\", \"arg\", ...]");
                }
            }
        }
        let file_mode = match &b.file_mode {
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .with_context(|| format!("file_mode `{m}` is not an octal mode like \"0644\""))?,
            None => 0o644,
        };
        Ok(Binding {
            doc: b.doc.clone(),
            path,
            file,
            format,
            mode,
            check: b.check.clone(),
            reload: b.reload.clone(),
            debounce: Duration::from_millis(b.debounce_ms.unwrap_or(200)),
            command_timeout: Duration::from_millis(b.command_timeout_ms.unwrap_or(30_000)),
            reload_jitter: Duration::from_millis(b.reload_jitter_ms.unwrap_or(1000)),
            file_mode,
            owner: b.owner.clone(),
            group: b.group.clone(),
        })
    }
}

/// Runs one task per binding; reloads replace the set.
pub struct Manager {
    node: crate::node::NodeHandle,
    shutdown: tokio::sync::watch::Receiver<bool>,
    current: std::sync::Mutex<Vec<Binding>>,
}

impl Manager {
    /// Start tasks for `bindings`.
    pub fn start(
        bindings: Vec<Binding>,
        node: crate::node::NodeHandle,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Manager {
        let m = Manager {
            node,
            shutdown,
            current: std::sync::Mutex::new(Vec::new()),
        };
        m.reload(bindings);
        m
    }

    /// Replace the running bindings with `bindings`.
    pub fn reload(&self, bindings: Vec<Binding>) {
        let _ = (&self.node, &self.shutdown);
        if !bindings.is_empty() {
            tracing::error!(
                count = bindings.len(),
                "file bindings are configured but not implemented in this build"
            );
        }
        if let Ok(mut c) = self.current.lock() {
            *c = bindings;
        }
    }

    /// Stop every binding task.
    pub async fn stop(&self) {}
}
