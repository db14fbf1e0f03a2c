//! Anti-entropy repairs whatever gossip missed. A node's version vectors, frontiers and their
//! digest (`Summary`) are cached until the store changes; a periodic round or a new
//! connection sends a `ShortDigest`, a peer whose digest differs is pulled from (one peer at
//! a time) by sending it our clocks page by page, and it answers each page with the changes
//! we lack (`missing`; `wanted_by` answers a `Want`), in causal order within batch limits.

use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashSet};

use super::SyncEngine;
use crate::identity::NodeId;
use crate::signed::{SignedChange, MEMBERSHIP_DOC};
use crate::sync::wire::{
    clocks_entry_len, frontier_entry_len, Clocks, DocRange, Frontiers, SyncMessage, VersionVector,
    AUTHOR_ENTRY,
};
use crate::sync::{clocks_digest, Replica, SyncError};

/// The store's version vectors, frontiers and their digest, cached until the store changes.
#[derive(Debug, Clone)]
pub(super) struct Summary {
    pub(super) clocks: Clocks,
    pub(super) frontiers: Frontiers,
    pub(super) digest: [u8; 32],
}

/// A pull under way: from whom, until when, and which page of our clocks it is at.
#[derive(Debug, Clone)]
pub(super) struct Pull {
    pub(super) peer: NodeId,
    pub(super) until: u64,
    pub(super) page: DocRange,
}

impl SyncEngine {
    /// A `ShortDigest` of our state with a fresh nonce.
    pub(super) fn short_digest(&mut self, store: &impl Replica) -> Result<SyncMessage, SyncError> {
        let digest = self.summary(store)?.digest;
        let nonce = (self.rng.next_u64() as u32).to_be_bytes();
        Ok(SyncMessage::ShortDigest {
            nonce,
            tag: short_tag(&nonce, &digest),
        })
    }

    /// The store's version vectors, frontiers and digest, cached until the store changes.
    pub(super) fn summary(&mut self, store: &impl Replica) -> Result<Summary, SyncError> {
        if let Some(c) = &self.cache {
            return Ok(c.clone());
        }
        let clocks = store.clocks()?;
        let frontiers = store.frontiers()?;
        let digest = clocks_digest(&clocks, &frontiers);
        let sum = Summary {
            clocks,
            frontiers,
            digest,
        };
        self.cache = Some(sum.clone());
        Ok(sum)
    }

    /// Send `peer` the page of our clocks that starts at position `start` (with our missing
    /// dependencies), asking for what we lack in it; remember the page if we are pulling
    /// from `peer`.
    pub(super) fn send_page(
        &mut self,
        peer: NodeId,
        store: &impl Replica,
        start: &Pos,
        reply: bool,
    ) -> Result<(), SyncError> {
        let sum = self.summary(store)?;
        let (range, clocks, frontiers) = page(&sum, start, self.cfg.clocks_page_bytes);
        let wants = store.wanted(MAX_WANTS)?;
        if let Some(p) = self.pulling.as_mut().filter(|p| p.peer == peer) {
            p.page = range.clone();
        }
        self.enqueue(
            peer,
            SyncMessage::Clocks {
                reply,
                pull: true,
                range,
                clocks,
                frontiers,
                wants,
            },
        );
        Ok(())
    }

    /// Ask `peer` for what we lack (its answer is a `Changes` batch), at most once per gap.
    pub(super) fn pull(
        &mut self,
        now: u64,
        peer: NodeId,
        store: &impl Replica,
    ) -> Result<(), SyncError> {
        let gap = self.cfg.pull_gap_ms;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        if p.last_pull.is_some_and(|t| now < t + gap) {
            return Ok(());
        }
        p.last_pull = Some(now);
        if !self.start_pull(now, peer) {
            return Ok(());
        }
        self.send_page(peer, store, &Pos::default(), false)
    }

    /// Start pulling from `peer` unless a pull is still in progress: at most one peer sends
    /// us a bulk transfer at a time, so after a partition heals a node receives what it lacks
    /// once, not once per neighbour.
    ///
    /// A pull whose last request got no answer for `pull_gap_ms` does not hold back a new
    /// one: its request or the answer was most likely lost (to a link cut or a dropped
    /// message), and waiting for `pull_timeout_ms` while ignoring every peer that offers an
    /// exchange would leave the node behind for that long after a partition heals. The new
    /// pull replaces it (from the same peer too: a peer that offers an exchange is up and is
    /// not answering ours). An answer to the old pull that still arrives is ingested as usual.
    pub(super) fn start_pull(&mut self, now: u64, peer: NodeId) -> bool {
        match &self.pulling {
            Some(p) if now < p.until && !self.stale(now, p) => false,
            _ => {
                self.pulling = Some(Pull {
                    peer,
                    until: now + self.cfg.pull_timeout_ms,
                    page: DocRange::default(),
                });
                true
            }
        }
    }

    /// Whether pull `p` has waited `pull_gap_ms` for an answer to its last request (each
    /// answered page moves `until` to `pull_timeout_ms` after it).
    fn stale(&self, now: u64, p: &Pull) -> bool {
        let asked = p.until.saturating_sub(self.cfg.pull_timeout_ms);
        now >= asked + self.cfg.pull_gap_ms
    }

    /// Whether a change announced to us was fetched less than `pull_gap_ms` ago and has not
    /// arrived yet.
    pub(super) fn fetching(&self, now: u64, store: &impl Replica) -> Result<bool, SyncError> {
        for (id, t) in &self.fetched {
            if now < *t + self.cfg.pull_gap_ms && !store.holds_id(id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The peer of a periodic round: a random one among those not known to hold every change
    /// applied here in the last interval (they may have been missed by gossip; the others
    /// almost surely hold the same as we do), else a random one.
    pub(super) fn round_peer(&mut self, now: u64, up: &[NodeId]) -> NodeId {
        let ttl = self.cfg.anti_entropy_interval_ms + self.cfg.anti_entropy_jitter_ms;
        while self.recent.front().is_some_and(|(t, _)| now >= *t + ttl) {
            self.recent.pop_front();
        }
        if self.cfg.ae_prefer_unknown && !self.recent.is_empty() {
            let unknown: Vec<NodeId> = up
                .iter()
                .filter(|p| {
                    !self.recent.iter().all(|(_, id)| {
                        self.holders
                            .get(id)
                            .is_some_and(|(_, peers)| peers.contains(p))
                    })
                })
                .copied()
                .collect();
            if !unknown.is_empty() {
                return unknown[self.rng.below(unknown.len() as u64) as usize];
            }
        }
        up[self.rng.below(up.len() as u64) as usize]
    }

    /// Answer to `Want`: the changes after the given seqs, for exactly the listed
    /// (document, author) pairs.
    pub(super) fn wanted_by(
        &mut self,
        store: &impl Replica,
        clocks: &Clocks,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        let mine = self.summary(store)?;
        let none = Frontiers::new();
        let all = DocRange::all();
        let theirs = Theirs {
            clocks,
            frontiers: &none,
            range: &all,
            wants: &[],
        };
        self.collect(store, &mine, &theirs, true)
    }

    /// The changes a peer lacks, given one page of its clocks, within the batch limits:
    /// first the dependencies it asked for by hash, the proof of forks it does not know, and
    /// our heads of documents where our version vectors agree but our heads do not (variants
    /// of one seq); then, by version vector, membership first and each document in causal
    /// order. Returns the batch and whether more was left out.
    pub(super) fn missing(
        &self,
        store: &impl Replica,
        mine: &Summary,
        theirs: &Theirs<'_>,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        self.collect(store, mine, theirs, false)
    }

    /// See [`SyncEngine::missing`]; with `partial` (a `Want`), only the listed
    /// (document, author) pairs count and nothing else is added.
    fn collect(
        &self,
        store: &impl Replica,
        sum: &Summary,
        theirs: &Theirs<'_>,
        partial: bool,
    ) -> Result<(Vec<SignedChange>, bool), SyncError> {
        let mine = &sum.clocks;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let limit = self.cfg.batch_changes.max(1);
        let mut sent: HashSet<[u8; 32]> = HashSet::new();
        if !partial {
            let mut extra = Vec::new();
            for h in theirs.wants.iter().take(MAX_WANTS) {
                extra.extend(store.get_any(h)?);
            }
            for (doc, f) in sum
                .frontiers
                .iter()
                .filter(|(d, _)| theirs.range.contains(d))
            {
                let their_f = theirs.frontiers.get(doc);
                for (author, seq) in &f.forks {
                    if their_f.and_then(|t| t.forks.get(author)) != Some(seq) {
                        extra.extend(store.fork_evidence(doc, author)?);
                    }
                }
                let their_heads = their_f.map(|t| t.heads.as_slice()).unwrap_or(&[]);
                let same_vv = if theirs.range.covers(doc) {
                    theirs.clocks.get(doc).is_some() && theirs.clocks.get(doc) == mine.get(doc)
                } else {
                    // This page holds only part of the document's version vector: compare
                    // that part (equal whole vectors are equal in every part, so no fork is
                    // missed; an unequal rest costs at most a few heads sent twice).
                    same_in_range(mine.get(doc), theirs.clocks.get(doc), doc, theirs.range)
                };
                if same_vv && their_heads != f.heads.as_slice() {
                    for h in &f.heads {
                        if their_heads.binary_search(h).is_err() {
                            extra.extend(store.get_change(h)?);
                        }
                    }
                }
            }
            for c in extra {
                if let Some(h) = c.hash() {
                    if sent.insert(h) {
                        bytes += c.encoded_len();
                        out.push(c);
                    }
                }
            }
        }
        let docs = mine
            .keys()
            .filter(|d| d.as_str() == MEMBERSHIP_DOC)
            .chain(mine.keys().filter(|d| d.as_str() != MEMBERSHIP_DOC))
            .filter(|d| theirs.range.touches(d));
        for doc in docs {
            let vv = &mine[doc];
            let their_vv = theirs.clocks.get(doc);
            if partial && their_vv.is_none() {
                continue;
            }
            // (start_op, change) for every change of this document they lack.
            let mut fetched: Vec<(u64, SignedChange)> = Vec::new();
            // Lowest last start_op among authors whose list was cut by the limit.
            let mut horizon = u64::MAX;
            let whole = theirs.range.covers(doc);
            for (author, seq) in vv {
                if !whole && !theirs.range.contains_entry(doc, author) {
                    continue;
                }
                let theirs_seq = match their_vv.and_then(|v| v.get(author)) {
                    Some(s) => *s,
                    None if partial => continue,
                    None => 0,
                };
                if *seq <= theirs_seq {
                    continue;
                }
                let room = limit.saturating_sub(out.len()).max(1);
                let list = store.changes_after(doc, author, theirs_seq, room)?;
                let cut = list.len() >= room && (*seq - theirs_seq) as usize > list.len();
                let mut last = 0;
                for c in list {
                    let Ok(h) = crate::header::parse(&c.bytes) else {
                        continue;
                    };
                    last = h.start_op;
                    if !sent.contains(&h.hash) {
                        fetched.push((h.start_op, c));
                    }
                }
                if cut {
                    horizon = horizon.min(last);
                }
            }
            // start_op exceeds the start_op of every dependency, so this order is causal.
            fetched.sort_by_key(|a| a.0);
            let mut complete = horizon == u64::MAX;
            for (start_op, c) in fetched {
                if start_op > horizon {
                    break;
                }
                let len = c.encoded_len();
                if !out.is_empty() && (bytes + len > self.cfg.batch_bytes || out.len() >= limit) {
                    return Ok((out, true));
                }
                bytes += len;
                out.push(c);
            }
            if out.len() >= limit {
                complete = false;
            }
            if !complete {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }
}

/// One page of a peer's clocks, as received.
pub(super) struct Theirs<'a> {
    pub(super) clocks: &'a Clocks,
    pub(super) frontiers: &'a Frontiers,
    pub(super) range: &'a DocRange,
    pub(super) wants: &'a [[u8; 32]],
}

/// A position in a node's clocks where a page starts or ends: a document, and an author
/// within it (`None`: the document itself, before its first author; see [`DocRange`]).
pub(super) type Pos = (String, Option<NodeId>);

/// The page of `sum` starting at position `start`: as many clock entries and frontiers as fit
/// in about `max_bytes` (at least one), cut between documents or, within a document with
/// more authors than fit, between two authors.
pub(super) fn page(sum: &Summary, start: &Pos, max_bytes: usize) -> (DocRange, Clocks, Frontiers) {
    let (start_doc, start_author) = start;
    let docs: BTreeSet<&String> = sum
        .clocks
        .keys()
        .chain(sum.frontiers.keys())
        .filter(|d| d.as_str() >= start_doc.as_str())
        .collect();
    let mut clocks = Clocks::new();
    let mut frontiers = Frontiers::new();
    let mut bytes = 0usize;
    let mut end: Option<Pos> = None;
    'docs: for doc in docs {
        // Where this document starts in the page: itself, or (the page's first document
        // only) an author of it.
        let from = if doc == start_doc {
            start_author.as_ref()
        } else {
            None
        };
        if from.is_none() {
            let vv_head = if sum.clocks.contains_key(doc) {
                clocks_entry_len(doc, &VersionVector::new())
            } else {
                0
            };
            let f = sum.frontiers.get(doc);
            let len = vv_head + f.map_or(0, |f| frontier_entry_len(doc, f));
            if bytes > 0 && bytes + len > max_bytes {
                end = Some((doc.clone(), None));
                break;
            }
            bytes += len;
            if let Some(f) = f {
                frontiers.insert(doc.clone(), f.clone());
            }
            if let Some(v) = sum.clocks.get(doc) {
                if v.is_empty() {
                    clocks.insert(doc.clone(), VersionVector::new());
                }
            }
        } else {
            // The document's entry header again, in this page.
            bytes += clocks_entry_len(doc, &VersionVector::new());
        }
        let Some(vv) = sum.clocks.get(doc) else {
            continue;
        };
        let authors = match from {
            Some(a) => vv.range(*a..),
            None => vv.range(..),
        };
        for (author, seq) in authors {
            if bytes > 0 && bytes + AUTHOR_ENTRY > max_bytes {
                end = Some((doc.clone(), Some(*author)));
                break 'docs;
            }
            bytes += AUTHOR_ENTRY;
            clocks.entry(doc.clone()).or_default().insert(*author, *seq);
        }
    }
    let range = DocRange {
        start: start_doc.clone(),
        start_author: *start_author,
        end: end.as_ref().map(|e| e.0.clone()),
        end_author: end.and_then(|e| e.1),
    };
    (range, clocks, frontiers)
}

/// Whether `mine` and `theirs` agree on every entry of `doc` that `range` holds.
fn same_in_range(
    mine: Option<&VersionVector>,
    theirs: Option<&VersionVector>,
    doc: &str,
    range: &DocRange,
) -> bool {
    let part = |v: Option<&VersionVector>| {
        v.into_iter()
            .flatten()
            .filter(|(a, _)| range.contains_entry(doc, a))
            .map(|(a, s)| (*a, *s))
            .collect::<Vec<_>>()
    };
    part(mine) == part(theirs)
}

/// Most missing-dependency hashes sent with one `Clocks`, or served from one.
const MAX_WANTS: usize = 64;

/// The tag of `ShortDigest`: SHA-256(nonce ‖ digest), first 6 bytes (see the message's docs).
pub(super) fn short_tag(nonce: &[u8; 4], d: &[u8; 32]) -> [u8; 6] {
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(d);
    let full = h.finalize();
    let mut s = [0; 6];
    s.copy_from_slice(&full[..6]);
    s
}

pub(super) fn seq_of(clocks: &Clocks, doc: &str, author: &NodeId) -> u64 {
    clocks
        .get(doc)
        .and_then(|v| v.get(author))
        .copied()
        .unwrap_or(0)
}

/// Whether `mine` lacks something a page of a peer's clocks shows: a higher seq, a fork we
/// have not flagged, or other heads for the same version vector.
pub(super) fn lacks(
    mine: &Summary,
    theirs: &Clocks,
    their_f: &Frontiers,
    range: &DocRange,
) -> bool {
    let higher = theirs
        .iter()
        .any(|(doc, vv)| vv.iter().any(|(a, s)| *s > seq_of(&mine.clocks, doc, a)));
    let fork = their_f.iter().any(|(doc, f)| {
        f.forks
            .iter()
            .any(|(a, s)| mine.frontiers.get(doc).and_then(|m| m.forks.get(a)) != Some(s))
    });
    let heads = theirs
        .keys()
        .chain(their_f.keys())
        .filter(|doc| range.contains(doc))
        .any(|doc| {
            let same = if range.covers(doc) {
                theirs.get(doc).is_some() && mine.clocks.get(doc) == theirs.get(doc)
            } else {
                same_in_range(mine.clocks.get(doc), theirs.get(doc), doc, range)
            };
            same && mine.frontiers.get(doc).map(|f| &f.heads) != their_f.get(doc).map(|f| &f.heads)
        });
    higher || fork || heads
}
