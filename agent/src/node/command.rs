//! The commands the node task answers, and how it answers those that are not writes.
//!
//! Callers (the HTTP API, the file bindings) send a [`Command`] with a oneshot [`Reply`]
//! through a `NodeHandle`; the task takes every command waiting, hands the writes to the group
//! commit (`commit`), and answers the others here, one by one, from the store.

use std::collections::BTreeSet;
use std::sync::Arc;

use lichen_crdt::{
    format_path, HistoryEntry, NodeId, Op, PathSeg, Role, StoreError, MEMBERSHIP_DOC,
};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use super::settings::LiveSettings;
use super::status::member_view;
use super::watchers::{Watched, Watcher};
use super::{heads_string, wall_ms, ApiError, Node};
use crate::views::{MemberView, StatusView};

/// The answer to a write: the change made (none if nothing changed, or if the write was not
/// made because the heads moved) and the document's heads after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriteOutcome {
    /// The signed change's hash.
    pub(crate) hash: Option<String>,
    /// The document's heads after the write (or now, when `heads_moved`).
    pub(crate) heads: String,
    /// The write named heads (`expect`) that were no longer the document's: it was not made.
    pub(crate) heads_moved: bool,
}

/// Where the node task sends a command's answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A request to the node task.
pub(crate) enum Command {
    /// A local edit. With `expect` (heads, as `Get` answers them), it is made only if those
    /// are still the document's heads when it is committed (`commit`: a local compare-and-set).
    Write {
        doc: String,
        op: Op,
        expect: Option<String>,
        reply: Reply<WriteOutcome>,
    },
    Get {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<Option<(Value, String)>>,
    },
    Ls {
        doc: Option<String>,
        path: Vec<PathSeg>,
        reply: Reply<Value>,
    },
    History {
        doc: String,
        path: Vec<PathSeg>,
        limit: usize,
        reply: Reply<Vec<HistoryEntry>>,
    },
    Conflicts {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<Vec<Value>>,
    },
    /// How many changes of `doc` this node has signed (its entry in the document's version
    /// vector): a file binding compares it across a restart to tell whether an edit it sent
    /// was committed (see `render::last`). Held, like writes, until this node has caught up
    /// after a start.
    OwnSeq {
        doc: String,
        reply: Reply<u64>,
    },
    Members {
        reply: Reply<Vec<MemberView>>,
    },
    /// A document's current heads (as `Get` prints them) and the names of the authors of the
    /// changes at `heads` (the current heads when `None`): what a file binding's provenance
    /// header names (see `render::provenance`).
    Authors {
        doc: String,
        heads: Option<String>,
        /// The subtree whose values are meant (empty: the whole document).
        path: Vec<lichen_crdt::PathSeg>,
        reply: Reply<(String, Vec<String>)>,
    },
    MemberAdd {
        id: NodeId,
        name: String,
        role: Role,
        addrs: Vec<String>,
        scopes: Vec<String>,
        reply: Reply<String>,
    },
    MemberRemove {
        id: NodeId,
        reply: Reply<String>,
    },
    MemberRole {
        id: NodeId,
        role: Role,
        reply: Reply<String>,
    },
    /// Replace a member's scopes (empty: every document).
    MemberScopes {
        id: NodeId,
        scopes: Vec<String>,
        reply: Reply<String>,
    },
    Status {
        reply: Reply<StatusView>,
    },
    /// A consistent copy of the store (`lichen backup`): taken on this task with the store's
    /// own connection, so no write interleaves (see `lichen_crdt::store::backup`).
    Backup {
        reply: Reply<Vec<u8>>,
    },
    /// A configuration reload: apply the settings that can change while running, and
    /// remember the changed settings that wait for the next start (`status` shows them).
    Reload {
        live: LiveSettings,
        restart_pending: Vec<String>,
        reply: Reply<()>,
    },
    /// Follow the value at a path: the receiver holds the current value and is updated by
    /// the node task itself whenever the document's heads change (no round trip per change).
    Watch {
        doc: String,
        path: Vec<PathSeg>,
        reply: Reply<watch::Receiver<Arc<Watched>>>,
    },
    /// Read the past, blame, export, audit; or revert or import (a write): see
    /// [`crate::history`] and `node/past.rs`.
    Past {
        req: crate::history::PastRequest,
        reply: Reply<crate::history::PastAnswer>,
    },
}

impl Command {
    /// Whether this command waits while writes are held: it makes a change signed by this
    /// node, or it is [`Command::OwnSeq`], which a file binding asks just before it reads the
    /// document to merge an edit into (so that the merge sees what the catch-up brought).
    pub(super) fn writes(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::OwnSeq { .. }
                | Command::MemberAdd { .. }
                | Command::MemberRemove { .. }
                | Command::MemberRole { .. }
                | Command::MemberScopes { .. }
        ) || matches!(self, Command::Past { req, .. } if req.writes())
    }
}

/// Answer a write or membership edit that was not made (503, `why`).
pub(super) fn refuse(c: Command, why: &str) {
    let e = ApiError::new(crate::error::ErrorKind::Unavailable, why);
    match c {
        Command::Write { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::OwnSeq { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::MemberAdd { reply, .. }
        | Command::MemberRemove { reply, .. }
        | Command::MemberRole { reply, .. }
        | Command::MemberScopes { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Past { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        _ => {}
    }
}

impl Node {
    /// See [`Command::Authors`]: the document's heads, and the names of the authors of the
    /// values under `path` (the change that set each leaf, by [`Store::blame`]'s rule; the
    /// winner of a conflict). When `heads` are given and the document has moved past them
    /// (a change arrived between a render and its header; the render that follows corrects
    /// it), or when the subtree has no leaves to blame, the names are those of the authors of
    /// the changes at `heads`. Heads that are not hex hashes, or not stored, are skipped.
    ///
    /// [`Store::blame`]: lichen_crdt::Store::blame
    fn authors(
        &mut self,
        doc: &str,
        heads: Option<String>,
        path: &[lichen_crdt::PathSeg],
    ) -> Result<(String, Vec<String>), StoreError> {
        let current = self.store.heads(doc)?;
        let hashes: Vec<[u8; 32]> = match heads {
            None => current.clone(),
            Some(h) => h
                .split(',')
                .filter_map(|x| x.parse::<NodeId>().ok())
                .map(|id| id.0)
                .collect(),
        };
        let at_current = {
            let (mut a, mut b) = (hashes.clone(), current.clone());
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        let mut names = BTreeSet::new();
        if at_current {
            if let Ok(leaves) = self.store.blame(doc, path) {
                for l in &leaves {
                    if let Some(s) = l.setters.first() {
                        names.insert(s.author_name.clone());
                    }
                }
            }
        }
        if names.is_empty() {
            let m = self.store.membership();
            for h in &hashes {
                if let Some(c) = self.store.get_change(h)? {
                    names.insert(m.name_of(&c.author));
                }
            }
        }
        Ok((heads_string(&current), names.into_iter().collect()))
    }

    /// A backup of the store into a temporary file beside it, read back and deleted.
    fn backup(&self) -> Result<Vec<u8>, ApiError> {
        let db = self.store.path();
        let tmp = db.with_file_name(format!("backup-{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let r = self
            .store
            .backup_to(&tmp, self.key.node_id(), wall_ms())
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::read(&tmp).map_err(|e| format!("{}: {e}", tmp.display())))
            .map_err(|e| {
                ApiError::new(
                    crate::error::ErrorKind::Internal,
                    format!("backup failed: {e}"),
                )
            });
        let _ = std::fs::remove_file(&tmp);
        r
    }

    fn member_change(
        &mut self,
        r: Result<lichen_crdt::SignedChange, StoreError>,
    ) -> Result<String, ApiError> {
        let ch = r.map_err(|e| self.change_error(e, "membership change"))?;
        self.committed = true;
        let now = self.now();
        let _ = self
            .engine
            .local_commit(now, std::slice::from_ref(&ch), &mut self.store);
        self.doc_changed(MEMBERSHIP_DOC.to_string());
        self.refresh_membership();
        Ok(ch.hash().map(|h| NodeId(h).to_string()).unwrap_or_default())
    }

    pub(super) fn handle_command(&mut self, c: Command) {
        let now_wall = wall_ms();
        match c {
            Command::Write { .. } => {}
            Command::Backup { reply } => {
                let _ = reply.send(self.backup());
            }
            Command::Past { req, reply } => self.past(req, reply),
            Command::Get { doc, path, reply } => {
                let r = (|| {
                    let v = self.store.get(&doc, &path)?;
                    let heads = heads_string(&self.store.heads(&doc)?);
                    Ok(v.map(|v| (v, heads)))
                })();
                let _ = reply.send(r.map_err(|e: StoreError| e.into()));
            }
            Command::Ls { doc, path, reply } => {
                let r = match doc {
                    // A document whose values were all deleted is not listed.
                    None => self
                        .store
                        .list_docs_with_values()
                        .map(|d| json!(d))
                        .map_err(ApiError::from),
                    Some(d) => match self.store.keys(&d, &path) {
                        Ok(Some(k)) => Ok(json!(k)),
                        Ok(None) => Err(ApiError::new(
                            crate::error::ErrorKind::NotFound,
                            format!(
                                "`{d}` has nothing at `{}` (list documents with `lichen ls`)",
                                format_path(&path)
                            ),
                        )),
                        Err(e) => Err(e.into()),
                    },
                };
                let _ = reply.send(r);
            }
            Command::History {
                doc,
                path,
                limit,
                reply,
            } => {
                let _ = reply.send(self.store.history(&doc, &path, limit).map_err(Into::into));
            }
            Command::Conflicts { doc, path, reply } => {
                let _ = reply.send(self.store.conflicts(&doc, &path).map_err(Into::into));
            }
            Command::OwnSeq { doc, reply } => {
                let me = self.key.node_id();
                let r = self
                    .store
                    .clock(&doc)
                    .map(|c| c.get(&me).copied().unwrap_or(0));
                let _ = reply.send(r.map_err(Into::into));
            }
            Command::Members { reply } => {
                let m = self.store.membership();
                let list: Vec<MemberView> = m
                    .members
                    .iter()
                    .map(|(id, mm)| member_view(id, mm, m.root == Some(*id)))
                    .collect();
                let _ = reply.send(Ok(list));
            }
            Command::Authors {
                doc,
                heads,
                path,
                reply,
            } => {
                let _ = reply.send(self.authors(&doc, heads, &path).map_err(Into::into));
            }
            Command::MemberAdd {
                id,
                name,
                role,
                addrs,
                scopes,
                reply,
            } => {
                let r = self
                    .store
                    .add_member(&self.key, id, &name, role, addrs, scopes, now_wall);
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::MemberRemove { id, reply } => {
                let r = self.store.remove_member(&self.key, id, now_wall);
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::MemberRole { id, role, reply } => {
                let r = if role == Role::Removed {
                    self.store.remove_member(&self.key, id, now_wall)
                } else {
                    self.store.set_role(&self.key, id, role, now_wall)
                };
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::MemberScopes { id, scopes, reply } => {
                let r = self.store.set_scopes(&self.key, id, scopes, now_wall);
                let r = self.member_change(r);
                let _ = reply.send(r);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Reload {
                live,
                restart_pending,
                reply,
            } => {
                self.apply_settings(live, restart_pending);
                let _ = reply.send(Ok(()));
            }
            Command::Watch { doc, path, reply } => {
                // Forget watchers whose stream has ended (on any document).
                self.watchers.retain(|_, list| {
                    list.retain(|w| !w.tx.is_closed());
                    !list.is_empty()
                });
                let r = self.snapshot(&doc, &path, &mut None).map(|snap| {
                    let (tx, rx) = watch::channel(Arc::new(snap));
                    self.watchers
                        .entry(doc)
                        .or_default()
                        .push(Watcher { path, tx });
                    rx
                });
                let _ = reply.send(r.map_err(ApiError::from));
            }
        }
    }
}
