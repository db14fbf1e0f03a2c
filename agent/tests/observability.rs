//! What operators' tools read from a real agent: `/metrics` passes a strict parser of the
//! Prometheus text format (and `promtool check metrics` where it is installed), labelled
//! error counters exist at zero before the first error, JSON logs are JSON on every line,
//! text logs written to a file carry no colour codes, and `members ls` shows scopes.
//!
//! Agents use loopback addresses 127.0.0.124 and up.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// A metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (no `:` for labels).
fn valid_name(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut chars = s.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}")),
    }
}

/// `{a="x",b="y"}` → pairs; the escapes allowed in a label value are `\\`, `\"` and `\n`.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            return Ok(out);
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("label without `=` in {s:?}"))?;
        if !valid_name(name, false) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = after.chars();
        if chars.next() != Some('"') {
            return Err(format!("label value of {name} is not quoted"));
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape \\{other:?} in label {name}")),
                },
                '"' => {
                    closed = true;
                    break;
                }
                '\n' => return Err(format!("raw newline in label {name}")),
                c => value.push(c),
            }
        }
        if !closed {
            return Err(format!("unterminated value of label {name}"));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} twice"));
        }
        out.push((name.to_string(), value));
        rest = chars.as_str();
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None if rest.trim().is_empty() => return Ok(out),
            None => return Err(format!("junk after label {name}: {rest:?}")),
        }
    }
}

/// A strict reading of the Prometheus text exposition format (0.0.4): every family has
/// one HELP and one TYPE before its samples, samples of a family are contiguous, names and
/// labels are well-formed, values parse, no series twice, counters end in `_total`,
/// histogram buckets carry `le`, are cumulative and end at `+Inf` = `_count`. Returns the
/// number of samples.
fn check_exposition(text: &str) -> Result<usize, String> {
    let mut help: HashSet<String> = HashSet::new();
    let mut kind: HashMap<String, String> = HashMap::new();
    let mut sampled: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<String> = HashSet::new();
    let mut buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    let mut samples = 0;
    if !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_name(name, true) || h.trim().is_empty() {
                return Err(at("bad HELP".into()));
            }
            if sampled.contains(name) || !help.insert(name.to_string()) {
                return Err(at(format!("HELP for {name} twice or after its samples")));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, k) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&k) {
                return Err(at(format!("unknown type {k}")));
            }
            if k == "counter" && !name.ends_with("_total") {
                return Err(at(format!("counter {name} does not end in _total")));
            }
            if sampled.contains(name) || kind.insert(name.to_string(), k.to_string()).is_some() {
                return Err(at(format!("TYPE for {name} twice or after its samples")));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find(['{', ' ']) {
            Some(p) if line[p..].starts_with('{') => {
                let close = line.rfind('}').ok_or_else(|| at("no `}`".into()))?;
                (
                    &line[..p],
                    parse_labels(&line[p + 1..close]).map_err(at)?,
                    &line[close + 1..],
                )
            }
            Some(p) => (&line[..p], Vec::new(), &line[p..]),
            None => return Err(at("sample without a value".into())),
        };
        if !valid_name(name, true) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let mut parts = rest.split_whitespace();
        let value = parse_value(parts.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .map_err(|e| at(format!("timestamp: {e}")))?;
        }
        if parts.next().is_some() {
            return Err(at("junk after the value".into()));
        }
        let family = if kind.contains_key(name) {
            name.to_string()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    matches!(
                        kind.get(base).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                    .then(|| base.to_string())
                })
                .ok_or_else(|| at(format!("{name} has no TYPE")))?
        };
        if !help.contains(&family) {
            return Err(at(format!("{family} has no HELP")));
        }
        if current.as_deref() != Some(family.as_str()) {
            if done.contains(&family) {
                return Err(at(format!("samples of {family} are not together")));
            }
            if let Some(c) = current.take() {
                done.insert(c);
            }
            current = Some(family.clone());
        }
        sampled.insert(family.clone());
        let mut sorted = labels.clone();
        sorted.sort();
        if !series.insert(format!("{name}{sorted:?}")) {
            return Err(at("the same series twice".into()));
        }
        if kind.get(&family).map(String::as_str) == Some("histogram") {
            if name.ends_with("_bucket") {
                let le = labels
                    .iter()
                    .find(|(n, _)| n == "le")
                    .ok_or_else(|| at("bucket without le".into()))?;
                let le = parse_value(&le.1).map_err(at)?;
                buckets.entry(family.clone()).or_default().push((le, value));
            } else if name.ends_with("_count") {
                counts.insert(family.clone(), value);
            }
        }
        samples += 1;
    }
    for (f, b) in &buckets {
        if b.windows(2).any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1) {
            return Err(format!(
                "{f}: buckets not increasing or not cumulative: {b:?}"
            ));
        }
        let last = b.last().copied().unwrap_or((0.0, 0.0));
        if last.0 != f64::INFINITY || Some(&last.1) != counts.get(f) {
            return Err(format!(
                "{f}: the +Inf bucket is missing or differs from _count"
            ));
        }
    }
    for f in kind.keys() {
        if !help.contains(f) {
            return Err(format!("{f} has a TYPE and no HELP"));
        }
    }
    Ok(samples)
}

#[test]
fn the_strict_parser_refuses_what_promtool_refuses() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{reason=\"x\\\"y\"} 1\n";
    assert_eq!(check_exposition(ok), Ok(1));
    for bad in [
        "# TYPE a_total counter\na_total 1\n",  // no HELP
        "# HELP a_total A.\na_total 1\n",       // no TYPE
        "# HELP a A.\n# TYPE a counter\na 1\n", // counter name
        "# HELP a_total A.\n# TYPE a_total counter\na_total{r=x} 1\n", // unquoted
        "# HELP a_total A.\n# TYPE a_total counter\na_total one\n", // value
        "# HELP a_total A.\n# TYPE a_total counter\na_total 1\na_total 2\n", // twice
        "# HELP g G.\n# TYPE g gauge\n# HELP h H.\n# TYPE h gauge\ng 1\nh 1\ng{a=\"b\"} 1\n",
    ] {
        assert!(check_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

/// `/metrics` body of an agent.
fn metrics_body(api: &str) -> String {
    let raw = http_get(api, "/metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

fn start(ip_base: u8, config: &str) -> (tempfile::TempDir, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::new(dir.path(), "a", node_ip(ip_base, 0));
    std::fs::write(&a.config, config).unwrap();
    a.start();
    (dir, a)
}

#[test]
fn metrics_pass_a_strict_parser_and_promtool_with_error_counters_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.json");
    let (_d, a) = start(
        124,
        &format!(
            "log = \"info\"\n[[bind]]\ndoc = \"app\"\nfile = \"{}\"\nmode = \"sync\"\ndebounce_ms = 50\n",
            file.display()
        ),
    );
    assert!(a.put("app", "k", "1"));
    let text = metrics_body(&a.api);
    let n = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(n > 20, "{n} samples");
    // Error counters exist before the first error.
    for series in [
        "lichen_ingest_errors_total{reason=\"syntax\"} 0",
        "lichen_render_errors_total{reason=\"reload\"} 0",
        "lichen_changes_rejected_total{reason=\"bad_signature\"} 0",
        "lichen_store_errors_total{reason=\"disk_full\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    // After one: still valid, counted.
    wait_until("the file is rendered", PATIENCE, || file.exists());
    std::fs::write(&file, "{\"k\": ").unwrap();
    wait_until("the bad edit is counted", PATIENCE, || {
        metrics_body(&a.api).contains("lichen_ingest_errors_total{reason=\"syntax\"} 1")
    });
    let text = metrics_body(&a.api);
    check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Err(e) => eprintln!("promtool not run ({e}); install it (Debian: `apt-get install prometheus`) to check with it too"),
        Ok(mut p) => {
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn json_logs_are_json_on_every_line() {
    let (_d, mut a) = start(125, "log = \"info\"\nlog_format = \"json\"\n");
    assert!(a.put("app", "k", "1"));
    assert!(a.terminate().success());
    let log = a.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{log}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        assert!(v["level"].is_string(), "{l}");
    }
    let started = lines
        .iter()
        .find(|l| l.contains("lichen started"))
        .expect("the start-up banner is a log event");
    let v: Value = serde_json::from_str(started).unwrap();
    assert!(
        v["fields"]["api"].as_str().unwrap_or("").contains(&a.api),
        "{v}"
    );
}

#[test]
fn text_logs_in_a_file_have_no_colour_and_members_ls_shows_scopes() {
    let (_d, a) = start(126, "log = \"info\"\n");
    let id = a.ok(&[
        "keygen",
        "--out",
        &a.dir.join("other.key").display().to_string(),
    ]);
    let id = id.trim();
    a.ok(&[
        "members",
        "add",
        id,
        "--role",
        "writer",
        "--name",
        "eu-1",
        "--scope",
        "region/eu/",
    ]);
    let ls = a.ok(&["members", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.contains("eu-1"))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(line.contains("region/eu/"), "members ls shows scopes: {ls}");
    let me = ls
        .lines()
        .find(|l| l.contains("(root)"))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(me.contains("scopes all"), "an unscoped member: {me}");
    let log = a.log_text();
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escape codes in a log file:\n{log}"
    );
}
