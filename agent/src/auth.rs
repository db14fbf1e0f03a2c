//! Who may use the local API: the token files, the `Host` check and the guard in front of
//! every route.
//!
//! Why it exists: the API writes configuration and, on an admin node, membership, signed with
//! this node's key. Loopback alone lets every user and process on the machine do that, and a
//! web page reach it by DNS rebinding (its own name resolving to 127.0.0.1). So:
//!
//! * over TCP every request but `GET /v1/health` carries `Authorization: Bearer <token>`, the
//!   token being the content of `data_dir/api.token` (created at the first start or `lichen
//!   init`, 256 random bits in hex, mode 0600). An optional read-only token
//!   (`api_read_token_file`) may only `GET`, and never a [`privileged`] route (a backup holds
//!   every document, whatever the method); `/metrics` takes either token, or none with
//!   `api_metrics_open = true`;
//! * every TCP request whose `Host` is not a loopback name or address is refused (403) before
//!   the token is looked at: a browser that was led to 127.0.0.1 by a foreign name sends
//!   that name;
//! * the unix socket `data_dir/api.sock` (mode 0660, group `api_socket_group`) needs no
//!   token: the file's permissions decide who connects.
//!
//! A refusal says where the token file is and how the CLI finds it, and nothing about the
//! node (no id, no version). Tokens are compared in constant time. Each refusal is counted in
//! `lichen_api_refused_total{reason}`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;

/// The token file's name in the data directory.
pub(crate) const TOKEN_FILE: &str = "api.token";
/// The unix socket's name in the data directory.
pub(crate) const SOCKET_FILE: &str = "api.sock";

/// `data_dir/api.token`.
pub(crate) fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// `data_dir/api.sock`.
pub(crate) fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Read a token file: its first line, trimmed; at least 16 characters, no spaces.
pub(crate) fn read_token(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the API token {}", path.display()))?;
    if meta.len() > 4096 {
        bail!("the API token file {} is larger than 4 KiB", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API token {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "the API token file {} must hold one token of at least 16 characters without spaces (delete it to have a new one generated at the next start)",
            path.display()
        );
    }
    Ok(token)
}

/// Load the token at `path`, or create it (256 random bits as hex, mode 0600) if it does not
/// exist. Returns the token and whether it was created. A token file that others may read is
/// reported (the agent still starts with it).
pub(crate) fn ensure_token(path: &Path) -> Result<(String, bool)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            let seed = crate::daemon::random_seed()?;
            let token: String = seed.iter().map(|b| format!("{b:02x}")).collect();
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write the API token {}", path.display()))?;
            Ok((token, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let token = read_token(path)?;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", m.permissions().mode() & 0o777),
                        "the API token file can be read by other users; `chmod 600` it"
                    );
                }
            }
            Ok((token, false))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create the API token {}", path.display())),
    }
}

/// The tokens the TCP listener accepts.
#[derive(Debug)]
pub(crate) struct Tokens {
    /// Full access.
    pub(crate) write: String,
    /// `GET` only (`api_read_token_file`).
    pub(crate) read: Option<String>,
    /// `/metrics` without a token (`api_metrics_open`).
    pub(crate) metrics_open: bool,
    /// Where the full token is (named in a 401).
    pub(crate) token_path: PathBuf,
    /// Where the unix socket is (named in a 401).
    pub(crate) socket_path: PathBuf,
}

/// How a listener's requests are let in.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// TCP: loopback `Host` and a token.
    Tokens(Arc<Tokens>),
    /// The unix socket: the file's permissions were the check.
    Socket,
}

/// Whether `host` (a `Host` header: name or address, optional port) names this machine's
/// loopback: `localhost` (or a name under `.localhost`), 127.0.0.0/8 or `[::1]`.
pub(crate) fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, after)) if after.is_empty() || after.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Equal in constant time (for equal lengths; the length of a token is not a secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Why a request was refused (the `reason` label of `lichen_api_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    ForeignHost,
    NoToken,
    WrongToken,
    ReadOnly,
    /// The read-only token on a [`privileged`] route.
    Privileged,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::ForeignHost => "foreign_host",
            Refusal::NoToken => "no_token",
            Refusal::WrongToken => "wrong_token",
            Refusal::ReadOnly | Refusal::Privileged => "read_only",
        }
    }
}

/// Routes only the full token (or the socket) may use, whatever the method: `/v1/backup`
/// hands out the whole store, more than a read-only token may read one route at a time
/// (a later `GET` variant of it must not open it to that token); `/v1/audit/{doc}` makes this
/// node sign a bundle with its key, which a monitoring token must not be able to make it do.
pub(crate) fn privileged(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    p == "/v1/backup" || p == "/v1/audit" || p.starts_with("/v1/audit/")
}

/// The decision for one TCP request: `None` lets it in.
fn check(
    t: &Tokens,
    method: &Method,
    path: &str,
    host: Option<&str>,
    auth: Option<&str>,
) -> Option<Refusal> {
    // A request without `Host` does not come from a browser (every browser sends it).
    if host.is_some_and(|h| !loopback_host(h)) {
        return Some(Refusal::ForeignHost);
    }
    if path == "/v1/health" && method == Method::GET {
        return None;
    }
    if path == "/metrics" && t.metrics_open {
        return None;
    }
    let Some(auth) = auth else {
        return Some(Refusal::NoToken);
    };
    let given = match auth.split_once(' ') {
        Some((scheme, tok)) if scheme.eq_ignore_ascii_case("bearer") => tok.trim(),
        _ => return Some(Refusal::NoToken),
    };
    if ct_eq(given.as_bytes(), t.write.as_bytes()) {
        return None;
    }
    if t.read
        .as_deref()
        .is_some_and(|r| ct_eq(given.as_bytes(), r.as_bytes()))
    {
        return if privileged(path) {
            Some(Refusal::Privileged)
        } else if method == Method::GET || method == Method::HEAD {
            None
        } else {
            Some(Refusal::ReadOnly)
        };
    }
    Some(Refusal::WrongToken)
}

/// The refusal's answer: what is wrong and where the token is; nothing about the node.
fn refusal_error(t: &Tokens, r: Refusal) -> ApiError {
    let token = t.token_path.display();
    let socket = t.socket_path.display();
    match r {
        Refusal::ForeignHost => ApiError::new(
            ErrorKind::Denied,
            "the Host header does not name this machine's loopback (localhost, 127.0.0.1 or [::1]); the API answers local clients only",
        ),
        Refusal::ReadOnly => ApiError::new(
            ErrorKind::Denied,
            format!(
                "this token is read-only (GET only); writes need the token in {token} or the unix socket {socket}"
            ),
        ),
        Refusal::Privileged => ApiError::new(
            ErrorKind::Denied,
            format!(
                "this token is read-only, and this route hands out every document (a backup) or makes the node sign (an audit bundle): it needs the token in {token} or the unix socket {socket}"
            ),
        ),
        Refusal::NoToken | Refusal::WrongToken => ApiError::new(
            ErrorKind::Unauthorized,
            format!(
                "{} API token: send `Authorization: Bearer <token>` with the token in {token}, or use the unix socket {socket}. The lichen CLI reads {} from the data directory (--data-dir, LICHEN_DATA_DIR, or data_dir in --config), else the token in LICHEN_TOKEN or the file given with --token-file",
                if r == Refusal::NoToken { "missing" } else { "wrong" },
                TOKEN_FILE
            ),
        ),
    }
}

/// Middleware in front of every route of a listener: let the request in or refuse it (before
/// its body is read; the connection is then closed).
pub(crate) async fn guard(
    State((access, metrics)): State<(Access, Arc<Metrics>)>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Access::Tokens(t) = &access else {
        return next.run(req).await;
    };
    let verdict = {
        let header = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("\u{0}"))
        };
        check(
            t,
            req.method(),
            req.uri().path(),
            header(header::HOST),
            header(header::AUTHORIZATION),
        )
    };
    let Some(refusal) = verdict else {
        return next.run(req).await;
    };
    metrics.inc_labelled("lichen_api_refused_total", refusal.label(), 1);
    let e = refusal_error(t, refusal);
    let unauthorized = e.kind == ErrorKind::Unauthorized;
    let mut resp = e.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if unauthorized {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"lichen\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            write: "w".repeat(64),
            read: Some("r".repeat(64)),
            metrics_open: false,
            token_path: "/d/api.token".into(),
            socket_path: "/d/api.sock".into(),
        }
    }

    #[test]
    fn loopback_hosts_and_others() {
        for h in [
            "localhost",
            "LOCALHOST:7421",
            "localhost.",
            "a.localhost:1",
            "127.0.0.1",
            "127.0.0.1:7421",
            "127.9.8.7:1",
            "[::1]",
            "[::1]:7421",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:7421",
            "localhost.evil.example",
            "10.0.0.1:7421",
            "[::2]:1",
            "[::1]x",
            "127.0.0.1:port",
            "",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn the_guard_decides_by_host_then_token_then_method() {
        let t = tokens();
        let (w, r) = (
            format!("Bearer {}", t.write),
            format!("bearer {}", t.read.clone().unwrap()),
        );
        let host = Some("127.0.0.1:7421");
        assert_eq!(check(&t, &Method::GET, "/v1/health", host, None), None);
        assert_eq!(
            check(&t, &Method::GET, "/v1/health", Some("evil.example"), None),
            Some(Refusal::ForeignHost)
        );
        assert_eq!(
            check(
                &t,
                &Method::GET,
                "/v1/status",
                Some("evil.example"),
                Some(&w)
            ),
            Some(Refusal::ForeignHost)
        );
        assert_eq!(
            check(&t, &Method::GET, "/v1/status", host, None),
            Some(Refusal::NoToken)
        );
        assert_eq!(
            check(&t, &Method::GET, "/v1/status", host, Some("Bearer nope")),
            Some(Refusal::WrongToken)
        );
        assert_eq!(
            check(&t, &Method::PUT, "/v1/docs/a/b", host, Some(&w)),
            None
        );
        assert_eq!(
            check(&t, &Method::GET, "/v1/docs/a/b", host, Some(&r)),
            None
        );
        assert_eq!(
            check(&t, &Method::PUT, "/v1/docs/a/b", host, Some(&r)),
            Some(Refusal::ReadOnly)
        );
        assert_eq!(
            check(&t, &Method::POST, "/v1/backup", host, Some(&r)),
            Some(Refusal::Privileged)
        );
        assert_eq!(
            check(&t, &Method::GET, "/v1/backup", host, Some(&r)),
            Some(Refusal::Privileged)
        );
        assert_eq!(check(&t, &Method::POST, "/v1/backup", host, Some(&w)), None);
        assert_eq!(
            check(&t, &Method::GET, "/v1/audit/app%2Fweb", host, Some(&r)),
            Some(Refusal::Privileged)
        );
        assert_eq!(
            check(&t, &Method::GET, "/v1/audit/app%2Fweb", host, Some(&w)),
            None
        );
        assert_eq!(check(&t, &Method::GET, "/metrics", host, Some(&r)), None);
        assert_eq!(
            check(&t, &Method::GET, "/metrics", host, None),
            Some(Refusal::NoToken)
        );
        let open = Tokens {
            metrics_open: true,
            ..tokens()
        };
        assert_eq!(check(&open, &Method::GET, "/metrics", host, None), None);
    }
}
