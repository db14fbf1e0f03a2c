//! Durability and locking of the SQLite connection: WAL checkpoints, the exclusive lock a
//! long-running agent holds, and the fsync policy (see "Durability and fsync policy" in the
//! `store` module docs). These only set pragmas: what is stored stays the same. Local writes
//! and ingest call `sync_for` before committing, so each gets its own policy.

use super::{in_use, Store};
use crate::error::StoreError;

impl Store {
    /// Let the write-ahead log grow to `pages` pages (of 4 KiB) before a commit copies it
    /// back into the database file (SQLite's `wal_autocheckpoint`; SQLite's default is 1000).
    ///
    /// The commit that crosses the mark pays for the checkpoint: every page changed since
    /// the last one is written back and the database file is fsynced. A bigger mark makes
    /// that rarer and cheaper per commit (a page rewritten by many commits is copied once)
    /// but each one longer, and the log file bigger on disk (~4 KiB per page; it keeps its
    /// largest size). Between 100 and 1,000,000.
    pub fn set_wal_autocheckpoint(&mut self, pages: u32) -> Result<(), StoreError> {
        if !(100..=1_000_000).contains(&pages) {
            return Err(StoreError::Invalid(format!(
                "the WAL checkpoint mark must be between 100 and 1000000 pages, not {pages}"
            )));
        }
        self.conn
            .pragma_update(None, "wal_autocheckpoint", i64::from(pages))?;
        Ok(())
    }

    /// Copy the whole write-ahead log into the database file, so that the next commit
    /// starts the log again from its beginning (SQLite's `wal_checkpoint(RESTART)`); the
    /// database file is fsynced. Takes as long as a checkpoint inside a commit would
    /// (milliseconds): call it when idle, so that writes do not pay for it. The log file
    /// keeps its size: overwriting it in place is cheaper to fsync than growing it again
    /// (truncating it made the next burst of writes ~0.2 ms slower each on ext4).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(StoreError::CommitFailed(
                "the write-ahead log is in use; checkpoint not done".into(),
            ));
        }
        Ok(())
    }

    /// Hold the database for this connection until the store is dropped (SQLite's
    /// `locking_mode = EXCLUSIVE`, taken at once with an empty write transaction).
    ///
    /// A long-running owner (the agent) calls this after opening: every later transaction
    /// skips SQLite's per-transaction file locking (about 20 `fcntl` calls per received
    /// change in WAL mode), and a second process that opens the same file is refused with
    /// [`StoreError::InUse`] instead of sharing it. The OS releases the lock when the process
    /// dies, so a `kill -9` leaves nothing to clean up.
    pub fn hold_exclusive(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA locking_mode = EXCLUSIVE", [], |r| {
                r.get::<_, String>(0)
            })?;
        let taken = self
            .conn
            .execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(|e| in_use(&self.path, &e).unwrap_or_else(|| StoreError::from(e)));
        if taken.is_err() {
            // Leave the connection as it was: shared, per-transaction locks.
            let _ = self
                .conn
                .query_row("PRAGMA locking_mode = NORMAL", [], |r| {
                    r.get::<_, String>(0)
                });
        }
        taken
    }

    /// Turn fsync off (`false`) or on (`true`, the default) for every commit. Off trades
    /// power-loss durability for speed: a committed transaction still survives a process
    /// crash (`kill -9`), but the last ones may be lost on a power loss (the database stays
    /// consistent: WAL with `synchronous = NORMAL`).
    pub fn set_fsync(&mut self, on: bool) -> Result<(), StoreError> {
        self.set_fsync_policy(on, on)
    }

    /// Fsync this node's own writes (`local`) and changes received from peers (`remote`)
    /// separately. With `local = true, remote = false` every acknowledged write of this node
    /// survives a power loss, while received changes survive a process crash and, after a
    /// power loss, the last of them are fetched again from the peers that hold them (their
    /// authors fsynced them before announcing them).
    pub fn set_fsync_policy(&mut self, local: bool, remote: bool) -> Result<(), StoreError> {
        self.fsync_local = local;
        self.fsync_remote = remote;
        // Force the next `sync_for` to set the pragma.
        self.sync_full = !local;
        self.sync_for(true)
    }

    /// Never sync at all (`synchronous = OFF`): commits survive a process crash, but a power
    /// loss may corrupt the database. For simulations and for benchmarks that measure the CPU
    /// cost of a commit; an agent uses [`Store::set_fsync_policy`].
    pub fn set_no_sync(&mut self) -> Result<(), StoreError> {
        self.set_fsync_policy(false, false)?;
        self.conn.pragma_update(None, "synchronous", "OFF")?;
        Ok(())
    }

    /// Set `synchronous` for the commits that follow: this node's own writes (`local`) or
    /// received changes.
    pub(super) fn sync_for(&mut self, local: bool) -> Result<(), StoreError> {
        let full = if local {
            self.fsync_local
        } else {
            self.fsync_remote
        };
        if full != self.sync_full {
            self.conn
                .pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
            self.sync_full = full;
        }
        Ok(())
    }

    /// Turn off (or back on; on by default) the writer's fast path, which builds a change
    /// made only of scalar puts at top-level keys without Automerge (see the `store` module
    /// docs). Changes and views are the same either way; for tests and benchmarks that
    /// compare the two paths, so only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn set_local_fast_path(&mut self, on: bool) {
        self.local_fast_path = on;
    }
}
