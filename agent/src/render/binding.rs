//! Binding configuration: what one `[[bind]]` table in the agent's config file says, and its
//! validated form.
//!
//! Why a separate file: the config loader ([`crate::config`]) only needs to parse and
//! validate bindings; everything that acts on them (rendering, ingesting, commands) lives in
//! the sibling modules and takes a validated [`Binding`]. Validation happens once, when the
//! config is resolved (at start-up and on SIGHUP), so a typo, an unknown user or a bad mode is
//! reported before anything runs and an invalid reload keeps the old bindings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::owner;

/// One `[[bind]]` table as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindingFile {
    /// Document name. A document binding renders it as json/toml/yaml; with `template`, its
    /// top-level keys are the template's variables.
    pub doc: Option<String>,
    /// Template file (minijinja / Jinja2 syntax; relative to the config file's directory),
    /// read at start and on SIGHUP: a template binding, one-way (see [`super::template`]).
    pub template: Option<PathBuf>,
    /// Environment variables a template may read as `env.NAME` (none by default).
    pub env: Option<Vec<String>>,
    /// Comment prefix such as `"# "`: the file's first line then names the signed heads it
    /// was rendered from and the authors of the changes at those heads (see
    /// [`super::provenance`]).
    pub header: Option<String>,
    /// Optional path inside the document (dotted); the whole document if absent.
    pub path: Option<String>,
    /// Target file (relative paths are relative to the config file's directory).
    pub file: PathBuf,
    /// `json`, `toml` or `yaml` (default: from the file extension).
    pub format: Option<String>,
    /// `render` (document → file, default) or `sync` (both ways; not with `template`).
    pub mode: Option<String>,
    /// Command run on the staged file (its path is appended as the last argument); a failure
    /// keeps the old file. In `sync` mode it also vets local edits before they propagate.
    /// Run without a shell; a relative program path with a `/` (`./check.sh`) is relative to
    /// the config file's directory. `LICHEN_DOC`, `LICHEN_FILE` (the target file) and
    /// `LICHEN_HEADS` are set (see [`super::provenance`]).
    pub check: Option<Vec<String>>,
    /// Command run after the file changed (same rules as `check`, no extra argument).
    pub reload: Option<Vec<String>>,
    /// Debounce window in milliseconds (default 200).
    pub debounce_ms: Option<u64>,
    /// Most time a check or reload command may take, in milliseconds (default 30000).
    pub command_timeout_ms: Option<u64>,
    /// Largest random delay before a reload, in milliseconds (default 1000), so a fleet does
    /// not reload in lockstep.
    pub reload_jitter_ms: Option<u64>,
    /// File mode, octal string such as "0640" (default: keep the existing file's mode, 0644
    /// for a new file).
    pub file_mode: Option<String>,
    /// Owner as a user name (looked up in /etc/passwd) or a numeric uid (needs privileges).
    pub owner: Option<String>,
    /// Group as a group name (looked up in /etc/group) or a numeric gid.
    pub group: Option<String>,
}

/// File format of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Toml,
    Yaml,
    /// A template's output: written as rendered, never parsed back.
    Text,
}

impl Format {
    /// Lower-case name, as in the config file.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Toml => "toml",
            Format::Yaml => "yaml",
            Format::Text => "text",
        }
    }
}

/// Direction of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Document → file.
    Render,
    /// Both ways.
    Sync,
}

/// A template binding's template: where it came from, its text as read at (re)load, and the
/// environment variables it may read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TemplateSpec {
    /// The template file (absolute, or relative to the agent's working directory).
    pub path: PathBuf,
    /// Its text as read when the config was (re)loaded.
    pub source: String,
    /// Names readable as `env.NAME`.
    pub env: Vec<String>,
}

/// A validated binding.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    /// Document name; empty for a template binding without `doc`.
    pub doc: String,
    /// The template of a template binding (then `format` is [`Format::Text`]).
    pub template: Option<TemplateSpec>,
    /// Comment prefix of the provenance header line, if one is written.
    pub header: Option<String>,
    pub path: Vec<lichen_crdt::PathSeg>,
    pub file: PathBuf,
    pub format: Format,
    pub mode: Mode,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
    pub debounce: Duration,
    pub command_timeout: Duration,
    pub reload_jitter: Duration,
    /// Mode bits for the rendered file; `None` keeps the existing file's (0644 if new).
    pub file_mode: Option<u32>,
    /// Numeric owner, resolved from a name at config time.
    pub uid: Option<u32>,
    /// Numeric group, resolved from a name at config time.
    pub gid: Option<u32>,
}

impl Binding {
    /// Validate one `[[bind]]` entry; relative files are resolved against `base`.
    pub(crate) fn resolve(b: &BindingFile, base: &Path) -> Result<Binding> {
        if let Some(doc) = &b.doc {
            if !lichen_crdt::valid_doc_name(doc) || doc == lichen_crdt::MEMBERSHIP_DOC {
                bail!("`{doc}` is not a valid document name");
            }
        }
        let template = match (&b.doc, &b.template) {
            (None, None) => {
                bail!("set `doc` (a document to render) or `template` (a template file)")
            }
            (Some(_), None) => {
                if b.env.is_some() {
                    bail!(
                        "`env` is for template bindings (a document binding reads no environment)"
                    );
                }
                None
            }
            (_, Some(t)) => Some(template_spec(b, t, base)?),
        };
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
            _ if template.is_some() => Format::Text,
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
        let command = |what: &str, cmd: &Option<Vec<String>>| -> Result<Option<Vec<String>>> {
            let Some(c) = cmd else { return Ok(None) };
            let Some(program) = c.first().filter(|p| !p.is_empty()) else {
                bail!("`{what}` must be a non-empty list: [\"program\", \"arg\", ...]");
            };
            let mut c = c.clone();
            if program.contains('/') && Path::new(program).is_relative() {
                c[0] = base.join(program).to_string_lossy().into_owned();
            }
            Ok(Some(c))
        };
        if let Some(h) = &b.header {
            if h.is_empty() || h.contains('\n') || h.contains('\r') {
                bail!("`header` must be a one-line comment prefix such as \"# \"");
            }
            match format {
                Format::Json => bail!("`header` cannot be used with json: JSON has no comments (use yaml, toml or a template)"),
                Format::Toml | Format::Yaml if !h.starts_with('#') => bail!(
                    "`header` must start with `#` for {} (its comment syntax)",
                    format.name()
                ),
                _ => {}
            }
        }
        let check = command("check", &b.check)?;
        let reload = command("reload", &b.reload)?;
        let file_mode = match &b.file_mode {
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .with_context(|| {
                        format!("file_mode `{m}` is not an octal mode like \"0644\"")
                    })?,
            ),
            None => None,
        };
        let uid = b
            .owner
            .as_deref()
            .map(|o| owner::resolve(o, owner::Kind::User))
            .transpose()?;
        let gid = b
            .group
            .as_deref()
            .map(|g| owner::resolve(g, owner::Kind::Group))
            .transpose()?;
        Ok(Binding {
            doc: b.doc.clone().unwrap_or_default(),
            template,
            header: b.header.clone(),
            path,
            file,
            format,
            mode,
            check,
            reload,
            debounce: Duration::from_millis(b.debounce_ms.unwrap_or(200)),
            command_timeout: Duration::from_millis(b.command_timeout_ms.unwrap_or(30_000)),
            reload_jitter: Duration::from_millis(b.reload_jitter_ms.unwrap_or(1000)),
            file_mode,
            uid,
            gid,
        })
    }

    /// `doc` or `doc:path` (`template PATH` for a template binding), for log lines.
    pub(crate) fn target(&self) -> String {
        if let Some(t) = &self.template {
            format!("template {}", t.path.display())
        } else if self.path.is_empty() {
            self.doc.clone()
        } else {
            format!("{}:{}", self.doc, lichen_crdt::format_path(&self.path))
        }
    }
}

/// Validate the template-only options and read the template file. Template bindings are
/// one-way: options that only make sense when the file is read back are refused.
fn template_spec(b: &BindingFile, t: &Path, base: &Path) -> Result<TemplateSpec> {
    if b.path.is_some() {
        bail!("`path` is for document bindings; a template reads what it needs with doc(\"NAME\")");
    }
    if let Some(f) = &b.format {
        bail!("`format = \"{f}\"` is for document bindings; a template's output is written as rendered (use the tojson/totoml/toyaml filters inside it)");
    }
    if b.mode.as_deref().is_some_and(|m| m != "render") {
        bail!("template bindings are one-way (document → file): `mode` must be \"render\"; a local edit of a rendered template cannot be turned back into document values");
    }
    let path = if t.is_absolute() {
        t.to_path_buf()
    } else {
        base.join(t)
    };
    let source = match super::write::read_bounded(&path, super::template::MAX_TEMPLATE) {
        Ok(super::write::FileRead::Bytes(b)) => String::from_utf8(b)
            .map_err(|_| anyhow::anyhow!("template {} is not UTF-8 text", path.display()))?,
        Ok(super::write::FileRead::Missing) => {
            bail!("template file {} does not exist", path.display())
        }
        Ok(super::write::FileRead::TooLarge(n)) => bail!(
            "template {} is {n} bytes, larger than {} KiB",
            path.display(),
            super::template::MAX_TEMPLATE >> 10
        ),
        Err(e) => bail!("cannot read template {}: {e}", path.display()),
    };
    let env = b.env.clone().unwrap_or_default();
    for name in &env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            bail!("`env` entry `{name}` is not an environment variable name");
        }
    }
    Ok(TemplateSpec { path, source, env })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Binding> {
        let b: BindingFile = toml::from_str(s)?;
        Binding::resolve(&b, Path::new("/etc/app"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let b = parse("doc = \"app/web\"\nfile = \"web.yml\"").unwrap();
        assert_eq!(b.file, PathBuf::from("/etc/app/web.yml"));
        assert_eq!(b.format, Format::Yaml);
        assert_eq!(b.mode, Mode::Render);
        assert_eq!(b.file_mode, None);
        assert_eq!(b.debounce, Duration::from_millis(200));
        assert_eq!(b.target(), "app/web");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("doc = \"a\"\nfile = \"x.ini\"").is_err());
        assert!(parse("doc = \"a\"\nfile = \"x\"").is_err());
        assert!(parse("doc = \"a\"\nfile = \"x.json\"\nmode = \"both\"").is_err());
        assert!(parse("doc = \"a\"\nfile = \"x.json\"\nfile_mode = \"999\"").is_err());
        assert!(parse("doc = \"a\"\nfile = \"x.json\"\ncheck = []").is_err());
        assert!(parse("doc = \"a\"\nfile = \"x.json\"\nowner = \"no-such-user-here\"").is_err());
        let b = parse("doc = \"a\"\nfile = \"x.json\"\nfile_mode = \"0640\"\nowner = \"0\"\ngroup = \"0\"\npath = \"limits.http\"").unwrap();
        assert_eq!(b.file_mode, Some(0o640));
        assert_eq!((b.uid, b.gid), (Some(0), Some(0)));
        assert_eq!(b.target(), "a:limits.http");
    }

    #[test]
    fn relative_programs_are_relative_to_the_config() {
        let b = parse("doc = \"a\"\nfile = \"x.json\"\ncheck = [\"./check.sh\", \"-q\"]\nreload = [\"systemctl\", \"reload\", \"web\"]").unwrap();
        assert_eq!(b.check.unwrap(), ["/etc/app/./check.sh", "-q"]);
        assert_eq!(b.reload.unwrap(), ["systemctl", "reload", "web"]);
    }
}
