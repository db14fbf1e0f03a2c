//! The audit bundle's binary format (see the [`crate::audit`] module docs for the layout):
//! encoding, decoding (lengths checked against the input before anything is allocated; never
//! panics on any input), the exporter's signature and the canonical order of changes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use sha2::{Digest, Sha256};

use crate::identity::{self, NodeId, SecretKey};
use crate::signed::{ClusterId, DecodeError, SignedChange, MAX_DOC_NAME, MEMBERSHIP_DOC};

/// The bundle format version this build writes and reads.
pub const BUNDLE_VERSION: u8 = 1;
const MAGIC: &[u8; 8] = b"LCHAUDIT";
const DOMAIN: &[u8] = b"lichen/audit/v1\0";
/// Smallest encoded signed change (an empty document name and change).
const MIN_ENTRY: usize = 1 + 2 + 32 + 64 + 4;
/// Most hashes in one heads list.
const MAX_HEADS: usize = 4096;

/// A decoded audit bundle (not yet verified: see [`crate::audit::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The cluster id.
    pub cluster: ClusterId,
    /// The document audited.
    pub doc: String,
    /// The exporting node.
    pub exporter: NodeId,
    /// Export time the exporter claims (ms since the epoch).
    pub exported_at_ms: i64,
    /// Heads the audit starts after (empty: from the beginning).
    pub since: Vec<[u8; 32]>,
    /// The document's heads at export.
    pub heads: Vec<[u8; 32]>,
    /// The membership document's heads at export.
    pub member_heads: Vec<[u8; 32]>,
    /// Membership changes, in canonical order.
    pub members: Vec<SignedChange>,
    /// Document changes, in canonical order.
    pub changes: Vec<SignedChange>,
    /// The exporter's signature over the rest.
    pub sig: [u8; 64],
}

/// Why bytes are not an audit bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleDecodeError {
    /// Not a bundle (wrong magic bytes).
    #[error("not a Lichen audit bundle (the file does not start with LCHAUDIT)")]
    NotABundle,
    /// A format version this build does not read.
    #[error("audit bundle format version {0} is not supported (this build reads version {BUNDLE_VERSION}); upgrade lichen")]
    UnknownVersion(u8),
    /// The input ends early.
    #[error("the bundle is truncated (it ends inside {0})")]
    Truncated(&'static str),
    /// A field is invalid.
    #[error("invalid bundle field: {0}")]
    Invalid(String),
    /// A change envelope does not decode.
    #[error("change #{index} of the bundle does not decode: {error}")]
    Change {
        /// Position of the change in the bundle (membership changes first, from 0).
        index: usize,
        /// Why.
        error: DecodeError,
    },
    /// Bytes remain after the last change.
    #[error("{0} unexpected bytes after the last change")]
    Trailing(usize),
}

fn put_hashes(out: &mut Vec<u8>, h: &[[u8; 32]]) {
    out.extend_from_slice(&(h.len().min(MAX_HEADS) as u16).to_be_bytes());
    for x in h.iter().take(MAX_HEADS) {
        out.extend_from_slice(x);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BundleDecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(BundleDecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BundleDecodeError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, BundleDecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?) as usize)
    }
    fn u32(&mut self, what: &'static str) -> Result<usize, BundleDecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?) as usize)
    }
    fn hashes(&mut self, what: &'static str) -> Result<Vec<[u8; 32]>, BundleDecodeError> {
        let n = self.u16(what)?;
        if n > MAX_HEADS {
            return Err(BundleDecodeError::Invalid(format!(
                "{n} {what} (at most {MAX_HEADS})"
            )));
        }
        if (self.buf.len() - self.pos) / 32 < n {
            return Err(BundleDecodeError::Truncated(what));
        }
        (0..n).map(|_| self.array(what)).collect()
    }
    fn rest(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl Bundle {
    /// The bytes before the signature.
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            128 + self
                .members
                .iter()
                .chain(&self.changes)
                .map(|c| c.encoded_len())
                .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.push(BUNDLE_VERSION);
        out.extend_from_slice(&self.cluster);
        out.extend_from_slice(&(self.doc.len() as u16).to_be_bytes());
        out.extend_from_slice(self.doc.as_bytes());
        out.extend_from_slice(&self.exporter.0);
        out.extend_from_slice(&self.exported_at_ms.to_be_bytes());
        put_hashes(&mut out, &self.since);
        put_hashes(&mut out, &self.heads);
        put_hashes(&mut out, &self.member_heads);
        out.extend_from_slice(&(self.members.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.changes.len() as u32).to_be_bytes());
        for c in self.members.iter().chain(&self.changes) {
            c.encode_into(&mut out);
        }
        out
    }

    /// The message the exporter signs: the domain, then SHA-256 of the body.
    fn signing_message(body: &[u8]) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&Sha256::digest(body));
        m
    }

    /// Sign the bundle with the exporter's key (which must be `self.exporter`'s).
    pub fn sign(&mut self, key: &SecretKey) {
        self.exporter = key.node_id();
        self.sig = key.sign(&Self::signing_message(&self.body()));
    }

    /// Whether the exporter's signature verifies.
    pub fn signature_ok(&self) -> bool {
        identity::verify(
            &self.exporter,
            &Self::signing_message(&self.body()),
            &self.sig,
        )
    }

    /// Encode (body, then signature).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.sig);
        out
    }

    /// Decode a bundle; any input gives a bundle or a typed error, never a panic.
    pub fn decode(buf: &[u8]) -> Result<Bundle, BundleDecodeError> {
        if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
            return Err(BundleDecodeError::NotABundle);
        }
        if buf.len() < MAGIC.len() + 1 + 64 {
            return Err(BundleDecodeError::Truncated("the header"));
        }
        let (body, sig) = buf.split_at(buf.len() - 64);
        let mut r = Reader {
            buf: body,
            pos: MAGIC.len(),
        };
        let version = r.array::<1>("the version")?[0];
        if version != BUNDLE_VERSION {
            return Err(BundleDecodeError::UnknownVersion(version));
        }
        let cluster = r.array::<32>("the cluster id")?;
        let doc_len = r.u16("the document name")?;
        if doc_len > MAX_DOC_NAME {
            return Err(BundleDecodeError::Invalid(
                "the document name is too long".into(),
            ));
        }
        let doc = std::str::from_utf8(r.take(doc_len, "the document name")?)
            .map_err(|_| BundleDecodeError::Invalid("the document name is not UTF-8".into()))?
            .to_string();
        if doc == MEMBERSHIP_DOC || !crate::signed::valid_doc_name(&doc) {
            return Err(BundleDecodeError::Invalid(format!(
                "`{}` is not a document name",
                doc.escape_debug()
            )));
        }
        let exporter = NodeId(r.array::<32>("the exporter")?);
        let exported_at_ms = i64::from_be_bytes(r.array("the export time")?);
        let since = r.hashes("the since heads")?;
        let heads = r.hashes("the heads")?;
        let member_heads = r.hashes("the membership heads")?;
        let n_members = r.u32("the change counts")?;
        let n_changes = r.u32("the change counts")?;
        let total = n_members.saturating_add(n_changes);
        if total > r.rest() / MIN_ENTRY {
            return Err(BundleDecodeError::Truncated("the changes"));
        }
        let mut members = Vec::with_capacity(n_members);
        let mut changes = Vec::with_capacity(n_changes);
        for index in 0..total {
            let (c, used) = SignedChange::decode(&body[r.pos..])
                .map_err(|error| BundleDecodeError::Change { index, error })?;
            r.pos += used;
            let membership = index < n_members;
            let want = if membership {
                MEMBERSHIP_DOC
            } else {
                doc.as_str()
            };
            if c.doc != want {
                return Err(BundleDecodeError::Invalid(format!(
                    "change #{index} is for document `{}`, expected `{want}`",
                    c.doc.escape_debug()
                )));
            }
            if membership {
                &mut members
            } else {
                &mut changes
            }
            .push(c);
        }
        if r.rest() != 0 {
            return Err(BundleDecodeError::Trailing(r.rest()));
        }
        let sig: [u8; 64] = sig
            .try_into()
            .map_err(|_| BundleDecodeError::Truncated("the signature"))?;
        Ok(Bundle {
            cluster,
            doc,
            exporter,
            exported_at_ms,
            since,
            heads,
            member_heads,
            members,
            changes,
            sig,
        })
    }
}

/// The canonical order of changes given as (hash, dependencies): each after its
/// dependencies present in the list, ties broken by the smaller hash. Returns indices into
/// `changes`; dependencies not in the list are ignored, and changes left in a cycle (which
/// hashes make impossible) come last in list order.
pub fn canonical_order(changes: &[([u8; 32], Vec<[u8; 32]>)]) -> Vec<usize> {
    let index: HashMap<[u8; 32], usize> = changes
        .iter()
        .enumerate()
        .map(|(i, (h, _))| (*h, i))
        .collect();
    let mut waiting: Vec<usize> = vec![0; changes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, (_, deps)) in changes.iter().enumerate() {
        let uniq: HashSet<&[u8; 32]> = deps.iter().collect();
        for d in uniq {
            if let Some(&j) = index.get(d) {
                waiting[i] += 1;
                children[j].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<([u8; 32], usize)>> = waiting
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == 0)
        .map(|(i, _)| Reverse((changes[i].0, i)))
        .collect();
    let mut out = Vec::with_capacity(changes.len());
    let mut done = vec![false; changes.len()];
    while let Some(Reverse((_, i))) = ready.pop() {
        out.push(i);
        done[i] = true;
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push(Reverse((changes[c].0, c)));
            }
        }
    }
    out.extend((0..changes.len()).filter(|i| !done[*i]));
    out
}
