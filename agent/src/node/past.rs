//! The node task's handling of [`Command::Past`]: reads of the past, blame, export and audit
//! bundles are answered from the store ([`crate::history::run`]); a revert or an import is
//! planned there as an [`Op`](lichen_crdt::Op) and committed here through the same group
//! commit as every write (`handle_commands`: authorized against this node's role and scopes,
//! durable before the answer, pushed to peers, watchers told).

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::command::{Command, Reply};
use super::{wall_ms, ApiError, Node};
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
                // Through the group commit, as one more write of this batch (a write
                // request is never held here: `Command::writes` holds it before).
                self.handle_commands(vec![Command::Write {
                    doc,
                    op,
                    expect: None,
                    reply: tx,
                }]);
                match rx.try_recv() {
                    Ok(Ok(w)) => {
                        report.insert("changed".into(), json!(w.hash.is_some()));
                        report.insert("hash".into(), json!(w.hash));
                        report.insert("heads".into(), json!(w.heads));
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
            e => ApiError::new(e.kind(), e.to_string()),
        }
    }
}
