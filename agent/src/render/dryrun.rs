//! `lichen render`: see what bindings would write, and develop templates, without touching
//! any file.
//!
//! Why it exists: a template (or a document change) should be checked before the agent
//! writes it into a live service's config. Two forms:
//!
//! * `lichen render --dry-run [--config C] [--file F]` reads the agent's config file (the
//!   CLI's global `--config`, or `LICHEN_CONFIG`; its
//!   `[[bind]]` tables, exactly as `lichen run` validates them), renders every binding (or
//!   the one of file F) from the agent's current documents, and prints for each what would
//!   be written and a unified diff against the file on disk. Nothing is written, no check or
//!   reload command runs.
//! * `lichen render --template T [--doc D] [--env NAME]...` renders one template once to
//!   stdout (`--doc D`: D's keys are the template's variables, as `doc = "D"` in a binding).
//!
//! Both read the documents, the membership and the node's identity through the local API
//! (read-only requests: `GET /v1/docs/{doc}`, `/v1/docs`, `/v1/members`, `/v1/status`, and
//! `/v1/docs/{doc}?blame` for the header), with the CLI's client (its token, or the unix
//! socket), so they see what the agent would render; the agent does not need to know. The
//! provenance header names the authors of the values, from the agent's `?blame` view.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::binding::{Binding, TemplateSpec};
use super::provenance::Provenance;
use super::template::{self, Data, NodeInfo, Outcome};
use crate::client::{doc_url, with_query, Client};
use crate::error::{ApiError, ErrorKind};
use crate::views::{MemberView, StatusView, ValueView};

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

fn fail(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

/// Run `lichen render`; `config` is the CLI's global `--config` (the agent's config file,
/// whose `[[bind]]` tables `--dry-run` renders).
pub(crate) fn run(c: &Client, config: Option<&Path>, o: Options) -> Result<(), ApiError> {
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
        let b =
            Binding::resolve(&b, &base).map_err(|e| fail(ErrorKind::Usage, format!("{e:#}")))?;
        let spec = b
            .template
            .clone()
            .ok_or_else(|| fail(ErrorKind::Usage, "no template"))?;
        if let Err(e) = template::check(&spec) {
            return Err(fail(ErrorKind::Invalid, e.to_string()));
        }
        let out = render_one(&api, &b, &spec)?;
        print!("{out}");
        return Ok(());
    }
    if !o.dry_run {
        return Err(fail(
            ErrorKind::Usage,
            "say what to render: --dry-run (the config's bindings) or --template T",
        ));
    }
    let Some(config) = config else {
        return Err(fail(
            ErrorKind::Usage,
            "--dry-run needs the agent's config file: --config PATH (or LICHEN_CONFIG)",
        ));
    };
    let cfg = crate::config::Config::resolve(&crate::config::Overrides {
        config: Some(config.to_path_buf()),
        ..Default::default()
    })
    .map_err(|e| fail(ErrorKind::Invalid, format!("{e:#}")))?;
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
                println!("cannot render: {}", e.error);
            }
        }
    }
    if !any {
        return Err(fail(
            ErrorKind::NotFound,
            match want {
                Some(f) => format!("no [[bind]] in {} writes {}", config.display(), f.display()),
                None => format!("{} has no [[bind]] tables", config.display()),
            },
        ));
    }
    if failed > 0 {
        return Err(fail(
            ErrorKind::Internal,
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
fn would_write(api: &Arc<ApiData>, b: &Binding) -> Result<String, ApiError> {
    if let Some(spec) = &b.template {
        if let Err(e) = template::check(spec) {
            return Err(fail(ErrorKind::Invalid, e.to_string()));
        }
        return render_one(api, b, spec);
    }
    let path = lichen_crdt::format_path(&b.path);
    let r: ValueView = api.c.get(&doc_url(&b.doc, &path)?)?;
    let bytes =
        super::format::serialize(b.format, &r.value).map_err(|e| fail(ErrorKind::Invalid, e))?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(prefix) = &b.header {
        let prov = Provenance::doc(&b.doc, r.heads);
        text = format!("{}{text}", header(api, prefix, &prov, &path));
    }
    Ok(text)
}

fn render_one(api: &Arc<ApiData>, b: &Binding, spec: &TemplateSpec) -> Result<String, ApiError> {
    let st: StatusView = api.c.get("/v1/status")?;
    let node = NodeInfo {
        id: st.node.id,
        name: st.node.name,
    };
    let root = (!b.doc.is_empty()).then_some(b.doc.as_str());
    let data: Arc<dyn Data> = api.clone();
    let (outcome, reads) = template::render(spec, root, data, &node);
    match outcome {
        Outcome::Rendered(text) => Ok(match &b.header {
            Some(prefix) => format!(
                "{}{text}",
                header(api, prefix, &Provenance::of_reads(&reads), "")
            ),
            None => text,
        }),
        Outcome::Waiting(missing) => Err(fail(
            ErrorKind::NotFound,
            format!(
                "the template reads {} which the agent does not hold (the agent would wait; use `| default(...)` to render without it)",
                missing.join(", ")
            ),
        )),
        Outcome::Failed(e) => Err(fail(ErrorKind::Invalid, e.to_string())),
    }
}

/// The provenance header, with the authors of the values as the agent's `?blame` names them
/// (the same rule as the agent's header: see [`super::provenance`]). `path` is a document
/// binding's path (its values are those under it); a template's documents are blamed whole.
fn header(api: &ApiData, prefix: &str, prov: &Provenance, path: &str) -> String {
    let authors: Vec<Vec<String>> = prov
        .docs
        .iter()
        .map(|(doc, heads)| {
            if heads.is_empty() {
                return Vec::new();
            }
            let url = doc_url(doc, path).map(|u| with_query(&u, &[("blame", None)]));
            let leaves = url
                .and_then(|u| api.c.get::<Value>(&u))
                .unwrap_or(Value::Null);
            let mut names: Vec<String> = leaves
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.get("setters")?.get(0)?.get("author_name")?.as_str())
                .map(str::to_string)
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
        let url = doc_url(name, "").map_err(|e| e.error)?;
        match self.c.get::<ValueView>(&url) {
            Ok(r) => Ok(Some((r.value, r.heads))),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.error),
        }
    }

    fn list(&self) -> Result<Vec<String>, String> {
        self.c.get::<Vec<String>>("/v1/docs").map_err(|e| e.error)
    }

    fn members(&self) -> Result<(Value, String), String> {
        let list: Vec<MemberView> = self.c.get("/v1/members").map_err(|e| e.error)?;
        let st: StatusView = self.c.get("/v1/status").map_err(|e| e.error)?;
        let heads = st
            .docs
            .iter()
            .find(|d| d.doc == lichen_crdt::MEMBERSHIP_DOC)
            .map(|d| d.heads.join(","))
            .unwrap_or_default();
        let list = serde_json::to_value(list).map_err(|e| e.to_string())?;
        Ok((list, heads))
    }
}
