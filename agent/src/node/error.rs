//! Errors for the node's callers, and how the node reports its own storage failures.
//!
//! A command that fails is answered with an [`ApiError`] (an [`ErrorKind`], which is both
//! the HTTP status and the CLI's exit code, and a message that names the next step); the
//! HTTP API sends it as is, the file bindings log it. A failure that is not the caller's
//! fault (a full disk, a failed commit) is also counted in `lichen_store_errors_total` and
//! logged, at most once per `STORAGE_LOG_EVERY`.

use std::path::Path;
use std::time::{Duration, Instant};

use lichen_crdt::{Role, StoreError};

use super::Node;
use crate::error::{ApiError, ErrorKind};

/// At most one log line per this long for repeated storage failures (a full disk).
const STORAGE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Node {
    /// Count (and log) a store failure that is not the caller's fault: a full disk or a
    /// failed commit. `false` for other errors (refusals, bad input).
    pub(super) fn storage_failure(&self, e: &StoreError, what: &str) -> bool {
        let reason = match e {
            StoreError::DiskFull => "disk_full",
            StoreError::CommitFailed(_) | StoreError::Sqlite(_) => "database",
            _ => return false,
        };
        self.metrics
            .inc_labelled("lichen_store_errors_total", reason, 1);
        // While the disk stays full every anti-entropy round fails again: one line per
        // STORAGE_LOG_EVERY, with how many were left out (the metric counts each).
        let now = Instant::now();
        let (last, quiet) = self.storage_log.get();
        if last.is_some_and(|t| now.duration_since(t) < STORAGE_LOG_EVERY) {
            self.storage_log.set((last, quiet + 1));
        } else {
            tracing::error!(error = %e, data_dir = %self.store.path().display(), similar_failures_not_logged = quiet, "{what} not stored");
            self.storage_log.set((Some(now), 0));
        }
        true
    }

    /// A refused write; on a node that is not a member yet, say what to run.
    pub(super) fn write_error(&self, e: StoreError) -> ApiError {
        let me = self.key.node_id();
        let removed = self
            .store
            .membership()
            .get(&me)
            .is_some_and(|x| x.role == Role::Removed);
        if matches!(e, StoreError::Denied(_)) && removed {
            return ApiError::new(
                ErrorKind::Denied,
                format!(
                    "this node's key was revoked: an admin removed it from the cluster, so it can no longer write ({e}); to write again, start this machine with a new data directory (a new key) and ask an admin to add it"
                ),
            );
        }
        if matches!(e, StoreError::Denied(_)) && !self.store.membership().is_active(&me) {
            return ApiError::new(
                ErrorKind::Denied,
                format!(
                    "this node is not a member of the cluster yet, so it cannot write: on an admin node run `lichen members add {me} --role writer --name {}`, then retry",
                    self.name
                ),
            );
        }
        self.change_error(e, "write")
    }

    /// The API's answer to a local change (`what`) the store refused or could not store: a
    /// storage failure is counted and logged, and a full disk names the data directory.
    pub(super) fn change_error(&self, e: StoreError, what: &str) -> ApiError {
        self.storage_failure(&e, what);
        if matches!(e, StoreError::DiskFull) {
            let dir = self.store.path().parent().unwrap_or(Path::new("/"));
            return ApiError::new(
                ErrorKind::DiskFull,
                format!("{e} (data directory {})", dir.display()),
            );
        }
        ApiError::from(e)
    }
}
