//! Node identity: an ed25519 key pair, and the node id derived from it.
//!
//! A node id *is* the node's public key. It appears in one text form everywhere (logs, CLI,
//! membership, docs): 64 lowercase hex digits. Key files hold the 32-byte secret seed as hex
//! and must be readable by their owner only (mode 0600): a key file that group or others can
//! read is refused, because anyone who can read it can write as this node.
//!
//! The crate never draws randomness itself: [`SecretKey::from_seed`] takes 32 bytes from the
//! caller (the agent uses the OS generator; tests use a seeded one).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::error::KeyError;

/// A node's public key, which is its identity in the cluster.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The raw 32 bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Build from a byte slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<NodeId> {
        <[u8; 32]>::try_from(bytes).ok().map(NodeId)
    }

    /// The first 8 hex digits, for compact log lines.
    pub fn short(&self) -> String {
        hex(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s.trim())
            .map(NodeId)
            .ok_or_else(|| KeyError::BadNodeId(s.chars().take(80).collect()))
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's secret signing key.
#[derive(Clone)]
pub struct SecretKey {
    signing: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(node {})", self.node_id().short())
    }
}

impl SecretKey {
    /// Build a key from 32 secret bytes (from the OS generator, or a seeded one in tests).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32 secret bytes (for the transport's TLS identity).
    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// This key's node id (its public key).
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// Sign a message with this key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Write the key to `path` with mode 0600. Refuses to overwrite an existing file.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        let io = |e| KeyError::Io(path.display().to_string(), e);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(format!("{}\n", hex(&self.seed())).as_bytes())
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Read a key file, refusing one that group or others can read or write.
    pub fn read_file(path: &Path) -> Result<SecretKey, KeyError> {
        let io = |e| KeyError::Io(path.display().to_string(), e);
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
        if meta.len() > 4096 {
            return Err(KeyError::Malformed(path.display().to_string()));
        }
        let text = fs::read_to_string(path).map_err(io)?;
        let seed = parse_hex32(text.trim())
            .ok_or_else(|| KeyError::Malformed(path.display().to_string()))?;
        Ok(SecretKey::from_seed(seed))
    }
}

/// Decompressed public keys per thread: decompressing a key is a square root on the curve,
/// ~10% of a verification, and a cluster has few authors. Bounded: cleared when full.
const KEY_CACHE_MAX: usize = 4096;

thread_local! {
    static KEYS: std::cell::RefCell<std::collections::HashMap<[u8; 32], VerifyingKey>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Verify an ed25519 signature by `signer` over `msg` (strict verification: no malleability).
pub(crate) fn verify(signer: &NodeId, msg: &[u8], sig: &[u8; 64]) -> bool {
    let key = KEYS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(k) = cache.get(&signer.0) {
            return Some(*k);
        }
        let k = VerifyingKey::from_bytes(&signer.0).ok()?;
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(signer.0, k);
        Some(k)
    });
    let Some(key) = key else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(sig);
    key.verify_strict(msg, &sig).is_ok()
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parse exactly 64 hex digits (either case) into 32 bytes.
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_form_round_trips() {
        let key = SecretKey::from_seed([7; 32]);
        let id = key.node_id();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert!(text
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!(text[..63].parse::<NodeId>().is_err());
    }

    #[test]
    fn key_file_is_private_and_readable_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = SecretKey::from_seed([9; 32]);
        key.write_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            SecretKey::read_file(&path).unwrap().node_id(),
            key.node_id()
        );
        // Never overwritten.
        assert!(SecretKey::from_seed([1; 32]).write_file(&path).is_err());
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        SecretKey::from_seed([9; 32]).write_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::read_file(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn signatures_verify_only_for_their_signer_and_message() {
        let a = SecretKey::from_seed([1; 32]);
        let b = SecretKey::from_seed([2; 32]);
        let sig = a.sign(b"hello");
        assert!(verify(&a.node_id(), b"hello", &sig));
        assert!(!verify(&b.node_id(), b"hello", &sig));
        assert!(!verify(&a.node_id(), b"hellp", &sig));
    }
}
