//! Group commit and the write hold.
//!
//! Every write command waiting in the channel is taken and committed in one SQLite
//! transaction (one fsync); each caller is answered only after that commit, and the changes
//! are pushed to connected peers right after (durable before announced).
//!
//! After a start, writes and membership edits are held (queued in `Node::held`, answered
//! later) until the node's first catch-up with a peer, or `sync.hold_writes_ms` (see the
//! module doc of `node`). On a data directory restored with its key they are refused
//! instead, until that catch-up (`Node::restored`).
//!
//! A write with `If-Match` heads is checked here, right before its group is committed, with
//! nothing in between: a compare-and-set against this node's copy of the document (a peer's
//! concurrent change may still merge after it; it is not consensus).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use lichen_crdt::{NodeId, Op};

use super::command::{refuse, Command, Reply, WriteOutcome};
use super::{heads_string, wall_ms, Node};

/// At most this many writes wait while writes are held; more are refused (503).
const MAX_HELD: usize = 1024;

/// One write waiting for the group commit.
struct Pending {
    doc: String,
    op: Op,
    expect: Option<String>,
    reply: Reply<WriteOutcome>,
}

/// Heads as a comparable set (the order and spacing a client sends them in do not matter).
fn heads_set(h: &str) -> BTreeSet<&str> {
    h.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

impl Node {
    /// Answer a batch of commands: writes are held or group-committed, the others are
    /// answered one by one.
    ///
    /// A conditional write (`expect`) is checked against the document's heads when its group
    /// is committed; so that no earlier write of the same batch comes between that check and
    /// the write, the writes before it to the same document are committed first.
    pub(super) fn handle_commands(&mut self, batch: Vec<Command>) {
        let mut writes: Vec<Pending> = Vec::new();
        let mut others = Vec::new();
        for c in batch {
            match c {
                c if self.restored.is_some() && c.writes() => {
                    refuse(c, "this node was restored from a backup with its key and has not reached a peer yet: it writes nothing until it has caught up (its key may have signed later changes elsewhere). Bring a peer up, or start it with --allow-isolated-writes to accept the risk");
                }
                c if self.hold_until.is_some() && c.writes() => {
                    if self.held.len() < MAX_HELD {
                        self.held.push(c);
                    } else {
                        refuse(c, "this node is catching up with its peers after a restart before it writes; retry in a few seconds");
                    }
                }
                Command::Write {
                    doc,
                    op,
                    expect,
                    reply,
                } => {
                    if expect.is_some() && writes.iter().any(|w| w.doc == doc) {
                        self.commit_writes(std::mem::take(&mut writes));
                    }
                    writes.push(Pending {
                        doc,
                        op,
                        expect,
                        reply,
                    });
                }
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

    fn commit_writes(&mut self, writes: Vec<Pending>) {
        use std::sync::atomic::Ordering::Relaxed;
        // Conditional writes whose heads moved are answered now and left out. Nothing runs
        // on the store between this check and the commit below (one task owns it).
        let mut writes_ok = Vec::with_capacity(writes.len());
        for w in writes {
            let Some(expect) = &w.expect else {
                writes_ok.push(w);
                continue;
            };
            let now = match self.store.heads(&w.doc) {
                Ok(h) => heads_string(&h),
                Err(e) => {
                    let _ = w.reply.send(Err(e.into()));
                    continue;
                }
            };
            if heads_set(&now) == heads_set(expect) {
                writes_ok.push(w);
            } else {
                self.metrics.write_errors.fetch_add(1, Relaxed);
                let _ = w.reply.send(Ok(WriteOutcome {
                    hash: None,
                    heads: now,
                    heads_moved: true,
                }));
            }
        }
        let writes = writes_ok;
        if writes.is_empty() {
            return;
        }
        let t = Instant::now();
        let ops: Vec<(String, Op)> = writes
            .iter()
            .map(|w| (w.doc.clone(), w.op.clone()))
            .collect();
        let results = self.store.write_batch(&self.key, &ops, wall_ms());
        let elapsed = t.elapsed();
        let mut committed = Vec::new();
        let mut docs = BTreeSet::new();
        let mut heads: BTreeMap<String, String> = BTreeMap::new();
        for (w, r) in writes.into_iter().zip(results) {
            let hash = match r {
                Ok(Some(ch)) => {
                    self.metrics.writes.fetch_add(1, Relaxed);
                    self.metrics.write_latency.observe(elapsed);
                    let h = ch.hash().map(|h| NodeId(h).to_string());
                    committed.push(ch);
                    docs.insert(w.doc.clone());
                    Ok(h)
                }
                Ok(None) => Ok(None),
                Err(e) => {
                    self.metrics.write_errors.fetch_add(1, Relaxed);
                    Err(self.write_error(e))
                }
            };
            let answer = hash.map(|hash| {
                let heads = heads
                    .entry(w.doc.clone())
                    .or_insert_with(|| {
                        self.store
                            .heads(&w.doc)
                            .map(|h| heads_string(&h))
                            .unwrap_or_default()
                    })
                    .clone();
                WriteOutcome {
                    hash,
                    heads,
                    heads_moved: false,
                }
            });
            let _ = w.reply.send(answer);
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
