//! The binding manager: starts one task per binding and replaces the set on a config reload.
//!
//! Why it exists: the daemon knows bindings only as a list from the config; it calls
//! [`Manager::start`] once, [`Manager::reload`] on SIGHUP with the new list, and
//! [`Manager::stop`] at shutdown. A reload keeps the tasks whose binding is unchanged
//! (their state — what the file holds, pending reloads — survives), stops the ones that were
//! removed or changed, and starts the new ones. A task replacing one for the same file
//! starts only after the old one has finished, so two tasks never write one file.
//!
//! A template binding whose new template does not compile is not replaced: the old task
//! (with the old template) keeps running, and the error is logged, counted and shown in
//! status until a later reload brings a template that compiles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::binding::Binding;
use super::last::LastSeen;
use super::task;
use crate::node::NodeHandle;

struct Running {
    binding: Binding,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// Runs one task per binding; reloads replace the set.
pub(crate) struct Manager {
    node: NodeHandle,
    /// Where each binding's last-seen file content is kept ([`LastSeen`]).
    state_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
    running: std::sync::Mutex<HashMap<PathBuf, Running>>,
}

impl Manager {
    /// Start tasks for `bindings`, keeping their state in `state_dir` (created when first
    /// needed). Must be called inside the Tokio runtime.
    pub(crate) fn start(
        bindings: Vec<Binding>,
        node: NodeHandle,
        shutdown: watch::Receiver<bool>,
        state_dir: &Path,
    ) -> Manager {
        let m = Manager {
            node,
            state_dir: state_dir.to_path_buf(),
            shutdown,
            running: std::sync::Mutex::new(HashMap::new()),
        };
        m.reload(bindings);
        m
    }

    /// Replace the running bindings with `bindings`.
    pub(crate) fn reload(&self, bindings: Vec<Binding>) {
        let Ok(mut running) = self.running.lock() else {
            tracing::error!("binding manager state is poisoned; bindings not reloaded");
            return;
        };
        let mut old: HashMap<PathBuf, Running> = std::mem::take(&mut *running);
        let (mut kept, mut started) = (0, 0);
        for b in bindings {
            if let Some(r) = old.remove(&b.file) {
                if r.binding == b {
                    self.node
                        .bindings
                        .update(&b.file, |s| s.config_error = None);
                    running.insert(b.file.clone(), r);
                    kept += 1;
                    continue;
                }
                if let Some(Err(e)) = b.template.as_ref().map(super::template::check) {
                    tracing::error!(file = %b.file.display(), error = %e, "the new template does not compile: the binding keeps running with its previous template");
                    self.node
                        .metrics
                        .inc_labelled(super::task::TEMPLATE_ERRORS, e.reason, 1);
                    self.node.bindings.update(&b.file, |s| {
                        s.config_error = Some(format!(
                            "new template not loaded (the previous one keeps running): {e}"
                        ))
                    });
                    running.insert(b.file.clone(), r);
                    kept += 1;
                    continue;
                }
                // Changed: stop the old task; the new one waits for it.
                let _ = r.stop.send(true);
                running.insert(b.file.clone(), self.spawn(b, Some(r.handle)));
            } else {
                running.insert(b.file.clone(), self.spawn(b, None));
            }
            started += 1;
        }
        let stopped = old.len();
        for (file, r) in old {
            let _ = r.stop.send(true);
            self.node.bindings.remove(&file);
        }
        if kept + started + stopped > 0 {
            tracing::info!(kept, started, stopped, "file bindings updated");
        }
    }

    fn spawn(&self, b: Binding, previous: Option<JoinHandle<()>>) -> Running {
        self.node
            .bindings
            .update(&b.file, |s| s.config_error = None);
        let (stop, stop_rx) = watch::channel(false);
        let (node, shutdown, binding) = (self.node.clone(), self.shutdown.clone(), b.clone());
        let last = LastSeen::new(&self.state_dir, &b);
        let handle = tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            task::run(b, node, last, stop_rx, shutdown).await;
        });
        Running {
            binding,
            stop,
            handle,
        }
    }

    /// Stop every binding task (a task busy with a command gets a few seconds, then is
    /// aborted, which kills the command).
    pub(crate) async fn stop(&self) {
        let all: Vec<Running> = match self.running.lock() {
            Ok(mut r) => r.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        for r in &all {
            let _ = r.stop.send(true);
        }
        for r in all {
            let abort = r.handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), r.handle)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}
