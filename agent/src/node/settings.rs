//! Settings a configuration reload (SIGHUP) applies to the running node, and the changed
//! settings that wait for the next start.
//!
//! The daemon compares the reloaded configuration with the running one
//! (`Config::changes`), logs every change (a warning for each one that waits for a restart),
//! and sends the node one [`Command::Reload`](super::Command::Reload) with the live values and
//! the names of the pending settings; `status` shows those as `restart_pending`.

use super::Node;

/// The node's settings that a reload applies at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveSettings {
    /// Documents kept in memory (`max_loaded_docs`): the cache is trimmed to it after the
    /// next step.
    pub max_loaded_docs: usize,
    /// Stored changes the background scrub checks per second (`scrub_rows_per_second`).
    pub scrub_rows_per_second: u32,
}

impl Node {
    /// Apply `live` and remember which changed settings wait for the next start.
    pub(super) fn apply_settings(&mut self, live: LiveSettings, restart_pending: Vec<String>) {
        self.store.set_max_loaded_docs(live.max_loaded_docs);
        self.scrub_rows = live.scrub_rows_per_second as usize;
        self.restart_pending = restart_pending;
    }
}
