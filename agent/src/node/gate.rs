//! Who may open a QUIC connection to this node.
//!
//! The transport asks the [`Gate`] at every handshake; the node task fills it from the
//! membership document (see `membership_sync`), so the transport never reads the store.

use std::collections::HashSet;
use std::sync::RwLock;

use lichen_transport::PeerKey;

/// Who may connect: active members, former members (keys the membership document lists as
/// removed), plus the join seed while membership is unknown.
///
/// A former member is let in so that it learns of its removal: the sync engine sends it the
/// signed membership changes that prove it, refuses everything it sends, and serves it
/// nothing else (see "Former members" in `lichen_crdt::sync`). Refused at the handshake, it
/// would never learn, and would keep acknowledging writes every other node treats as void.
#[derive(Default)]
pub(crate) struct Gate {
    pub(super) members: RwLock<HashSet<PeerKey>>,
    pub(super) former: RwLock<HashSet<PeerKey>>,
    pub(super) bootstrap: RwLock<HashSet<PeerKey>>,
}

impl lichen_transport::Authorizer for Gate {
    fn is_member(&self, key: &PeerKey) -> bool {
        let members = self
            .members
            .read()
            .map(|m| m.contains(key))
            .unwrap_or(false);
        let former = self.former.read().map(|m| m.contains(key)).unwrap_or(false);
        members
            || former
            || (self.members.read().map(|m| m.is_empty()).unwrap_or(false)
                && self
                    .bootstrap
                    .read()
                    .map(|b| b.contains(key))
                    .unwrap_or(false))
    }
}
