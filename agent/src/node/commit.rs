//! Group commit and the write hold.
//!
//! Every write command waiting in the channel is taken and committed in one SQLite
//! transaction (one fsync); each caller is answered only after that commit, and the changes
//! are pushed to connected peers right after (durable before announced).
//!
//! After a start, writes and membership edits are held (queued in `Node::held`, answered
//! later) until the node's first catch-up with a peer, or `sync.hold_writes_ms` (see the
//! module doc of `node`).

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use lichen_crdt::{NodeId, Op};

use super::command::{refuse, Command, Reply};
use super::{wall_ms, Node};

/// At most this many writes wait while writes are held; more are refused (503).
const MAX_HELD: usize = 1024;

impl Node {
    /// Answer a batch of commands: writes are held or group-committed, the others are
    /// answered one by one.
    pub(super) fn handle_commands(&mut self, batch: Vec<Command>) {
        let mut writes: Vec<(String, Op, Reply<Option<String>>)> = Vec::new();
        let mut others = Vec::new();
        for c in batch {
            match c {
                c if self.hold_until.is_some() && c.writes() => {
                    if self.held.len() < MAX_HELD {
                        self.held.push(c);
                    } else {
                        refuse(c, "this node is catching up with its peers after a restart before it writes; retry in a few seconds");
                    }
                }
                Command::Write { doc, op, reply } => writes.push((doc, op, reply)),
                other => others.push(other),
            }
        }
        if !writes.is_empty() {
            self.commit_writes(writes);
        }
        for c in others {
            self.handle_command(c);
        }
    }

    fn commit_writes(&mut self, writes: Vec<(String, Op, Reply<Option<String>>)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let t = Instant::now();
        let ops: Vec<(String, Op)> = writes
            .iter()
            .map(|(d, o, _)| (d.clone(), o.clone()))
            .collect();
        let results = self.store.write_batch(&self.key, &ops, wall_ms());
        let elapsed = t.elapsed();
        let mut committed = Vec::new();
        let mut docs = BTreeSet::new();
        for ((doc, _, reply), r) in writes.into_iter().zip(results) {
            let answer = match r {
                Ok(Some(ch)) => {
                    self.metrics.writes.fetch_add(1, Relaxed);
                    self.metrics.write_latency.observe(elapsed);
                    let h = ch.hash().map(|h| NodeId(h).to_string());
                    committed.push(ch);
                    docs.insert(doc);
                    Ok(h)
                }
                Ok(None) => Ok(None),
                Err(e) => {
                    self.metrics.write_errors.fetch_add(1, Relaxed);
                    Err(self.write_error(e))
                }
            };
            let _ = reply.send(answer);
        }
        self.committed |= !committed.is_empty();
        // Writes to one document in one group commit share a change: announce it once.
        let mut seen = HashSet::new();
        committed.retain(|c| seen.insert(c.hash()));
        if !committed.is_empty() {
            self.metrics
                .changes_sent
                .fetch_add(committed.len() as u64, Relaxed);
            let now = self.now();
            if let Err(e) = self.engine.local_commit(now, &committed, &mut self.store) {
                tracing::error!(error = %e, "push failed; anti-entropy will deliver");
            }
        }
        for doc in docs {
            self.doc_changed(doc);
        }
    }
}
