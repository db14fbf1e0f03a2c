//! A minimal, defensive reader for the header of an Automerge change chunk.
//!
//! Automerge panics on some malformed input, so Lichen never hands bytes to Automerge before
//! their signature has been checked. The signature covers the change hash, and the change hash
//! is SHA-256 over the chunk after its 8-byte prefix (magic + checksum), so both can be
//! computed here without Automerge. This module also reads the fields that authorization needs
//! (dependencies, actor, seq, start_op, time) with every length checked against the bytes that
//! remain; ops are left to Automerge, which only sees the chunk after it is authenticated.
//!
//! Layout (Automerge binary format, uncompressed change chunk):
//! `magic[4] checksum[4] type(=1)[1] uleb(len) data[len]`, where `data` begins with
//! `uleb(n) hash[32]*n  uleb(actor_len) actor  uleb(seq)  uleb(start_op)  sleb(time)
//! uleb(msg_len) msg  ...`.

use sha2::{Digest, Sha256};

use crate::error::RejectReason;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_TYPE_CHANGE: u8 = 1;
/// Upper bound on the size of one change we accept (4 MiB), checked before anything else.
pub const MAX_CHANGE_BYTES: usize = 4 << 20;
/// Upper bound on dependencies of one change.
const MAX_DEPS: u64 = 1024;

/// The fields of a change that Lichen checks before Automerge parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeHeader {
    /// SHA-256 change hash (Automerge's `ChangeHash`).
    pub hash: [u8; 32],
    /// Hashes of the changes this one depends on.
    pub deps: Vec<[u8; 32]>,
    /// The actor id bytes (in Lichen: the author's 32-byte public key).
    pub actor: Vec<u8>,
    /// Per-actor sequence number, starting at 1.
    pub seq: u64,
    /// The counter of this change's first op.
    pub start_op: u64,
    /// Wall-clock milliseconds the author claims (informational only, never trusted).
    pub time: i64,
    /// For a change without dependencies (a document's first change, or one of several
    /// made concurrently on empty replicas): its Automerge message, which Lichen requires to
    /// be the document's name (see [`crate::SignedChange::authenticate`]). `None` for every
    /// other change (their messages are not read).
    pub root_message: Option<Vec<u8>>,
}

/// Read and hash a change chunk. Fails on anything that is not a well-framed, uncompressed
/// change chunk whose checksum matches.
pub fn parse(bytes: &[u8]) -> Result<ChangeHeader, RejectReason> {
    if bytes.len() > MAX_CHANGE_BYTES {
        return Err(RejectReason::TooLarge);
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(RejectReason::Malformed("bad magic bytes"));
    }
    let checksum: [u8; 4] = r.take(4)?.try_into().map_err(|_| RejectReason::Truncated)?;
    let hashed_from = r.pos;
    if r.take(1)?[0] != CHUNK_TYPE_CHANGE {
        return Err(RejectReason::Malformed("not an uncompressed change chunk"));
    }
    let len = r.uleb()?;
    if len != (bytes.len() - r.pos) as u64 {
        return Err(if len > (bytes.len() - r.pos) as u64 {
            RejectReason::Truncated
        } else {
            RejectReason::Malformed("trailing bytes after change chunk")
        });
    }
    let hash: [u8; 32] = Sha256::digest(&bytes[hashed_from..]).into();
    if hash[..4] != checksum {
        return Err(RejectReason::HashMismatch);
    }
    let ndeps = r.uleb()?;
    if ndeps > MAX_DEPS || ndeps * 32 > r.remaining() as u64 {
        return Err(RejectReason::Malformed("dependency count out of range"));
    }
    let mut deps = Vec::with_capacity(ndeps as usize);
    for _ in 0..ndeps {
        deps.push(
            r.take(32)?
                .try_into()
                .map_err(|_| RejectReason::Truncated)?,
        );
    }
    let actor_len = r.uleb()?;
    if actor_len > 64 || actor_len > r.remaining() as u64 {
        return Err(RejectReason::Malformed("actor id length out of range"));
    }
    let actor = r.take(actor_len as usize)?.to_vec();
    let seq = r.uleb()?;
    let start_op = r.uleb()?;
    let time = r.sleb()?;
    if seq == 0 || start_op == 0 {
        return Err(RejectReason::Malformed("zero seq or start_op"));
    }
    // Automerge op counters are 32-bit in places; a larger start_op panics receivers.
    if start_op >= 1 << 32 || seq >= 1 << 32 {
        return Err(RejectReason::InflatedStartOp);
    }
    let root_message = if deps.is_empty() {
        let len = r.uleb()?;
        if len > r.remaining() as u64 {
            return Err(RejectReason::Truncated);
        }
        Some(r.take(len as usize)?.to_vec())
    } else {
        None
    };
    Ok(ChangeHeader {
        hash,
        deps,
        actor,
        seq,
        start_op,
        time,
        root_message,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RejectReason> {
        if n > self.remaining() {
            return Err(RejectReason::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn uleb(&mut self) -> Result<u64, RejectReason> {
        let mut result: u64 = 0;
        for i in 0..10 {
            let b = self.take(1)?[0];
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(RejectReason::Malformed("integer overflow"));
            }
            result |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(result);
            }
        }
        Err(RejectReason::Malformed("integer overflow"))
    }

    fn sleb(&mut self) -> Result<i64, RejectReason> {
        let mut result: i64 = 0;
        let mut shift = 0;
        loop {
            let b = self.take(1)?[0];
            if shift >= 63 && b & 0x7e != 0 && b & 0x7e != 0x7e {
                return Err(RejectReason::Malformed("integer overflow"));
            }
            if shift < 64 {
                result |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    result |= -1i64 << shift;
                }
                return Ok(result);
            }
            if shift > 70 {
                return Err(RejectReason::Malformed("integer overflow"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{transaction::Transactable, ActorId, Automerge, ReadDoc, ROOT};

    fn sample_change() -> automerge::Change {
        let mut doc = Automerge::new().with_actor(ActorId::from([5u8; 32]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "a", 1).unwrap();
        tx.commit();
        let mut tx = doc.transaction();
        tx.put(ROOT, "b", "x").unwrap();
        tx.commit();
        assert!(doc.get(ROOT, "a").unwrap().is_some());
        doc.get_last_local_change().unwrap()
    }

    #[test]
    fn header_matches_what_automerge_says() {
        let change = sample_change();
        let h = parse(change.raw_bytes()).unwrap();
        assert_eq!(h.hash, change.hash().0);
        assert_eq!(h.actor, change.actor_id().to_bytes());
        assert_eq!(h.seq, change.seq());
        assert_eq!(h.start_op, change.start_op().get());
        assert_eq!(
            h.deps,
            change.deps().iter().map(|d| d.0).collect::<Vec<_>>()
        );
        assert_eq!(h.time, change.timestamp());
        assert_eq!(h.root_message, None, "a change with dependencies");
    }

    #[test]
    fn the_message_of_a_change_without_dependencies_is_read() {
        for message in [None, Some("app/x"), Some("région/é")] {
            let mut doc = Automerge::new().with_actor(ActorId::from([5u8; 32]));
            let mut tx = doc.transaction();
            tx.put(ROOT, "a", 1).unwrap();
            let mut options = automerge::transaction::CommitOptions::default();
            if let Some(m) = message {
                options = options.with_message(m.to_string());
            }
            tx.commit_with(options);
            let change = doc.get_last_local_change().unwrap();
            let h = parse(change.raw_bytes()).unwrap();
            assert_eq!(
                h.root_message.as_deref(),
                Some(message.unwrap_or("").as_bytes())
            );
            assert_eq!(change.message(), message);
        }
    }

    #[test]
    fn every_truncation_and_single_byte_flip_is_rejected_without_panic() {
        let change = sample_change();
        let bytes = change.raw_bytes().to_vec();
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..bytes.len() {
            let mut m = bytes.clone();
            m[i] ^= 0x01;
            // Either rejected, or (if it still parses) its hash differs from the original.
            if let Ok(h) = parse(&m) {
                assert_ne!(h.hash, change.hash().0, "flip at {i} kept the hash");
            }
        }
    }
}
