//! Template bindings: a minijinja (Jinja2 syntax) template rendered from documents, the
//! membership and this node into a file of any format (nginx.conf, haproxy.cfg, an
//! environment file ...).
//!
//! Why it exists: most configuration files are not JSON, TOML or YAML. A template binding
//! renders text; everything after the text (staged write, check, rename, fsync, reload with
//! jitter, retries) is the document bindings' machinery ([`super::task`], [`super::write`]).
//!
//! # Data flow
//!
//! ```text
//!  TemplateSpec (binding.rs: file read at start / SIGHUP)
//!     ──► check(): compile once (a syntax error names file:line:column)
//!     ──► render(spec, Data, node)   [blocking thread]
//!            doc()/docs()/members() ──► Data (the node task, or the API for the CLI)
//!                                        └─► Reads: documents (and heads), prefixes,
//!                                            membership, refused env names
//!            output ──► Capped writer (1 MiB)
//!     ──► Outcome: Rendered(text) | Waiting(missing docs) | Failed(TemplateError)
//! ```
//!
//! What a template can read:
//!
//! * with `doc = "app/nginx"` on the binding (or `--doc` for `lichen render --template`),
//!   that document's top-level keys are the template's variables (`{{ upstreams }}`);
//! * `doc("app/nginx")` — a document as a value (`doc("app/nginx").upstreams`); a document
//!   this node does not hold is *undefined*: the binding waits for it, unless the template
//!   handles it (`doc("x", {})`, `doc("x") | default({})`, `{% if doc("x") %}`);
//! * `docs("region/eu/")` — a map of document name → value for every document whose name
//!   starts with the prefix;
//! * `members()` — the active members, each `{id, name, role, scopes, addrs, root}`;
//! * `node.id`, `node.name` — this node;
//! * `env.NAME` — only names in the binding's `env` allow-list (any other name is an error).
//!
//! Filters beyond minijinja's built-ins: `totoml`, `toyaml`, `keys`, `base64`
//! (`tojson`, `default`, `indent`, `join`, `sort`, `replace`, `lower`, `upper`, `split` are
//! built in). Blocks are trimmed like Ansible's (`trim_blocks`, `lstrip_blocks`) and a
//! trailing newline is kept; nothing is HTML-escaped.
//!
//! Bounds: every render gets [`FUEL`] instructions (a loop that never ends runs out), a
//! recursion limit of [`RECURSION`], and its output is capped at [`MAX_OUTPUT`] bytes (the
//! bound files have everywhere); minijinja itself refuses `range()` of more than 100 000
//! items and a single string repetition over 100 MB. Each render runs on a blocking thread,
//! never on the async workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value as JValue};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde_json::Value;

use super::binding::{Format, TemplateSpec};

/// Largest template file.
pub(crate) const MAX_TEMPLATE: usize = 256 << 10;
/// Instructions one render may execute (a few hundred per rendered line is typical).
pub(crate) const FUEL: u64 = 5_000_000;
/// Nesting depth of loops, conditions, macro calls.
pub(crate) const RECURSION: usize = 100;
/// Largest rendered output (the file bound every binding has).
pub(crate) const MAX_OUTPUT: usize = super::ingest::MAX_FILE;

/// Where a template's data comes from: the node task (the agent) or the API (the CLI).
/// Called from a blocking thread.
pub(crate) trait Data: Send + Sync {
    /// A document's value and heads; `None` if this node does not hold it.
    fn doc(&self, name: &str) -> Result<Option<(Value, String)>, String>;
    /// Every document name.
    fn list(&self) -> Result<Vec<String>, String>;
    /// The membership (a list of member objects) and the membership document's heads.
    fn members(&self) -> Result<(Value, String), String>;
}

/// This node, as `node.id` and `node.name`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct NodeInfo {
    pub id: String,
    pub name: String,
}

/// What one render read: decides which document changes re-render, and feeds provenance.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Reads {
    /// Documents read, with their heads (`None`: not held by this node).
    pub docs: BTreeMap<String, Option<String>>,
    /// Prefixes listed with `docs()`.
    pub prefixes: BTreeSet<String>,
    /// The membership's heads, if `members()` was called.
    pub members: Option<String>,
    /// Environment variables read that are not in the allow-list.
    pub env_denied: BTreeSet<String>,
    /// An error that is not the template's fault (the agent did not answer).
    pub data_error: Option<String>,
    /// A `doc()` argument that is not a valid document name.
    pub bad_name: Option<String>,
}

impl Reads {
    /// Whether a change of `doc` may change the output.
    pub(crate) fn wants(&self, doc: &str) -> bool {
        self.docs.contains_key(doc)
            || self.prefixes.iter().any(|p| doc.starts_with(p.as_str()))
            || (self.members.is_some() && doc == lichen_crdt::MEMBERSHIP_DOC)
    }

    /// Documents read that this node does not hold.
    pub(crate) fn missing(&self) -> Vec<String> {
        self.docs
            .iter()
            .filter(|(_, h)| h.is_none())
            .map(|(d, _)| d.clone())
            .collect()
    }
}

/// A template error, with where it happened.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TemplateError {
    /// The metric label: `syntax`, `undefined`, `fuel`, `recursion`, `too_large`, `env`,
    /// `doc_name`, `data` or `render`.
    pub reason: &'static str,
    /// The template file.
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// Every reason label, for the metric family.
pub(crate) const REASONS: &[&str] = &[
    "data",
    "doc_name",
    "env",
    "fuel",
    "recursion",
    "render",
    "syntax",
    "too_large",
    "undefined",
];

/// What a render produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Rendered(String),
    /// Documents the template needs and this node does not hold yet.
    Waiting(Vec<String>),
    Failed(TemplateError),
}

fn name_of(spec: &TemplateSpec) -> String {
    spec.path.display().to_string()
}

/// A bare environment with the settings and filters every template gets.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_debug(true);
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION);
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.add_filter("totoml", |v: JValue| serialize(Format::Toml, &v));
    env.add_filter("toyaml", |v: JValue| serialize(Format::Yaml, &v));
    env.add_filter("keys", keys);
    env.add_filter("base64", |s: String| base64(s.as_bytes()));
    env
}

fn serialize(format: Format, v: &JValue) -> Result<String, Error> {
    let json = serde_json::to_value(v).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot convert to {}: {e}", format.name()),
        )
    })?;
    let bytes = super::format::serialize(format, &json)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e))?;
    String::from_utf8(bytes).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

fn keys(v: JValue) -> Result<JValue, Error> {
    if v.kind() != minijinja::value::ValueKind::Map {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys needs a map, not {}", v.kind()),
        ));
    }
    Ok(JValue::from(v.try_iter()?.collect::<Vec<_>>()))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Compile the template: `Err` is its syntax error (file, line, column).
pub(crate) fn check(spec: &TemplateSpec) -> Result<(), TemplateError> {
    let mut env = environment();
    env.add_template_owned(name_of(spec), spec.source.clone())
        .map_err(|e| error(spec, &e, &Reads::default()))
}

/// `env.NAME`, limited to the allow-list.
#[derive(Debug)]
struct EnvVars {
    allow: Vec<String>,
    reads: Arc<Mutex<Reads>>,
}

impl Object for EnvVars {
    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let name = key.as_str()?;
        if self.allow.iter().any(|a| a == name) {
            return std::env::var(name).ok().map(JValue::from);
        }
        if let Ok(mut r) = self.reads.lock() {
            r.env_denied.insert(name.to_string());
        }
        Some(JValue::from(Error::new(
            ErrorKind::InvalidOperation,
            format!("env.{name} is not in this binding's `env` allow-list (add it to `env = [...]` in the [[bind]] table)"),
        )))
    }
}

/// Render `spec` once, reading through `data`; `root` is the document whose keys are the
/// template's variables, if any.
pub(crate) fn render(
    spec: &TemplateSpec,
    root: Option<&str>,
    data: Arc<dyn Data>,
    node: &NodeInfo,
) -> (Outcome, Reads) {
    let reads = Arc::new(Mutex::new(Reads::default()));
    let ctx = match root {
        None => JValue::from(()),
        Some(d) => match doc_fn(&*data, &reads, d, None) {
            Ok(v) if v.is_undefined() => {
                let r = reads.lock().map(|r| r.clone()).unwrap_or_default();
                return (Outcome::Waiting(vec![d.to_string()]), r);
            }
            Ok(v) => v,
            Err(e) => {
                let r = reads.lock().map(|r| r.clone()).unwrap_or_default();
                return (Outcome::Failed(error(spec, &e, &r)), r);
            }
        },
    };
    let mut env = environment();
    {
        let (data, reads) = (data.clone(), reads.clone());
        env.add_function(
            "doc",
            move |name: String, default: Option<JValue>| -> Result<JValue, Error> {
                doc_fn(&*data, &reads, &name, default)
            },
        );
    }
    {
        let (data, reads) = (data.clone(), reads.clone());
        env.add_function("docs", move |prefix: String| -> Result<JValue, Error> {
            docs_fn(&*data, &reads, &prefix)
        });
    }
    {
        let (data, reads) = (data.clone(), reads.clone());
        env.add_function("members", move || -> Result<JValue, Error> {
            let (list, heads) = data.members().map_err(|e| data_error(&reads, e))?;
            if let Ok(mut r) = reads.lock() {
                r.members = Some(heads);
            }
            let active: Vec<Value> = list
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter(|m| m.get("role").and_then(Value::as_str) != Some("removed"))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            Ok(JValue::from_serialize(active))
        });
    }
    env.add_global("node", JValue::from_serialize(node));
    env.add_global(
        "env",
        JValue::from_object(EnvVars {
            allow: spec.env.clone(),
            reads: reads.clone(),
        }),
    );
    let name = name_of(spec);
    let result = env
        .add_template_owned(name.clone(), spec.source.clone())
        .and_then(|()| env.get_template(&name))
        .and_then(|t| {
            let mut out = Capped(Vec::new());
            t.render_captured_to(ctx, &mut out).map(|_| out.0)
        });
    let reads = reads.lock().map(|r| r.clone()).unwrap_or_default();
    let outcome = match result {
        Ok(bytes) if reads.env_denied.is_empty() => match String::from_utf8(bytes) {
            Ok(s) => Outcome::Rendered(s),
            Err(_) => Outcome::Failed(TemplateError {
                reason: "render",
                file: name,
                line: None,
                column: None,
                message: "the output is not UTF-8".to_string(),
            }),
        },
        Ok(_) => Outcome::Failed(env_error(spec, &reads, None)),
        Err(e) => {
            let missing = reads.missing();
            if !missing.is_empty()
                && reads.env_denied.is_empty()
                && reads.data_error.is_none()
                && reads.bad_name.is_none()
            {
                Outcome::Waiting(missing)
            } else {
                Outcome::Failed(error(spec, &e, &reads))
            }
        }
    };
    (outcome, reads)
}

fn data_error(reads: &Mutex<Reads>, e: String) -> Error {
    if let Ok(mut r) = reads.lock() {
        r.data_error = Some(e.clone());
    }
    Error::new(ErrorKind::InvalidOperation, e)
}

fn doc_fn(
    data: &dyn Data,
    reads: &Mutex<Reads>,
    name: &str,
    default: Option<JValue>,
) -> Result<JValue, Error> {
    if !lichen_crdt::valid_doc_name(name) || name == lichen_crdt::MEMBERSHIP_DOC {
        if let Ok(mut r) = reads.lock() {
            r.bad_name = Some(name.to_string());
        }
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("doc(\"{name}\"): not a valid document name (segments of letters, digits, `-`, `_`, `.` separated by `/`; the membership is members())"),
        ));
    }
    let got = data.doc(name).map_err(|e| data_error(reads, e))?;
    if let Ok(mut r) = reads.lock() {
        r.docs
            .insert(name.to_string(), got.as_ref().map(|(_, h)| h.clone()));
    }
    Ok(match got {
        Some((v, _)) => JValue::from_serialize(v),
        None => default.unwrap_or(JValue::UNDEFINED),
    })
}

fn docs_fn(data: &dyn Data, reads: &Mutex<Reads>, prefix: &str) -> Result<JValue, Error> {
    let names = data.list().map_err(|e| data_error(reads, e))?;
    let mut out = BTreeMap::new();
    for n in names.into_iter().filter(|n| n.starts_with(prefix)) {
        if let Some((v, heads)) = data.doc(&n).map_err(|e| data_error(reads, e))? {
            if let Ok(mut r) = reads.lock() {
                r.docs.insert(n.clone(), Some(heads));
            }
            out.insert(n, v);
        }
    }
    if let Ok(mut r) = reads.lock() {
        r.prefixes.insert(prefix.to_string());
    }
    Ok(JValue::from_serialize(out))
}

/// An output writer that refuses more than [`MAX_OUTPUT`] bytes.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other("output too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn env_error(spec: &TemplateSpec, reads: &Reads, at: Option<&Error>) -> TemplateError {
    let names: Vec<&str> = reads.env_denied.iter().map(String::as_str).collect();
    let (line, column) = at.map(|e| position(spec, e)).unwrap_or((None, None));
    TemplateError {
        reason: "env",
        file: name_of(spec),
        line,
        column,
        message: format!(
            "env.{} is not in this binding's `env` allow-list (add it to `env = [...]` in the [[bind]] table)",
            names.join(", env.")
        ),
    }
}

/// Line and column (1-based, in characters) of an error.
fn position(spec: &TemplateSpec, e: &Error) -> (Option<usize>, Option<usize>) {
    let line = e.line();
    let column = e.range().and_then(|r| {
        let before = spec.source.get(..r.start)?;
        let start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        Some(before[start..].chars().count() + 1)
    });
    (line, column)
}

fn error(spec: &TemplateSpec, e: &Error, reads: &Reads) -> TemplateError {
    if !reads.env_denied.is_empty() {
        return env_error(spec, reads, Some(e));
    }
    let (line, column) = position(spec, e);
    let detail = e.detail().unwrap_or("");
    let reason = if reads.data_error.is_some() {
        "data"
    } else if reads.bad_name.is_some() {
        "doc_name"
    } else {
        match e.kind() {
            ErrorKind::SyntaxError => "syntax",
            ErrorKind::UndefinedError => "undefined",
            ErrorKind::OutOfFuel => "fuel",
            ErrorKind::WriteFailure => "too_large",
            _ if detail.contains("recursion") => "recursion",
            _ => "render",
        }
    };
    let message = match reason {
        "fuel" => format!(
            "the template ran out of fuel ({FUEL} instructions): a loop that does not end, or far too much work"
        ),
        "too_large" => format!(
            "the output is larger than {} MiB",
            MAX_OUTPUT >> 20
        ),
        "undefined" => format!(
            "{}: a value the template uses is undefined (give it a default: `x | default(...)`, or test it: `{{% if x is defined %}}`)",
            kind_and_detail(e)
        ),
        "data" => format!(
            "cannot read data from the agent: {}",
            reads.data_error.as_deref().unwrap_or("")
        ),
        _ => kind_and_detail(e),
    };
    TemplateError {
        reason,
        file: name_of(spec),
        line,
        column,
        message,
    }
}

fn kind_and_detail(e: &Error) -> String {
    match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake(BTreeMap<String, Value>);

    impl Data for Fake {
        fn doc(&self, name: &str) -> Result<Option<(Value, String)>, String> {
            Ok(self.0.get(name).map(|v| (v.clone(), format!("h-{name}"))))
        }
        fn list(&self) -> Result<Vec<String>, String> {
            Ok(self.0.keys().cloned().collect())
        }
        fn members(&self) -> Result<(Value, String), String> {
            Ok((
                json!([
                    {"id": "aa", "name": "n1", "role": "admin", "addrs": ["10.0.0.1:7000"], "scopes": []},
                    {"id": "bb", "name": "n2", "role": "removed", "addrs": [], "scopes": []}
                ]),
                "mh".to_string(),
            ))
        }
    }

    fn spec(src: &str, env: &[&str]) -> TemplateSpec {
        TemplateSpec {
            path: "/t/x.tmpl".into(),
            source: src.to_string(),
            env: env.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn go(src: &str) -> (Outcome, Reads) {
        let data = Fake(BTreeMap::from([
            (
                "app/nginx".to_string(),
                json!({"upstreams": ["a:1", "b:2"], "port": 80}),
            ),
            ("region/eu/one".to_string(), json!({"x": 1})),
            ("region/eu/two".to_string(), json!({"x": 2})),
        ]));
        let node = NodeInfo {
            id: "abcd".into(),
            name: "me".into(),
        };
        render(&spec(src, &["LICHEN_TEST_OK"]), None, Arc::new(data), &node)
    }

    fn text(src: &str) -> String {
        match go(src).0 {
            Outcome::Rendered(s) => s,
            o => panic!("{o:?}"),
        }
    }

    fn failed(src: &str) -> TemplateError {
        match go(src).0 {
            Outcome::Failed(e) => e,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn reads_documents_members_node_and_filters() {
        assert_eq!(
            text("{% for u in doc(\"app/nginx\").upstreams %}server {{ u }};\n{% endfor %}"),
            "server a:1;\nserver b:2;\n"
        );
        assert_eq!(
            text("{{ docs(\"region/eu/\") | keys | join(\",\") }}"),
            "region/eu/one,region/eu/two"
        );
        assert_eq!(
            text("{% for m in members() %}{{ m.name }} {{ m.addrs | join(\" \") }}{% endfor %}"),
            "n1 10.0.0.1:7000"
        );
        assert_eq!(text("{{ node.name }}/{{ node.id }}\n"), "me/abcd\n");
        let root = Fake(BTreeMap::from([("a".to_string(), json!({"port": 80}))]));
        let node = NodeInfo {
            id: "i".into(),
            name: "n".into(),
        };
        let (o, r) = render(&spec("{{ port }}", &[]), Some("a"), Arc::new(root), &node);
        assert_eq!(o, Outcome::Rendered("80".into()));
        assert!(r.wants("a"));
        assert_eq!(text("{{ \"hi\" | base64 }}"), "aGk=");
        assert_eq!(
            text("{{ \"abc\" | base64 }}{{ \"a\" | base64 }}"),
            "YWJjYQ=="
        );
        assert_eq!(
            text("{{ doc(\"app/nginx\") | totoml }}"),
            "port = 80\nupstreams = [\"a:1\", \"b:2\"]\n"
        );
        assert_eq!(text("{{ {\"a\": [1]} | toyaml }}"), "a:\n- 1\n");
        assert_eq!(text("{{ {\"a\": 1} | tojson }}"), "{\"a\":1}");
        assert_eq!(
            text("{{ \"B,a\" | lower | split(\",\") | sort | join(\"-\") | upper | replace(\"-\", \"+\") }}"),
            "A+B"
        );
        let (_, reads) = go(
            "{{ doc(\"app/nginx\").port }}{{ docs(\"region/\") | length }}{{ members() | length }}",
        );
        assert!(reads.wants("app/nginx"));
        assert!(reads.wants("region/new"));
        assert!(reads.wants(lichen_crdt::MEMBERSHIP_DOC));
        assert!(!reads.wants("app/other"));
        assert_eq!(reads.docs["app/nginx"].as_deref(), Some("h-app/nginx"));
    }

    #[test]
    fn a_missing_document_waits_unless_defaulted() {
        assert_eq!(
            go("{{ doc(\"app/missing\").port }}").0,
            Outcome::Waiting(vec!["app/missing".to_string()])
        );
        assert_eq!(
            text("{{ (doc(\"app/missing\") | default({})).port | default(8080) }}"),
            "8080"
        );
        assert_eq!(text("{{ doc(\"app/missing\", {\"port\": 1}).port }}"), "1");
        assert_eq!(text("{% if doc(\"app/missing\") %}x{% endif %}."), ".");
    }

    #[test]
    fn errors_name_file_line_column_and_reason() {
        let e = check(&spec("line one\n  {% for x in %}\n", &[])).unwrap_err();
        assert_eq!(e.reason, "syntax");
        assert_eq!((e.line, e.file.as_str()), (Some(2), "/t/x.tmpl"));
        assert!(e.column.is_some(), "{e}");
        assert!(e.to_string().starts_with("/t/x.tmpl:2:"), "{e}");
        let e = failed("a\n{{ doc(\"app/nginx\").nope.deeper }}");
        assert_eq!((e.reason, e.line), ("undefined", Some(2)));
        let e = failed(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert_eq!(e.reason, "fuel");
        let e = failed("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert_eq!(e.reason, "recursion", "{e}");
        let e = failed("{% for i in range(100) %}{{ \"x\" * 100000 }}{% endfor %}");
        assert_eq!(e.reason, "too_large");
        let e = failed("{{ doc(\"Bad Name!\") }}");
        assert_eq!(e.reason, "doc_name");
        assert!(e.message.contains("Bad Name!"), "{e}");
        let e = failed("x\n  {{ env.HOME }}");
        assert_eq!((e.reason, e.line), ("env", Some(2)));
        assert!(e.message.contains("env.HOME"), "{e}");
        let e = failed("{{ env.HOME | default(\"\") }}");
        assert_eq!(e.reason, "env");
        std::env::set_var("LICHEN_TEST_OK", "yes");
        assert_eq!(text("{{ env.LICHEN_TEST_OK }}"), "yes");
    }
}
