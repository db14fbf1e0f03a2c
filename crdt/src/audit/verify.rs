//! Verifying an audit bundle offline (see the [`crate::audit`] module docs for the rules):
//! decode → cluster → authenticate every change and check the canonical order → ingest into
//! an empty in-memory store of the cluster (the rules a node applies on ingest) → heads →
//! exporter and its signature → the verified history.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use super::bundle::{canonical_order, Bundle, BundleDecodeError};
use crate::error::{RejectReason, StoreError};
use crate::identity::{hex, NodeId};
use crate::signed::{ClusterId, SignedChange, MEMBERSHIP_DOC};
use crate::store::{HistoryEntry, Outcome, Store};

/// Why a bundle does not verify. Every variant about one change names it: which part of the
/// bundle (`membership` or `document`), its position there (from 0), its hash and author.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The bytes are not a bundle.
    #[error("{0}")]
    Decode(#[from] BundleDecodeError),
    /// The bundle belongs to another cluster.
    #[error("the bundle is for cluster {found}, not {expected}")]
    WrongCluster {
        /// The cluster id asked for.
        expected: String,
        /// The cluster id in the bundle.
        found: String,
    },
    /// A change was refused by the rules of ingest.
    #[error("{part} change #{position} {hash} by {author} is refused: {reason}")]
    Change {
        /// `membership` or `document`.
        part: &'static str,
        /// Position in its part.
        position: usize,
        /// Its hash (hex; empty if it does not even parse).
        hash: String,
        /// Its claimed author.
        author: NodeId,
        /// Why.
        reason: String,
    },
    /// The changes are not in the canonical order (reordered).
    #[error("{part} change #{position} {hash} is out of order (the canonical order has {expected} there): the bundle was reordered")]
    OutOfOrder {
        /// `membership` or `document`.
        part: &'static str,
        /// Position in its part.
        position: usize,
        /// The change found there.
        hash: String,
        /// The change that belongs there.
        expected: String,
    },
    /// A change depends on a change that is not in the bundle.
    #[error("{part} change #{position} {hash} by {author} depends on a change missing from the bundle: the bundle was truncated")]
    MissingDependency {
        /// `membership` or `document`.
        part: &'static str,
        /// Position in its part.
        position: usize,
        /// Its hash (hex).
        hash: String,
        /// Its author.
        author: NodeId,
    },
    /// The heads reached are not the heads the bundle names.
    #[error("the bundle names {part} head {missing}, which none of its valid changes is: changes are missing (truncated)")]
    MissingHead {
        /// `membership` or `document`.
        part: &'static str,
        /// The head named but not reached (hex).
        missing: String,
    },
    /// The changes reach heads the bundle does not name.
    #[error("the {part} changes reach heads {found}, but the bundle names {named}")]
    HeadsMismatch {
        /// `membership` or `document`.
        part: &'static str,
        /// Heads reached (comma-separated hex).
        found: String,
        /// Heads named.
        named: String,
    },
    /// The `since` heads are not changes of the document.
    #[error("the bundle starts after {0}, which is not one of its changes")]
    BadSince(String),
    /// The exporter is not a member, or its signature over the bundle does not verify.
    #[error("exporter {exporter}: {reason}")]
    Exporter {
        /// The exporting node.
        exporter: NodeId,
        /// Why.
        reason: String,
    },
    /// The in-memory store failed.
    #[error("verification failed to run: {0}")]
    Store(#[from] StoreError),
}

/// A bundle that verified.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedBundle {
    /// Cluster id (hex).
    pub cluster: String,
    /// The document.
    pub doc: String,
    /// The exporting node.
    pub exporter: NodeId,
    /// Its name in the membership chain.
    pub exporter_name: String,
    /// Export time the exporter claims.
    pub exported_at_ms: i64,
    /// Heads of the document (comma-separated hex).
    pub heads: String,
    /// Heads the audit starts after (comma-separated hex; empty: from the beginning).
    pub since: String,
    /// Number of membership changes checked.
    pub membership_changes: usize,
    /// Number of document changes checked.
    pub document_changes: usize,
    /// The verified history after `since`, oldest first.
    pub history: Vec<HistoryEntry>,
    /// The document's value at its heads.
    pub value: Value,
}

fn heads_text(h: &[[u8; 32]]) -> String {
    let mut h = h.to_vec();
    h.sort();
    h.iter().map(|x| hex(x)).collect::<Vec<_>>().join(",")
}

/// Authenticate every change of a part and check that it is in canonical order.
fn check_part(
    part: &'static str,
    list: &[SignedChange],
    cluster: &ClusterId,
) -> Result<(), AuditError> {
    let mut hd = Vec::with_capacity(list.len());
    for (position, c) in list.iter().enumerate() {
        let h = c.authenticate(cluster).map_err(|r| AuditError::Change {
            part,
            position,
            hash: c.hash().map(|h| hex(&h)).unwrap_or_default(),
            author: c.author,
            reason: r.to_string(),
        })?;
        hd.push((h.hash, h.deps));
    }
    let order = canonical_order(&hd);
    if let Some(position) = order.iter().enumerate().position(|(k, i)| k != *i) {
        return Err(AuditError::OutOfOrder {
            part,
            position,
            hash: hex(&hd[position].0),
            expected: hex(&hd[order[position]].0),
        });
    }
    Ok(())
}

/// Ingest a part; every change must be applied.
fn ingest_part(
    store: &mut Store,
    part: &'static str,
    list: &[SignedChange],
) -> Result<(), AuditError> {
    if list.is_empty() {
        return Ok(());
    }
    let report = store.ingest(list.to_vec())?;
    let mut outcomes: HashMap<[u8; 32], &Outcome> = HashMap::new();
    for (_, _, h, o) in &report.outcomes {
        if let Some(h) = h {
            outcomes.entry(*h).or_insert(o);
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (position, c) in list.iter().enumerate() {
        let hash = c.hash().unwrap_or_default();
        let refused = |reason: String| AuditError::Change {
            part,
            position,
            hash: hex(&hash),
            author: c.author,
            reason,
        };
        if !seen.insert(hash) {
            return Err(refused("it is listed twice".into()));
        }
        match outcomes.get(&hash) {
            Some(Outcome::Applied) => {}
            Some(Outcome::Pending(RejectReason::MissingDeps(_))) => {
                return Err(AuditError::MissingDependency {
                    part,
                    position,
                    hash: hex(&hash),
                    author: c.author,
                })
            }
            Some(Outcome::Pending(r) | Outcome::Rejected(r)) => return Err(refused(r.to_string())),
            Some(Outcome::Duplicate) => return Err(refused("it is listed twice".into())),
            None => return Err(refused("it was not applied".into())),
        }
    }
    Ok(())
}

/// The heads reached by a part must be the heads the bundle names.
fn check_heads(
    part: &'static str,
    found: &[[u8; 32]],
    named: &[[u8; 32]],
) -> Result<(), AuditError> {
    if let Some(m) = named.iter().find(|h| !found.contains(h)) {
        return Err(AuditError::MissingHead {
            part,
            missing: hex(m),
        });
    }
    if found.len() != named.len() {
        return Err(AuditError::HeadsMismatch {
            part,
            found: heads_text(found),
            named: heads_text(named),
        });
    }
    Ok(())
}

/// Verify an audit bundle against the cluster id `cluster` (see the module docs). Needs no
/// agent and no data directory: the changes are judged in an in-memory store.
pub fn verify(bytes: &[u8], cluster: &ClusterId) -> Result<VerifiedBundle, AuditError> {
    let b = Bundle::decode(bytes)?;
    if b.cluster != *cluster {
        return Err(AuditError::WrongCluster {
            expected: hex(cluster),
            found: hex(&b.cluster),
        });
    }
    check_part("membership", &b.members, cluster)?;
    check_part("document", &b.changes, cluster)?;
    let mut store = Store::scratch(*cluster)?;
    ingest_part(&mut store, "membership", &b.members)?;
    ingest_part(&mut store, "document", &b.changes)?;
    check_heads("membership", &store.heads(MEMBERSHIP_DOC)?, &b.member_heads)?;
    check_heads("document", &store.heads(&b.doc)?, &b.heads)?;
    let exporter_name = match store.membership().get(&b.exporter) {
        Some(_) => store.membership().name_of(&b.exporter),
        None => {
            return Err(AuditError::Exporter {
                exporter: b.exporter,
                reason: "not a key the membership chain records (a foreign key)".into(),
            })
        }
    };
    if !b.signature_ok() {
        return Err(AuditError::Exporter {
            exporter: b.exporter,
            reason: "its signature over the bundle does not verify: the bundle was altered".into(),
        });
    }
    let (history, value) = if b.changes.is_empty() {
        (Vec::new(), Value::Object(serde_json::Map::new()))
    } else {
        let after = store
            .changes_since(&b.doc, &b.since)
            .map_err(|_| AuditError::BadSince(heads_text(&b.since)))?;
        let history = store
            .history(&b.doc, &[], usize::MAX)?
            .into_iter()
            .filter(|e| after.as_ref().is_none_or(|a| a.contains(&e.hash)))
            .collect();
        (history, store.get(&b.doc, &[])?.unwrap_or(Value::Null))
    };
    Ok(VerifiedBundle {
        cluster: hex(cluster),
        doc: b.doc.clone(),
        exporter: b.exporter,
        exporter_name,
        exported_at_ms: b.exported_at_ms,
        heads: heads_text(&b.heads),
        since: heads_text(&b.since),
        membership_changes: b.members.len(),
        document_changes: b.changes.len(),
        history,
        value,
    })
}
