//! A document as environment variables: the naming rule of `lichen exec`.
//!
//! The value at the watched path must be an object. Each leaf becomes one variable:
//!
//! * the name is the prefix, then the path's keys joined by `_`, each key upper-cased with
//!   every character that is not an ASCII letter or digit replaced by `_` (`limits.rate` with
//!   prefix `APP_` → `APP_LIMITS_RATE`; `log-level` → `LOG_LEVEL`; an empty key → `_`);
//! * nested objects are walked (an empty object makes no variable);
//! * strings are passed as they are, numbers and booleans as their JSON text (`4`, `2.5`,
//!   `true`), `null` as the empty string, and arrays as JSON (`["a","b"]`): a variable holds
//!   one string, and JSON is what a program can parse back without ambiguity.
//!
//! Two paths that map to one name (`a.b` and `a_b`) are refused with both paths named, as is
//! a string holding a NUL byte (no environment can carry it) and an environment over
//! [`MAX_ENV_BYTES`] (the kernel refuses an `execve` past its argument limit).

use std::collections::BTreeMap;

use serde_json::Value;

/// Largest environment (names, values, `=` and NUL) a document may become.
pub(super) const MAX_ENV_BYTES: usize = 512 * 1024;

/// Why a document cannot become an environment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum EnvError {
    /// The watched value is not an object.
    #[error("the value at the watched path is {0}, not an object: point --path at an object")]
    NotAnObject(&'static str),
    /// Two paths map to one variable name.
    #[error("`{first}` and `{second}` both become {name}: rename one of the keys")]
    Collision {
        name: String,
        first: String,
        second: String,
    },
    /// A string value holds a NUL byte.
    #[error("the value at `{0}` holds a NUL byte, which no environment variable can carry")]
    Nul(String),
    /// The environment would be too large.
    #[error("the document makes {0} bytes of environment, over the {MAX_ENV_BYTES}-byte limit")]
    TooLarge(usize),
}

/// The variables for `value` (which must be an object), by name.
pub(super) fn flatten(value: &Value, prefix: &str) -> Result<BTreeMap<String, String>, EnvError> {
    let Value::Object(map) = value else {
        return Err(EnvError::NotAnObject(kind(value)));
    };
    let mut out = BTreeMap::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    let mut size = 0usize;
    walk(map, prefix, "", &mut out, &mut origin, &mut size)?;
    Ok(out)
}

fn walk(
    map: &serde_json::Map<String, Value>,
    name: &str,
    path: &str,
    out: &mut BTreeMap<String, String>,
    origin: &mut BTreeMap<String, String>,
    size: &mut usize,
) -> Result<(), EnvError> {
    for (key, value) in map {
        let var = format!("{name}{}", escape(key));
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let text = match value {
            Value::Object(inner) => {
                walk(inner, &format!("{var}_"), &here, out, origin, size)?;
                continue;
            }
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if text.contains('\0') {
            return Err(EnvError::Nul(here));
        }
        if let Some(first) = origin.get(&var) {
            return Err(EnvError::Collision {
                name: var,
                first: first.clone(),
                second: here,
            });
        }
        *size += var.len() + text.len() + 2;
        if *size > MAX_ENV_BYTES {
            return Err(EnvError::TooLarge(*size));
        }
        origin.insert(var.clone(), here);
        out.insert(var, text);
    }
    Ok(())
}

/// A key as part of a variable name.
fn escape(key: &str) -> String {
    if key.is_empty() {
        return "_".into();
    }
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "absent (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value, prefix: &str) -> Vec<(String, String)> {
        flatten(&v, prefix).unwrap().into_iter().collect()
    }

    #[test]
    fn nested_keys_join_with_underscores_under_the_prefix() {
        let v = json!({"limits": {"rate": 5, "burst": 2.5}, "name": "web", "on": true});
        assert_eq!(
            vars(v, "APP_"),
            [
                ("APP_LIMITS_BURST".into(), "2.5".into()),
                ("APP_LIMITS_RATE".into(), "5".into()),
                ("APP_NAME".into(), "web".into()),
                ("APP_ON".into(), "true".into()),
            ]
        );
    }

    #[test]
    fn other_characters_become_underscores_and_arrays_become_json() {
        let v = json!({"log-level": "debug", "hosts": ["a", "b"], "x": null, "": 1, "empty": {}});
        assert_eq!(
            vars(v, ""),
            [
                ("HOSTS".into(), r#"["a","b"]"#.into()),
                ("LOG_LEVEL".into(), "debug".into()),
                ("X".into(), "".into()),
                ("_".into(), "1".into()),
            ]
        );
    }

    #[test]
    fn two_paths_with_one_name_are_refused_with_both_named() {
        let e = flatten(&json!({"a": {"b": 1}, "a_b": 2}), "P_").unwrap_err();
        assert_eq!(
            e,
            EnvError::Collision {
                name: "P_A_B".into(),
                first: "a.b".into(),
                second: "a_b".into(),
            }
        );
    }

    #[test]
    fn what_no_environment_can_hold_is_refused() {
        assert_eq!(
            flatten(&json!(4), ""),
            Err(EnvError::NotAnObject("a number"))
        );
        assert_eq!(
            flatten(&json!({"s": {"t": "a\u{0}b"}}), ""),
            Err(EnvError::Nul("s.t".into()))
        );
        let big = "x".repeat(MAX_ENV_BYTES);
        assert!(matches!(
            flatten(&json!({ "big": big }), ""),
            Err(EnvError::TooLarge(_))
        ));
    }
}
