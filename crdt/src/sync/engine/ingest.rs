//! Received changes go to the store here: those already held are dropped before any signature
//! check, the rest go to [`Replica::ingest`], and the store's report becomes what the engine
//! acts on (`Ingested`: applied changes to relay, waiting ones to pull for) plus events and
//! counters.

use std::collections::{BTreeMap, HashSet};

use super::{Event, SyncEngine, MAX_WANTED};
use crate::identity::NodeId;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};
use crate::store::Outcome;
use crate::sync::{Replica, SyncError};

impl SyncEngine {
    /// Give received changes to the store: drop those already held (so duplicates cost no
    /// signature check), ingest the rest, report.
    pub(super) fn ingest(
        &mut self,
        from: NodeId,
        changes: Vec<SignedChange>,
        store: &mut impl Replica,
    ) -> Result<Ingested, SyncError> {
        let mut fresh = Vec::with_capacity(changes.len());
        let mut seen = HashSet::new();
        let mut dups = 0;
        for c in changes {
            if let Ok(h) = crate::header::parse(&c.bytes) {
                if !seen.insert(h.hash) || store.contains(&h.hash)? {
                    self.stats.duplicates += 1;
                    dups += 1;
                    continue;
                }
            }
            fresh.push(c);
        }
        if fresh.is_empty() {
            return Ok(Ingested {
                duplicates: dups,
                ..Ingested::default()
            });
        }
        let mut by_hash: BTreeMap<[u8; 32], SignedChange> = BTreeMap::new();
        for c in &fresh {
            if let Ok(h) = crate::header::parse(&c.bytes) {
                by_hash.insert(h.hash, c.clone());
            }
        }
        let report = store.ingest(fresh)?;
        let mut out = Ingested {
            duplicates: dups,
            ..Ingested::default()
        };
        let mut rejected: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (_, _, hash, o) in &report.outcomes {
            match o {
                Outcome::Applied => {
                    let Some(h) = hash else { continue };
                    let c = match by_hash.remove(h) {
                        Some(c) => Some(c),
                        None => store.get_change(h)?,
                    };
                    out.applied.extend(c);
                }
                Outcome::Duplicate => {
                    self.stats.duplicates += 1;
                    out.duplicates += 1;
                }
                Outcome::Pending(_) => {
                    out.waiting += 1;
                    if let Some(h) = hash {
                        if self.seen_waiting.len() >= MAX_WANTED {
                            self.seen_waiting.clear();
                        }
                        out.progress |= self.seen_waiting.insert(*h);
                    }
                }
                Outcome::Rejected(r) => *rejected.entry(r.label()).or_default() += 1,
            }
        }
        out.progress |= !out.applied.is_empty()
            || !report.voided.is_empty()
            || !report.revived.is_empty()
            || report.membership_changed;
        if out.progress || !report.changed_docs.is_empty() {
            self.cache = None;
        }
        if report.membership_changed {
            self.check_former(store)?;
        }
        if !out.applied.is_empty() {
            // Membership first, then in the order applied: relaying keeps dependencies ahead.
            out.applied.sort_by_key(|c| c.doc != MEMBERSHIP_DOC);
            self.stats.applied += out.applied.len() as u64;
            self.event(Event::Applied {
                from,
                docs: report.changed_docs.clone(),
                count: out.applied.len(),
            });
        }
        for (label, count) in rejected {
            self.stats.rejected += count as u64;
            self.event(Event::Rejected { from, label, count });
        }
        Ok(out)
    }
}

#[derive(Default)]
pub(super) struct Ingested {
    /// Changes already held (not verified again).
    pub(super) duplicates: usize,
    /// Newly applied changes (for relaying).
    pub(super) applied: Vec<SignedChange>,
    /// Changes held in the pending set (their dependencies or author are not known yet).
    pub(super) waiting: usize,
    /// Something changed in the store (applied, voided, revived, or a change newly waiting).
    pub(super) progress: bool,
}
