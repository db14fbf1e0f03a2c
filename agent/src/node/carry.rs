//! Voided changes, and carrying this node's own void writes forward.
//!
//! The store reports changes that were valid here and became void (a revoked author, a
//! change built on a void one). The node task logs and counts them, and when one of them is
//! this node's own (or at start), writes the values of its void acknowledged writes again as a
//! new change (`Store::carry_forward`), committed durably and pushed like a local write.

use std::collections::BTreeMap;

use lichen_crdt::NodeId;

use super::{wall_ms, Node};

impl Node {
    /// Changes the store voided since the last call: log and count them, and when one of them
    /// is this node's own (or `always`, at start), carry this node's void writes forward as
    /// new changes (see `lichen_crdt::store` `carry`): durable, then pushed like local writes.
    pub(super) fn handle_voided(&mut self, always: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let notes = self.store.take_voided();
        let me = self.key.node_id();
        let own = notes.iter().any(|v| v.author == me);
        let mut groups: BTreeMap<(&str, &'static str), Vec<String>> = BTreeMap::new();
        for v in &notes {
            self.metrics
                .inc_labelled("lichen_changes_voided_total", v.reason, 1);
            groups
                .entry((v.doc.as_str(), v.reason))
                .or_default()
                .push(NodeId(v.hash).to_string());
        }
        for ((doc, reason), hashes) in groups {
            let count = hashes.len();
            let shown = &hashes[..count.min(8)];
            tracing::warn!(doc, reason, count, hashes = ?shown, "changes that were valid here became void");
        }
        if (!own && !always) || self.restored.is_some() {
            return;
        }
        let carried = match self.store.carry_forward(&self.key, wall_ms()) {
            Ok(c) => c,
            Err(e) => {
                if !self.storage_failure(
                    &e,
                    "own writes to carry forward (retried at the next start)",
                ) {
                    tracing::error!(error = %e, "carrying this node's void writes forward failed");
                }
                return;
            }
        };
        let mut committed = Vec::new();
        for c in carried {
            self.metrics
                .carried_forward
                .fetch_add(c.voided.len() as u64, Relaxed);
            let voided: Vec<String> = c.voided.iter().map(|h| NodeId(*h).to_string()).collect();
            let new = c
                .change
                .as_ref()
                .and_then(|ch| ch.hash())
                .map(|h| NodeId(h).to_string());
            tracing::warn!(
                doc = %c.doc,
                voided = ?voided,
                new_change = new.as_deref().unwrap_or("none (the values already stand)"),
                "this node's acknowledged writes were void (built on a void change): their values were written again as a new change"
            );
            if let Some(ch) = c.change {
                committed.push(ch);
                self.doc_changed(c.doc);
            }
        }
        if !committed.is_empty() {
            self.committed = true;
            self.metrics
                .changes_sent
                .fetch_add(committed.len() as u64, Relaxed);
            let now = self.now();
            if let Err(e) = self.engine.local_commit(now, &committed, &mut self.store) {
                tracing::error!(error = %e, "push failed; anti-entropy will deliver");
            }
        }
    }
}
