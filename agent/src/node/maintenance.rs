//! The node task's periodic jobs on the store: the idle write-ahead log checkpoint, the
//! background scrub, and document snapshots.
//!
//! The event loop (`run`) owns the timers and calls one of these when its timer fires; each
//! one is a step on the store, counted in the metrics, whose failure is logged and retried at
//! the next tick (never fatal).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Node;

/// After this long without commits the write-ahead log is checkpointed (restarted).
pub(super) const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

/// How often the background scrub checks a few stored changes.
pub(super) const SCRUB_EVERY: Duration = Duration::from_millis(250);

/// How often documents with many changes since their last snapshot get a new one.
pub(super) const MAINTENANCE_EVERY: Duration = Duration::from_secs(300);

impl Node {
    /// Copy the write-ahead log into the database once writes pause, so that the next writes
    /// start it again from its beginning: the checkpoint is then not paid inside a write
    /// (SQLite does it in the commit that crosses `wal_checkpoint_pages`).
    pub(super) fn idle_checkpoint(&mut self) {
        match self.store.checkpoint() {
            Ok(()) => {
                self.metrics.wal_checkpoints.fetch_add(1, Relaxed);
                self.metrics.wal_checkpoint_pending.store(0, Relaxed);
            }
            Err(e) => {
                if !self.storage_failure(&e, "write-ahead log checkpoint") {
                    tracing::warn!(error = %e, "write-ahead log checkpoint failed");
                }
            }
        }
    }

    /// One step of the background scrub: a few stored changes checked, so that damage on disk
    /// is found (and fetched again from a peer) without loading the disk.
    pub(super) fn scrub_step(&mut self) {
        let budget = (self.scrub_rows * SCRUB_EVERY.as_millis() as usize / 1000).max(1);
        match self.store.scrub_step(budget) {
            Ok(step) => {
                if step.healed > 0 || !step.corrupt.is_empty() {
                    // The store no longer claims (or claims again) some changes:
                    // the engine's cached version vectors are stale.
                    self.engine.invalidate();
                    self.refresh_membership();
                }
            }
            Err(e) => {
                if !self.storage_failure(&e, "background scrub") {
                    tracing::warn!(error = %e, "background scrub failed");
                }
            }
        }
        self.update_scrub_metrics();
    }

    /// Snapshots of documents with many changes since their last one, so that a document
    /// dropped from memory (`Store::trim_cache`) or loaded after a restart is rebuilt fast.
    pub(super) fn save_snapshots(&mut self) {
        match self.store.maintenance() {
            Ok(0) => {}
            Ok(n) => tracing::debug!(snapshots = n, "saved document snapshots"),
            Err(e) => {
                if !self.storage_failure(&e, "document snapshots") {
                    tracing::warn!(error = %e, "saving document snapshots failed");
                }
            }
        }
    }

    /// Copy the store's corruption counters into the metrics.
    pub(super) fn update_scrub_metrics(&self) {
        match self.store.scrub_status() {
            Ok(s) => {
                self.metrics.corrupt_changes.store(s.corrupt_found, Relaxed);
                self.metrics
                    .quarantined_changes
                    .store(s.quarantined, Relaxed);
                self.metrics.healed_changes.store(s.healed, Relaxed);
                self.metrics
                    .snapshots_dropped
                    .store(s.snapshots_dropped, Relaxed);
                self.metrics.scrubbed_changes.store(s.checked, Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "reading the scrub counters failed"),
        }
    }
}
