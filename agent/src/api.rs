//! The local HTTP API (axum): one router served on loopback TCP (token required, see
//! [`crate::auth`]) and on the unix socket `data_dir/api.sock`; the CLI is its client.
//!
//! Documents are resources: `/v1/docs/{doc}/{path…}` with the document name as one
//! percent-encoded segment (`app%2Fweb`) and each key of the path in its own segment (a key
//! `[n]` is the list index n). A `GET` picks its view with a query flag on the same resource
//! ([`DocView`], [`IndexView`]); the dispatcher parses the query into that enum first, so a
//! new view is a new variant and a new arm.
//!
//! | method & path | what |
//! |---|---|
//! | `GET /v1/health` | liveness (the only route without a token) |
//! | `GET /v1/docs[?prefix=P]` | document names |
//! | `GET /v1/docs?prefix=P&values` | every document under the prefix: `{doc: {"value", "heads"}}` |
//! | `GET /v1/docs?prefix=P&watch` | Server-Sent Events, one per change of a document under the prefix |
//! | `GET /v1/docs/{doc}[/{path…}]` | `{"doc", "path", "value", "heads"}`, `ETag: "<heads>"`, 404 if absent |
//! | `… ?keys` | keys at the path |
//! | `… ?raw` | a string as `text/plain` without quotes; other values as JSON |
//! | `… ?history[&limit=N]` | verified history, oldest first |
//! | `… ?conflicts` | concurrent values, winner first |
//! | `… ?watch[&since=HEADS]` | Server-Sent Events; resumable with `Last-Event-ID`/`since` |
//! | `PUT /v1/docs/{doc}[/{path…}]` (body: JSON) | set (the whole document: an object); `If-Match` |
//! | `DELETE /v1/docs/{doc}/{path…}` | delete a value; `If-Match` |
//! | `DELETE /v1/docs/{doc}` | delete every value of the document (one signed change) |
//! | `… ?at=HEADS`, `?diff&from=HEADS[&to=HEADS]`, `?blame`, `?export=automerge\|json` | the past, diffs, blame, export (`api/history.rs`) |
//! | `PUT /v1/docs/{doc}?import`, `POST /v1/docs/{doc}[/{path…}]?revert` | import, revert (`api/history.rs`) |
//! | `GET /v1/audit/{doc}[?since=HEADS]` | audit bundle bytes (`api/history.rs`) |
//! | `GET /v1/members`, `POST /v1/members` | list / add |
//! | `PATCH /v1/members/{id}`, `DELETE /v1/members/{id}` | role, scopes / remove |
//! | `GET /v1/status` | typed status ([`crate::views::StatusView`]) |
//! | `POST /v1/backup` | a consistent copy of the store (`application/octet-stream`); full token only |
//! | `GET /metrics` | Prometheus text format |
//!
//! Writes answer after the commit is durable, with `ETag` = the document heads after it.
//! `If-Match: "<heads>"` makes a write conditional: the node task compares the heads with the
//! document's when it commits the write (in the same step, so no other local write comes
//! between) and answers 412 with the current `ETag` if they differ. It is a local
//! compare-and-set, not consensus: a peer's concurrent write may still merge after it.
//!
//! Request bodies are limited to 1 MiB ([`MAX_BODY`], checked against `Content-Length`
//! before anything is read) and must arrive within the API's idle timeout. A write holds at
//! most [`MAX_WRITE_NODES`] map keys and list items (split a bigger value into several
//! writes): that bounds the work, the memory and the wait of every other request behind one
//! write.
//!
//! Every error is JSON, `{"error": "..."}`, with a message that names the next step: the
//! handlers' own ([`ApiError`]), and those that the framework makes (an unknown route, a
//! wrong method, a query or body that does not parse, a body too large or of the wrong
//! content type), which [`bodies_and_errors`] rewrites into the same shape.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lichen_crdt::{format_path, parse_path, NodeId, Op, PathSeg, Role};
use serde_json::Value;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;

use crate::auth::Access;

mod history;
use crate::error::{ApiError, ErrorKind};
use crate::node::{Command, NodeHandle, Watched};
use crate::views::{
    AddMemberRequest, DocValue, HashView, HealthView, HistoryView, PatchMemberRequest, ValueView,
    WatchEvent, WriteView,
};

/// Largest accepted request body.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Most map keys and list items (counted through the whole value) one write may hold.
/// A 1 MiB body can hold ~100,000 of them; the node task builds and commits one change for
/// a write while every other request waits, at roughly 0.1 ms and 2.5 KiB of heap per key
/// in a release build (freed afterwards, and returned to the system: `alloc.rs`), so
/// 100,000 keys stalled the API for seconds and took ~240 MiB. At 5,000 the wait is ~0.2 s
/// at most.
pub(crate) const MAX_WRITE_NODES: usize = 5_000;

/// Map keys and list items in `v`, counting stops once past `limit`.
pub(crate) fn count_nodes(v: &Value, limit: usize) -> usize {
    let mut n = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                n += m.len();
                stack.extend(m.values());
            }
            Value::Array(a) => {
                n += a.len();
                stack.extend(a.iter());
            }
            _ => {}
        }
        if n > limit {
            break;
        }
    }
    n
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// Build the router of one listener. Request bodies must arrive within `body_timeout`;
/// `access` says how its requests are let in (token or unix socket).
pub(crate) fn router(node: NodeHandle, body_timeout: Duration, access: Access) -> Router {
    let metrics = node.metrics.clone();
    let routes = Router::new()
        .route(
            "/v1/health",
            get(|| async {
                Json(HealthView {
                    status: "ok".into(),
                })
            }),
        )
        .route("/v1/docs", get(docs_index))
        .route(
            "/v1/docs/{*rest}",
            get(doc_get)
                .put(doc_put)
                .delete(doc_delete)
                .post(history::doc_post),
        )
        .route("/v1/audit/{*rest}", get(history::audit))
        .route("/v1/members", get(members).post(member_add))
        .route(
            "/v1/members/{id}",
            axum::routing::patch(member_patch).delete(member_remove),
        )
        .route("/v1/status", get(status))
        .route("/v1/backup", axum::routing::post(backup))
        .route("/metrics", get(metrics_text))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(node);
    // Around the whole router (not each route), so that it sees responses as the router
    // finishes them (a 405's `Allow` header is added after the route's own layers). The
    // guard is outermost: a refused request's body is never read.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(
            body_timeout,
            bodies_and_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (access, metrics),
            crate::auth::guard,
        ))
}

/// The list of routes, for a 404.
const ROUTES: &str = "GET /v1/health, GET /v1/docs[?prefix=P[&values|&watch]], GET|PUT|DELETE /v1/docs/{doc}/{path…} (GET views: ?keys, ?raw, ?history, ?conflicts, ?watch, ?at=HEADS, ?diff&from=HEADS, ?blame, ?export=automerge|json; PUT ?import), POST /v1/docs/{doc}/{path…}?revert, GET /v1/audit/{doc}, GET|POST /v1/members, PATCH|DELETE /v1/members/{id}, GET /v1/status, POST /v1/backup and GET /metrics";

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no API route {method} {}; the routes are {ROUTES} (see the API table in the README or use the `lichen` CLI)",
            uri.path()
        ),
    )
}

/// Read the request body first (refusing it by its `Content-Length` before reading, and
/// giving up on a body that does not arrive within `timeout`), then run the handler, then
/// turn any error response that is not JSON yet into `{"error": ...}` with a next step.
async fn bodies_and_errors(
    State(timeout): State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large().with_close();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_big {
                too_large().with_close()
            } else {
                ApiError::new(
                    ErrorKind::Invalid,
                    format!("cannot read the request body: {e}; send it again"),
                )
                .into_response()
                .with_close()
            };
        }
        Err(_) => {
            return ApiError::new(
                ErrorKind::Timeout,
                format!(
                    "the request body did not arrive within {} ms; send the whole request at once",
                    timeout.as_millis()
                ),
            )
            .into_response()
            .with_close()
        }
    };
    let resp = next
        .run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await;
    as_json_error(resp, &method, &path).await
}

fn too_large() -> Response {
    ApiError::new(
        ErrorKind::TooLarge,
        format!(
            "the request body is larger than {} MiB; split the value into several writes",
            MAX_BODY >> 20
        ),
    )
    .into_response()
}

trait WithClose {
    fn with_close(self) -> Response;
}

impl WithClose for Response {
    /// The request's body may be left unread: do not reuse the connection.
    fn with_close(mut self) -> Response {
        self.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        self
    }
}

/// An error response the framework made (plain text or empty) as `{"error": ...}` with the
/// next step for its status; JSON responses and successes pass unchanged.
async fn as_json_error(resp: Response, method: &Method, path: &str) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let why = |default: &str| {
        if text.is_empty() {
            default.to_string()
        } else {
            text.clone()
        }
    };
    let msg = match status.as_u16() {
        400 => format!(
            "{}; check the query parameters and the value's JSON (see the API table in the README)",
            why("the request is invalid")
        ),
        404 => format!("no API route {method} {path}; the routes are {ROUTES}"),
        405 => format!("{path} does not accept {method}; use {allow}"),
        413 => format!(
            "the request body is larger than {} MiB; split the value into several writes",
            MAX_BODY >> 20
        ),
        415 => format!(
            "{}; send the body as JSON with the header `Content-Type: application/json`",
            why("unsupported content type")
        ),
        422 => format!(
            "{}; see the API table in the README for the fields this route takes",
            why("the JSON body does not have the expected fields")
        ),
        _ => format!(
            "{}; see the agent's log",
            why(status.canonical_reason().unwrap_or("error"))
        ),
    };
    let mut out = ApiError::new(ErrorKind::from_status(status.as_u16()), msg).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// Decode one percent-encoded URL segment.
fn percent_decode(seg: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorKind::Invalid,
            format!("`{seg}` is not a valid percent-encoded URL segment; encode each document name and key with %XX escapes"),
        )
    };
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
            let s = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// A document and a path inside it, from the URL path after `/v1/docs/`: the first segment is
/// the document name, each further segment one key (`[n]`: list index n). Taken from the raw
/// URL, so that an encoded `/` stays inside its segment.
fn doc_and_path(uri: &Uri) -> Result<(String, Vec<PathSeg>), ApiError> {
    let rest = uri.path().strip_prefix("/v1/docs/").unwrap_or("");
    let mut segs: Vec<&str> = rest.split('/').collect();
    // `/v1/docs/app/` is the document itself.
    if segs.len() > 1 && segs.last() == Some(&"") {
        segs.pop();
    }
    let mut it = segs.into_iter();
    let doc = percent_decode(it.next().unwrap_or(""))?;
    if doc.is_empty() {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            "the URL names no document: /v1/docs/{doc}/{path…} with the name percent-encoded (app%2Fweb)",
        ));
    }
    let mut path = Vec::new();
    for s in it {
        let key = percent_decode(s)?;
        let index = key
            .strip_prefix('[')
            .and_then(|k| k.strip_suffix(']'))
            .and_then(|n| n.parse::<usize>().ok());
        path.push(match index {
            Some(i) => PathSeg::Index(i),
            None => PathSeg::Key(key),
        });
    }
    // The same bounds as a dotted path (length, number of segments).
    parse_path(&format_path(&path))
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("invalid path: {e}")))?;
    Ok((doc, path))
}

/// A query as its pairs; a flag (`?keys`) has an empty value.
type Pairs = Vec<(String, String)>;

/// Take `name` out of the query pairs.
fn take(q: &mut Pairs, name: &str) -> Option<String> {
    let i = q.iter().position(|(k, _)| k == name)?;
    Some(q.remove(i).1)
}

fn query_error(msg: String) -> ApiError {
    ApiError::new(
        ErrorKind::Invalid,
        format!("{msg}; check the query parameters (see the API table in the README)"),
    )
}

/// A query parameter that is left over: unknown, or not for this view.
fn leftover(q: &Pairs, view: &str) -> Result<(), ApiError> {
    match q.first() {
        None => Ok(()),
        Some((k, _)) => Err(query_error(format!(
            "the query parameter `{k}` is unknown or does not go with {view}"
        ))),
    }
}

/// The view flags of a document resource, in the order they are looked for.
const DOC_VIEW_FLAGS: &[&str] = &[
    "keys",
    "raw",
    "history",
    "conflicts",
    "watch",
    "at",
    "diff",
    "blame",
    "export",
];

/// What a `GET /v1/docs/{doc}/{path…}` returns, parsed from its query.
#[derive(Debug, Clone, PartialEq)]
enum DocView {
    /// `{"value", "heads"}` (no flag).
    Value,
    /// `?keys`.
    Keys,
    /// `?raw`.
    Raw,
    /// `?history[&limit=N]`.
    History { limit: usize },
    /// `?conflicts`.
    Conflicts,
    /// `?watch[&since=HEADS]`.
    Watch { since: Option<String> },
    /// `?at=HEADS`: the value as of HEADS (see [`crate::history`]).
    At { heads: String },
    /// `?diff&from=HEADS[&to=HEADS]`: what changed from HEADS (to now).
    Diff { from: String, to: Option<String> },
    /// `?blame`: who set each leaf.
    Blame,
    /// `?export=automerge|json`: the document's bytes.
    Export {
        format: crate::history::ExportFormat,
    },
}

impl DocView {
    fn parse(mut q: Pairs) -> Result<DocView, ApiError> {
        let flags: Vec<&str> = DOC_VIEW_FLAGS
            .iter()
            .copied()
            .filter(|f| q.iter().any(|(k, _)| k == f))
            .collect();
        if flags.len() > 1 {
            return Err(query_error(format!(
                "one view at a time, not {}",
                flags.join(" and ")
            )));
        }
        let view = match flags.first().copied() {
            None => DocView::Value,
            Some(flag) => {
                let value = take(&mut q, flag).unwrap_or_default();
                match flag {
                    "keys" => DocView::Keys,
                    "raw" => DocView::Raw,
                    "history" => {
                        let limit = match take(&mut q, "limit") {
                            None => 100,
                            Some(l) => l.parse::<usize>().map_err(|_| {
                                query_error(format!("`limit` must be a number, not `{l}`"))
                            })?,
                        };
                        DocView::History {
                            limit: limit.min(10_000),
                        }
                    }
                    "conflicts" => DocView::Conflicts,
                    "watch" => DocView::Watch {
                        since: take(&mut q, "since"),
                    },
                    _ => history::parse_view(flag, value, &mut q)?,
                }
            }
        };
        leftover(&q, &format!("{view:?}").to_lowercase())?;
        Ok(view)
    }
}

/// What a `GET /v1/docs` returns, parsed from its query.
#[derive(Debug, Clone, PartialEq)]
enum IndexView {
    /// Names (under the prefix).
    Names { prefix: String },
    /// `&values`: every document's value under the prefix.
    Values { prefix: String },
    /// `&watch`: events for every document under the prefix.
    Watch { prefix: String },
}

impl IndexView {
    fn parse(mut q: Pairs) -> Result<IndexView, ApiError> {
        let prefix = take(&mut q, "prefix").unwrap_or_default();
        let values = take(&mut q, "values").is_some();
        let watch = take(&mut q, "watch").is_some();
        leftover(&q, "/v1/docs")?;
        Ok(match (values, watch) {
            (true, true) => {
                return Err(query_error(
                    "one view at a time, not values and watch".into(),
                ))
            }
            (true, false) => IndexView::Values { prefix },
            (false, true) => IndexView::Watch { prefix },
            (false, false) => IndexView::Names { prefix },
        })
    }
}

/// `ETag: "<heads>"`.
fn etag(heads: &str) -> (header::HeaderName, HeaderValue) {
    (
        header::ETAG,
        HeaderValue::from_str(&format!("\"{heads}\"")).unwrap_or(HeaderValue::from_static("\"\"")),
    )
}

/// The heads an `If-Match` header names (quotes and a weak `W/` taken off).
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        ApiError::new(
            ErrorKind::Invalid,
            "If-Match must be the heads as ASCII text: \"<heads>\" from the ETag of a GET",
        )
    })?;
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v);
    Ok(Some(v.to_string()))
}

async fn docs_index(State(n): State<NodeHandle>, Query(q): Query<Pairs>) -> ApiResult {
    match IndexView::parse(q)? {
        IndexView::Names { prefix } => Ok(Json(doc_names(&n, &prefix).await?).into_response()),
        IndexView::Values { prefix } => {
            let mut out: BTreeMap<String, DocValue> = BTreeMap::new();
            for doc in doc_names(&n, &prefix).await? {
                if let Some(v) = read_present(&n, &doc, Vec::new()).await? {
                    out.insert(doc, v);
                }
            }
            Ok(Json(out).into_response())
        }
        IndexView::Watch { prefix } => prefix_watch(n, prefix).await,
    }
}

/// Document names under `prefix` (all for `""`).
async fn doc_names(n: &NodeHandle, prefix: &str) -> Result<Vec<String>, ApiError> {
    let v = n
        .ask(|reply| Command::Ls {
            doc: None,
            path: Vec::new(),
            reply,
        })
        .await?;
    let names: Vec<String> = serde_json::from_value(v).unwrap_or_default();
    Ok(names
        .into_iter()
        .filter(|d| d.starts_with(prefix))
        .collect())
}

/// The value at `path` in `doc` and the document heads.
async fn read_value(
    n: &NodeHandle,
    doc: &str,
    path: Vec<PathSeg>,
) -> Result<Option<DocValue>, ApiError> {
    let d = doc.to_string();
    Ok(n.ask(|reply| Command::Get {
        doc: d,
        path,
        reply,
    })
    .await?
    .map(|(value, heads)| DocValue { value, heads }))
}

/// [`read_value`], with a whole document that holds no value (all deleted) as absent.
async fn read_present(
    n: &NodeHandle,
    doc: &str,
    path: Vec<PathSeg>,
) -> Result<Option<DocValue>, ApiError> {
    let whole = path.is_empty();
    Ok(read_value(n, doc, path)
        .await?
        .filter(|v| !(whole && v.value.as_object().is_some_and(|m| m.is_empty()))))
}

fn absent(doc: &str, path: &[PathSeg]) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "`{doc}` has no value at `{}` (see `lichen ls {doc}`)",
            format_path(path)
        ),
    )
}

async fn doc_get(
    State(n): State<NodeHandle>,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let (doc, path) = doc_and_path(&uri)?;
    match DocView::parse(q)? {
        DocView::Value => {
            let v = read_present(&n, &doc, path.clone())
                .await?
                .ok_or_else(|| absent(&doc, &path))?;
            let tag = etag(&v.heads);
            let view = ValueView {
                doc,
                path: format_path(&path),
                value: v.value,
                heads: v.heads,
            };
            Ok(([tag], Json(view)).into_response())
        }
        DocView::Raw => {
            let v = read_present(&n, &doc, path.clone())
                .await?
                .ok_or_else(|| absent(&doc, &path))?;
            let tag = etag(&v.heads);
            Ok(match v.value {
                Value::String(s) => (
                    [
                        tag,
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; charset=utf-8"),
                        ),
                    ],
                    s,
                )
                    .into_response(),
                other => ([tag], Json(other)).into_response(),
            })
        }
        DocView::Keys => {
            let v = n
                .ask(|reply| Command::Ls {
                    doc: Some(doc),
                    path,
                    reply,
                })
                .await?;
            Ok(Json(v).into_response())
        }
        DocView::History { limit } => {
            let h = n
                .ask(|reply| Command::History {
                    doc,
                    path,
                    limit,
                    reply,
                })
                .await?;
            let h: Vec<HistoryView> = h.into_iter().map(HistoryView::from).collect();
            Ok(Json(h).into_response())
        }
        DocView::Conflicts => {
            let v = n
                .ask(|reply| Command::Conflicts { doc, path, reply })
                .await?;
            Ok(Json(v).into_response())
        }
        DocView::Watch { since } => {
            let since = headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(since);
            watch(n, doc, path, since).await
        }
        view @ (DocView::At { .. }
        | DocView::Diff { .. }
        | DocView::Blame
        | DocView::Export { .. }) => history::doc_view(&n, doc, path, view).await,
    }
}

async fn doc_put(
    State(n): State<NodeHandle>,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<Pairs>,
    body: axum::body::Bytes,
) -> ApiResult {
    let (doc, path) = doc_and_path(&uri)?;
    let mut q = q;
    if take(&mut q, "import").is_some() {
        leftover(&q, "PUT ?import")?;
        return history::import(&n, doc, path, body).await;
    }
    leftover(&q, "PUT")?;
    let expect = if_match(&headers)?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorKind::Invalid,
            format!("the value must be JSON (quote strings: '\"text\"'): {e}"),
        )
    })?;
    let nodes = count_nodes(&value, MAX_WRITE_NODES);
    if nodes > MAX_WRITE_NODES {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "the value holds more than {MAX_WRITE_NODES} map keys and list items; write it in parts (one put per sub-path)"
            ),
        ));
    }
    let op = if path.is_empty() {
        if !value.is_object() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "a whole document must be a JSON object",
            ));
        }
        Op::Replace { value }
    } else {
        Op::Put { path, value }
    };
    write(&n, doc, op, expect).await
}

async fn doc_delete(
    State(n): State<NodeHandle>,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<Pairs>,
) -> ApiResult {
    let (doc, path) = doc_and_path(&uri)?;
    leftover(&q, "DELETE")?;
    let expect = if_match(&headers)?;
    let op = if path.is_empty() {
        // The whole document: every value goes, in one signed change (its history stays, as
        // every change does in a CRDT). A document that does not exist is a 404.
        if read_present(&n, &doc, Vec::new()).await?.is_none() {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("there is no document `{doc}` with values (see `lichen ls`)"),
            ));
        }
        Op::Replace {
            value: Value::Object(Default::default()),
        }
    } else {
        Op::Delete { path }
    };
    write(&n, doc, op, expect).await
}

/// Make a write (conditional on `expect` = heads) and answer with the change and the heads;
/// 412 with the current heads (`ETag`) when `expect` is no longer the document's heads.
async fn write(n: &NodeHandle, doc: String, op: Op, expect: Option<String>) -> ApiResult {
    let d = doc.clone();
    let was = expect.clone();
    let out = n
        .ask(|reply| Command::Write {
            doc: d,
            op,
            expect,
            reply,
        })
        .await?;
    let tag = etag(&out.heads);
    if out.heads_moved {
        let mut resp = ApiError::new(
            ErrorKind::HeadsMoved,
            format!(
                "`{doc}` changed: its heads are now `{}`, not `{}`; nothing was written. Read it again and retry with If-Match: \"{}\" (lichen put --if-match {})",
                out.heads,
                was.unwrap_or_default(),
                out.heads,
                if out.heads.is_empty() { "''" } else { out.heads.as_str() }
            ),
        )
        .into_response();
        resp.headers_mut().insert(tag.0, tag.1);
        return Ok(resp);
    }
    Ok((
        [tag],
        Json(WriteView {
            changed: out.hash.is_some(),
            hash: out.hash,
            heads: out.heads,
        }),
    )
        .into_response())
}

/// SSE: one `value` event now if the client's known state (`since` / `Last-Event-ID`, the
/// document heads) differs from ours or is absent, then one per change of the document's heads
/// while the path holds a value. The node task updates the subscription itself after each
/// change ([`Command::Watch`]); a burst of changes may be coalesced into its last value.
async fn watch(n: NodeHandle, doc: String, path: Vec<PathSeg>, since: Option<String>) -> ApiResult {
    let path_text = format_path(&path);
    let d = doc.clone();
    let mut rx = n
        .ask(|reply| Command::Watch {
            doc: d,
            path,
            reply,
        })
        .await?;
    let first = rx.borrow_and_update().clone();
    let initial = (since.as_deref() != Some(first.heads.as_str()))
        .then(|| value_event(&doc, &path_text, &first));
    let mut last_heads = first.heads.clone();
    let stream = WatchStream::from_changes(rx).filter_map(move |w: Arc<Watched>| {
        if w.heads == last_heads {
            return None;
        }
        last_heads.clone_from(&w.heads);
        Some(Ok(value_event(&doc, &path_text, &w)))
    });
    let stream = tokio_stream::iter(initial.map(Ok::<Event, Infallible>)).chain(stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// SSE over every document under `prefix`: first each one's current value, then an event
/// whenever one of them (or a new one) changes. Driven by the node's change notices; if this
/// stream falls behind them, every document under the prefix is read again, and only those
/// whose heads moved are sent. Events carry the document's name and heads; the stream is not
/// resumable (a new one starts with every current value).
async fn prefix_watch(n: NodeHandle, prefix: String) -> ApiResult {
    use tokio::sync::broadcast::error::RecvError;
    let mut notices = n.notices.subscribe();
    let mut sent: HashMap<String, String> = HashMap::new();
    let mut first = Vec::new();
    for doc in doc_names(&n, &prefix).await? {
        if let Some(v) = read_value(&n, &doc, Vec::new()).await? {
            first.push(doc_event(&doc, &v));
            sent.insert(doc, v.heads);
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        for ev in first {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        loop {
            let docs: Vec<String> = tokio::select! {
                _ = tx.closed() => return,
                r = notices.recv() => match r {
                    Ok(notice) if notice.doc.starts_with(&prefix) => vec![notice.doc],
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => match doc_names(&n, &prefix).await {
                        Ok(d) => d,
                        Err(_) => return,
                    },
                    Err(RecvError::Closed) => return,
                },
            };
            for doc in docs {
                let Ok(Some(v)) = read_value(&n, &doc, Vec::new()).await else {
                    continue;
                };
                if sent.get(&doc) == Some(&v.heads) {
                    continue;
                }
                let ev = doc_event(&doc, &v);
                sent.insert(doc, v.heads);
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn doc_event(doc: &str, v: &DocValue) -> Event {
    value_event(
        doc,
        "",
        &Watched {
            heads: v.heads.clone(),
            value: v.value.clone(),
        },
    )
}

fn value_event(doc: &str, path: &str, w: &Watched) -> Event {
    let data = WatchEvent {
        doc: doc.to_string(),
        heads: w.heads.clone(),
        path: path.to_string(),
        value: w.value.clone(),
    };
    Event::default()
        .event("value")
        .id(w.heads.clone())
        .data(serde_json::to_string(&data).unwrap_or_default())
}

async fn members(State(n): State<NodeHandle>) -> ApiResult {
    Ok(Json(n.ask(|reply| Command::Members { reply }).await?).into_response())
}

fn parse_id(s: &str) -> Result<NodeId, ApiError> {
    s.parse()
        .map_err(|e: lichen_crdt::KeyError| ApiError::new(ErrorKind::Invalid, e.to_string()))
}

fn parse_role(s: &str) -> Result<Role, ApiError> {
    s.parse()
        .map_err(|e: String| ApiError::new(ErrorKind::Invalid, e))
}

/// The membership rules every node applies on ingest (`lichen_crdt::membership`), checked
/// before anything is signed: 422 with the rule broken and what to pass instead.
fn check_member_fields(name: &str, addrs: &[String], scopes: &[String]) -> Result<(), ApiError> {
    use lichen_crdt::membership::{MAX_MEMBER_ADDRS, MAX_MEMBER_SCOPES};
    let invalid =
        |e: String, next: &str| ApiError::new(ErrorKind::Unprocessable, format!("{e}; {next}"));
    lichen_crdt::validate_name(name).map_err(|e| {
        invalid(
            e,
            "pass --name with 1 to 64 bytes of printable text, e.g. `--name eu-1`",
        )
    })?;
    let addr_next = "pass each --addr as host:port, e.g. `10.0.0.1:7946`, `node1.example:7946` or `[fd00::1]:7946`";
    if addrs.len() > MAX_MEMBER_ADDRS {
        return Err(invalid(
            format!("{} addresses (at most {MAX_MEMBER_ADDRS})", addrs.len()),
            addr_next,
        ));
    }
    for a in addrs {
        lichen_crdt::validate_addr(a).map_err(|e| invalid(e, addr_next))?;
    }
    let scope_next = "pass each --scope as a document-name prefix such as `region/eu/` or `app`";
    if scopes.len() > MAX_MEMBER_SCOPES {
        return Err(invalid(
            format!("{} scopes (at most {MAX_MEMBER_SCOPES})", scopes.len()),
            scope_next,
        ));
    }
    for sc in scopes {
        lichen_crdt::validate_scope(sc).map_err(|e| invalid(e, scope_next))?;
    }
    Ok(())
}

async fn member_add(State(n): State<NodeHandle>, Json(b): Json<AddMemberRequest>) -> ApiResult {
    let id = parse_id(&b.id)?;
    let role = parse_role(b.role.as_deref().unwrap_or("writer"))?;
    let name = b.name.unwrap_or_else(|| id.short());
    check_member_fields(&name, &b.addrs, &b.scopes)?;
    let hash = n
        .ask(|reply| Command::MemberAdd {
            id,
            name,
            role,
            addrs: b.addrs,
            scopes: b.scopes,
            reply,
        })
        .await?;
    Ok(Json(HashView { hash }).into_response())
}

async fn member_remove(State(n): State<NodeHandle>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let hash = n.ask(|reply| Command::MemberRemove { id, reply }).await?;
    Ok(Json(HashView { hash }).into_response())
}

/// Role first, then scopes (each its own signed change); the answer names the last change.
async fn member_patch(
    State(n): State<NodeHandle>,
    Path(id): Path<String>,
    Json(b): Json<PatchMemberRequest>,
) -> ApiResult {
    let id = parse_id(&id)?;
    if b.role.is_none() && b.scopes.is_none() {
        return Err(ApiError::new(
            ErrorKind::Unprocessable,
            "nothing to change: send {\"role\": \"writer\"} and/or {\"scopes\": [\"app/\"]} (an empty list: all documents)",
        ));
    }
    let role = b.role.as_deref().map(parse_role).transpose()?;
    if let Some(scopes) = &b.scopes {
        check_member_fields("x", &[], scopes)?;
    }
    let mut hash = String::new();
    if let Some(role) = role {
        hash = n
            .ask(|reply| Command::MemberRole { id, role, reply })
            .await?;
    }
    if let Some(scopes) = b.scopes {
        hash = n
            .ask(|reply| Command::MemberScopes { id, scopes, reply })
            .await?;
    }
    Ok(Json(HashView { hash }).into_response())
}

async fn status(State(n): State<NodeHandle>) -> ApiResult {
    let mut v = n.ask(|reply| Command::Status { reply }).await?;
    // File bindings are the render manager's, not the node task's.
    v.bindings = n.bindings.snapshot();
    Ok(Json(v).into_response())
}

/// `lichen backup`: the store's online copy as a file (application/octet-stream). Only the
/// full token or the socket may take one (`auth`: it holds every document).
async fn backup(State(n): State<NodeHandle>) -> ApiResult {
    let bytes = n.ask(|reply| Command::Backup { reply }).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn metrics_text(State(n): State<NodeHandle>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        n.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Pairs {
        serde_urlencoded_pairs(s)
    }

    fn serde_urlencoded_pairs(s: &str) -> Pairs {
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.to_string(), String::new()),
            })
            .collect()
    }

    #[test]
    fn get_views_are_parsed_from_the_query() {
        assert_eq!(DocView::parse(pairs("")).unwrap(), DocView::Value);
        assert_eq!(DocView::parse(pairs("keys")).unwrap(), DocView::Keys);
        assert_eq!(DocView::parse(pairs("raw=")).unwrap(), DocView::Raw);
        assert_eq!(
            DocView::parse(pairs("history&limit=5")).unwrap(),
            DocView::History { limit: 5 }
        );
        assert_eq!(
            DocView::parse(pairs("watch&since=ab")).unwrap(),
            DocView::Watch {
                since: Some("ab".into())
            }
        );
        assert!(DocView::parse(pairs("keys&raw")).is_err());
        assert!(DocView::parse(pairs("limit=5")).is_err());
        assert!(DocView::parse(pairs("history&limit=many")).is_err());
        assert!(DocView::parse(pairs("nope")).is_err());
        assert_eq!(
            IndexView::parse(pairs("prefix=app/&values")).unwrap(),
            IndexView::Values {
                prefix: "app/".into()
            }
        );
        assert!(IndexView::parse(pairs("values&watch")).is_err());
    }

    #[test]
    fn documents_and_paths_come_from_raw_segments() {
        let uri: Uri = "/v1/docs/app%2Fweb/limits/a%2Eb%2Fc/%5B2%5D"
            .parse()
            .unwrap();
        let (doc, path) = doc_and_path(&uri).unwrap();
        assert_eq!(doc, "app/web");
        assert_eq!(
            path,
            vec![
                PathSeg::Key("limits".into()),
                PathSeg::Key("a.b/c".into()),
                PathSeg::Index(2)
            ]
        );
        let uri: Uri = "/v1/docs/app/".parse().unwrap();
        assert_eq!(doc_and_path(&uri).unwrap(), ("app".to_string(), vec![]));
        assert!(doc_and_path(&"/v1/docs/%zz".parse().unwrap()).is_err());
        assert!(doc_and_path(&"/v1/docs/".parse().unwrap()).is_err());
    }
}
