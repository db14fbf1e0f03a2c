//! File formats: bytes ⇄ JSON values, for JSON, TOML and YAML.
//!
//! Why it exists: documents are JSON inside Lichen, files are whatever the application reads.
//! This module is the only place that knows the three syntaxes, in both directions:
//!
//! * [`serialize`] (document → file) is deterministic: map keys are emitted in sorted order
//!   (the value is rebuilt in sorted order first, whatever map type serde_json uses), JSON is
//!   pretty-printed with two spaces, every file ends with a newline. The same document gives
//!   the same bytes on every node, so "did the content change" is a byte comparison.
//! * [`parse`] (file → document) never panics on content and reports where a syntax error
//!   is (1-based line and column when the parser gives them). TOML date-times become strings;
//!   values a format cannot hold (TOML has no `null`, and needs a table at the top) are
//!   refused when serializing with the path of the offending value.

use serde_json::{Map, Number, Value};

use super::binding::Format;

/// Why content was refused. `reason` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParseError {
    /// `syntax`, `encoding`, `empty`, `root` or `too_large`.
    pub reason: &'static str,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl ParseError {
    pub(super) fn new(reason: &'static str, message: impl Into<String>) -> ParseError {
        ParseError {
            reason,
            message: message.into(),
            line: None,
            column: None,
        }
    }

    fn at(mut self, line: usize, column: usize) -> ParseError {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// Parse file content. Empty (or whitespace-only) content is refused: a truncated file is
/// far more often a save in progress than an intent to empty the configuration.
pub(super) fn parse(format: Format, bytes: &[u8]) -> Result<Value, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(bytes, e.valid_up_to());
        ParseError::new("encoding", format!("not UTF-8 text ({e})")).at(line, column)
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(ParseError::new("empty", "the file is empty"));
    }
    let value = match format {
        // Template output is never parsed back (template bindings are one-way).
        Format::Text => return Ok(Value::String(text.to_string())),
        Format::Json => serde_json::from_str::<Value>(text).map_err(|e| {
            ParseError::new("syntax", format!("invalid JSON: {e}")).at(e.line(), e.column())
        })?,
        Format::Toml => {
            let table = toml::from_str::<toml::Table>(text).map_err(|e| {
                let err = ParseError::new(
                    "syntax",
                    format!("invalid TOML: {}", e.message().trim_end()),
                );
                match e.span() {
                    Some(s) => {
                        let (l, c) = line_col(text.as_bytes(), s.start);
                        err.at(l, c)
                    }
                    None => err,
                }
            })?;
            toml_to_json(toml::Value::Table(table))
        }
        Format::Yaml => serde_norway::from_str::<Value>(text).map_err(|e| {
            let err = ParseError::new("syntax", format!("invalid YAML: {e}"));
            match e.location() {
                Some(l) => err.at(l.line(), l.column()),
                None => err,
            }
        })?,
    };
    Ok(sorted(value))
}

/// Serialize a value for a file. The error names what the format cannot hold.
pub(super) fn serialize(format: Format, value: &Value) -> Result<Vec<u8>, String> {
    let value = sorted(value.clone());
    let mut out = match (format, &value) {
        // A template's output, written exactly as rendered.
        (Format::Text, Value::String(s)) => return Ok(s.clone().into_bytes()),
        (Format::Text, _) => return Err("a template binding renders text".to_string()),
        (Format::Json, _) => serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?,
        (Format::Toml, _) => {
            let toml::Value::Table(t) = json_to_toml(&value, &mut String::new())? else {
                return Err(
                    "TOML needs a table at the top: bind a map, or use json or yaml".to_string(),
                );
            };
            toml::to_string(&t).map_err(|e| format!("cannot write TOML: {e}"))?
        }
        (Format::Yaml, _) => {
            serde_norway::to_string(&value).map_err(|e| format!("cannot write YAML: {e}"))?
        }
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// The same value with every map rebuilt in sorted key order.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sorted(v)))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|p| p + 1)
        .unwrap_or(0);
    let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, column)
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        // TOML allows nan and inf; JSON has no such numbers.
        toml::Value::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// `path` is the dotted path of `v`, for the error message.
fn json_to_toml(v: &Value, path: &mut String) -> Result<toml::Value, String> {
    Ok(match v {
        Value::Null => {
            return Err(format!(
                "TOML has no null, found one at `{}`: remove it or use json or yaml",
                if path.is_empty() { "(top)" } else { path }
            ))
        }
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => return Err(format!("TOML cannot hold the number {n} at `{path}`")),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(json_to_toml(x, path)?);
                path.truncate(len);
            }
            toml::Value::Array(out)
        }
        Value::Object(m) => {
            let mut t = toml::Table::new();
            for (k, x) in m {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                t.insert(k.clone(), json_to_toml(x, path)?);
                path.truncate(len);
            }
            toml::Value::Table(t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"zeta": 1, "alpha": {"b": [1, 2.5, "x"], "a": true}, "name": "web"})
    }

    #[test]
    fn every_format_round_trips_deterministically() {
        for f in [Format::Json, Format::Toml, Format::Yaml] {
            let bytes = serialize(f, &doc()).unwrap();
            assert_eq!(bytes, serialize(f, &doc()).unwrap());
            assert!(bytes.ends_with(b"\n"));
            assert_eq!(parse(f, &bytes).unwrap(), doc(), "{}", f.name());
            let text = String::from_utf8(bytes).unwrap();
            let (a, n, z) = (
                text.find("alpha").unwrap(),
                text.find("name").unwrap(),
                text.find("zeta").unwrap(),
            );
            if f != Format::Toml {
                assert!(a < n && n < z, "{text}");
            }
        }
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse(Format::Json, b"{\n  \"a\": 1,\n  \"b\": \n}").unwrap_err();
        assert_eq!((e.reason, e.line), ("syntax", Some(4)));
        let e = parse(Format::Toml, b"a = 1\nb = = 2\n").unwrap_err();
        assert_eq!((e.reason, e.line), ("syntax", Some(2)));
        let e = parse(Format::Yaml, b"a: 1\nb: [1, 2\n").unwrap_err();
        assert_eq!(e.reason, "syntax");
        assert!(e.line.is_some(), "{e}");
        assert_eq!(parse(Format::Json, b"  \n").unwrap_err().reason, "empty");
        assert_eq!(
            parse(Format::Json, b"\xff\xfe").unwrap_err().reason,
            "encoding"
        );
    }

    #[test]
    fn what_a_format_cannot_hold_is_refused() {
        let e = serialize(Format::Toml, &json!({"a": {"b": null}})).unwrap_err();
        assert!(e.contains("a.b"), "{e}");
        assert!(serialize(Format::Toml, &json!([1, 2])).is_err());
        assert_eq!(
            serialize(Format::Json, &json!([1])).unwrap(),
            b"[\n  1\n]\n"
        );
        assert_eq!(
            parse(Format::Toml, b"when = 1979-05-27T07:32:00Z\n").unwrap(),
            json!({"when": "1979-05-27T07:32:00Z"})
        );
    }
}
