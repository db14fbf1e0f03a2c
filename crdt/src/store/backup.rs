//! Backups of a store: an online copy, its verification, and a restore into a new database.
//!
//! Why it exists: an operator must be able to copy a running node's database without stopping
//! it and without a torn copy, and to check a copy before trusting it (`lichen backup`,
//! `lichen backup verify`, `lichen restore`).
//!
//! Data flow:
//! * [`Store::backup_to`] copies the database through SQLite's online backup API on the
//!   store's own connection, in one step: the copy is the committed state at that moment (what
//!   is in the write-ahead log included), and no write can interleave because the owner of the
//!   store is busy copying. The copy is then switched to a rollback journal (one
//!   self-contained file), tagged with the node that took it and when (`meta` rows
//!   `backup_source`, `backup_time_ms`), and fsynced.
//! * [`embed_key`] adds the node's secret key to a copy (`meta` row `backup_key`), for a
//!   restore that keeps the node's identity. Without it a backup holds no secret.
//! * [`verify`] trusts nothing in the copy: SQLite's `integrity_check`, the application id and
//!   schema version, then every stored change is offered again, in storage order, to a fresh
//!   store of the same cluster, which authenticates (hash, signature), authorizes against the
//!   membership chain rooted in the cluster id and judges each change exactly as ingest does.
//!   The copy passes only if the fresh store holds the same valid changes and the same
//!   materialized values. The fresh store lives at a scratch path chosen by the caller.
//! * [`restore`] copies a verified backup into a new database file without the `backup_*`
//!   rows, and hands back the embedded key if there was one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::Store;
use crate::error::StoreError;
use crate::identity::{hex, NodeId, SecretKey};
use crate::schema;
use crate::signed::{ClusterId, SignedChange};

/// Changes offered to the fresh store per ingest call during [`verify`].
const VERIFY_BATCH: usize = 512;

/// Why a backup could not be made, verified or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed on the backup file.
    #[error("{path}: {source}")]
    Sqlite {
        /// The file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The destination exists: a backup or restore never overwrites a file.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(String),
    /// The file is not a sound Lichen database (integrity check, application id, schema,
    /// cluster id).
    #[error("{path} is not a usable Lichen backup: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The stored changes do not stand when checked again: altered bytes, a bad signature,
    /// a change its author was not allowed to make, or a materialized value that does not
    /// follow from the changes.
    #[error("{path} does not verify: {reason}")]
    Tampered {
        /// The file.
        path: String,
        /// The first difference found.
        reason: String,
    },
    /// The store failed (taking the copy, or the fresh store of a verification).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`verify`] found in a backup that passed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupSummary {
    /// The cluster the backup belongs to (hex).
    pub cluster: String,
    /// The backup's schema version (`PRAGMA user_version`).
    pub schema_version: i64,
    /// The node whose store was copied, if recorded.
    pub source: Option<NodeId>,
    /// When the copy was taken, in milliseconds since the epoch, if recorded.
    pub taken_ms: Option<i64>,
    /// Whether the backup holds the source node's secret key.
    pub with_key: bool,
    /// User documents (the membership document not counted).
    pub documents: usize,
    /// Stored changes, valid and void.
    pub changes: usize,
    /// Stored changes that are valid.
    pub valid_changes: usize,
    /// Members, by role name, in the verified membership.
    pub members: BTreeMap<String, usize>,
}

/// A database built by [`restore`].
#[derive(Debug)]
pub struct Restored {
    /// The key embedded in the backup, if it was taken with one.
    pub key: Option<SecretKey>,
    /// The node the backup was taken from, if recorded.
    pub source: Option<NodeId>,
    /// The cluster id.
    pub cluster: ClusterId,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn sql(path: &Path) -> impl FnOnce(rusqlite::Error) -> BackupError + '_ {
    move |source| BackupError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> BackupError {
    BackupError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn tampered(path: &Path, reason: impl Into<String>) -> BackupError {
    BackupError::Tampered {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn fsync(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

impl Store {
    /// Copy this store's committed state into a new file at `dest` (SQLite's online backup
    /// API, in one step on this store's connection: no write can interleave and nothing is
    /// torn), recording `source` (this node) and `now_ms` in it. `dest` must not exist. The
    /// copy holds no secret key (see [`embed_key`]).
    pub fn backup_to(&self, dest: &Path, source: NodeId, now_ms: i64) -> Result<(), BackupError> {
        if dest.exists() {
            return Err(BackupError::Exists(dest.display().to_string()));
        }
        let mut out = Connection::open(dest).map_err(sql(dest))?;
        {
            let copy = rusqlite::backup::Backup::new(&self.conn, &mut out).map_err(sql(dest))?;
            copy.step(-1).map_err(sql(dest))?;
        }
        // One self-contained file (no -wal beside it), fsynced by every commit.
        out.query_row("PRAGMA journal_mode = DELETE", [], |r| {
            r.get::<_, String>(0)
        })
        .map_err(sql(dest))?;
        out.pragma_update(None, "synchronous", "FULL")
            .map_err(sql(dest))?;
        out.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('backup_source', ?1), ('backup_time_ms', ?2)",
            params![source.0.to_vec(), now_ms.to_be_bytes().to_vec()],
        )
        .map_err(sql(dest))?;
        drop(out);
        fsync(dest)
    }
}

/// Add `key` to the backup at `file` (its `meta` row `backup_key`), so that [`restore`] can
/// give the restored node its old identity. The key must be the one of the node the backup
/// was taken from.
pub fn embed_key(file: &Path, key: &SecretKey) -> Result<(), BackupError> {
    let conn =
        Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql(file))?;
    let source = meta(&conn, file, "backup_source")?;
    if source.as_deref() != Some(key.node_id().0.as_slice()) {
        return Err(invalid(
            file,
            format!(
                "it was not taken from node {}, the owner of this key",
                key.node_id()
            ),
        ));
    }
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('backup_key', ?1)",
        params![key.seed().to_vec()],
    )
    .map_err(sql(file))?;
    drop(conn);
    fsync(file)
}

fn meta(conn: &Connection, file: &Path, key: &str) -> Result<Option<Vec<u8>>, BackupError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(sql(file))
}

/// The checks that need only the file: integrity, application id, schema, cluster id.
fn open_checked(file: &Path) -> Result<(Connection, ClusterId, i64), BackupError> {
    if !file.is_file() {
        return Err(invalid(file, "no such file"));
    }
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    let problems: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .map_err(|e| invalid(file, format!("SQLite cannot read it: {e}")))?;
    if problems != ["ok"] {
        return Err(invalid(
            file,
            format!("integrity check failed: {}", problems.join("; ")),
        ));
    }
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(sql(file))?;
    if app != schema::APPLICATION_ID {
        return Err(invalid(
            file,
            "not a Lichen database (wrong application id)",
        ));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql(file))?;
    if !(1..=schema::SCHEMA_VERSION).contains(&version) {
        return Err(invalid(
            file,
            format!(
                "schema version {version}; this build reads 1 to {}",
                schema::SCHEMA_VERSION
            ),
        ));
    }
    let cluster: ClusterId = meta(&conn, file, "cluster_id")?
        .and_then(|c| c.try_into().ok())
        .ok_or_else(|| invalid(file, "no cluster id recorded"))?;
    Ok((conn, cluster, version))
}

/// Check the backup at `file` from scratch (see the module docs); `scratch` is a path where a
/// fresh store is built for the check (it must not exist; it is removed afterwards, with its
/// `-wal` and `-shm` files).
pub fn verify(file: &Path, scratch: &Path) -> Result<BackupSummary, BackupError> {
    if scratch.exists() {
        return Err(BackupError::Exists(scratch.display().to_string()));
    }
    let r = verify_with(file, scratch);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = scratch.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    r
}

type Row = (i64, Vec<u8>, String, Vec<u8>, Vec<u8>, Vec<u8>, i64);

fn verify_with(file: &Path, scratch: &Path) -> Result<BackupSummary, BackupError> {
    let (conn, cluster, schema_version) = open_checked(file)?;
    if schema_version >= 6 {
        // A cut's base is not a signed change: replaying the rows would call it tampered.
        let cuts: i64 = conn
            .query_row("SELECT COUNT(*) FROM cuts WHERE won = 1", [], |r| r.get(0))
            .map_err(sql(file))?;
        if cuts > 0 {
            return Err(BackupError::Invalid {
                path: file.display().to_string(),
                reason: "it holds compacted documents, whose verification (replaying their cut \
                         records) this build does not do"
                    .into(),
            });
        }
    }
    let mut fresh = Store::join(scratch, cluster)?;
    fresh.set_no_sync()?;
    let mut stmt = conn
        .prepare("SELECT id, hash, doc, author, sig, bytes, status FROM changes ORDER BY id")
        .map_err(sql(file))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .map_err(sql(file))?;
    let mut valid_in_backup: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut rejected: BTreeMap<[u8; 32], String> = BTreeMap::new();
    let mut changes = 0usize;
    let mut batch = Vec::with_capacity(VERIFY_BATCH);
    for row in rows {
        let (id, hash, doc, author, sig, bytes, status): Row =
            row.map_err(|e| tampered(file, format!("a change row cannot be read: {e}")))?;
        changes += 1;
        let author = NodeId::from_slice(&author)
            .ok_or_else(|| tampered(file, format!("change row {id}: author is not 32 bytes")))?;
        let sig: [u8; 64] = sig
            .try_into()
            .map_err(|_| tampered(file, format!("change row {id}: signature is not 64 bytes")))?;
        let change = SignedChange {
            doc,
            author,
            sig,
            bytes,
        };
        if change.hash().map(|h| h.to_vec()) != Some(hash.clone()) {
            return Err(tampered(
                file,
                format!(
                    "change row {id} ({}): its bytes do not hash to its recorded hash {}",
                    change.doc,
                    hex(&hash)
                ),
            ));
        }
        if status == 0 {
            valid_in_backup.insert(hash);
        }
        batch.push(change);
        if batch.len() == VERIFY_BATCH {
            offer(&mut fresh, &mut batch, &mut rejected)?;
        }
    }
    offer(&mut fresh, &mut batch, &mut rejected)?;
    let valid_fresh: BTreeSet<Vec<u8>> = fresh
        .conn
        .prepare("SELECT hash FROM changes WHERE status = 0")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(StoreError::from)?;
    if let Some(h) = valid_in_backup.difference(&valid_fresh).next() {
        let why = <[u8; 32]>::try_from(h.as_slice())
            .ok()
            .and_then(|h| rejected.get(&h).cloned())
            .unwrap_or_else(|| "void when judged again".into());
        return Err(tampered(
            file,
            format!(
                "{} of the changes it holds as valid do not stand, first {} ({why})",
                valid_in_backup.difference(&valid_fresh).count(),
                hex(h)
            ),
        ));
    }
    if let Some(h) = valid_fresh.difference(&valid_in_backup).next() {
        return Err(tampered(
            file,
            format!("change {} is valid but the backup holds it as void", hex(h)),
        ));
    }
    let view = |c: &Connection| -> rusqlite::Result<BTreeMap<(String, String), Value>> {
        c.prepare("SELECT doc, key, value FROM kv")?
            .query_map([], |r| {
                let text: String = r.get(2)?;
                Ok((
                    (r.get(0)?, r.get(1)?),
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                ))
            })?
            .collect()
    };
    let (theirs, ours) = (
        view(&conn).map_err(sql(file))?,
        view(&fresh.conn).map_err(StoreError::from)?,
    );
    if theirs != ours {
        let key = theirs
            .iter()
            .find(|(k, v)| ours.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .or_else(|| ours.keys().find(|k| !theirs.contains_key(*k)));
        let (doc, key) = key.cloned().unwrap_or_default();
        return Err(tampered(
            file,
            format!("its stored value of {doc} {key:?} does not follow from its changes"),
        ));
    }
    let mut members = BTreeMap::new();
    for m in fresh.membership().members.values() {
        *members.entry(m.role.as_str().to_string()).or_insert(0) += 1;
    }
    let documents = fresh.list_docs()?.len();
    let source = meta(&conn, file, "backup_source")?.and_then(|s| NodeId::from_slice(&s));
    let taken_ms = meta(&conn, file, "backup_time_ms")?
        .and_then(|t| <[u8; 8]>::try_from(t.as_slice()).ok())
        .map(i64::from_be_bytes);
    let key = meta(&conn, file, "backup_key")?;
    if let Some(k) = &key {
        let k: [u8; 32] = k
            .as_slice()
            .try_into()
            .map_err(|_| tampered(file, "the embedded key is not 32 bytes"))?;
        if Some(SecretKey::from_seed(k).node_id()) != source {
            return Err(tampered(
                file,
                "the embedded key is not the key of the node it was taken from",
            ));
        }
    }
    Ok(BackupSummary {
        cluster: hex(&cluster),
        schema_version,
        source,
        taken_ms,
        with_key: key.is_some(),
        documents,
        changes,
        valid_changes: valid_in_backup.len(),
        members,
    })
}

fn offer(
    fresh: &mut Store,
    batch: &mut Vec<SignedChange>,
    rejected: &mut BTreeMap<[u8; 32], String>,
) -> Result<(), BackupError> {
    if batch.is_empty() {
        return Ok(());
    }
    let report = fresh.ingest(std::mem::take(batch))?;
    for (_, _, hash, outcome) in &report.outcomes {
        if let (Some(h), super::Outcome::Rejected(r) | super::Outcome::Pending(r)) = (hash, outcome)
        {
            rejected.insert(*h, r.to_string());
        }
    }
    Ok(())
}

/// Build a new database at `dest` from the backup at `file` (which should have passed
/// [`verify`]): a copy without the `backup_*` rows. Returns the key the backup holds, if any.
/// `dest` must not exist.
pub fn restore(file: &Path, dest: &Path) -> Result<Restored, BackupError> {
    if dest.exists() {
        return Err(BackupError::Exists(dest.display().to_string()));
    }
    let (src, cluster, _) = open_checked(file)?;
    let key = meta(&src, file, "backup_key")?;
    let source = meta(&src, file, "backup_source")?.and_then(|s| NodeId::from_slice(&s));
    let mut out = Connection::open(dest).map_err(sql(dest))?;
    {
        let copy = rusqlite::backup::Backup::new(&src, &mut out).map_err(sql(dest))?;
        copy.step(-1).map_err(sql(dest))?;
    }
    out.execute(
        "DELETE FROM meta WHERE key LIKE 'backup\\_%' ESCAPE '\\'",
        [],
    )
    .map_err(sql(dest))?;
    drop(out);
    fsync(dest)?;
    let key = match key {
        None => None,
        Some(k) => {
            Some(SecretKey::from_seed(k.as_slice().try_into().map_err(
                |_| tampered(file, "the embedded key is not 32 bytes"),
            )?))
        }
    };
    Ok(Restored {
        key,
        source,
        cluster,
    })
}
