//! Rebuilding a document from all its stored changes, after a revocation or an equivocation:
//! every change is judged again (`crate::equivocation`) → the Automerge document is rebuilt
//! from the valid ones → status flips, view and heads are replaced and the snapshot dropped
//! (it may hold changes that are void now), in one transaction → the document goes into the
//! cache and its flagged forks are updated. The flips are returned for the ingest report.

use automerge::{Automerge, Change, ROOT};
use rusqlite::params;
use serde_json::Value;

use super::cache::Loaded;
use super::{blob_to_hashes, corrupt, hashes_to_blob, panic_safe, Store};
use crate::equivocation;
use crate::error::StoreError;
use crate::identity::NodeId;
use crate::json;

impl Store {
    /// Re-judge a document from all its stored changes and rebuild it from the valid ones:
    /// changes whose dependencies are void become void, and the equivocation rule
    /// ([`crate::equivocation`]) decides statuses 2 and 3 afresh. Returns the hashes that
    /// became void and those that became valid again.
    #[allow(clippy::type_complexity)]
    pub(super) fn rebuild(
        &mut self,
        doc: &str,
    ) -> Result<(Vec<[u8; 32]>, Vec<[u8; 32]>), StoreError> {
        self.loaded.remove(doc);
        type Row = (Vec<u8>, Vec<u8>, i64, i64, Vec<u8>, Vec<u8>);
        let rows: Vec<Row> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT hash, author, seq, status, deps, bytes FROM changes WHERE doc = ?1 AND status < 4 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut judged = Vec::with_capacity(rows.len());
        let mut old_status = Vec::with_capacity(rows.len());
        for (hash, author, seq, status, deps, _) in &rows {
            let (Ok(hash), Some(author)) = (
                <[u8; 32]>::try_from(hash.as_slice()),
                NodeId::from_slice(author),
            ) else {
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of {doc} is malformed"),
                ));
            };
            judged.push(equivocation::Row {
                hash,
                author,
                seq: *seq as u64,
                deps: blob_to_hashes(deps),
                base_void: *status == 1,
            });
            old_status.push(*status);
        }
        let verdict = equivocation::evaluate(&judged);
        let mut voided = Vec::new();
        let mut revived = Vec::new();
        let mut updates: Vec<([u8; 32], i64)> = Vec::new();
        let mut valid_count = 0usize;
        let mut changes = Vec::new();
        for (i, (raw_hash, author, _, _, _, bytes)) in rows.iter().enumerate() {
            let st = verdict.status[i];
            let (hash, was) = (judged[i].hash, old_status[i]);
            if st.code() != was {
                updates.push((hash, st.code()));
                match (was == 0, st == equivocation::Status::Valid) {
                    (true, false) => {
                        let reason = if st == equivocation::Status::Fork {
                            "equivocation"
                        } else {
                            // Revoked changes were flipped before the rebuild: a change that
                            // turns void here is built on a void one.
                            "depends_on_void"
                        };
                        self.note_voided(doc, judged[i].author, hash, reason);
                        voided.push(hash);
                    }
                    (false, true) => revived.push(hash),
                    _ => {}
                }
            }
            if st != equivocation::Status::Valid {
                continue;
            }
            if let Err(reason) = super::scrub::check_row(raw_hash, author, bytes) {
                // Never applied: quarantined by the next repair (see `scrub`).
                self.note_suspect(doc, raw_hash, &reason);
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of {doc} is damaged"),
                ));
            }
            let Some(Ok(c)) = panic_safe(|| Change::try_from(bytes.as_slice())) else {
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of {doc} does not parse"),
                ));
            };
            valid_count += 1;
            changes.push(c);
        }
        let mut am = Automerge::new();
        let path = self.path.clone();
        panic_safe(|| am.apply_changes(changes))
            .ok_or_else(|| corrupt(&path, format!("document {doc} panicked on rebuild")))?
            .map_err(|e| corrupt(&path, format!("document {doc}: {e}")))?;
        let heads: Vec<[u8; 32]> = am.get_heads().iter().map(|h| h.0).collect();
        let root = json::to_json(&am, &ROOT)?;
        let tx = self.conn.transaction()?;
        {
            let mut up = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (h, st) in &updates {
                up.execute(params![h.to_vec(), st])?;
            }
            tx.execute("DELETE FROM kv WHERE doc = ?1", params![doc])?;
            if let Value::Object(m) = root {
                let mut put =
                    tx.prepare_cached("INSERT INTO kv (doc, key, value) VALUES (?1, ?2, ?3)")?;
                for (k, v) in m {
                    put.execute(params![doc, k, v.to_string()])?;
                }
            }
            // The snapshot may hold changes that are void now.
            tx.execute("DELETE FROM snapshots WHERE doc = ?1", params![doc])?;
            if valid_count == 0 {
                // A document none of whose changes stand does not exist.
                tx.execute("DELETE FROM docs WHERE doc = ?1", params![doc])?;
            } else {
                tx.execute(
                    "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                     ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads,
                        n_changes = excluded.n_changes",
                    params![doc, hashes_to_blob(&heads), valid_count as i64],
                )?;
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        if valid_count > 0 {
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        self.forks.retain(|(d, _), _| d != doc);
        for (author, seq) in verdict.forks {
            self.forks.insert((doc.to_string(), author), seq);
        }
        Ok((voided, revived))
    }
}
