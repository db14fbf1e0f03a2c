//! The local HTTP API (axum), bound to loopback only; the CLI is its client.
//!
//! | method & path | what |
//! |---|---|
//! | `GET /v1/health` | liveness |
//! | `GET /v1/get?doc=D&path=P` | value at a path (`{"value", "heads"}`), 404 if absent |
//! | `PUT /v1/put?doc=D&path=P` (body: JSON value) | set; answers after the commit is durable |
//! | `DELETE /v1/del?doc=D&path=P` | delete |
//! | `GET /v1/ls[?doc=D&path=P]` | documents, or keys at a path |
//! | `GET /v1/history?doc=D&path=P&limit=N` | verified history |
//! | `GET /v1/conflicts?doc=D&path=P` | concurrent values, winner first |
//! | `GET /v1/watch?doc=D&path=P` | Server-Sent Events; resumable with `Last-Event-ID`/`since` = heads |
//! | `GET /v1/members`, `POST /v1/members`, `POST /v1/members/remove`, `POST /v1/members/role` | membership |
//! | `GET /v1/status` | peers, heads, lag, rejections |
//! | `GET /metrics` | Prometheus text format |
//!
//! Request bodies are limited to 1 MiB. Errors are JSON: `{"error": "..."}` with a message
//! that names the next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lichen_crdt::{parse_path, NodeId, Op, PathSeg, Role};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;

use crate::node::{ApiError, Command, NodeHandle, Watched};

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.error }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

#[derive(Deserialize)]
struct DocQuery {
    doc: Option<String>,
    path: Option<String>,
    limit: Option<usize>,
    since: Option<String>,
}

impl DocQuery {
    fn doc(&self) -> Result<String, ApiError> {
        self.doc
            .clone()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| ApiError::new(400, "missing `doc` query parameter"))
    }

    fn path(&self) -> Result<Vec<PathSeg>, ApiError> {
        parse_path(self.path.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::new(400, format!("invalid path: {e}")))
    }
}

/// Build the router.
pub fn router(node: NodeHandle) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/v1/get", get(get_value))
        .route("/v1/put", axum::routing::put(put_value))
        .route("/v1/del", axum::routing::delete(del_value))
        .route("/v1/ls", get(ls))
        .route("/v1/history", get(history))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/watch", get(watch))
        .route("/v1/members", get(members).post(member_add))
        .route("/v1/members/remove", post(member_remove))
        .route("/v1/members/role", post(member_role))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

async fn get_value(State(n): State<NodeHandle>, Query(q): Query<DocQuery>) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    let d = doc.clone();
    let p = path.clone();
    match n
        .ask(|reply| Command::Get {
            doc: d,
            path: p,
            reply,
        })
        .await?
    {
        Some((value, heads)) => Ok(Json(
            json!({"doc": doc, "path": q.path, "value": value, "heads": heads}),
        )
        .into_response()),
        None => Err(ApiError::new(
            404,
            format!(
                "`{doc}` has no value at `{}` (see `lichen ls {doc}`)",
                q.path.as_deref().unwrap_or("")
            ),
        )),
    }
}

async fn put_value(
    State(n): State<NodeHandle>,
    Query(q): Query<DocQuery>,
    body: axum::body::Bytes,
) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            format!("the value must be JSON (quote strings: '\"text\"'): {e}"),
        )
    })?;
    let op = if path.is_empty() {
        if !value.is_object() {
            return Err(ApiError::new(400, "a whole document must be a JSON object"));
        }
        Op::Replace { value }
    } else {
        Op::Put { path, value }
    };
    let hash = n.ask(|reply| Command::Write { doc, op, reply }).await?;
    Ok(Json(json!({"hash": hash, "changed": hash.is_some()})).into_response())
}

async fn del_value(State(n): State<NodeHandle>, Query(q): Query<DocQuery>) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    if path.is_empty() {
        return Err(ApiError::new(
            400,
            "give a path to delete (a document cannot be deleted as a whole)",
        ));
    }
    let hash = n
        .ask(|reply| Command::Write {
            doc,
            op: Op::Delete { path },
            reply,
        })
        .await?;
    Ok(Json(json!({"hash": hash, "changed": hash.is_some()})).into_response())
}

async fn ls(State(n): State<NodeHandle>, Query(q): Query<DocQuery>) -> ApiResult {
    let path = q.path()?;
    let doc = q.doc.clone().filter(|d| !d.is_empty());
    let v = n.ask(|reply| Command::Ls { doc, path, reply }).await?;
    Ok(Json(v).into_response())
}

async fn history(State(n): State<NodeHandle>, Query(q): Query<DocQuery>) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    let limit = q.limit.unwrap_or(100).min(10_000);
    let h = n
        .ask(|reply| Command::History {
            doc,
            path,
            limit,
            reply,
        })
        .await?;
    Ok(Json(h).into_response())
}

async fn conflicts(State(n): State<NodeHandle>, Query(q): Query<DocQuery>) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    let v = n
        .ask(|reply| Command::Conflicts { doc, path, reply })
        .await?;
    Ok(Json(v).into_response())
}

/// SSE: one `value` event now if the client's known state (`since` / `Last-Event-ID`, the
/// document heads) differs from ours or is absent, then one per change of the document's heads
/// while the path holds a value. The node task updates the subscription itself after each
/// change ([`Command::Watch`]); a burst of changes may be coalesced into its last value.
async fn watch(
    State(n): State<NodeHandle>,
    headers: HeaderMap,
    Query(q): Query<DocQuery>,
) -> ApiResult {
    let (doc, path) = (q.doc()?, q.path()?);
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.since.clone());
    let path_text = lichen_crdt::format_path(&path);
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

fn value_event(doc: &str, path: &str, w: &Watched) -> Event {
    /// The event's data (fields in the order `json!` would print them).
    #[derive(serde::Serialize)]
    struct Data<'a> {
        doc: &'a str,
        heads: &'a str,
        path: &'a str,
        value: &'a Value,
    }
    let data = Data {
        doc,
        heads: &w.heads,
        path,
        value: &w.value,
    };
    Event::default()
        .event("value")
        .id(w.heads.clone())
        .data(serde_json::to_string(&data).unwrap_or_default())
}

async fn members(State(n): State<NodeHandle>) -> ApiResult {
    Ok(Json(n.ask(|reply| Command::Members { reply }).await?).into_response())
}

#[derive(Deserialize)]
struct AddMember {
    id: String,
    name: Option<String>,
    role: Option<String>,
    #[serde(default)]
    addrs: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

fn parse_id(s: &str) -> Result<NodeId, ApiError> {
    s.parse()
        .map_err(|e: lichen_crdt::KeyError| ApiError::new(400, e.to_string()))
}

fn parse_role(s: &str) -> Result<Role, ApiError> {
    s.parse().map_err(|e: String| ApiError::new(400, e))
}

/// The membership rules every node applies on ingest (`lichen_crdt::membership`), checked
/// before anything is signed: 422 with the rule broken and what to pass instead.
fn check_member_fields(name: &str, addrs: &[String], scopes: &[String]) -> Result<(), ApiError> {
    use lichen_crdt::membership::{MAX_MEMBER_ADDRS, MAX_MEMBER_SCOPES};
    let invalid = |e: String, next: &str| ApiError::new(422, format!("{e}; {next}"));
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

async fn member_add(State(n): State<NodeHandle>, Json(b): Json<AddMember>) -> ApiResult {
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
    Ok(Json(json!({"hash": hash})).into_response())
}

#[derive(Deserialize)]
struct MemberRef {
    id: String,
    role: Option<String>,
}

async fn member_remove(State(n): State<NodeHandle>, Json(b): Json<MemberRef>) -> ApiResult {
    let id = parse_id(&b.id)?;
    let hash = n.ask(|reply| Command::MemberRemove { id, reply }).await?;
    Ok(Json(json!({"hash": hash})).into_response())
}

async fn member_role(State(n): State<NodeHandle>, Json(b): Json<MemberRef>) -> ApiResult {
    let id = parse_id(&b.id)?;
    let role = parse_role(
        b.role
            .as_deref()
            .ok_or_else(|| ApiError::new(400, "missing `role`"))?,
    )?;
    let hash = n
        .ask(|reply| Command::MemberRole { id, role, reply })
        .await?;
    Ok(Json(json!({"hash": hash})).into_response())
}

async fn status(State(n): State<NodeHandle>) -> ApiResult {
    Ok(Json(n.ask(|reply| Command::Status { reply }).await?).into_response())
}

async fn metrics(State(n): State<NodeHandle>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        n.metrics.render(),
    )
        .into_response()
}
