//! The node task's handling of [`Command::Past`]: reads of the past, blame, export and audit
//! bundles are answered from the store ([`crate::history::run`]); a revert or an import is
//! planned there as an [`Op`](lichen_crdt::Op) and committed here through the same group
//! commit as every write (`commit_writes`: authorized against this node's role and scopes,
//! durable before the answer, pushed to peers, watchers told).

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{wall_ms, ApiError, Node, Reply};
use crate::error::ErrorKind;
use crate::history::{PastAnswer, PastError, PastRequest, Planned};

impl Node {
    /// Answer a [`PastRequest`].
    pub(super) fn past(&mut self, req: PastRequest, reply: Reply<PastAnswer>) {
        let answer = match crate::history::run(&mut self.store, &self.key, req, wall_ms()) {
            Err(e) => Err(self.past_error(e)),
            Ok(Planned::Answer(a)) => Ok(a),
            Ok(Planned::Write {
                op: None,
                mut report,
                ..
            }) => {
                report.insert("hash".into(), Value::Null);
                report.insert("changed".into(), json!(false));
                Ok(PastAnswer::Json(Value::Object(report)))
            }
            Ok(Planned::Write {
                doc,
                op: Some(op),
                mut report,
            }) => {
                let (tx, mut rx) = oneshot::channel();
                self.commit_writes(vec![(doc, op, tx)]);
                match rx.try_recv() {
                    Ok(Ok(hash)) => {
                        report.insert("changed".into(), json!(hash.is_some()));
                        report.insert("hash".into(), json!(hash));
                        Ok(PastAnswer::Json(Value::Object(report)))
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(ApiError::new(
                        ErrorKind::Internal,
                        "the write was not answered; see the agent's log",
                    )),
                }
            }
        };
        let _ = reply.send(answer);
    }

    fn past_error(&self, e: PastError) -> ApiError {
        match e {
            PastError::History(lichen_crdt::HistoryError::Store(e)) => self.write_error(e),
            e => ApiError::new(e.status(), e.to_string()),
        }
    }
}
