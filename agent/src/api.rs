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
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use crate::node::{ApiError, Command, NodeHandle};

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
/// document heads) differs from ours or is absent, then one per change of the watched value.
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
    // Subscribe before reading, so no change between the read and the subscription is missed.
    let rx = BroadcastStream::new(n.notices.subscribe());
    let node = n.clone();
    let first = read_event(&node, &doc, &path).await?;
    let mut last_heads = since;
    let initial = match first {
        Some((ev, heads)) if last_heads.as_deref() != Some(heads.as_str()) => {
            last_heads = Some(heads);
            Some(ev)
        }
        Some((_, heads)) => {
            last_heads = Some(heads);
            None
        }
        None => None,
    };
    let doc2 = doc.clone();
    let stream = async_stream(node, doc2, path, rx, last_heads);
    let stream = tokio_stream::iter(initial.map(Ok::<Event, Infallible>)).chain(stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn async_stream(
    node: NodeHandle,
    doc: String,
    path: Vec<PathSeg>,
    rx: BroadcastStream<crate::node::Notice>,
    last_heads: Option<String>,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> {
    let state = std::sync::Arc::new(tokio::sync::Mutex::new((last_heads, None::<Value>)));
    let watched = doc.clone();
    rx.filter_map(move |n| match n {
        Ok(n) if n.doc == watched => Some(()),
        Ok(_) => None,
        // Lagged: we may have missed notices; re-read to be safe.
        Err(_) => Some(()),
    })
    .then(move |_| {
        let node = node.clone();
        let doc = doc.clone();
        let path = path.clone();
        let state = state.clone();
        async move {
            let r = read_event(&node, &doc, &path).await.ok().flatten();
            let mut st = state.lock().await;
            match r {
                Some((ev, heads)) if st.0.as_deref() != Some(heads.as_str()) => {
                    st.0 = Some(heads);
                    Some(Ok(ev))
                }
                _ => None,
            }
        }
    })
    .filter_map(|x| x)
}

async fn read_event(
    node: &NodeHandle,
    doc: &str,
    path: &[PathSeg],
) -> Result<Option<(Event, String)>, ApiError> {
    let d = doc.to_string();
    let p = path.to_vec();
    let r = node
        .ask(|reply| Command::Get {
            doc: d,
            path: p,
            reply,
        })
        .await?;
    let (value, heads) = match r {
        Some((v, h)) => (v, h),
        None => (Value::Null, String::new()),
    };
    let data =
        json!({"doc": doc, "path": lichen_crdt::format_path(path), "value": value, "heads": heads});
    let ev = Event::default()
        .event("value")
        .id(heads.clone())
        .data(data.to_string());
    Ok(Some((ev, heads)))
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

async fn member_add(State(n): State<NodeHandle>, Json(b): Json<AddMember>) -> ApiResult {
    let id = parse_id(&b.id)?;
    let role = parse_role(b.role.as_deref().unwrap_or("writer"))?;
    let name = b.name.unwrap_or_else(|| id.short());
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
