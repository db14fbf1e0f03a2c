//! The store's side of audit bundles (see [`crate::audit`]): exporting a document's valid
//! changes and the membership chain in canonical order, signed by this node
//! ([`Store::audit_bundle`]); the empty in-memory store a bundle is verified in
//! (`Store::scratch`); and the changes after some heads, for the history a verification
//! prints.

use std::collections::HashSet;
use std::path::Path;

use automerge::ChangeHash;
use rusqlite::{params, Connection};

use super::history_at::HistoryError;
use super::{blob_to_hashes, corrupt, Store};
use crate::audit::{canonical_order, Bundle};
use crate::error::StoreError;
use crate::identity::{hex, NodeId, SecretKey};
use crate::schema;
use crate::signed::{ClusterId, SignedChange, MEMBERSHIP_DOC};

impl Store {
    /// An empty store of `cluster` in memory (nothing is written to disk), to judge changes
    /// by the rules of ingest: what [`crate::audit::verify`] runs a bundle through.
    pub(crate) fn scratch(cluster: ClusterId) -> Result<Store, StoreError> {
        let path = Path::new(":memory:");
        let mut conn = Connection::open_in_memory()?;
        schema::prepare(&mut conn, true).map_err(|_| corrupt(path, "cannot create the schema"))?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('cluster_id', ?1)",
            params![cluster.to_vec()],
        )?;
        Ok(Store::empty(conn, path, cluster))
    }

    /// The valid changes of `doc` in canonical order (see [`crate::audit`]).
    fn canonical_changes(&self, doc: &str) -> Result<Vec<SignedChange>, StoreError> {
        if self.has_cut(doc)? {
            // The cut's base is not a signed change; a bundle would need the cut records.
            return Err(StoreError::Invalid(format!(
                "`{doc}` was compacted: audit bundles of a compacted document are not supported \
                 by this build (its verified history starts at the cut: see `history`)"
            )));
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT hash, author, sig, bytes, deps FROM changes WHERE doc = ?1 AND status = 0 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![doc], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut list = Vec::new();
        let mut hd = Vec::new();
        for row in rows {
            let (hash, author, sig, bytes, deps) = row?;
            if let Err(reason) = super::scrub::check_row(&hash, &author, &bytes) {
                self.note_suspect(doc, &hash, &reason);
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of `{doc}` is damaged ({reason}); it is quarantined, export again"),
                ));
            }
            let h: [u8; 32] = hash
                .try_into()
                .map_err(|_| corrupt(&self.path, "bad hash length"))?;
            hd.push((h, blob_to_hashes(&deps)));
            list.push(SignedChange {
                doc: doc.to_string(),
                author: NodeId::from_slice(&author)
                    .ok_or_else(|| corrupt(&self.path, "bad author"))?,
                sig: sig
                    .try_into()
                    .map_err(|_| corrupt(&self.path, "bad signature length"))?,
                bytes,
            });
        }
        drop(stmt);
        let order = canonical_order(&hd);
        let mut slots: Vec<Option<SignedChange>> = list.into_iter().map(Some).collect();
        Ok(order
            .into_iter()
            .filter_map(|i| slots.get_mut(i).and_then(Option::take))
            .collect())
    }

    /// An audit bundle of `doc` (see [`crate::audit`]), signed by `key`, starting after
    /// `since` (empty: from the beginning), encoded.
    pub fn audit_bundle(
        &mut self,
        key: &SecretKey,
        doc: &str,
        since: &[[u8; 32]],
        now_ms: i64,
    ) -> Result<Vec<u8>, HistoryError> {
        self.check_heads(doc, since)?;
        let mut bundle = Bundle {
            cluster: self.cluster,
            doc: doc.to_string(),
            exporter: key.node_id(),
            exported_at_ms: now_ms,
            since: since.to_vec(),
            heads: self.heads(doc)?,
            member_heads: self.heads(MEMBERSHIP_DOC)?,
            members: self.canonical_changes(MEMBERSHIP_DOC)?,
            changes: self.canonical_changes(doc)?,
            sig: [0; 64],
        };
        bundle.sign(key);
        Ok(bundle.encode())
    }

    /// Hashes (hex) of the valid changes of `doc` not in the causal past of `since`; `None`
    /// for an empty `since` (every change). Fails if a head of `since` is not in `doc`.
    pub(crate) fn changes_since(
        &mut self,
        doc: &str,
        since: &[[u8; 32]],
    ) -> Result<Option<HashSet<String>>, HistoryError> {
        if since.is_empty() {
            return Ok(None);
        }
        self.check_heads(doc, since)?;
        let am = &self.loaded_doc_repaired(doc)?.am;
        let have: Vec<ChangeHash> = since.iter().map(|h| ChangeHash(*h)).collect();
        Ok(Some(
            am.get_changes(&have)
                .iter()
                .map(|c| hex(&c.hash().0))
                .collect(),
        ))
    }
}
