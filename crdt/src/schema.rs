//! The SQLite schema and its migrations.
//!
//! The database is identified by `PRAGMA application_id` ("LCHN") and versioned by
//! `PRAGMA user_version`. Opening runs the migrations from the stored version up to
//! [`SCHEMA_VERSION`] inside one transaction. A file that is not a Lichen database, or one
//! written by a newer schema, is refused and never touched.
//!
//! Tables:
//! * `meta(key, value)`: the cluster id.
//! * `changes`: every authenticated change, by hash, with signature, author, seq, start_op,
//!   `max_op` (start_op - 1 + number of ops), dependencies, and `status`: 0 valid, 1 void
//!   (revoked, or depends on a revoked change), 2 void (depends on an equivocation-void
//!   change), 3 void (by an author flagged for equivocation, at or after its fork seq; see
//!   [`crate::equivocation`]). The `(doc, author, seq)` index is the per-author chain used by
//!   sync. It is not unique: a void change's seq may be reused by its author's next valid
//!   change (an honest change voided because of its dependencies), and both variants of an
//!   equivocation are stored (status 3) as evidence. The partial index `changes_forked`
//!   (schema 2) finds flagged authors without scanning the table.
//! * `evidence`: (schema 1 only) the second change of an equivocating pair; no longer written
//!   for configuration documents, still read by `Store::equivocators`.
//! * `docs`: per document: heads and change count, rewritten by every commit that touches the
//!   document (a small row: see `snapshots`).
//! * `snapshots` (schema 3): per document, an Automerge snapshot with the last change rowid
//!   it covers (so a lazy load applies only what came after). Until schema 2 these were
//!   columns of `docs`; but SQLite rewrites a row's whole overflow chain whenever the row
//!   changes size (the heads going from one hash to two and back, as concurrent writers do),
//!   so every such commit copied the snapshot (tens of KiB to MiB) into the write-ahead log.
//! * `kv`: the materialized view: the JSON value of each top-level key, maintained in the same
//!   transaction as the changes, so reads never need Automerge; and (schema 4) `ops`, the ids
//!   of the Automerge ops whose values are visible at that key (sorted; each an 8-byte
//!   big-endian counter, a 1-byte actor length and the actor), or NULL where not known: a
//!   fast forward may only overwrite exactly these (see `store::ingest`).
//! * `quarantine` (schema 5): changes moved out of `changes` because their stored row failed
//!   verification (`corrupt` = 1, with the `reason`), or because they depend on such a change
//!   (`corrupt` = 0; their own bytes are good and are offered to ingest again). `rebuilt` is
//!   set once the document's view, heads and snapshot were rebuilt without them (a crash in
//!   between is finished at the next open), `healed` once the change is held again (a peer's
//!   good copy); the bytes of a healed row are dropped. See `store::scrub`.
//! * `cuts` (schema 6): the signed compaction records of each document (kept: they are small,
//!   and a peer catching up needs the chain), the base bytes of the cuts that won here, which
//!   one won, and whether the document was rebuilt on it since (`installed`; a crash in
//!   between is finished at the next open). `changes.status` 4: void because a cut made it late (its author carries it
//!   forward); 5: folded by the winning cut, left out of the document and kept on disk until a
//!   cut built on that one wins (see [`crate::compaction`]).

use rusqlite::Connection;

/// `PRAGMA application_id` of a Lichen database ("LCHN").
pub(crate) const APPLICATION_ID: i64 = 0x4c43_484e;
/// The newest schema this build writes.
pub(crate) const SCHEMA_VERSION: i64 = 6;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
     CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        author BLOB NOT NULL,
        seq INTEGER NOT NULL,
        start_op INTEGER NOT NULL,
        max_op INTEGER NOT NULL,
        time INTEGER NOT NULL,
        deps BLOB NOT NULL,
        sig BLOB NOT NULL,
        bytes BLOB NOT NULL,
        status INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX changes_by_author ON changes (doc, author, seq);
     CREATE INDEX changes_by_doc ON changes (doc, id);
     CREATE TABLE evidence (
        hash BLOB PRIMARY KEY,
        doc TEXT NOT NULL,
        author BLOB NOT NULL,
        seq INTEGER NOT NULL,
        sig BLOB NOT NULL,
        bytes BLOB NOT NULL,
        conflicts_with BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE docs (
        doc TEXT PRIMARY KEY,
        heads BLOB NOT NULL,
        n_changes INTEGER NOT NULL,
        snapshot BLOB,
        snapshot_upto INTEGER NOT NULL DEFAULT 0
     ) WITHOUT ROWID;
     CREATE TABLE kv (
        doc TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (doc, key)
     ) WITHOUT ROWID;",
    // 1 -> 2: equivocation variants live in `changes` with status 3.
    "CREATE INDEX changes_forked ON changes (doc, author, seq) WHERE status = 3;",
    // 2 -> 3: snapshots move out of `docs`, whose rows every commit rewrites.
    "CREATE TABLE snapshots (
        doc TEXT PRIMARY KEY,
        upto INTEGER NOT NULL,
        snapshot BLOB NOT NULL
     );
     INSERT INTO snapshots (doc, upto, snapshot)
        SELECT doc, snapshot_upto, snapshot FROM docs WHERE snapshot IS NOT NULL;
     ALTER TABLE docs DROP COLUMN snapshot;
     ALTER TABLE docs DROP COLUMN snapshot_upto;",
    // 3 -> 4: the Automerge ops behind each view row, so that a fast forward can check what
    // a put overwrites (NULL: not known; the next change to the key takes the Automerge path).
    "ALTER TABLE kv ADD COLUMN ops BLOB;",
    // 4 -> 5: changes found damaged on disk, and the changes moved out with them because
    // they depend on one, until a peer's good copy replaces them (see `store::scrub`).
    "CREATE TABLE quarantine (
        hash BLOB PRIMARY KEY,
        doc TEXT NOT NULL,
        author BLOB NOT NULL,
        seq INTEGER NOT NULL,
        sig BLOB NOT NULL,
        bytes BLOB NOT NULL,
        reason TEXT NOT NULL,
        corrupt INTEGER NOT NULL,
        rebuilt INTEGER NOT NULL DEFAULT 0,
        healed INTEGER NOT NULL DEFAULT 0
     ) WITHOUT ROWID;",
    // 5 -> 6: compaction cut records (see `crate::compaction`), with the base of those that
    // won; `changes.status` gains 4 (late for a cut) and 5 (folded, retained one epoch).
    "CREATE TABLE cuts (
        hash BLOB PRIMARY KEY,
        doc TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        record BLOB NOT NULL,
        base BLOB,
        won INTEGER NOT NULL DEFAULT 0,
        installed INTEGER NOT NULL DEFAULT 0
     ) WITHOUT ROWID;
     CREATE INDEX cuts_by_doc ON cuts (doc, epoch);",
];

/// Why a database could not be prepared.
pub(crate) enum SchemaProblem {
    NotLichen,
    Newer(i64),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for SchemaProblem {
    fn from(e: rusqlite::Error) -> Self {
        SchemaProblem::Sql(e)
    }
}

/// Check identity and version, then migrate to the latest schema.
pub(crate) fn prepare(conn: &mut Connection, fresh: bool) -> Result<(), SchemaProblem> {
    let app: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if !fresh && app != APPLICATION_ID {
        return Err(SchemaProblem::NotLichen);
    }
    if version > SCHEMA_VERSION {
        return Err(SchemaProblem::Newer(version));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", v as i64 + 1)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory Lichen database as schema `version` left it.
    fn database_at(version: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        conn
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    /// A version-1 database (the first schema) is migrated in place: its rows are kept, the
    /// new index exists, and the version is the latest.
    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rows() {
        let mut conn = database_at(1);
        conn.execute(
            "INSERT INTO changes (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes)
             VALUES (x'01', 'app/x', x'02', 1, 1, 1, 0, x'', x'', x'')",
            [],
        )
        .unwrap();
        prepare(&mut conn, false).ok().unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        let index: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'changes_forked'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
    }

    /// A version-2 database keeps its snapshots, now in their own table; `docs` keeps its
    /// rows without the snapshot columns.
    #[test]
    fn a_version_2_database_moves_its_snapshots_out_of_docs() {
        let mut conn = database_at(2);
        conn.execute_batch(
            "INSERT INTO docs (doc, heads, n_changes, snapshot, snapshot_upto)
                VALUES ('app/a', x'aa', 3, x'0102', 7), ('app/b', x'bb', 1, NULL, 0);",
        )
        .unwrap();
        prepare(&mut conn, false).ok().unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let snaps: Vec<(String, i64, Vec<u8>)> = conn
            .prepare("SELECT doc, upto, snapshot FROM snapshots")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(snaps, vec![("app/a".to_string(), 7, vec![1, 2])]);
        let docs: Vec<(String, Vec<u8>, i64)> = conn
            .prepare("SELECT * FROM docs ORDER BY doc")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            docs,
            vec![
                ("app/a".to_string(), vec![0xaa], 3),
                ("app/b".to_string(), vec![0xbb], 1)
            ],
            "`docs` has exactly heads and n_changes left"
        );
    }

    /// A version-5 database gains an empty `cuts` table and keeps its changes and quarantine.
    #[test]
    fn a_version_5_database_gains_a_cuts_table() {
        let mut conn = database_at(5);
        conn.execute(
            "INSERT INTO changes (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes)
             VALUES (x'01', 'app/x', x'02', 1, 1, 1, 0, x'', x'', x'')",
            [],
        )
        .unwrap();
        prepare(&mut conn, false).ok().unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let (changes, cuts): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM changes), (SELECT COUNT(*) FROM cuts)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((changes, cuts), (1, 0));
    }

    /// A version-4 database gains an empty `quarantine` table and keeps its changes.
    #[test]
    fn a_version_4_database_gains_a_quarantine_table() {
        let mut conn = database_at(4);
        conn.execute(
            "INSERT INTO changes (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes)
             VALUES (x'01', 'app/x', x'02', 1, 1, 1, 0, x'', x'', x'')",
            [],
        )
        .unwrap();
        prepare(&mut conn, false).ok().unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let (changes, quarantined): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM changes), (SELECT COUNT(*) FROM quarantine)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((changes, quarantined), (1, 0));
    }
}
