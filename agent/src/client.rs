//! The CLI's client for the local API: a small blocking HTTP/1.0 client over TCP or the agent's
//! unix socket, that sends the API token, builds the resource URLs and reads the typed views
//! of [`crate::views`] back. Every failure is an [`ApiError`] whose kind gives the exit code.
//!
//! Why its own HTTP: the same client must speak over a unix socket, which the HTTP library
//! used before (ureq) does not. A request is HTTP/1.0 with `Connection: close`, so the answer
//! is either `Content-Length`-delimited or ends when the agent closes (never chunked), and a
//! Server-Sent Events stream is read line by line until it ends.
//!
//! Where it connects and with what token (also in the README):
//! * `--api unix:PATH`: that socket, no token;
//! * `--api HOST:PORT` (or `LICHEN_API`): TCP with the token;
//! * neither: the data directory's `api.sock` if it exists and accepts a connection, else TCP
//!   to `api` in `--config` (default 127.0.0.1:7421) with the token.
//!
//! The token: `--token-file FILE`, else `LICHEN_TOKEN`, else the data directory's `api.token`
//! (the data directory: `--data-dir`, `LICHEN_DATA_DIR`, `data_dir` in `--config`, else the
//! default one).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use lichen_crdt::PathSeg;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorKind};
use crate::views::WatchEvent;

pub(crate) use crate::error::exit;

/// Where the agent's API is.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `host:port` over TCP.
    Tcp(String),
    /// A unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Response headers, names in lower case.
type Headers = Vec<(String, String)>;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An answer: status, headers (lower-case names) and the connection to read the body from.
struct Answer {
    status: u16,
    headers: Headers,
    body: BufReader<Box<dyn Stream>>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The whole body (at most 64 MiB; a longer or broken-off answer is an error, never a
    /// shorter body).
    fn bytes(self) -> Result<(u16, Headers, Vec<u8>), ApiError> {
        let status = self.status;
        let headers = self.headers.clone();
        let body = self.whole(64 << 20)?;
        Ok((status, headers, body))
    }

    /// The whole body, checked: exactly `Content-Length` bytes when the agent sent it, and
    /// at most `limit` bytes either way.
    fn whole(mut self, limit: u64) -> Result<Vec<u8>, ApiError> {
        let len = self
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = len.filter(|n| *n > limit) {
            return Err(ApiError::new(
                ErrorKind::TooLarge,
                format!("the agent's answer is {n} bytes, more than the {limit} this CLI takes"),
            ));
        }
        let mut out = Vec::new();
        (&mut self.body)
            .take(len.unwrap_or(limit.saturating_add(1)))
            .read_to_end(&mut out)
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::Unreachable,
                    format!(
                        "the agent's answer broke off after {} bytes: {e}",
                        out.len()
                    ),
                )
            })?;
        let got = out.len() as u64;
        match len {
            Some(n) if got != n => Err(ApiError::new(
                ErrorKind::Unreachable,
                format!("the agent's answer broke off after {got} of {n} bytes"),
            )),
            None if got > limit => Err(ApiError::new(
                ErrorKind::TooLarge,
                format!("the agent's answer is more than the {limit} bytes this CLI takes"),
            )),
            _ => Ok(out),
        }
    }
}

/// Largest answer [`Client::post_for_bytes`] takes (a backup).
pub(crate) const MAX_BYTES_ANSWER: u64 = 16 << 30;

/// Percent-encode one URL segment or query value (everything but `A-Z a-z 0-9 - . _ ~`).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/v1/docs/{doc}/{seg}…` for a document and a dotted path (`limits.rate`, `servers[0]`).
pub(crate) fn doc_url(doc: &str, path: &str) -> Result<String, ApiError> {
    let segs = lichen_crdt::parse_path(path)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("invalid path `{path}`: {e}")))?;
    let mut url = format!("/v1/docs/{}", encode(doc));
    for s in segs {
        url.push('/');
        match s {
            PathSeg::Key(k) => url.push_str(&encode(&k)),
            PathSeg::Index(i) => url.push_str(&encode(&format!("[{i}]"))),
        }
    }
    Ok(url)
}

/// `url` with a query: `(name, Some(value))` pairs and `(flag, None)` flags.
pub(crate) fn with_query(url: &str, q: &[(&str, Option<&str>)]) -> String {
    let mut out = url.to_string();
    for (i, (k, v)) in q.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(k);
        if let Some(v) = v {
            out.push('=');
            out.push_str(&encode(v));
        }
    }
    out
}

/// Client of one agent's API.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    /// Read for each request when `token` is not given (an agent that is just starting
    /// writes it; `lichen demo` follows its agents this way).
    token_file: Option<PathBuf>,
}

impl Client {
    /// A client of `endpoint`, sending `token` over TCP.
    pub(crate) fn new(endpoint: Endpoint, token: Option<String>) -> Client {
        Client {
            endpoint,
            token,
            token_file: None,
        }
    }

    /// A client of `endpoint` that reads its token from `file` for each request.
    pub(crate) fn with_token_file(endpoint: Endpoint, file: PathBuf) -> Client {
        Client {
            endpoint,
            token: None,
            token_file: Some(file),
        }
    }

    fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            self.token_file
                .as_deref()
                .and_then(|f| crate::auth::read_token(f).ok())
        })
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            ErrorKind::Unreachable,
            format!(
                "cannot reach the lichen agent at {} ({e}): is `lichen run` running? (set --api or LICHEN_API for another address, or --api unix:PATH for its socket)",
                self.endpoint
            ),
        )
    }

    fn connect(&self, timeout: Option<Duration>) -> Result<Box<dyn Stream>, ApiError> {
        Ok(match &self.endpoint {
            Endpoint::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let addr = a
                    .to_socket_addrs()
                    .map_err(|e| self.unreachable(e))?
                    .next()
                    .ok_or_else(|| self.unreachable("no address"))?;
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(|e| self.unreachable(e))?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(timeout)
                    .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(60))))
                    .map_err(|e| self.unreachable(e))?;
                Box::new(s)
            }
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(|e| self.unreachable(e))?;
                s.set_read_timeout(timeout)
                    .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(60))))
                    .map_err(|e| self.unreachable(e))?;
                Box::new(s)
            }
        })
    }

    /// Send one request; `timeout` bounds each read of the answer (None for a stream).
    fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Answer, ApiError> {
        let mut s = self.connect(timeout)?;
        let host = match &self.endpoint {
            Endpoint::Tcp(a) => a.as_str(),
            Endpoint::Unix(_) => "localhost",
        };
        let mut head =
            format!("{method} {target} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n");
        if let (Endpoint::Tcp(_), Some(t)) = (&self.endpoint, self.token()) {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        let mut req = head.into_bytes();
        req.extend_from_slice(body.unwrap_or_default());
        s.write_all(&req)
            .and_then(|()| s.flush())
            .map_err(|e| self.unreachable(e))?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| self.unreachable(e))?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| self.unreachable(format!("not an HTTP answer: {:?}", line.trim())))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            let n = r.read_line(&mut line).map_err(|e| self.unreachable(e))?;
            let l = line.trim_end();
            if n == 0 || l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok(Answer {
            status,
            headers,
            body: r,
        })
    }

    /// A request whose answer is read whole: (headers, body) on 2xx, else the error.
    fn call(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(Headers, Vec<u8>), ApiError> {
        let (status, headers, bytes) = self
            .send(method, target, headers, body, Some(Duration::from_secs(60)))?
            .bytes()?;
        if (200..300).contains(&status) {
            return Ok((headers, bytes));
        }
        Err(error_of(status, &bytes))
    }

    fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("the agent's answer is not what this CLI expects ({e}); is the agent the same version as the CLI?"),
            )
        })
    }

    /// `GET` a JSON view.
    pub(crate) fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ApiError> {
        let (_, b) = self.call("GET", target, &[], None)?;
        Self::json(&b)
    }

    /// `GET` as text with the content type (for `?raw`).
    pub(crate) fn get_text(&self, target: &str) -> Result<(String, String), ApiError> {
        let (h, b) = self.call("GET", target, &[], None)?;
        let ct = h
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Ok((ct, String::from_utf8_lossy(&b).into_owned()))
    }

    /// A request with a JSON body (or none) and extra headers, answered with a JSON view.
    pub(crate) fn send_json<T: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&impl Serialize>,
    ) -> Result<T, ApiError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ApiError::new(ErrorKind::Usage, e.to_string()))?;
        let (_, b) = self.call(method, target, headers, body.as_deref())?;
        Self::json(&b)
    }

    /// `POST` without a body, the answer taken whole as bytes (a backup: up to
    /// [`MAX_BYTES_ANSWER`]). The agent makes the whole copy before it answers, so each read
    /// may wait up to 10 minutes. A body shorter than its `Content-Length` (the agent went
    /// away midway) or longer than the limit is an error, never a short copy.
    pub(crate) fn post_for_bytes(&self, target: &str) -> Result<Vec<u8>, ApiError> {
        let a = self.send(
            "POST",
            target,
            &[("Content-Length", "0")],
            None,
            Some(Duration::from_secs(600)),
        )?;
        if !(200..300).contains(&a.status) {
            let (status, _, bytes) = a.bytes()?;
            return Err(error_of(status, &bytes));
        }
        a.whole(MAX_BYTES_ANSWER)
    }

    /// `GET` bytes (an export, an audit bundle); an answer cut short (or longer than the
    /// 64 MiB a body is read up to) is an error, never a shorter file.
    pub(crate) fn get_bytes(&self, target: &str) -> Result<Vec<u8>, ApiError> {
        let (h, b) = self.call("GET", target, &[], None)?;
        let declared = h
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match declared {
            Some(n) if n != b.len() => Err(ApiError::new(
                ErrorKind::Unreachable,
                format!(
                    "the agent's answer has {n} bytes but {} arrived (at most 64 MiB are read); nothing was written",
                    b.len()
                ),
            )),
            _ => Ok(b),
        }
    }

    /// A request with a body of bytes of `content_type`, answered with a JSON view.
    pub(crate) fn send_bytes<T: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<T, ApiError> {
        let (_, b) = self.call(
            method,
            target,
            &[("Content-Type", content_type)],
            Some(body),
        )?;
        Self::json(&b)
    }

    /// Follow a Server-Sent Events stream, calling `on_event` with each event.
    /// Returns when the stream ends or `on_event` returns false.
    pub(crate) fn sse(
        &self,
        target: &str,
        mut on_event: impl FnMut(WatchEvent) -> bool,
    ) -> Result<(), ApiError> {
        let a = self.send(
            "GET",
            target,
            &[("Accept", "text/event-stream")],
            None,
            None,
        )?;
        if a.status != 200 {
            let (status, _, bytes) = a.bytes()?;
            return Err(error_of(status, &bytes));
        }
        let mut data = String::new();
        for line in a.body.lines() {
            let line = line.map_err(|e| {
                ApiError::new(ErrorKind::Unreachable, format!("watch stream broke: {e}"))
            })?;
            if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let ev: Result<WatchEvent, _> = serde_json::from_str(&data);
                data.clear();
                match ev {
                    Ok(ev) => {
                        if !on_event(ev) {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "an event that does not parse"),
                }
            }
        }
        Ok(())
    }
}

/// The error an answer that is not 2xx stands for: its kind from the status, its message
/// from the body.
fn error_of(status: u16, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| format!("agent answered HTTP {status}"));
    ApiError::new(ErrorKind::from_status(status), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_each_segment() {
        assert_eq!(
            doc_url("app/web", "limits.\"a.b/c\"[2]").unwrap(),
            "/v1/docs/app%2Fweb/limits/a.b%2Fc/%5B2%5D"
        );
        assert_eq!(doc_url("app", "").unwrap(), "/v1/docs/app");
        assert_eq!(
            with_query("/v1/docs", &[("prefix", Some("a b/")), ("values", None)]),
            "/v1/docs?prefix=a%20b%2F&values"
        );
    }
}
