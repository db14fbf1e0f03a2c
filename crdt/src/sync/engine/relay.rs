//! Gossip: new changes travel by push and relay. A change applied here is relayed to `fanout`
//! random peers, in full when small or first-hand, else announced by id (`Announce`) or by
//! version vector (`Have`), and a peer that lacks an announced change fetches it. The engine
//! remembers which peers hold which recent changes (relays skip them) and which peers pruned
//! an author's eager relays (they get held, batched announcements instead).

use super::{SyncEngine, MAX_WANTED};
use crate::identity::NodeId;
use crate::signed::SignedChange;
use crate::sync::wire::{change_id, ChangeId, Clocks, SyncMessage};
use crate::sync::{Replica, SyncError};

impl SyncEngine {
    /// `from` pushed changes: apply them, relay the new ones, pull what they wait for.
    pub(super) fn pushed(
        &mut self,
        now: u64,
        from: NodeId,
        changes: Vec<SignedChange>,
        store: &mut impl Replica,
    ) -> Result<(), SyncError> {
        // A full relay (not from the changes' author, not asked for) that brings nothing new:
        // tell the relayer to announce this author's changes to us instead.
        let n = changes.len();
        let mut prune = None;
        for c in &changes {
            if let Some(h) = c.hash() {
                let id = change_id(&h);
                self.note_holder(now, id, from);
                if c.author != from && !self.fetched.contains_key(&id) {
                    prune = Some(id);
                }
            }
        }
        let outcome = self.ingest(from, changes, store)?;
        if let Some(id) = prune {
            if n > 0 && outcome.duplicates == n {
                self.enqueue(from, SyncMessage::Prune { id });
            }
        }
        if !outcome.applied.is_empty() {
            self.relay(now, from, outcome.applied);
        }
        if outcome.waiting > 0 {
            self.pull(now, from, store)?;
        }
        Ok(())
    }

    /// `from` announced changes by id: fetch those we lack and nobody else is fetching.
    pub(super) fn announced(
        &mut self,
        now: u64,
        from: NodeId,
        ids: Vec<ChangeId>,
        store: &impl Replica,
    ) -> Result<(), SyncError> {
        let wait = self.cfg.pull_gap_ms;
        self.fetched.retain(|_, t| now < *t + wait);
        let mut want = Vec::new();
        for id in ids.into_iter().take(MAX_WANTED) {
            self.note_holder(now, id, from);
            // Asked another announcer recently: wait for its answer.
            if self.fetched.contains_key(&id) || store.holds_id(&id)? {
                continue;
            }
            if self.fetched.len() < MAX_WANTED {
                self.fetched.insert(id, now);
            }
            want.push(id);
        }
        if let [id] = want.as_slice() {
            self.enqueue(from, SyncMessage::FetchOne { id: *id });
        } else if !want.is_empty() {
            self.enqueue(from, SyncMessage::Fetch { ids: want });
        }
        Ok(())
    }

    /// `from` asked for changes by id: push those we hold.
    pub(super) fn fetch(
        &mut self,
        now: u64,
        from: NodeId,
        ids: &[ChangeId],
        store: &impl Replica,
    ) -> Result<(), SyncError> {
        let mut changes = Vec::new();
        for id in ids.iter().take(self.cfg.batch_changes) {
            let c = store.change_by_id(id)?;
            if c.is_some() {
                self.note_holder(now, *id, from);
            }
            changes.extend(c);
        }
        for chunk in self.chunks(changes) {
            self.enqueue(from, push(chunk));
        }
        Ok(())
    }

    /// Split changes into messages within the batch limits.
    pub(super) fn chunks(&self, changes: Vec<SignedChange>) -> Vec<Vec<SignedChange>> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut bytes = 0;
        for c in changes {
            let len = c.encoded_len();
            if !cur.is_empty()
                && (bytes + len > self.cfg.batch_bytes || cur.len() >= self.cfg.batch_changes)
            {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += len;
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Remember that `id` was applied or committed here at `now`.
    pub(super) fn note_recent(&mut self, now: u64, id: ChangeId) {
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((now, id));
    }

    /// Remember that `peer` holds the change `id` (it pushed or announced it to us).
    pub(super) fn note_holder(&mut self, now: u64, id: ChangeId, peer: NodeId) {
        if !self.holders.contains_key(&id) && self.holders.len() >= MAX_WANTED {
            let ttl = self.cfg.anti_entropy_interval_ms;
            self.holders.retain(|_, (t, _)| now < *t + ttl);
            if self.holders.len() >= MAX_WANTED {
                self.holders.clear();
            }
        }
        let (_, peers) = self.holders.entry(id).or_insert((now, Vec::new()));
        if !peers.contains(&peer) && peers.len() < MAX_HOLDERS {
            peers.push(peer);
        }
    }

    /// Send the held announcements that are due (all that are full or due with `full`):
    /// one `Announce` per peer, without the ids the peer is known to hold by now.
    pub(super) fn send_held(&mut self, now: u64, full: bool) {
        let max = self.cfg.announce_max;
        let due: Vec<NodeId> = self
            .held
            .iter()
            .filter(|(_, (t, ids))| now >= *t || (full && ids.len() >= max))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some((_, mut ids)) = self.held.remove(&peer) else {
                continue;
            };
            ids.sort_unstable();
            ids.dedup();
            ids.retain(|id| {
                !self
                    .holders
                    .get(id)
                    .is_some_and(|(_, peers)| peers.contains(&peer))
            });
            for chunk in ids.chunks(max.max(1)) {
                self.enqueue(peer, announce(chunk));
            }
        }
    }

    /// Relay newly applied changes to `fanout` random peers other than the sender and other
    /// than those known to hold them all already (they pushed or announced them to us).
    pub(super) fn relay(&mut self, now: u64, from: NodeId, applied: Vec<SignedChange>) {
        let ids: Vec<ChangeId> = applied
            .iter()
            .filter_map(|c| c.hash().map(|h| change_id(&h)))
            .collect();
        for id in &ids {
            self.note_recent(now, *id);
        }
        let holds_all = |peer: &NodeId| {
            !ids.is_empty()
                && ids.iter().all(|id| {
                    self.holders
                        .get(id)
                        .is_some_and(|(_, peers)| peers.contains(peer))
                })
        };
        let all = self
            .peers
            .iter()
            .filter(|(id, p)| p.up && !p.restricted && **id != from)
            .count();
        let others: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.up && !p.restricted
                    && **id != from
                    && !(self.cfg.relay_skip_holders && holds_all(id))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut fanout = self.cfg.fanout;
        if self.cfg.relay_proportional && all > 0 {
            // Each peer not known to hold the changes is picked with the same probability
            // as without that knowledge (fanout / others): same coverage, fewer messages.
            let scaled = fanout * others.len();
            fanout = scaled / all + usize::from(self.rng.below(all as u64) < (scaled % all) as u64);
        }
        let mut targets = self.rng.choose(&others, fanout);
        // A change pushed by its own author is on its first relay: few nodes hold it yet, so
        // pushing it in full costs few duplicates and saves two message delays.
        let first_hop = applied.iter().all(|c| c.author == from);
        // In a mesh where the author pushes to everyone, the announcements to peers that
        // pruned the author are insurance: hold and batch them (see
        // `Config::pruned_announce_delay_ms`).
        if first_hop
            && self.cfg.eager_first_hop
            && self.cfg.pruned_announce_delay_ms > 0
            && all < self.cfg.fanout
            && !self.pruned.is_empty()
        {
            let delay = self.cfg.pruned_announce_delay_ms;
            let mut full = false;
            targets.retain(|t| {
                if !self.pruned.contains(&(*t, from)) {
                    return true;
                }
                let (_, held) = self.held.entry(*t).or_insert((now + delay, Vec::new()));
                held.extend(ids.iter().copied());
                full |= held.len() >= self.cfg.announce_max;
                false
            });
            if full {
                self.send_held(now, true);
            }
        }
        if targets.is_empty() {
            return;
        }
        for id in &ids {
            for t in &targets {
                self.note_holder(now, *id, *t);
            }
        }
        let bytes: usize = applied.iter().map(SignedChange::encoded_len).sum();
        let (eager, targets): (Vec<NodeId>, Vec<NodeId>) = if bytes <= self.cfg.relay_inline_bytes {
            (targets, Vec::new())
        } else if first_hop && self.cfg.eager_first_hop && bytes <= self.cfg.batch_bytes {
            // Peers that pruned this author (they hold its changes first-hand) get announcements.
            targets
                .into_iter()
                .partition(|t| !self.pruned.contains(&(*t, from)))
        } else {
            (Vec::new(), targets)
        };
        if !eager.is_empty() {
            for chunk in self.chunks(applied.clone()) {
                for t in &eager {
                    self.enqueue(*t, push(chunk.clone()));
                }
            }
        }
        if targets.is_empty() {
            return;
        }
        if applied.len() <= self.cfg.announce_max {
            let mut ids = ids;
            ids.sort_unstable();
            ids.dedup();
            for t in targets {
                self.enqueue(t, announce(&ids));
            }
        } else {
            let mut have = Clocks::new();
            for c in &applied {
                if let Ok(h) = crate::header::parse(&c.bytes) {
                    let e = have
                        .entry(c.doc.clone())
                        .or_default()
                        .entry(c.author)
                        .or_insert(0);
                    *e = (*e).max(h.seq);
                }
            }
            for t in targets {
                self.enqueue(
                    t,
                    SyncMessage::Have {
                        clocks: have.clone(),
                    },
                );
            }
        }
    }
}

/// `Push` of `changes`, as `PushOne` when there is one.
pub(super) fn push(mut changes: Vec<SignedChange>) -> SyncMessage {
    match changes.pop() {
        Some(change) if changes.is_empty() => SyncMessage::PushOne { change },
        Some(last) => {
            changes.push(last);
            SyncMessage::Push { changes }
        }
        None => SyncMessage::Push { changes },
    }
}

/// The announcement of `ids`: `AnnounceOne` for one, `Announce` for more.
fn announce(ids: &[ChangeId]) -> SyncMessage {
    match ids {
        [id] => SyncMessage::AnnounceOne { id: *id },
        _ => SyncMessage::Announce { ids: ids.to_vec() },
    }
}

/// Most recently applied changes remembered for choosing the peer of a round.
const MAX_RECENT: usize = 64;
/// Most holders remembered per change.
const MAX_HOLDERS: usize = 32;
