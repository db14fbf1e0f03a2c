//! Watchers and notices: how a change reaches the API's watch streams and the file bindings.
//!
//! Every document change (a local commit, changes applied from a peer, a carried-forward
//! write, a membership edit) goes through `Node::doc_changed`: it re-reads the value under
//! each watcher of that document and updates its `watch` channel when the heads moved (no
//! round trip per change), then broadcasts a [`Notice`] to the file bindings.

use std::sync::Arc;

use lichen_crdt::{PathSeg, StoreError};
use serde_json::Value;
use tokio::sync::watch;

use super::{heads_string, Node};

/// The value at a watched path and the document heads it was read at (`""` and null when
/// the path holds nothing).
#[derive(Debug, Default)]
pub(crate) struct Watched {
    pub heads: String,
    pub value: Value,
}

/// A watch (`GET /v1/docs/{doc}/{path}?watch`) subscriber, kept by the node task.
pub(super) struct Watcher {
    pub(super) path: Vec<PathSeg>,
    pub(super) tx: watch::Sender<Arc<Watched>>,
}

/// A document changed (locally or from a peer).
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    pub doc: String,
}

impl Node {
    /// A document changed: update its watchers, then tell the other subscribers (file
    /// bindings).
    pub(super) fn doc_changed(&mut self, doc: String) {
        if let Some(mut list) = self.watchers.remove(&doc) {
            list.retain(|w| !w.tx.is_closed());
            let mut heads: Option<String> = None;
            for w in &list {
                let snap = match self.snapshot(&doc, &w.path, &mut heads) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(doc = %doc, error = %e, "cannot read a watched value");
                        continue;
                    }
                };
                w.tx.send_if_modified(|cur| {
                    let changed = cur.heads != snap.heads;
                    if changed {
                        *cur = Arc::new(snap);
                    }
                    changed
                });
            }
            if !list.is_empty() {
                self.watchers.insert(doc.clone(), list);
            }
        }
        let _ = self.notices.send(Notice { doc });
    }

    /// The watched value at `path`; `heads` caches the document's heads across watchers.
    pub(super) fn snapshot(
        &self,
        doc: &str,
        path: &[PathSeg],
        heads: &mut Option<String>,
    ) -> Result<Watched, StoreError> {
        Ok(match self.store.get(doc, path)? {
            Some(value) => {
                let h = match heads {
                    Some(h) => h.clone(),
                    None => heads.insert(heads_string(&self.store.heads(doc)?)).clone(),
                };
                Watched { heads: h, value }
            }
            None => Watched::default(),
        })
    }
}
