//! Signed changes: an Automerge change plus its author's detached ed25519 signature.
//!
//! The signature covers `"lichen/change/v1\0" || cluster id || doc name || change hash`. The
//! cluster id and document name are in the signed message (domain separation), so a change
//! cannot be replayed into another document or another cluster. Because the change hash is
//! SHA-256 over the chunk (see [`crate::header`]), the signature is checked before Automerge
//! parses any byte. Anyone may relay a signed change; no one can forge or alter one.
//!
//! Encoding (used on the wire and for fixtures; versioned, lengths checked before allocating):
//! `u8 version=1 | u16be doc_len | doc | author[32] | sig[64] | u32be len | change bytes`.

use crate::error::RejectReason;
use crate::header::{self, ChangeHeader, MAX_CHANGE_BYTES};
use crate::identity::{self, NodeId, SecretKey};

/// The 32-byte cluster id: the hash of the cluster's genesis change.
pub type ClusterId = [u8; 32];

/// Name of the membership document (reserved; user documents cannot start with `_`).
pub const MEMBERSHIP_DOC: &str = "_members";

const DOMAIN: &[u8] = b"lichen/change/v1\0";
const ENCODING_VERSION: u8 = 1;
/// Longest document name.
pub const MAX_DOC_NAME: usize = 128;

/// A change with its author's signature, as stored and as sent between nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedChange {
    /// Document name.
    pub doc: String,
    /// The author's node id (must equal the change's Automerge actor).
    pub author: NodeId,
    /// Detached signature over the domain-separated (cluster, doc, hash).
    pub sig: [u8; 64],
    /// The raw, uncompressed Automerge change chunk.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SignedChange({} by {}, {} bytes)",
            self.doc,
            self.author.short(),
            self.bytes.len()
        )
    }
}

/// The exact message an author signs.
pub(crate) fn signing_message(cluster: &ClusterId, doc: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 32 + 2 + doc.len() + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(cluster);
    m.extend_from_slice(&(doc.len() as u16).to_be_bytes());
    m.extend_from_slice(doc.as_bytes());
    m.extend_from_slice(hash);
    m
}

/// Check a document name: 1–128 bytes of `a-z 0-9 . _ - /`, segments separated by single `/`,
/// no leading `_` except the reserved membership document.
pub fn valid_doc_name(name: &str) -> bool {
    if name == MEMBERSHIP_DOC {
        return true;
    }
    !name.is_empty()
        && name.len() <= MAX_DOC_NAME
        && !name.starts_with('_')
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'.'
                        || b == b'_'
                        || b == b'-'
                })
        })
}

impl SignedChange {
    /// Sign raw change bytes made locally by `key`, whose hash is already known.
    pub(crate) fn sign_hashed(
        key: &SecretKey,
        cluster: &ClusterId,
        doc: &str,
        hash: &[u8; 32],
        bytes: Vec<u8>,
    ) -> SignedChange {
        let sig = key.sign(&signing_message(cluster, doc, hash));
        SignedChange {
            doc: doc.to_string(),
            author: key.node_id(),
            sig,
            bytes,
        }
    }

    /// Sign an Automerge change chunk (for tools and tests; the store signs its own changes).
    /// Fails if the bytes are not a well-framed change chunk.
    pub fn sign(
        key: &SecretKey,
        cluster: &ClusterId,
        doc: &str,
        bytes: Vec<u8>,
    ) -> Result<SignedChange, RejectReason> {
        let h = header::parse(&bytes)?;
        Ok(Self::sign_hashed(key, cluster, doc, &h.hash, bytes))
    }

    /// Authenticate a change without Automerge: frame and hash, document named by a change
    /// without dependencies, signature, actor = signer. On success returns the header read
    /// from the bytes.
    ///
    /// A change without dependencies must carry its document's name as its Automerge message
    /// (the cluster's genesis change in the membership document excepted: its hash is the
    /// cluster id). Automerge hashes a
    /// change's content only, and changes are stored by hash, so without this a member could
    /// sign one change for two documents and nodes would keep it in whichever arrived first.
    /// With it, such a change is valid in one document at most, and by induction so is every
    /// change, since a change may only depend on changes of its own document (checked at
    /// ingest).
    pub fn authenticate(&self, cluster: &ClusterId) -> Result<ChangeHeader, RejectReason> {
        if !valid_doc_name(&self.doc) {
            return Err(RejectReason::BadDocument);
        }
        let h = header::parse(&self.bytes)?;
        if let Some(name) = &h.root_message {
            let genesis = self.doc == MEMBERSHIP_DOC && h.hash == *cluster;
            if !genesis && name.as_slice() != self.doc.as_bytes() {
                return Err(RejectReason::Malformed(
                    "a change without dependencies must name its document",
                ));
            }
        }
        if !identity::verify(
            &self.author,
            &signing_message(cluster, &self.doc, &h.hash),
            &self.sig,
        ) {
            return Err(RejectReason::BadSignature);
        }
        if h.actor != self.author.0 {
            return Err(RejectReason::ActorNotSigner);
        }
        Ok(h)
    }

    /// The change hash (computed; does not authenticate).
    pub fn hash(&self) -> Option<[u8; 32]> {
        header::parse(&self.bytes).ok().map(|h| h.hash)
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        1 + 2 + self.doc.len() + 32 + 64 + 4 + self.bytes.len()
    }

    /// Append the versioned encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&(self.doc.len() as u16).to_be_bytes());
        out.extend_from_slice(self.doc.as_bytes());
        out.extend_from_slice(&self.author.0);
        out.extend_from_slice(&self.sig);
        out.extend_from_slice(&(self.bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.bytes);
    }

    /// Encode to a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut v);
        v
    }

    /// Decode one signed change from the front of `buf`; returns it and the bytes consumed.
    /// Lengths are checked against the input before anything is allocated.
    pub fn decode(buf: &[u8]) -> Result<(SignedChange, usize), DecodeError> {
        let mut pos = 0usize;
        let take = |pos: &mut usize, n: usize| -> Result<&[u8], DecodeError> {
            if buf.len() - *pos < n {
                return Err(DecodeError::Truncated);
            }
            let s = &buf[*pos..*pos + n];
            *pos += n;
            Ok(s)
        };
        let version = take(&mut pos, 1)?[0];
        if version != ENCODING_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let doc_len = u16::from_be_bytes([take(&mut pos, 1)?[0], take(&mut pos, 1)?[0]]) as usize;
        if doc_len > MAX_DOC_NAME {
            return Err(DecodeError::TooLong("document name"));
        }
        let doc = std::str::from_utf8(take(&mut pos, doc_len)?)
            .map_err(|_| DecodeError::Invalid("document name is not UTF-8"))?
            .to_string();
        let author = NodeId::from_slice(take(&mut pos, 32)?).ok_or(DecodeError::Truncated)?;
        let sig: [u8; 64] = take(&mut pos, 64)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        let len_bytes: [u8; 4] = take(&mut pos, 4)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > MAX_CHANGE_BYTES {
            return Err(DecodeError::TooLong("change"));
        }
        let bytes = take(&mut pos, len)?.to_vec();
        Ok((
            SignedChange {
                doc,
                author,
                sig,
                bytes,
            },
            pos,
        ))
    }
}

/// Why bytes could not be decoded into a signed change (or a sync message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input ended early.
    #[error("truncated input")]
    Truncated,
    /// A version this build does not understand.
    #[error("unknown encoding version {0}; this node may need an upgrade")]
    UnknownVersion(u8),
    /// A length field exceeds its limit.
    #[error("{0} exceeds its size limit")]
    TooLong(&'static str),
    /// A field has an invalid value.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// Bytes left over after a complete message.
    #[error("trailing bytes after message")]
    Trailing,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names() {
        for ok in [
            "app/nginx",
            "region/eu/limits",
            "a",
            "x-1.2_3",
            MEMBERSHIP_DOC,
        ] {
            assert!(valid_doc_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "A",
            "_x",
            "a/../b",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(!valid_doc_name(bad), "{bad}");
        }
    }

    #[test]
    fn encoding_round_trips_and_rejects_truncation() {
        let c = SignedChange {
            doc: "app/x".into(),
            author: NodeId([3; 32]),
            sig: [4; 64],
            bytes: vec![1, 2, 3],
        };
        let enc = c.encode();
        assert_eq!(enc.len(), c.encoded_len());
        let (d, n) = SignedChange::decode(&enc).unwrap();
        assert_eq!((d, n), (c, enc.len()));
        for cut in 0..enc.len() {
            assert!(SignedChange::decode(&enc[..cut]).is_err());
        }
        let mut v2 = enc.clone();
        v2[0] = 2;
        assert_eq!(
            SignedChange::decode(&v2).unwrap_err(),
            DecodeError::UnknownVersion(2)
        );
    }
}
