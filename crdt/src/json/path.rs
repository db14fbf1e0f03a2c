//! Textual paths into a document (`servers[0].host`, `"a.b".c`): [`parse_path`] turns the
//! text a user or a tool gives into [`PathSeg`]s, bounded by [`MAX_PATH_BYTES`] and
//! [`MAX_PATH_SEGMENTS`], and [`format_path`] prints segments back (in error messages and
//! the store's key prefixes) so that parsing gives them back unchanged.

use super::{JsonError, PathSeg};

/// Maximum number of segments in a parsed path.
pub(super) const MAX_PATH_SEGMENTS: usize = 64;
/// Maximum length in bytes of a textual path.
pub(super) const MAX_PATH_BYTES: usize = 1024;

/// Parse a dotted path: `""` (root), `workers`, `limits.rate`,
/// `servers.0.host`, `servers[0].host`, `"a.b".c`.
///
/// Only the `[n]` syntax yields [`PathSeg::Index`]; a bare numeric segment
/// such as `0` is [`PathSeg::Key`] and is resolved as an index at run time
/// when the container is a list. Keys may be double-quoted to contain `.`,
/// `[`, `]`, or be empty; inside quotes `\"` and `\\` are the only escapes.
pub fn parse_path(s: &str) -> Result<Vec<PathSeg>, JsonError> {
    let err = |reason: &str| JsonError::InvalidPath {
        path: s.to_string(),
        reason: reason.to_string(),
    };
    if s.len() > MAX_PATH_BYTES {
        return Err(err(&format!("longer than {MAX_PATH_BYTES} bytes")));
    }
    let mut segs = Vec::new();
    if s.is_empty() {
        return Ok(segs);
    }
    let mut chars = s.chars().peekable();
    let mut first = true;
    loop {
        // One dot-separated component: an optional key (only the very first
        // component may omit it) followed by any number of `[n]` indices.
        match chars.peek().copied() {
            None | Some('.') => return Err(err("empty segment")),
            Some(']') => return Err(err("unbalanced `]`")),
            Some('[') if !first => return Err(err("empty segment before `[`")),
            Some('[') => {}
            Some('"') => {
                chars.next();
                let mut key = String::new();
                loop {
                    match chars.next() {
                        None => return Err(err("unbalanced `\"`")),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => key.push(c),
                            _ => return Err(err("invalid escape in quoted key")),
                        },
                        Some(c) => key.push(c),
                    }
                }
                segs.push(PathSeg::Key(key));
            }
            Some(_) => {
                let mut key = String::new();
                while let Some(&c) = chars.peek() {
                    match c {
                        '.' | '[' => break,
                        ']' => return Err(err("unbalanced `]`")),
                        '"' => return Err(err("`\"` inside an unquoted key")),
                        _ => {
                            key.push(c);
                            chars.next();
                        }
                    }
                }
                segs.push(PathSeg::Key(key));
            }
        }
        first = false;
        while chars.peek() == Some(&'[') {
            chars.next();
            let mut digits = String::new();
            loop {
                match chars.next() {
                    None => return Err(err("unbalanced `[`")),
                    Some(']') => break,
                    Some(c) if c.is_ascii_digit() => digits.push(c),
                    Some(_) => return Err(err("index must be a non-negative integer")),
                }
            }
            if digits.is_empty() {
                return Err(err("empty index `[]`"));
            }
            let index = digits
                .parse::<usize>()
                .map_err(|_| err("index is too large"))?;
            segs.push(PathSeg::Index(index));
        }
        if segs.len() > MAX_PATH_SEGMENTS {
            return Err(err(&format!("more than {MAX_PATH_SEGMENTS} segments")));
        }
        match chars.next() {
            None => return Ok(segs),
            Some('.') => {}
            Some(']') => return Err(err("unbalanced `]`")),
            Some(_) => return Err(err("expected `.` or `[` after a segment")),
        }
    }
}

/// Format a path so that [`parse_path`] gives it back unchanged.
pub fn format_path(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        match seg {
            PathSeg::Key(k) => {
                if i > 0 {
                    out.push('.');
                }
                let needs_quotes =
                    k.is_empty() || k.chars().any(|c| matches!(c, '.' | '[' | ']' | '"' | '\\'));
                if needs_quotes {
                    out.push('"');
                    for c in k.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                } else {
                    out.push_str(k);
                }
            }
            PathSeg::Index(n) => {
                out.push('[');
                out.push_str(&n.to_string());
                out.push(']');
            }
        }
    }
    out
}
