//! The CLI's side of issue 19: text renderings of the answers of `get --at`, `diff`,
//! `blame`, `revert` and `import`, and `lichen audit verify`, which runs offline (no agent,
//! no data directory: the bundle and the cluster id are all it needs).

use std::fmt::Write as _;
use std::path::Path;

use lichen_crdt::audit::{verify, VerifiedBundle};
use serde_json::Value;

fn short(s: &str, n: usize) -> &str {
    s.get(..n.min(s.len())).unwrap_or(s)
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "(absent)".into(),
        Some(v) => serde_json::to_string(v).unwrap_or_default(),
    }
}

/// `lichen diff`: one line per path, `+` added, `-` removed, `~` changed (old → new).
pub(crate) fn render_diff(r: &Value) -> String {
    let mut out = String::new();
    let changes = r["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        out.push_str("no differences\n");
    }
    for c in &changes {
        let path = c["path"].as_str().unwrap_or("");
        let path = if path.is_empty() { "(document)" } else { path };
        let _ = match c["kind"].as_str().unwrap_or("") {
            "added" => writeln!(out, "+ {path} = {}", value_text(c.get("new"))),
            "removed" => writeln!(out, "- {path} (was {})", value_text(c.get("old"))),
            _ => writeln!(
                out,
                "~ {path}: {} -> {}",
                value_text(c.get("old")),
                value_text(c.get("new"))
            ),
        };
    }
    out
}

fn setter_text(s: &Value) -> String {
    let author = s["author"].as_str().unwrap_or("");
    format!(
        "{} by {} ({}){} seq {} at {} ms",
        short(s["hash"].as_str().unwrap_or(""), 12),
        s["author_name"].as_str().unwrap_or(""),
        short(author, 8),
        if s["member"] == Value::Bool(false) {
            " [no longer a member]"
        } else {
            ""
        },
        s["seq"],
        s["time_ms"],
    )
}

/// `lichen blame`: one line per leaf (its value and the change that set it); a conflicted
/// leaf lists every concurrent value with its author, the winner first.
pub(crate) fn render_blame(r: &Value) -> String {
    let mut out = String::new();
    for leaf in r.as_array().into_iter().flatten() {
        let setters = leaf["setters"].as_array().cloned().unwrap_or_default();
        let path = leaf["path"].as_str().unwrap_or("");
        if setters.len() > 1 {
            let _ = writeln!(out, "{path} CONFLICT ({} concurrent values)", setters.len());
            for (i, s) in setters.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  {} {}  {}",
                    if i == 0 { "*" } else { " " },
                    value_text(s.get("value")),
                    setter_text(s)
                );
            }
        } else if let Some(s) = setters.first() {
            let _ = writeln!(
                out,
                "{path} = {}  {}",
                value_text(leaf.get("value")),
                setter_text(s)
            );
        }
    }
    out
}

/// `lichen revert` / `lichen import`: the new change's hash (or that nothing changed), and
/// for an undo the values put back and those skipped because they changed since.
pub(crate) fn render_write(r: &Value) -> String {
    let mut out = String::new();
    for u in r["undone"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "undone   {}", u.as_str().unwrap_or(""));
    }
    for s in r["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "skipped  {}: overwritten since (the change set {}, it is now {}); use --force to revert it anyway",
            s["path"].as_str().unwrap_or(""),
            value_text(s.get("set")),
            value_text(s.get("now")),
        );
    }
    match r["hash"].as_str() {
        Some(h) => {
            let _ = writeln!(out, "{h}");
        }
        None => out.push_str("nothing to change\n"),
    }
    out
}

/// The verified history of a bundle, as `lichen history` prints one.
pub(crate) fn render_verified(v: &VerifiedBundle) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "verified: `{}` of cluster {}, exported by {} ({}) at {} ms",
        v.doc,
        short(&v.cluster, 16),
        v.exporter_name,
        v.exporter.short(),
        v.exported_at_ms
    );
    let _ = writeln!(
        out,
        "{} document changes and {} membership changes: every signature and every authorization checked",
        v.document_changes, v.membership_changes
    );
    if !v.since.is_empty() {
        let _ = writeln!(out, "history after {}", v.since);
    }
    for e in &v.history {
        let edits: Vec<String> = e
            .edits
            .iter()
            .map(|x| match &x.value {
                Some(val) => format!("{} {} = {}", x.action, x.path, val),
                None => format!("{} {}", x.action, x.path),
            })
            .collect();
        let _ = writeln!(
            out,
            "{} {} ({}) #{} at {} ms: {}",
            short(&e.hash, 12),
            e.author_name,
            e.author.short(),
            e.seq,
            e.time_ms,
            edits.join("; ")
        );
    }
    let _ = writeln!(out, "heads {}", v.heads);
    out
}

/// `lichen audit verify FILE --cluster ID`: `Ok(text or JSON)` if the bundle verifies, else
/// the reason (naming the offending change).
pub(crate) fn audit_verify(file: &Path, cluster: &str, as_json: bool) -> Result<String, String> {
    let id: lichen_crdt::NodeId = cluster.trim().parse().map_err(|_| {
        format!("`{cluster}` is not a cluster id (64 hex digits, as `lichen status` prints it)")
    })?;
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let v = verify(&bytes, &id.0).map_err(|e| format!("{}: NOT VERIFIED: {e}", file.display()))?;
    Ok(if as_json {
        serde_json::to_string(&v).unwrap_or_default()
    } else {
        render_verified(&v)
    })
}
