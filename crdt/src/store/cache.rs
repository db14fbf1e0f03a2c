//! The in-memory document cache. Automerge documents are loaded lazily, from a snapshot
//! plus the valid changes after it, only when something needs Automerge (a write, conflicts,
//! history, an ingest that is not a fast forward); fast-forward changes wait in
//! `Loaded::deferred` until then. [`Store::trim_cache`] drops the least recently used beyond the cap and
//! [`Store::maintenance`] saves snapshots: everything here is derived from what is on disk.

use automerge::{Automerge, Change};
use rusqlite::{params, OptionalExtension};

use super::{corrupt, panic_safe, Store};
use crate::error::StoreError;
use crate::owners::Owners;
use crate::signed::MEMBERSHIP_DOC;

pub(super) struct Loaded {
    pub(super) am: Automerge,
    /// Owner (top-level key) of each object, built on first need: see [`crate::owners`].
    pub(super) owners: Option<Owners>,
    /// Stored fast-forward changes not yet applied to `am` (see `ingest::fast_forward_rows`):
    /// applied in one batch when the document is next needed.
    pub(super) deferred: Vec<Change>,
    /// When it was last needed (the store's use counter), for [`Store::trim_cache`].
    last_used: u64,
}

impl Loaded {
    pub(super) fn new(am: Automerge) -> Loaded {
        Loaded {
            am,
            owners: None,
            deferred: Vec::new(),
            last_used: 0,
        }
    }
}

impl Store {
    /// Keep at most `max` documents in memory after each [`Store::trim_cache`] (at least 1).
    /// A document in memory holds its whole Automerge history (~20 KiB for a small
    /// configuration document, much more for one with a long history); one that is needed
    /// again is rebuilt from its snapshot and the changes after it. Default
    /// [`DEFAULT_MAX_LOADED_DOCS`](crate::store::DEFAULT_MAX_LOADED_DOCS).
    pub fn set_max_loaded_docs(&mut self, max: usize) {
        self.max_loaded = max.max(1);
    }

    /// Drop `doc` from memory (nothing is lost: it is rebuilt from disk when next needed).
    pub fn unload(&mut self, doc: &str) {
        self.loaded.remove(doc);
    }

    /// How many documents are in memory now.
    pub fn loaded_docs(&self) -> usize {
        self.loaded.len()
    }

    /// Once more than the cap ([`Store::set_max_loaded_docs`]) are in memory, drop the least
    /// recently used documents down to 7/8 of it (so that the sort is not paid on every call
    /// while documents are cycled through); returns how many were dropped. Nothing is lost: a
    /// document in memory is derived from what is on disk. Call between operations (the agent
    /// does after each batch of commands and messages), not in the middle of one.
    pub fn trim_cache(&mut self) -> usize {
        if self.loaded.len() <= self.max_loaded {
            return 0;
        }
        let keep = self.max_loaded - self.max_loaded / 8;
        let excess = self.loaded.len() - keep;
        let mut by_age: Vec<(u64, String)> = self
            .loaded
            .iter()
            .map(|(d, l)| (l.last_used, d.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, doc) in by_age.into_iter().take(excess) {
            self.loaded.remove(&doc);
        }
        excess
    }

    pub(super) fn loaded_doc_or_new(&mut self, doc: &str) -> Result<&mut Loaded, StoreError> {
        if !self.loaded.contains_key(doc) {
            let am = if self.has_doc(doc)? {
                self.load_from_disk(doc)?
            } else {
                Automerge::new()
            };
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        let flushed = match self.loaded.get_mut(doc) {
            Some(l) if !l.deferred.is_empty() => {
                let changes = std::mem::take(&mut l.deferred);
                if let Some(owners) = l.owners.as_mut() {
                    // Record their ops, which later changes may overwrite.
                    let _ = owners.touched(&changes);
                }
                matches!(panic_safe(|| l.am.apply_changes(changes)), Some(Ok(())))
            }
            _ => true,
        };
        if !flushed {
            // Never expected (the changes passed every check); reload from disk instead.
            tracing::warn!(
                doc,
                "deferred changes did not apply in memory; reloading the document"
            );
            let am = self.load_from_disk(doc)?;
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        self.use_tick += 1;
        let tick = self.use_tick;
        let l = self
            .loaded
            .get_mut(doc)
            .ok_or_else(|| StoreError::NoSuchDocument(doc.to_string()))?;
        l.last_used = tick;
        Ok(l)
    }

    pub(super) fn loaded_doc(&mut self, doc: &str) -> Result<&mut Loaded, StoreError> {
        self.loaded_doc_or_new(doc)
    }

    /// [`Store::loaded_doc`] for a caller between operations (a read, not the middle of an
    /// ingest or a write): a load that found a damaged change quarantines it (see `scrub`),
    /// which rebuilds the document, and the load is tried again.
    pub(super) fn loaded_doc_repaired(&mut self, doc: &str) -> Result<&mut Loaded, StoreError> {
        if self.loaded_doc(doc).is_err() && self.has_suspects() {
            self.repair()?;
        }
        self.loaded_doc(doc)
    }

    /// Load a document from its snapshot plus the valid changes after it.
    fn load_from_disk(&self, doc: &str) -> Result<Automerge, StoreError> {
        let (snapshot, upto): (Option<Vec<u8>>, i64) = self
            .conn
            .prepare_cached("SELECT snapshot, upto FROM snapshots WHERE doc = ?1")?
            .query_row(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((None, 0));
        let had_snapshot = snapshot.is_some();
        let (am, upto) = match snapshot
            .and_then(|s| panic_safe(|| Automerge::load(&s)))
            .and_then(|r| r.ok())
        {
            Some(am) => (am, upto),
            None => (Automerge::new(), 0),
        };
        let am = self.apply_stored(doc, am, upto)?;
        let usable = upto > 0 && self.heads_match(doc, &am)?;
        if !had_snapshot || usable {
            return Ok(am);
        }
        // A snapshot that does not load, or does not end at the stored heads with the
        // changes after it, is damaged: drop it and load from the changes alone
        // (`maintenance` saves a new one).
        tracing::error!(
            doc,
            "the stored snapshot of this document is damaged; dropped, loading from its changes"
        );
        self.note_snapshot_dropped();
        self.conn
            .prepare_cached("DELETE FROM snapshots WHERE doc = ?1")?
            .execute(params![doc])?;
        if upto == 0 {
            // It did not load: `am` was loaded from the changes alone already.
            return Ok(am);
        }
        self.apply_stored(doc, Automerge::new(), 0)
    }

    /// `am` with the valid stored changes of `doc` after row `upto` applied.
    fn apply_stored(
        &self,
        doc: &str,
        mut am: Automerge,
        upto: i64,
    ) -> Result<Automerge, StoreError> {
        let changes = self.valid_changes_after(doc, upto)?;
        let path = self.path.clone();
        panic_safe(|| am.apply_changes(changes))
            .ok_or_else(|| corrupt(&path, format!("document {doc} panicked on load")))?
            .map_err(|e| corrupt(&path, format!("document {doc}: {e}")))?;
        Ok(am)
    }

    fn valid_changes_after(&self, doc: &str, after_id: i64) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT bytes, hash, author FROM changes WHERE doc = ?1 AND id > ?2 AND status = 0 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![doc, after_id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        let mut damaged = false;
        for r in rows {
            let (bytes, hash, author) = r?;
            if let Err(reason) = super::scrub::check_row(&hash, &author, &bytes) {
                // Never applied: the load fails and the row is quarantined (`scrub`).
                self.note_suspect(doc, &hash, &reason);
                damaged = true;
                continue;
            }
            let c = panic_safe(|| Change::try_from(bytes.as_slice()))
                .and_then(|r| r.ok())
                .ok_or_else(|| {
                    corrupt(
                        &self.path,
                        format!("a stored change of {doc} does not parse"),
                    )
                })?;
            out.push(c);
        }
        if damaged {
            return Err(corrupt(
                &self.path,
                format!("a stored change of {doc} is damaged (quarantined at the next repair)"),
            ));
        }
        Ok(out)
    }

    /// Save Automerge snapshots of documents that have many changes since their last
    /// snapshot, so later lazy loads are fast. Call when idle. A document that is not in
    /// memory (one only ever written through the fast paths: a replica's fast forward, the
    /// writer's scalar puts) is loaded for it and dropped again.
    pub fn maintenance(&mut self) -> Result<usize, StoreError> {
        let mut saved = 0;
        let docs: Vec<String> = self
            .conn
            .prepare_cached("SELECT doc FROM docs WHERE doc != ?1")?
            .query_map(params![MEMBERSHIP_DOC], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for doc in docs {
            // Changes (valid or void) stored since the document's last snapshot.
            let n: i64 = self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM changes WHERE doc = ?1
                       AND id > COALESCE((SELECT upto FROM snapshots WHERE doc = ?1), 0)",
                )?
                .query_row(params![doc], |r| r.get(0))?;
            if n < 1000 {
                continue;
            }
            let was_loaded = self.loaded.contains_key(&doc);
            let max_id: i64 = self.conn.query_row(
                "SELECT COALESCE(MAX(id), 0) FROM changes WHERE doc = ?1",
                params![doc],
                |r| r.get(0),
            )?;
            // Apply deferred changes first: the snapshot must hold everything up to max_id.
            let bytes = self.loaded_doc(&doc)?.am.save();
            self.conn
                .prepare_cached(
                    "INSERT INTO snapshots (doc, upto, snapshot) VALUES (?1, ?2, ?3)
                     ON CONFLICT (doc) DO UPDATE SET upto = excluded.upto,
                        snapshot = excluded.snapshot",
                )?
                .execute(params![doc, max_id, bytes])?;
            if !was_loaded {
                self.loaded.remove(&doc);
            }
            saved += 1;
        }
        Ok(saved)
    }
}
