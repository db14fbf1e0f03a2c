//! The API's issue-19 views and actions (see [`crate::history`] for what they do):
//!
//! | method & path | what |
//! |---|---|
//! | `GET /v1/docs/{doc}[/{path…}]?at=HEADS` | `{"doc","path","at","value"}` (value null if absent then) |
//! | `GET /v1/docs/{doc}[/{path…}]?diff&from=HEADS[&to=HEADS]` | `{"doc","path","from","to","changes"}` |
//! | `GET /v1/docs/{doc}[/{path…}]?blame` | per leaf: value and who set it |
//! | `GET /v1/docs/{doc}?export=automerge\|json` | the document's Automerge bytes / its JSON value |
//! | `PUT /v1/docs/{doc}?import` | body: a JSON object or an Automerge document; one signed change |
//! | `POST /v1/docs/{doc}[/{path…}]?revert` | body `{"to":"HEADS"}` or `{"undo":"HASH","force":false}` |
//! | `GET /v1/audit/{doc}[?since=HEADS]` | the audit bundle's bytes |
//!
//! Unknown heads are a 400 naming the document's current heads; an unknown change to undo a
//! 404. Writes answer `{"hash","changed",…}` after the commit is durable.

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lichen_crdt::PathSeg;
use serde::Deserialize;

use super::{doc_and_path, leftover, percent_decode, query_error, take, ApiResult, DocView, Pairs};
use crate::error::{ApiError, ErrorKind};
use crate::history::{PastAnswer, PastRequest};
use crate::node::{Command, NodeHandle};

/// Parse the issue-19 view named by `flag` (whose value is `value`; its other parameters
/// are taken out of `q`).
pub(super) fn parse_view(flag: &str, value: String, q: &mut Pairs) -> Result<DocView, ApiError> {
    Ok(match flag {
        "at" => DocView::At { heads: value },
        "diff" => DocView::Diff {
            from: take(q, "from").ok_or_else(|| {
                query_error("`?diff` needs `from=HEADS` (the heads `get` printed)".into())
            })?,
            to: take(q, "to").filter(|t| !t.is_empty()),
        },
        "blame" => DocView::Blame,
        _ => DocView::Export {
            format: value.parse().map_err(query_error)?,
        },
    })
}

async fn ask(n: &NodeHandle, req: PastRequest) -> Result<PastAnswer, ApiError> {
    n.ask(|reply| Command::Past { req, reply }).await
}

fn answer(a: PastAnswer, file_type: &'static str) -> Response {
    match a {
        PastAnswer::Json(v) => Json(v).into_response(),
        PastAnswer::Bytes(b) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(file_type))],
            b,
        )
            .into_response(),
    }
}

/// `GET /v1/docs/{doc}[/{path…}]` with an issue-19 view.
pub(super) async fn doc_view(
    n: &NodeHandle,
    doc: String,
    path: Vec<PathSeg>,
    view: DocView,
) -> ApiResult {
    let whole = |what: &str| -> Result<(), ApiError> {
        if path.is_empty() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorKind::Invalid,
                format!("{what} is of a whole document: /v1/docs/{{doc}} with no path"),
            ))
        }
    };
    let req = match view {
        DocView::At { heads } => PastRequest::At { doc, path, heads },
        DocView::Diff { from, to } => PastRequest::Diff {
            doc,
            path,
            from,
            to,
        },
        DocView::Blame => PastRequest::Blame { doc, path },
        DocView::Export { format } => {
            whole("an export")?;
            PastRequest::Export { doc, format }
        }
        _ => return Err(ApiError::new(ErrorKind::Internal, "not a history view")),
    };
    Ok(answer(ask(n, req).await?, "application/octet-stream"))
}

/// The body of `POST …?revert`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    to: Option<String>,
    undo: Option<String>,
    #[serde(default)]
    force: bool,
}

/// `POST /v1/docs/{doc}[/{path…}]?revert`.
pub(super) async fn doc_post(
    State(n): State<NodeHandle>,
    uri: Uri,
    Query(mut q): Query<Pairs>,
    body: axum::body::Bytes,
) -> ApiResult {
    let (doc, path) = doc_and_path(&uri)?;
    if take(&mut q, "revert").is_none() {
        return Err(query_error(
            "POST on a document takes `?revert` with a body {\"to\":\"HEADS\"} or {\"undo\":\"HASH\",\"force\":false}".into(),
        ));
    }
    leftover(&q, "POST ?revert")?;
    let b: RevertBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorKind::Invalid,
            format!("the body must be {{\"to\":\"HEADS\"}} or {{\"undo\":\"HASH\",\"force\":false}}: {e}"),
        )
    })?;
    let req =
        match (b.to, b.undo) {
            (Some(heads), None) if !b.force => PastRequest::RevertTo { doc, path, heads },
            (None, Some(hash)) if path.is_empty() => PastRequest::Undo {
                doc,
                hash,
                force: b.force,
            },
            (None, Some(_)) => {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    "an undo is of a whole change: POST /v1/docs/{doc}?revert with no path",
                ))
            }
            _ => return Err(ApiError::new(
                ErrorKind::Invalid,
                "give either \"to\" (heads) or \"undo\" (a change hash, with optional \"force\")",
            )),
        };
    Ok(answer(ask(&n, req).await?, "application/json"))
}

/// `PUT /v1/docs/{doc}?import` (body: a JSON object or an Automerge document).
pub(super) async fn import(
    n: &NodeHandle,
    doc: String,
    path: Vec<PathSeg>,
    body: axum::body::Bytes,
) -> ApiResult {
    if !path.is_empty() {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            "an import replaces a whole document: PUT /v1/docs/{doc}?import with no path",
        ));
    }
    let req = PastRequest::Import {
        doc,
        bytes: body.to_vec(),
    };
    Ok(answer(ask(n, req).await?, "application/json"))
}

/// `GET /v1/audit/{doc}[?since=HEADS]`.
pub(super) async fn audit(
    State(n): State<NodeHandle>,
    uri: Uri,
    Query(mut q): Query<Pairs>,
) -> ApiResult {
    let rest = uri
        .path()
        .strip_prefix("/v1/audit/")
        .unwrap_or("")
        .trim_end_matches('/');
    let doc = percent_decode(rest)?;
    if doc.is_empty() || rest.contains('/') {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            "the URL names no document: /v1/audit/{doc} with the name percent-encoded (app%2Fweb)",
        ));
    }
    let since = take(&mut q, "since").filter(|s| !s.is_empty());
    leftover(&q, "GET /v1/audit")?;
    let a = ask(&n, PastRequest::Audit { doc, since }).await?;
    Ok(answer(a, "application/vnd.lichen.audit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Pairs {
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.to_string(), String::new()),
            })
            .collect()
    }

    #[test]
    fn history_views_parse_from_the_query() {
        assert_eq!(
            DocView::parse(pairs("at=ab,cd")).unwrap(),
            DocView::At {
                heads: "ab,cd".into()
            }
        );
        assert_eq!(
            DocView::parse(pairs("diff&from=ab")).unwrap(),
            DocView::Diff {
                from: "ab".into(),
                to: None
            }
        );
        assert_eq!(
            DocView::parse(pairs("diff&from=ab&to=cd")).unwrap(),
            DocView::Diff {
                from: "ab".into(),
                to: Some("cd".into())
            }
        );
        assert_eq!(DocView::parse(pairs("blame")).unwrap(), DocView::Blame);
        assert_eq!(
            DocView::parse(pairs("export=json")).unwrap(),
            DocView::Export {
                format: crate::history::ExportFormat::Json
            }
        );
        // Refused: a diff without `from`, an unknown format, two views, a stray parameter.
        for bad in ["diff", "export=xml", "at=ab&blame", "blame&limit=3"] {
            let e = DocView::parse(pairs(bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{bad}: {e}");
        }
    }
}
