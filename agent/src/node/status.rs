//! The node's views for `GET /v1/status` and `GET /v1/members`, read from the store, the sync
//! engine, the transport and the metrics by the node task.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use lichen_crdt::{Member, NodeId, Role, StoreError, MEMBERSHIP_DOC};

use super::{ApiError, Node};
use crate::views::{
    DocStatusView, MemberView, NodeView, PeerView, StatusView, StorageView, SyncStatsView,
};

impl Node {
    pub(super) fn status(&self) -> Result<StatusView, ApiError> {
        // Before the reads below, which may load documents until the next trim.
        let loaded_docs = self.store.loaded_docs();
        let me = self.key.node_id();
        let m = self.store.membership();
        let now = self.now();
        let conns = self.endpoint.connections();
        let peers: Vec<PeerView> = self
            .known_peers
            .iter()
            .map(|id| {
                let c = conns.iter().find(|c| c.peer == id.0);
                PeerView {
                    id: id.to_string(),
                    name: m.name_of(id).to_string(),
                    connected: c.is_some(),
                    addr: c.map(|c| c.remote_addr.to_string()),
                    rtt_ms: c.map(|c| c.rtt.as_secs_f64() * 1000.0),
                    last_sync_ms_ago: self.last_caught_up.get(id).map(|t| now.saturating_sub(*t)),
                }
            })
            .collect();
        let mut docs = self.store.list_docs()?;
        docs.push(MEMBERSHIP_DOC.to_string());
        let docs: Vec<DocStatusView> = docs
            .iter()
            .map(|d| {
                Ok(DocStatusView {
                    doc: d.clone(),
                    heads: self
                        .store
                        .heads(d)?
                        .iter()
                        .map(|h| NodeId(*h).to_string())
                        .collect(),
                    changes: self.store.change_count(d)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let stats = self.engine.stats();
        let scrub = self.store.scrub_status()?;
        let quarantined: BTreeMap<String, Vec<String>> = self
            .store
            .quarantined()?
            .into_iter()
            .map(|(d, hs)| (d, hs.iter().map(|h| NodeId(*h).to_string()).collect()))
            .collect();
        Ok(StatusView {
            node: NodeView {
                id: me.to_string(),
                name: self.name.clone(),
                role: m
                    .get(&me)
                    .map(|x| x.role.as_str())
                    .unwrap_or("not a member")
                    .to_string(),
                revoked: m.get(&me).is_some_and(|x| x.role == Role::Removed),
                listen: self.endpoint.local_addr().to_string(),
            },
            cluster: NodeId(self.store.cluster_id()).to_string(),
            join_token: self.join_token.clone(),
            peers,
            docs,
            pending_changes: self.store.pending_len() as u64,
            writes_held: self.hold_until.map(|_| self.held.len() as u64),
            restart_pending: self.restart_pending.clone(),
            sync_lag_ms: self.metrics.sync_lag_ms.load(Relaxed),
            rejected: self.metrics.labelled("lichen_changes_rejected_total"),
            store_errors: self.metrics.labelled("lichen_store_errors_total"),
            sync: SyncStatsView {
                messages_sent: stats.sent_messages,
                messages_received: stats.received_messages,
                bytes_sent: stats.sent_bytes,
                bytes_received: stats.received_bytes,
                applied: stats.applied,
                rejected: stats.rejected,
                dropped_pushes: stats.dropped_pushes,
            },
            storage: StorageView {
                loaded_docs: loaded_docs as u64,
                corrupt_found: scrub.corrupt_found,
                corrupt_ever: scrub.corrupt_ever,
                quarantined: scrub.quarantined,
                healed: scrub.healed,
                snapshots_dropped: scrub.snapshots_dropped,
                scrubbed: scrub.checked,
                scrub_passes: scrub.passes,
                quarantined_changes: quarantined,
            },
            voided: self
                .metrics
                .labelled("lichen_changes_voided_total")
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .collect(),
            carried_forward: self.metrics.carried_forward.load(Relaxed),
            equivocators: self
                .store
                .equivocators()?
                .iter()
                .map(|i| i.to_string())
                .collect(),
            // The render manager's, added by the API (`NodeHandle::bindings`).
            bindings: Vec::new(),
        })
    }
}

/// One member, as `GET /v1/members` lists it.
pub(super) fn member_view(id: &NodeId, m: &Member, root: bool) -> MemberView {
    MemberView {
        id: id.to_string(),
        name: m.name.clone(),
        role: m.role.as_str().to_string(),
        addrs: m.addrs.clone(),
        scopes: m.scopes.clone(),
        root,
    }
}
