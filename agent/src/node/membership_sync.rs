//! Membership → transport: the one place the membership document reaches the transport.
//!
//! After every change to the membership document the node task aligns the transport with it:
//! who may connect (the [`Gate`](super::Gate): members, former members, the join seed),
//! whom to dial and at which addresses (members' `addrs` and the join seeds, names resolved by
//! the transport's dialer at each attempt), the redial cap
//! while this node waits to be admitted, and which keys are refused (flagged for
//! equivocation). It also publishes this node's own configured addresses into the document,
//! once per run (see the module doc of `node`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use lichen_crdt::{NodeId, Role, MEMBERSHIP_DOC};
use lichen_transport::{PeerAddr, PeerKey};

use super::{wall_ms, Node};

/// Longest pause between dials of a join seed while this node waits to be admitted.
const JOIN_REDIAL_CAP: Duration = Duration::from_secs(1);

impl Node {
    /// Tell the transport to refuse every key flagged for equivocation (other than ours: a
    /// node does not connect to itself). Two machines running one key make the peers'
    /// connections flip between them; once the key is proven cloned, neither gets one.
    pub(super) fn refuse_flagged(&mut self) {
        let me = self.key.node_id();
        let flagged: Vec<NodeId> = match self.store.equivocators() {
            Ok(f) => f.into_iter().filter(|k| *k != me).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the keys flagged for equivocation");
                return;
            }
        };
        if flagged == self.refused {
            return;
        }
        for k in flagged.iter().filter(|k| !self.refused.contains(k)) {
            tracing::warn!(peer = %k, "key flagged for equivocation (a cloned key?): its connections are refused; remove it and re-admit the machine with a new key");
        }
        self.endpoint.set_refused(flagged.iter().map(|k| k.0));
        self.refused = flagged;
    }

    /// Write this node's configured addresses into the membership document if it shows
    /// others, once per run, after the write hold (see the module doc). Returns whether a
    /// change was made.
    pub(super) fn publish_own_addrs(&mut self) -> bool {
        let me = self.key.node_id();
        if self.addrs_checked || self.hold_until.is_some() || self.advertise.is_empty() {
            return false;
        }
        let m = self.store.membership();
        if !m.is_active(&me) {
            return false;
        }
        self.addrs_checked = true;
        if m.get(&me).is_some_and(|x| x.addrs == self.advertise) {
            return false;
        }
        match self
            .store
            .set_own_addrs(&self.key, self.advertise.clone(), wall_ms())
        {
            Ok(Some(ch)) => {
                tracing::info!(addrs = ?self.advertise, "published this node's addresses");
                self.committed = true;
                let now = self.now();
                if let Err(e) = self.engine.local_commit(now, &[ch], &mut self.store) {
                    tracing::error!(error = %e, "push failed; anti-entropy will deliver");
                }
                self.doc_changed(MEMBERSHIP_DOC.to_string());
                self.refresh_membership();
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not publish own addresses");
                false
            }
        }
    }

    /// Align the transport with the membership document: who may connect, whom to dial.
    pub(super) fn refresh_membership(&mut self) {
        let m = self.store.membership().clone();
        if self.membership.as_ref() == Some(&m) {
            return;
        }
        let me = self.key.node_id();
        let active: HashSet<PeerKey> = m
            .members
            .iter()
            .filter(|(_, mm)| mm.role != Role::Removed)
            .map(|(id, _)| id.0)
            .collect();
        let former: HashSet<PeerKey> = m
            .members
            .iter()
            .filter(|(_, mm)| mm.role == Role::Removed)
            .map(|(id, _)| id.0)
            .collect();
        if let Ok(mut g) = self.gate.members.write() {
            *g = active.clone();
        }
        if let Ok(mut g) = self.gate.former.write() {
            *g = former;
        }
        // Removed for good (the proof came from a peer, or this node's own store holds it):
        // nothing left to sync, so no one to dial. Its writes are refused as revoked.
        let removed = m.get(&me).is_some_and(|x| x.role == Role::Removed);
        if removed
            && self
                .membership
                .as_ref()
                .and_then(|o| o.get(&me))
                .map(|x| x.role)
                != Some(Role::Removed)
        {
            tracing::error!(
                node = %me,
                "this node was removed from the cluster by an admin: its key is revoked, its writes are refused and it no longer syncs; to take part again, start it with a new data directory (a new key) and ask an admin to add it"
            );
        }
        if let Ok(mut b) = self.gate.bootstrap.write() {
            *b = self.seeds.iter().map(|(id, _)| id.0).collect();
        }
        // Addresses go to the transport as written (`host:port`, names allowed): its dialer
        // resolves names at each attempt, so a DNS change applies at the next redial and a
        // lookup never blocks this thread.
        let mut wanted: BTreeMap<NodeId, Vec<PeerAddr>> = BTreeMap::new();
        for (id, mm) in &m.members {
            if *id == me || mm.role == Role::Removed || removed {
                continue;
            }
            let addrs: Vec<PeerAddr> = mm.addrs.iter().map(|a| PeerAddr::parse(a)).collect();
            wanted.insert(*id, addrs);
        }
        for (id, addr) in self.seeds.iter().filter(|_| !removed) {
            let a = PeerAddr::parse(addr);
            let entry = wanted.entry(*id).or_default();
            if !entry.contains(&a) {
                entry.push(a);
            }
        }
        for id in &self.known_peers {
            if !wanted.contains_key(id) {
                self.endpoint.remove_peer(id.0);
            }
        }
        for (id, addrs) in &wanted {
            self.endpoint.add_peer(id.0, addrs.clone());
        }
        // Waiting to be admitted (not a member, not removed): the seeds refuse us until an
        // admin runs `members add`, and we must notice that within about a second, not after
        // a backoff pause that has grown to half a minute.
        let waiting = !m.is_active(&me) && m.get(&me).is_none_or(|x| x.role != Role::Removed);
        for (id, _) in &self.seeds {
            self.endpoint
                .set_redial_cap(id.0, waiting.then_some(JOIN_REDIAL_CAP));
        }
        self.known_peers = wanted.keys().copied().collect();
        self.endpoint.membership_changed();
        // Our own addresses are published by `publish_own_addrs`, once per run.
        if !m.is_active(&me) && m.root.is_some() && !removed {
            tracing::warn!(
                node = %me,
                "this node is not a member yet: on an admin run `lichen members add {me} --role writer --name {}`",
                self.name
            );
        }
        self.membership = Some(self.store.membership().clone());
    }
}
