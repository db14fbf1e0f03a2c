//! The sync wire format: a versioned binary encoding of [`SyncMessage`].
//!
//! Why it exists: sync messages cross the network between nodes that trust nothing they
//! receive, and may run different Lichen versions. The format is therefore explicit (no serde
//! layout that could shift under a dependency upgrade), versioned, canonical (a message has
//! exactly one encoding, so `encode(decode(b)) == b` for every `b` that decodes, which the fuzz
//! target checks), and every count and length is checked against both the input that remains
//! and a fixed limit *before* anything is allocated.
//!
//! Data flow: the engine produces [`SyncMessage`] values; the transport sends
//! [`SyncMessage::encode`]d bytes; the receiving engine runs [`SyncMessage::decode`] (through
//! [`crate::sync::SyncEngine::handle_bytes`]) and only then looks at the content. Signed changes
//! inside are still unverified at that point: the store verifies each one on ingest.
//!
//! # Layout (all integers big-endian)
//! ```text
//! message   = version:u8 (=2) | type:u8 | body
//! Digest    (1) = digest[32]
//! Clocks    (2) = flags:u8 (bit 0: reply wanted; bit 1: pull; bit 2: the range starts at an
//!                 author; bit 3: the range ends at an author; other bits 0) | range | clocks
//!                 | frontiers | wants
//! Changes   (3) = flags:u8 (bit 0: more to come; other bits 0) | changes
//! Push      (4) = changes
//! Have      (5) = clocks
//! Want      (6) = clocks
//! Announce  (7) = ids
//! Fetch     (8) = ids
//! ShortDigest (9) = nonce[4] tag[6] (tag: SHA-256(nonce ‖ Digest's digest), first 6 bytes)
//! AnnounceOne (10) = id[8]   (an Announce of one change, 4 bytes shorter)
//! FetchOne  (11) = id[8]     (a Fetch of one change)
//! PushOne   (12) = signed change (a Push of one change, 4 bytes shorter)
//! Prune     (13) = id[8]     (a relayed Push brought this change twice: relay its author's
//!                              changes to me lazily)
//! ids       = n:u32 | n × id[8], strictly ascending (an id is the first 8 bytes of a change
//!             hash)
//! range     = start_len:u16 | start | [start_author[32] if bit 2] | end_len:u16 | end
//!             | [end_author[32] if bit 3]
//!             positions p with start ≤ p < end, in (document, author) order where a document
//!             itself comes before its authors (a bound without author: the document itself);
//!             an empty start: from the first document, an empty end: to the last; non-empty
//!             bounds are valid names, an author only after a non-empty name, start < end
//! clocks    = n_docs:u32 | n_docs × ( doc_len:u16 | doc | n_authors:u32 | n_authors × (author[32] | seq:u64) )
//!             docs strictly ascending (byte order), authors strictly ascending per doc
//! frontiers = n_docs:u32 | n_docs × ( doc_len:u16 | doc | n_heads:u32 | n_heads × hash[32]
//!             | n_forks:u32 | n_forks × (author[32] | fork seq:u64) )
//!             docs, heads and authors strictly ascending; every clock entry (document,
//!             author) and every frontier's document (or a clock document without authors)
//!             lies inside the range
//! wants     = n:u32 | n × hash[32], strictly ascending
//! changes   = n:u32 | n × signed change (see crate::signed: u8 version | u16 doc_len | doc |
//!             author[32] | sig[64] | u32 len | bytes)
//! ```
//! Version history: 1 had `Clocks = flags | clocks` only. Version 2 (equivocation and paging)
//! adds the range (a large version vector is sent as several pages, each well under the
//! message limit), the frontiers (per-document heads, so two nodes holding different
//! variants of one seq no longer look identical, and flagged forks, so evidence reaches every
//! node), the hashes of missing dependencies, and `Announce`/`Fetch` (lazy push of single
//! changes by 8-byte id: 14 bytes to announce one change instead of ~60). Added later within
//! version 2 (this build decodes every message of an earlier version-2 build, not the
//! reverse: upgrade all nodes): `ShortDigest`, `AnnounceOne`, `FetchOne`, `PushOne` (types
//! 9–12: the idle and one-change cases, 4–22 bytes shorter), `Prune` (13), and author bounds
//! in a `Clocks` range (flag bits 2 and 3: a page may cut one document's version vector
//! between two authors). A v1 message is refused with [`DecodeError::UnknownVersion`]: mixed clusters do
//! not sync (upgrade all nodes).
//! Limits: a message is at most [`MAX_MESSAGE_BYTES`] (8 MiB) long; document names are valid
//! names of at most 128 bytes; counts are bounded by what the remaining bytes could hold.
//! Unknown version → [`DecodeError::UnknownVersion`]; unknown type or flag bits →
//! [`DecodeError::Invalid`]; bytes after the message → [`DecodeError::Trailing`].

use std::collections::BTreeMap;

use crate::identity::NodeId;
use crate::signed::{valid_doc_name, DecodeError, SignedChange, MAX_DOC_NAME};

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u8 = 2;
/// Hard upper bound on an encoded message; longer input is refused before decoding.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Per-author highest sequence number in one document.
pub type VersionVector = BTreeMap<NodeId, u64>;
/// Version vectors of several documents, by document name.
pub type Clocks = BTreeMap<String, VersionVector>;

/// What a version vector cannot show about one document: its heads (hashes of the valid
/// changes nothing valid depends on, sorted) and the authors flagged for equivocation in it,
/// with their fork seq (see `crate::equivocation`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    /// Sorted heads.
    pub heads: Vec<[u8; 32]>,
    /// Flagged authors → fork seq.
    pub forks: VersionVector,
}

/// Frontiers of several documents, by document name.
pub type Frontiers = BTreeMap<String, Frontier>;

/// A range of clock positions. A position is a document and, within it, either the document
/// itself (`None`: placed before every author of the document; its frontier lives there) or
/// one author's entry. A range is `start ≤ position < end` in (document, author) order, so a
/// page can cut one document's version vector between two authors: any number of authors fits
/// in pages under the message limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocRange {
    /// First document included (empty: from the first).
    pub start: String,
    /// With `start`: the range begins at this author's entry of `start` (its frontier and
    /// earlier authors excluded). `None`: at the document itself.
    pub start_author: Option<NodeId>,
    /// First document after the range (`None`: to the last).
    pub end: Option<String>,
    /// With `end`: the range stops before this author's entry of `end` (the document itself
    /// and earlier authors included). `None`: before the document itself.
    pub end_author: Option<NodeId>,
}

impl DocRange {
    /// Every document.
    pub fn all() -> DocRange {
        DocRange::default()
    }

    /// Whether the position of `doc` itself (its frontier; before all its authors) lies in
    /// the range.
    pub fn contains(&self, doc: &str) -> bool {
        self.contains_pos(doc, None)
    }

    /// Whether the entry of `author` in `doc` lies in the range.
    pub fn contains_entry(&self, doc: &str, author: &NodeId) -> bool {
        self.contains_pos(doc, Some(author))
    }

    /// Whether some position of `doc` (itself or an author's entry) lies in the range.
    pub fn touches(&self, doc: &str) -> bool {
        doc >= self.start.as_str()
            && match self.end.as_deref() {
                None => true,
                Some(e) => doc < e || (doc == e && self.end_author.is_some()),
            }
    }

    /// Whether every position of `doc` lies in the range (the page holds it whole).
    pub fn covers(&self, doc: &str) -> bool {
        (doc > self.start.as_str() || (doc == self.start && self.start_author.is_none()))
            && self.end.as_deref().is_none_or(|e| doc < e)
    }

    fn contains_pos(&self, doc: &str, author: Option<&NodeId>) -> bool {
        (doc, author) >= (self.start.as_str(), self.start_author.as_ref())
            && self
                .end
                .as_deref()
                .is_none_or(|e| (doc, author) < (e, self.end_author.as_ref()))
    }
}

const T_DIGEST: u8 = 1;
const T_CLOCKS: u8 = 2;
const T_CHANGES: u8 = 3;
const T_PUSH: u8 = 4;
const T_HAVE: u8 = 5;
const T_WANT: u8 = 6;
const T_ANNOUNCE: u8 = 7;
const T_FETCH: u8 = 8;
const T_SHORT_DIGEST: u8 = 9;
const T_ANNOUNCE_ONE: u8 = 10;
const T_FETCH_ONE: u8 = 11;
const T_PUSH_ONE: u8 = 12;
const T_PRUNE: u8 = 13;

/// Short id of a change in `Announce`/`Fetch`: the first 8 bytes of its hash.
pub type ChangeId = [u8; 8];

/// The short id of a change hash.
pub fn change_id(hash: &[u8; 32]) -> ChangeId {
    let mut id = [0; 8];
    id.copy_from_slice(&hash[..8]);
    id
}

/// Smallest encoding of one signed change (empty doc name and change bytes).
const MIN_CHANGE_LEN: usize = 1 + 2 + 32 + 64 + 4;
/// Smallest encoding of one document entry of a clock list.
const MIN_DOC_ENTRY: usize = 2 + 1 + 4;
/// Encoded length of one (author, seq) entry of a version vector.
pub(crate) const AUTHOR_ENTRY: usize = 32 + 8;

/// One message of the sync protocol (see [`crate::sync`] for the protocol itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMessage {
    /// Anti-entropy opener: SHA-256 of the sender's full version vector.
    Digest {
        /// The digest (see [`crate::sync::clocks_digest`]).
        digest: [u8; 32],
    },
    /// The sender's version vectors for a range of documents (one page); the receiver
    /// answers (if `pull`) with the changes the sender lacks in that range and (if `reply`)
    /// with its own `Clocks` when it lacks something the sender has.
    Clocks {
        /// Whether the receiver should send its own clocks back if it lacks something.
        reply: bool,
        /// Whether the receiver should send the changes the sender lacks now (false while the
        /// sender is already pulling from another peer: one inbound transfer at a time).
        pull: bool,
        /// The documents this page covers.
        range: DocRange,
        /// Version vectors per document (documents of the range absent: the sender has none
        /// of them).
        clocks: Clocks,
        /// Heads and flagged forks per document of the range.
        frontiers: Frontiers,
        /// Hashes of dependencies the sender is missing (its pending changes wait for them).
        wants: Vec<[u8; 32]>,
    },
    /// A bounded batch of changes answering `Clocks`, membership changes first.
    Changes {
        /// The sender had more to send: answer with updated `Clocks` to get the next batch.
        more: bool,
        /// The changes, in an order where each follows its dependencies.
        changes: Vec<SignedChange>,
    },
    /// Eagerly pushed changes (a local commit, a relay, or the answer to `Want`).
    Push {
        /// The changes.
        changes: Vec<SignedChange>,
    },
    /// Announcement of new changes by (document, author, highest seq), without the bodies.
    Have {
        /// Announced entries.
        clocks: Clocks,
    },
    /// Request for the changes after the given seqs, for exactly the listed (document, author)
    /// pairs; answered with `Push`.
    Want {
        /// What the sender holds of the pairs it wants.
        clocks: Clocks,
    },
    /// Announcement of a few new changes by short id (lazy push); a peer lacking them answers
    /// with `Fetch`.
    Announce {
        /// Sorted short ids.
        ids: Vec<ChangeId>,
    },
    /// Request for announced changes by short id; answered with `Push`.
    Fetch {
        /// Sorted short ids.
        ids: Vec<ChangeId>,
    },
    /// Anti-entropy opener as sent by the engine: a fresh random `nonce` and the first 6 bytes
    /// of SHA-256(nonce ‖ digest) (12 bytes on the wire instead of 34). The receiver computes
    /// the same tag over its own digest. A chance false "equal" is 2⁻⁴⁸ per round and costs one
    /// round with that peer; because the nonce is the sender's fresh choice, no one can
    /// precompute two states whose tags collide (a plain 6- or 8-byte prefix of the digest
    /// could be collided with 2²⁴–2³² hashes by a member crafting its own changes).
    ShortDigest {
        /// Chosen at random by the sender for this message.
        nonce: [u8; 4],
        /// SHA-256(nonce ‖ digest), first 6 bytes.
        tag: [u8; 6],
    },
    /// `Announce` of a single change (the common case of a relayed write): 10 bytes on the
    /// wire instead of 14.
    AnnounceOne {
        /// The short id.
        id: ChangeId,
    },
    /// `Fetch` of a single change.
    FetchOne {
        /// The short id.
        id: ChangeId,
    },
    /// `Push` of a single change.
    PushOne {
        /// The change.
        change: SignedChange,
    },
    /// The change with this id, relayed in full by the receiver of this message, was already
    /// held here (it came straight from its author): relay that author's changes to the
    /// sender as announcements from now on (Plumtree's prune).
    Prune {
        /// The short id of the duplicate.
        id: ChangeId,
    },
}

impl SyncMessage {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SyncMessage::Digest { .. } => "digest",
            SyncMessage::Clocks { .. } => "clocks",
            SyncMessage::Changes { .. } => "changes",
            SyncMessage::Push { .. } => "push",
            SyncMessage::Have { .. } => "have",
            SyncMessage::Want { .. } => "want",
            SyncMessage::Announce { .. } => "announce",
            SyncMessage::Fetch { .. } => "fetch",
            SyncMessage::ShortDigest { .. } => "digest",
            SyncMessage::AnnounceOne { .. } => "announce",
            SyncMessage::FetchOne { .. } => "fetch",
            SyncMessage::PushOne { .. } => "push",
            SyncMessage::Prune { .. } => "prune",
        }
    }

    /// Length of [`SyncMessage::encode`]'s output, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        2 + match self {
            SyncMessage::Digest { .. } => 32,
            SyncMessage::ShortDigest { .. } => 10,
            SyncMessage::AnnounceOne { .. }
            | SyncMessage::FetchOne { .. }
            | SyncMessage::Prune { .. } => 8,
            SyncMessage::PushOne { change } => change.encoded_len(),
            SyncMessage::Clocks {
                range,
                clocks,
                frontiers,
                wants,
                ..
            } => {
                1 + range_len(range)
                    + clocks_len(clocks)
                    + frontiers_len(frontiers)
                    + 4
                    + 32 * wants.len()
            }
            SyncMessage::Changes { changes, .. } => 1 + changes_len(changes),
            SyncMessage::Push { changes } => changes_len(changes),
            SyncMessage::Have { clocks } | SyncMessage::Want { clocks } => clocks_len(clocks),
            SyncMessage::Announce { ids } | SyncMessage::Fetch { ids } => 4 + 8 * ids.len(),
        }
    }

    /// Encode. Callers keep messages within [`MAX_MESSAGE_BYTES`] (the engine's batches do);
    /// a longer message encodes but is refused by every decoder.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(WIRE_VERSION);
        match self {
            SyncMessage::Digest { digest } => {
                out.push(T_DIGEST);
                out.extend_from_slice(digest);
            }
            SyncMessage::ShortDigest { nonce, tag } => {
                out.push(T_SHORT_DIGEST);
                out.extend_from_slice(nonce);
                out.extend_from_slice(tag);
            }
            SyncMessage::AnnounceOne { id } => {
                out.push(T_ANNOUNCE_ONE);
                out.extend_from_slice(id);
            }
            SyncMessage::FetchOne { id } => {
                out.push(T_FETCH_ONE);
                out.extend_from_slice(id);
            }
            SyncMessage::PushOne { change } => {
                out.push(T_PUSH_ONE);
                change.encode_into(&mut out);
            }
            SyncMessage::Prune { id } => {
                out.push(T_PRUNE);
                out.extend_from_slice(id);
            }
            SyncMessage::Clocks {
                reply,
                pull,
                range,
                clocks,
                frontiers,
                wants,
            } => {
                out.push(T_CLOCKS);
                out.push(u8::from(*reply) | (u8::from(*pull) << 1) | range_flags(range));
                encode_range(range, &mut out);
                encode_clocks(clocks, &mut out);
                encode_frontiers(frontiers, &mut out);
                out.extend_from_slice(&(wants.len() as u32).to_be_bytes());
                for w in wants {
                    out.extend_from_slice(w);
                }
            }
            SyncMessage::Changes { more, changes } => {
                out.push(T_CHANGES);
                out.push(u8::from(*more));
                encode_changes(changes, &mut out);
            }
            SyncMessage::Push { changes } => {
                out.push(T_PUSH);
                encode_changes(changes, &mut out);
            }
            SyncMessage::Have { clocks } => {
                out.push(T_HAVE);
                encode_clocks(clocks, &mut out);
            }
            SyncMessage::Want { clocks } => {
                out.push(T_WANT);
                encode_clocks(clocks, &mut out);
            }
            SyncMessage::Announce { ids } | SyncMessage::Fetch { ids } => {
                out.push(if matches!(self, SyncMessage::Announce { .. }) {
                    T_ANNOUNCE
                } else {
                    T_FETCH
                });
                out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
                for id in ids {
                    out.extend_from_slice(id);
                }
            }
        }
        out
    }

    /// Decode one complete message; never panics, allocates only what the input can back.
    pub fn decode(buf: &[u8]) -> Result<SyncMessage, DecodeError> {
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLong("message"));
        }
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let msg = match r.u8()? {
            T_DIGEST => SyncMessage::Digest { digest: r.array()? },
            T_SHORT_DIGEST => SyncMessage::ShortDigest {
                nonce: r.array()?,
                tag: r.array()?,
            },
            T_ANNOUNCE_ONE => SyncMessage::AnnounceOne { id: r.array()? },
            T_FETCH_ONE => SyncMessage::FetchOne { id: r.array()? },
            T_PRUNE => SyncMessage::Prune { id: r.array()? },
            T_PUSH_ONE => {
                let (change, used) = SignedChange::decode(&r.buf[r.pos..])?;
                r.pos += used;
                SyncMessage::PushOne { change }
            }
            T_CLOCKS => {
                let flags = r.u8()?;
                if flags > 15 {
                    return Err(DecodeError::Invalid("unknown flag bits"));
                }
                let range = r.range(flags & 4 != 0, flags & 8 != 0)?;
                let clocks = r.clocks()?;
                let frontiers = r.frontiers()?;
                let entries_inside = clocks.iter().all(|(d, vv)| {
                    if vv.is_empty() {
                        range.contains(d)
                    } else {
                        vv.keys().all(|a| range.contains_entry(d, a))
                    }
                });
                if !entries_inside || !frontiers.keys().all(|d| range.contains(d)) {
                    return Err(DecodeError::Invalid("document outside the range"));
                }
                let n = r.count(32, "want count")?;
                let mut wants: Vec<[u8; 32]> = Vec::with_capacity(n);
                for _ in 0..n {
                    let h: [u8; 32] = r.array()?;
                    if wants.last().is_some_and(|l| *l >= h) {
                        return Err(DecodeError::Invalid("wants not strictly ascending"));
                    }
                    wants.push(h);
                }
                SyncMessage::Clocks {
                    reply: flags & 1 != 0,
                    pull: flags & 2 != 0,
                    range,
                    clocks,
                    frontiers,
                    wants,
                }
            }
            T_CHANGES => {
                let more = r.flag()?;
                SyncMessage::Changes {
                    more,
                    changes: r.changes()?,
                }
            }
            T_PUSH => SyncMessage::Push {
                changes: r.changes()?,
            },
            T_HAVE => SyncMessage::Have {
                clocks: r.clocks()?,
            },
            T_WANT => SyncMessage::Want {
                clocks: r.clocks()?,
            },
            T_ANNOUNCE => SyncMessage::Announce { ids: r.ids()? },
            T_FETCH => SyncMessage::Fetch { ids: r.ids()? },
            _ => return Err(DecodeError::Invalid("unknown message type")),
        };
        if r.pos != buf.len() {
            return Err(DecodeError::Trailing);
        }
        Ok(msg)
    }
}

fn clocks_len(clocks: &Clocks) -> usize {
    4 + clocks
        .iter()
        .map(|(d, v)| clocks_entry_len(d, v))
        .sum::<usize>()
}

/// Encoded length of a clock list.
pub(crate) fn clocks_entry_len(doc: &str, vv: &VersionVector) -> usize {
    2 + doc.len() + 4 + vv.len() * AUTHOR_ENTRY
}

/// Encoded length of one document's frontier.
pub(crate) fn frontier_entry_len(doc: &str, f: &Frontier) -> usize {
    2 + doc.len() + 4 + 32 * f.heads.len() + 4 + f.forks.len() * AUTHOR_ENTRY
}

fn frontiers_len(frontiers: &Frontiers) -> usize {
    4 + frontiers
        .iter()
        .map(|(d, f)| frontier_entry_len(d, f))
        .sum::<usize>()
}

fn range_len(range: &DocRange) -> usize {
    4 + range.start.len()
        + range.end.as_ref().map_or(0, |e| e.len())
        + 32 * (usize::from(range.start_author.is_some()) + usize::from(range.end_author.is_some()))
}

/// Flag bits 2 and 3 of `Clocks`: which bounds of the range carry an author.
fn range_flags(range: &DocRange) -> u8 {
    (u8::from(range.start_author.is_some()) << 2) | (u8::from(range.end_author.is_some()) << 3)
}

fn encode_range(range: &DocRange, out: &mut Vec<u8>) {
    out.extend_from_slice(&(range.start.len() as u16).to_be_bytes());
    out.extend_from_slice(range.start.as_bytes());
    if let Some(a) = &range.start_author {
        out.extend_from_slice(&a.0);
    }
    let end = range.end.as_deref().unwrap_or("");
    out.extend_from_slice(&(end.len() as u16).to_be_bytes());
    out.extend_from_slice(end.as_bytes());
    if let Some(a) = &range.end_author {
        out.extend_from_slice(&a.0);
    }
}

/// Canonical encoding of frontiers (also an input of the anti-entropy digest).
pub(crate) fn encode_frontiers(frontiers: &Frontiers, out: &mut Vec<u8>) {
    out.extend_from_slice(&(frontiers.len() as u32).to_be_bytes());
    for (doc, f) in frontiers {
        out.extend_from_slice(&(doc.len() as u16).to_be_bytes());
        out.extend_from_slice(doc.as_bytes());
        out.extend_from_slice(&(f.heads.len() as u32).to_be_bytes());
        for h in &f.heads {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&(f.forks.len() as u32).to_be_bytes());
        for (author, seq) in &f.forks {
            out.extend_from_slice(&author.0);
            out.extend_from_slice(&seq.to_be_bytes());
        }
    }
}

fn changes_len(changes: &[SignedChange]) -> usize {
    4 + changes.iter().map(SignedChange::encoded_len).sum::<usize>()
}

/// Canonical encoding of a clock list (also the input of the anti-entropy digest).
pub(crate) fn encode_clocks(clocks: &Clocks, out: &mut Vec<u8>) {
    out.extend_from_slice(&(clocks.len() as u32).to_be_bytes());
    for (doc, vv) in clocks {
        out.extend_from_slice(&(doc.len() as u16).to_be_bytes());
        out.extend_from_slice(doc.as_bytes());
        out.extend_from_slice(&(vv.len() as u32).to_be_bytes());
        for (author, seq) in vv {
            out.extend_from_slice(&author.0);
            out.extend_from_slice(&seq.to_be_bytes());
        }
    }
}

fn encode_changes(changes: &[SignedChange], out: &mut Vec<u8>) {
    out.extend_from_slice(&(changes.len() as u32).to_be_bytes());
    for c in changes {
        c.encode_into(out);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("unknown flag bits")),
        }
    }

    /// A count of items of at least `min_item` bytes each, checked against what remains.
    fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > self.remaining() / min_item {
            return Err(if n.saturating_mul(min_item) > MAX_MESSAGE_BYTES {
                DecodeError::TooLong(what)
            } else {
                DecodeError::Truncated
            });
        }
        Ok(n)
    }

    /// A document name (`allow_empty`: or the empty string).
    fn doc_name(&mut self, allow_empty: bool) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_DOC_NAME {
            return Err(DecodeError::TooLong("document name"));
        }
        let doc = std::str::from_utf8(self.take(len)?)
            .map_err(|_| DecodeError::Invalid("document name is not UTF-8"))?;
        if !(valid_doc_name(doc) || allow_empty && doc.is_empty()) {
            return Err(DecodeError::Invalid("invalid document name"));
        }
        Ok(doc)
    }

    /// `n_authors:u32 | (author | seq)×`, authors strictly ascending.
    fn authors(&mut self) -> Result<VersionVector, DecodeError> {
        let n_authors = self.count(AUTHOR_ENTRY, "author count")?;
        let mut vv = VersionVector::new();
        let mut last_author: Option<[u8; 32]> = None;
        for _ in 0..n_authors {
            let author: [u8; 32] = self.array()?;
            if last_author.is_some_and(|l| l >= author) {
                return Err(DecodeError::Invalid("authors not strictly ascending"));
            }
            last_author = Some(author);
            let seq = self.u64()?;
            vv.insert(NodeId(author), seq);
        }
        Ok(vv)
    }

    fn ids(&mut self) -> Result<Vec<ChangeId>, DecodeError> {
        let n = self.count(8, "id count")?;
        let mut ids: Vec<ChangeId> = Vec::with_capacity(n);
        for _ in 0..n {
            let id: ChangeId = self.array()?;
            if ids.last().is_some_and(|l| *l >= id) {
                return Err(DecodeError::Invalid("ids not strictly ascending"));
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// A range; `start_author`/`end_author`: the flags say the bound carries an author.
    fn range(&mut self, start_author: bool, end_author: bool) -> Result<DocRange, DecodeError> {
        let start = self.doc_name(true)?.to_string();
        let start_author = if start_author {
            if start.is_empty() {
                return Err(DecodeError::Invalid("author bound without a document"));
            }
            Some(NodeId(self.array()?))
        } else {
            None
        };
        let end = self.doc_name(true)?;
        let end_author = if end_author {
            if end.is_empty() {
                return Err(DecodeError::Invalid("author bound without a document"));
            }
            Some(NodeId(self.array()?))
        } else {
            None
        };
        if !end.is_empty() && (start.as_str(), start_author.as_ref()) >= (end, end_author.as_ref())
        {
            return Err(DecodeError::Invalid("empty document range"));
        }
        Ok(DocRange {
            start,
            start_author,
            end: (!end.is_empty()).then(|| end.to_string()),
            end_author,
        })
    }

    fn clocks(&mut self) -> Result<Clocks, DecodeError> {
        let n_docs = self.count(MIN_DOC_ENTRY, "document count")?;
        let mut clocks = Clocks::new();
        let mut last_doc: Option<&str> = None;
        for _ in 0..n_docs {
            let doc = self.doc_name(false)?;
            if last_doc.is_some_and(|l| l >= doc) {
                return Err(DecodeError::Invalid("documents not strictly ascending"));
            }
            last_doc = Some(doc);
            clocks.insert(doc.to_string(), self.authors()?);
        }
        Ok(clocks)
    }

    fn frontiers(&mut self) -> Result<Frontiers, DecodeError> {
        let n_docs = self.count(MIN_DOC_ENTRY + 4, "document count")?;
        let mut out = Frontiers::new();
        let mut last_doc: Option<&str> = None;
        for _ in 0..n_docs {
            let doc = self.doc_name(false)?;
            if last_doc.is_some_and(|l| l >= doc) {
                return Err(DecodeError::Invalid("documents not strictly ascending"));
            }
            last_doc = Some(doc);
            let n = self.count(32, "head count")?;
            let mut heads: Vec<[u8; 32]> = Vec::with_capacity(n);
            for _ in 0..n {
                let h: [u8; 32] = self.array()?;
                if heads.last().is_some_and(|l| *l >= h) {
                    return Err(DecodeError::Invalid("heads not strictly ascending"));
                }
                heads.push(h);
            }
            let forks = self.authors()?;
            out.insert(doc.to_string(), Frontier { heads, forks });
        }
        Ok(out)
    }

    fn changes(&mut self) -> Result<Vec<SignedChange>, DecodeError> {
        let n = self.count(MIN_CHANGE_LEN, "change count")?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (c, used) = SignedChange::decode(&self.buf[self.pos..])?;
            self.pos += used;
            out.push(c);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn clocks() -> Clocks {
        let mut c = Clocks::new();
        c.insert("_members".into(), [(id(1), 2)].into_iter().collect());
        c.insert("a".into(), [(id(1), 1), (id(2), 258)].into_iter().collect());
        c
    }

    fn change() -> SignedChange {
        SignedChange {
            doc: "a".into(),
            author: id(0xaa),
            sig: [0xbb; 64],
            bytes: vec![1, 2, 3],
        }
    }

    /// Golden bytes of the clock list of [`clocks`].
    const CLOCKS_HEX: &str = "00000002
        0008 5f6d656d62657273 00000001
          0101010101010101010101010101010101010101010101010101010101010101 0000000000000002
        0001 61 00000002
          0101010101010101010101010101010101010101010101010101010101010101 0000000000000001
          0202020202020202020202020202020202020202020202020202020202020202 0000000000000102";

    /// Golden bytes of [`frontiers`].
    const FRONTIERS_HEX: &str = "00000001
        0001 61 00000001 1111111111111111111111111111111111111111111111111111111111111111
          00000001 0202020202020202020202020202020202020202020202020202020202020202 0000000000000005";

    fn frontiers() -> Frontiers {
        let mut f = Frontiers::new();
        f.insert(
            "a".into(),
            Frontier {
                heads: vec![[0x11; 32]],
                forks: [(id(2), 5)].into_iter().collect(),
            },
        );
        f
    }

    const CHANGE_HEX: &str = "01 0001 61
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
        bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
        bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
        00000003 010203";

    fn golden() -> Vec<(SyncMessage, Vec<u8>)> {
        vec![
            (
                SyncMessage::Digest { digest: [7; 32] },
                hex("02 01 0707070707070707070707070707070707070707070707070707070707070707"),
            ),
            (
                SyncMessage::Clocks {
                    reply: true,
                    pull: true,
                    range: DocRange::all(),
                    clocks: clocks(),
                    frontiers: frontiers(),
                    wants: vec![[0x33; 32]],
                },
                hex(&format!(
                    "02 02 03 0000 0000 {CLOCKS_HEX} {FRONTIERS_HEX} 00000001 {}",
                    "33".repeat(32)
                )),
            ),
            (
                SyncMessage::Clocks {
                    reply: false,
                    pull: true,
                    range: DocRange {
                        start: "a".into(),
                        end: Some("b".into()),
                        ..DocRange::default()
                    },
                    clocks: Clocks::new(),
                    frontiers: Frontiers::new(),
                    wants: Vec::new(),
                },
                hex("02 02 02 0001 61 0001 62 00000000 00000000 00000000"),
            ),
            (
                // One document's version vector cut between authors: the page starts at
                // author 01 of `a` and stops before author 02 of `a`.
                SyncMessage::Clocks {
                    reply: false,
                    pull: true,
                    range: DocRange {
                        start: "a".into(),
                        start_author: Some(id(1)),
                        end: Some("a".into()),
                        end_author: Some(id(2)),
                    },
                    clocks: [("a".to_string(), [(id(1), 1)].into_iter().collect())]
                        .into_iter()
                        .collect(),
                    frontiers: Frontiers::new(),
                    wants: Vec::new(),
                },
                hex(&format!(
                    "02 02 0e 0001 61 {} 0001 61 {} 00000001 0001 61 00000001 {} 0000000000000001 \
                     00000000 00000000",
                    "01".repeat(32),
                    "02".repeat(32),
                    "01".repeat(32)
                )),
            ),
            (
                SyncMessage::Changes {
                    more: true,
                    changes: vec![change()],
                },
                hex(&format!("02 03 01 00000001 {CHANGE_HEX}")),
            ),
            (
                SyncMessage::Push {
                    changes: vec![change(), change()],
                },
                hex(&format!("02 04 00000002 {CHANGE_HEX} {CHANGE_HEX}")),
            ),
            (
                SyncMessage::Have { clocks: clocks() },
                hex(&format!("02 05 {CLOCKS_HEX}")),
            ),
            (
                SyncMessage::Want { clocks: clocks() },
                hex(&format!("02 06 {CLOCKS_HEX}")),
            ),
            (
                SyncMessage::Announce {
                    ids: vec![[1; 8], [2; 8]],
                },
                hex("02 07 00000002 0101010101010101 0202020202020202"),
            ),
            (
                SyncMessage::Fetch { ids: vec![[3; 8]] },
                hex("02 08 00000001 0303030303030303"),
            ),
            (
                SyncMessage::ShortDigest {
                    nonce: [7; 4],
                    tag: [8; 6],
                },
                hex("02 09 07070707 080808080808"),
            ),
            (
                SyncMessage::AnnounceOne { id: [4; 8] },
                hex("02 0a 0404040404040404"),
            ),
            (
                SyncMessage::FetchOne { id: [5; 8] },
                hex("02 0b 0505050505050505"),
            ),
            (
                SyncMessage::PushOne { change: change() },
                hex(&format!("02 0c {CHANGE_HEX}")),
            ),
            (
                SyncMessage::Prune { id: [6; 8] },
                hex("02 0d 0606060606060606"),
            ),
        ]
    }

    #[test]
    fn every_message_type_has_pinned_bytes() {
        for (msg, bytes) in golden() {
            assert_eq!(msg.encode(), bytes, "{}", msg.kind());
            assert_eq!(msg.encoded_len(), bytes.len(), "{}", msg.kind());
            assert_eq!(SyncMessage::decode(&bytes).unwrap(), msg, "{}", msg.kind());
        }
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        for (msg, bytes) in golden() {
            for cut in 0..bytes.len() {
                assert!(
                    SyncMessage::decode(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    msg.kind()
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(SyncMessage::decode(&long), Err(DecodeError::Trailing));
        }
    }

    #[test]
    fn unknown_version_type_and_flags_are_typed_errors() {
        // Version 1 (before frontiers and paging) is refused, as is anything newer.
        assert_eq!(
            SyncMessage::decode(&hex("01 01")),
            Err(DecodeError::UnknownVersion(1))
        );
        assert_eq!(
            SyncMessage::decode(&hex("03 01")),
            Err(DecodeError::UnknownVersion(3))
        );
        assert_eq!(
            SyncMessage::decode(&hex("02 0e")),
            Err(DecodeError::Invalid("unknown message type"))
        );
        assert_eq!(
            SyncMessage::decode(&hex("02 02 10 0000 0000 00000000 00000000 00000000")),
            Err(DecodeError::Invalid("unknown flag bits"))
        );
        // Bits 2 and 3 (an author bound) need a document to hang on.
        assert_eq!(
            SyncMessage::decode(&hex("02 02 04 0000 0000 00000000 00000000 00000000")),
            Err(DecodeError::Invalid("author bound without a document"))
        );
        assert_eq!(SyncMessage::decode(&[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        // 4 billion documents in a 7-byte message.
        assert_eq!(
            SyncMessage::decode(&hex("02 05 ffffffff")),
            Err(DecodeError::TooLong("document count"))
        );
        assert_eq!(
            SyncMessage::decode(&hex("02 04 00001000")),
            Err(DecodeError::Truncated)
        );
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            SyncMessage::decode(&big),
            Err(DecodeError::TooLong("message"))
        );
    }

    #[test]
    fn non_canonical_clocks_are_refused() {
        // Same document twice.
        let dup = hex("02 05 00000002 0001 61 00000000 0001 61 00000000");
        assert!(SyncMessage::decode(&dup).is_err());
        // Descending authors.
        let desc = format!(
            "02 05 00000001 0001 61 00000002 {} 0000000000000001 {} 0000000000000001",
            "02".repeat(32),
            "01".repeat(32)
        );
        assert!(SyncMessage::decode(&hex(&desc)).is_err());
        // Invalid document name.
        assert!(SyncMessage::decode(&hex("02 05 00000001 0001 41 00000000")).is_err());
        // A document outside the page's range, an empty range, unsorted heads or wants.
        assert_eq!(
            SyncMessage::decode(&hex(
                "02 02 00 0001 62 0000 00000001 0001 61 00000000 00000000 00000000"
            )),
            Err(DecodeError::Invalid("document outside the range"))
        );
        assert_eq!(
            SyncMessage::decode(&hex("02 02 00 0001 62 0001 61 00000000 00000000 00000000")),
            Err(DecodeError::Invalid("empty document range"))
        );
        // An author before the page's first author, an empty range within one document.
        let outside = format!(
            "02 02 04 0001 61 {} 0000 00000001 0001 61 00000001 {} 0000000000000001 \
             00000000 00000000",
            "02".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(
            SyncMessage::decode(&hex(&outside)),
            Err(DecodeError::Invalid("document outside the range"))
        );
        let empty = format!(
            "02 02 0c 0001 61 {} 0001 61 {} 00000000 00000000 00000000",
            "02".repeat(32),
            "02".repeat(32)
        );
        assert_eq!(
            SyncMessage::decode(&hex(&empty)),
            Err(DecodeError::Invalid("empty document range"))
        );
        // A frontier belongs to the document itself, before its authors: not in a page that
        // starts at an author of it.
        let frontier = format!(
            "02 02 04 0001 61 {} 0000 00000000 00000001 0001 61 00000000 00000000 00000000",
            "02".repeat(32)
        );
        assert_eq!(
            SyncMessage::decode(&hex(&frontier)),
            Err(DecodeError::Invalid("document outside the range"))
        );
        let heads = format!(
            "02 02 00 0000 0000 00000000 00000001 0001 61 00000002 {} {} 00000000 00000000",
            "22".repeat(32),
            "11".repeat(32)
        );
        assert!(SyncMessage::decode(&hex(&heads)).is_err());
        let wants = format!(
            "02 02 00 0000 0000 00000000 00000000 00000002 {} {}",
            "22".repeat(32),
            "22".repeat(32)
        );
        assert!(SyncMessage::decode(&hex(&wants)).is_err());
        assert_eq!(
            SyncMessage::decode(&hex("02 07 00000002 0202020202020202 0101010101010101")),
            Err(DecodeError::Invalid("ids not strictly ascending"))
        );
    }

    proptest::proptest! {
        /// What the fuzz target checks, on random and on mutated valid input.
        #[test]
        fn whatever_decodes_re_encodes_identically(
            pick in 0usize..15,
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..4),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut bytes = golden()[pick].1.clone();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] = v;
            }
            for input in [bytes.clone(), [bytes, tail.clone()].concat(), tail] {
                if let Ok(m) = SyncMessage::decode(&input) {
                    proptest::prop_assert_eq!(m.encode(), input);
                }
            }
        }
    }
}
