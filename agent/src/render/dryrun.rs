//! `lichen render`: see what bindings would write, and develop templates, without touching
//! any file.
//!
//! Why it exists: a template (or a document change) should be checked before the agent
//! writes it into a live service's config. Two forms:
//!
//! * `lichen render --dry-run [--config C] [--file F]` reads the agent's config file (its
//!   `[[bind]]` tables, exactly as `lichen run` validates them), renders every binding (or
//!   the one of file F) from the agent's current documents, and prints for each what would
//!   be written and a unified diff against the file on disk. Nothing is written, no check or
//!   reload command runs.
//! * `lichen render --template T [--doc D] [--env NAME]...` renders one template once to
//!   stdout (`--doc D`: D's keys are the template's variables, as `doc = "D"` in a binding).
//!
//! Both read the documents, the membership and the node's identity through the local API
//! (read-only requests), so they see what the agent would render; the agent does not need
//! to know. The provenance header names the authors of the head changes from the
//! document's history (its last 256 changes; a head older than that is named without
//! authors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::binding::{Binding, TemplateSpec};
use super::provenance::Provenance;
use super::template::{self, Data, NodeInfo, Outcome};
use crate::client::{exit, Client, ClientError};

/// `lichen render` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// Print, for each binding, what would be written and a diff against the file on disk;
    /// write and reload nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// With --dry-run: only the binding of this file.
    #[arg(long, requires = "dry_run")]
    pub(crate) file: Option<PathBuf>,
    /// The agent's config file (its [[bind]] tables).
    #[arg(long, short = 'c', env = "LICHEN_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Render this template once to stdout.
    #[arg(long, conflicts_with = "dry_run")]
    pub(crate) template: Option<PathBuf>,
    /// With --template: the document whose keys are the template's variables.
    #[arg(long, requires = "template")]
    pub(crate) doc: Option<String>,
    /// With --template: an environment variable the template may read as env.NAME
    /// (repeatable).
    #[arg(long = "env", requires = "template")]
    pub(crate) env: Vec<String>,
}

fn fail(code: i32, message: impl Into<String>) -> ClientError {
    ClientError {
        code,
        message: message.into(),
    }
}

/// Run `lichen render`.
pub(crate) fn run(c: &Client, o: Options) -> Result<(), ClientError> {
    let api = Arc::new(ApiData { c: c.clone() });
    if let Some(t) = &o.template {
        let b = crate::render::BindingFile {
            doc: o.doc.clone(),
            template: Some(t.clone()),
            env: Some(o.env.clone()),
            file: PathBuf::from("stdout"),
            ..Default::default()
        };
        let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let b = Binding::resolve(&b, &base).map_err(|e| fail(exit::USAGE, format!("{e:#}")))?;
        let spec = b
            .template
            .clone()
            .ok_or_else(|| fail(exit::USAGE, "no template"))?;
        if let Err(e) = template::check(&spec) {
            return Err(fail(exit::INVALID, e.to_string()));
        }
        let out = render_one(&api, &b, &spec)?;
        print!("{out}");
        return Ok(());
    }
    if !o.dry_run {
        return Err(fail(
            exit::USAGE,
            "say what to render: --dry-run (the config's bindings) or --template T",
        ));
    }
    let Some(config) = &o.config else {
        return Err(fail(
            exit::USAGE,
            "--dry-run needs the agent's config file: --config PATH (or LICHEN_CONFIG)",
        ));
    };
    let cfg = crate::config::Config::resolve(&crate::config::Overrides {
        config: Some(config.clone()),
        ..Default::default()
    })
    .map_err(|e| fail(exit::INVALID, format!("{e:#}")))?;
    let want = o.file.as_ref().map(|f| absolute(f));
    let mut any = false;
    let mut failed = 0;
    for b in &cfg.bindings {
        if want.as_ref().is_some_and(|w| *w != absolute(&b.file)) {
            continue;
        }
        any = true;
        println!("== {} ({})", b.file.display(), b.target());
        match would_write(&api, b) {
            Ok(text) => {
                let current = match std::fs::read(&b.file) {
                    Ok(x) => String::from_utf8_lossy(&x).into_owned(),
                    Err(_) => String::new(),
                };
                if current == text {
                    println!("up to date: nothing would change");
                    continue;
                }
                println!("-- would write:");
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                println!("-- diff:");
                print!("{}", unified_diff(&b.file, &current, &text));
            }
            Err(e) => {
                failed += 1;
                println!("cannot render: {}", e.message);
            }
        }
    }
    if !any {
        return Err(fail(
            exit::NOT_FOUND,
            match want {
                Some(f) => format!("no [[bind]] in {} writes {}", config.display(), f.display()),
                None => format!("{} has no [[bind]] tables", config.display()),
            },
        ));
    }
    if failed > 0 {
        return Err(fail(
            exit::FAILURE,
            format!("{failed} binding(s) cannot be rendered (see above)"),
        ));
    }
    Ok(())
}

fn absolute(f: &Path) -> PathBuf {
    if f.is_absolute() {
        f.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(f))
            .unwrap_or_else(|_| f.to_path_buf())
    }
}

/// A unified diff of the file on disk (`old`) and what would be written (`new`).
/// (The `similar` crate: Myers' diff and the unified format, small and dependency-free.)
fn unified_diff(file: &Path, old: &str, new: &str) -> String {
    let name = file.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("{name} (on disk)"),
            &format!("{name} (would be written)"),
        )
        .to_string()
}

/// What the agent would write for `b` now.
fn would_write(api: &Arc<ApiData>, b: &Binding) -> Result<String, ClientError> {
    if let Some(spec) = &b.template {
        if let Err(e) = template::check(spec) {
            return Err(fail(exit::INVALID, e.to_string()));
        }
        return render_one(api, b, spec);
    }
    let path = lichen_crdt::format_path(&b.path);
    let r = api.c.get("/v1/get", &[("doc", &b.doc), ("path", &path)])?;
    let bytes =
        super::format::serialize(b.format, &r["value"]).map_err(|e| fail(exit::INVALID, e))?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(prefix) = &b.header {
        let heads = r["heads"].as_str().unwrap_or("").to_string();
        let prov = Provenance::doc(&b.doc, heads);
        text = format!("{}{text}", header(api, prefix, &prov));
    }
    Ok(text)
}

fn render_one(api: &Arc<ApiData>, b: &Binding, spec: &TemplateSpec) -> Result<String, ClientError> {
    let st = api.c.get("/v1/status", &[])?;
    let node = NodeInfo {
        id: st["node"]["id"].as_str().unwrap_or("").to_string(),
        name: st["node"]["name"].as_str().unwrap_or("").to_string(),
    };
    let root = (!b.doc.is_empty()).then_some(b.doc.as_str());
    let data: Arc<dyn Data> = api.clone();
    let (outcome, reads) = template::render(spec, root, data, &node);
    match outcome {
        Outcome::Rendered(text) => Ok(match &b.header {
            Some(prefix) => format!(
                "{}{text}",
                header(api, prefix, &Provenance::of_reads(&reads))
            ),
            None => text,
        }),
        Outcome::Waiting(missing) => Err(fail(
            exit::NOT_FOUND,
            format!(
                "the template reads {} which the agent does not hold (the agent would wait; use `| default(...)` to render without it)",
                missing.join(", ")
            ),
        )),
        Outcome::Failed(e) => Err(fail(exit::INVALID, e.to_string())),
    }
}

/// The provenance header, with authors found in each document's recent history.
fn header(api: &ApiData, prefix: &str, prov: &Provenance) -> String {
    let authors: Vec<Vec<String>> = prov
        .docs
        .iter()
        .map(|(doc, heads)| {
            let mut by_hash = BTreeMap::new();
            if let Ok(h) = api.c.get("/v1/history", &[("doc", doc), ("limit", "256")]) {
                for e in h.as_array().into_iter().flatten() {
                    if let (Some(hash), Some(name)) =
                        (e["hash"].as_str(), e["author_name"].as_str())
                    {
                        by_hash.insert(hash.to_string(), name.to_string());
                    }
                }
            }
            let mut names: Vec<String> = heads
                .split(',')
                .filter_map(|h| by_hash.get(h).cloned())
                .collect();
            names.sort();
            names.dedup();
            names
        })
        .collect();
    prov.header(prefix, &authors)
}

/// A template's data through the local API.
struct ApiData {
    c: Client,
}

impl Data for ApiData {
    fn doc(&self, name: &str) -> Result<Option<(Value, String)>, String> {
        match self.c.get("/v1/get", &[("doc", name), ("path", "")]) {
            Ok(r) => Ok(Some((
                r["value"].clone(),
                r["heads"].as_str().unwrap_or("").to_string(),
            ))),
            Err(e) if e.code == exit::NOT_FOUND => Ok(None),
            Err(e) => Err(e.message),
        }
    }

    fn list(&self) -> Result<Vec<String>, String> {
        let r = self.c.get("/v1/ls", &[]).map_err(|e| e.message)?;
        Ok(r.as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn members(&self) -> Result<(Value, String), String> {
        let list = self.c.get("/v1/members", &[]).map_err(|e| e.message)?;
        let st = self.c.get("/v1/status", &[]).map_err(|e| e.message)?;
        let heads = st["docs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["doc"] == lichen_crdt::MEMBERSHIP_DOC)
            .and_then(|d| d["heads"].as_array())
            .map(|h| {
                h.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        Ok((list, heads))
    }
}
