//! The binding task: one per binding, the only code that touches its file.
//!
//! Why it exists: rendering, ingesting and reloading must be serialized per file (an ingest
//! and a render racing on one file would lose an edit or echo it back), debounced, and kept
//! apart from the node task (a slow check command must not stall the store). So each binding
//! runs one task that owns all the state about its file and reacts to three inputs:
//!
//! * document notices from the node task ([`crate::node::Notice`], filtered by document
//!   name; a lagged receiver counts as a notice);
//! * wake-ups from the directory watcher ([`super::watch`]);
//! * its own timers: the debounce deadline, render retries, the (jittered) reload, and
//!   re-establishing a lost watch.
//!
//! Inputs only mark the task dirty and start the debounce window (fixed from the first
//! event, so a steady stream of changes cannot postpone a render forever). When the window
//! closes the task looks at the file only if it is *quiescent*: no writer holds it open (a
//! write event without its close, see [`super::watch::Activity`], for at most
//! [`OPEN_WRITER_GRACE`]) and its size, mtime and inode are the same as when the window
//! opened; otherwise the window opens again. So an editor that writes half a file, pauses,
//! then writes the rest is read once, complete (one change, and peers never render the half).
//! Then the task *processes*: in `sync` mode it first ingests the file if its bytes differ
//! from what the task last wrote or read (see [`super::ingest`]); in `render` mode a file
//! changed by someone else is restored from the document. Then it renders: it reads the
//! document (or path) and, if that differs from what the file represents, writes it with
//! [`super::write::write_file`] and schedules the reload command.
//!
//! State kept per file: `seen`, the bytes the file held when the task last wrote or read it
//! (an event whose content equals it is the task's own render, or an already handled edit —
//! never re-ingested), and `file_value`, the last good value the file represents (what
//! "the file is up to date" is compared with, and the base of three-way merges). An invalid
//! edit updates `seen` but not `file_value`, so it is neither ingested nor overwritten until
//! the document changes or the file is fixed.
//!
//! In `sync` mode, `seen` (when it decodes to `file_value`) is also kept on disk
//! ([`super::last`]) after every render and accepted edit, so that it survives a restart
//! (`render` bindings keep no record: nothing reads it back). An edit is also recorded as
//! *pending* before it is sent to the node task, so that a restart after its commit but before
//! its record does not apply it a second time (see [`super::last`]); start-up settles such a
//! record first.
//!
//! Start-up: the current file is taken as `seen`/`file_value` — except in `sync` mode when it
//! differs from the record on disk: then the record is taken as `seen`/`file_value`, so the
//! first processing sees the file as edited and ingests it (three-way merge on the record),
//! as if the edit had been made while the agent ran. If the document (or path) does not
//! exist yet, or is an empty map before any notice arrived (a node that has not synced yet),
//! the file is not rendered over and the task logs that it is waiting. A file whose content
//! already equals the document is not rewritten (same inode, same mtime, no reload).
//!
//! Reload: the reload command runs once per effective change of the file — after a render
//! that replaced it, or after a local edit was applied (the service must load it too) —
//! after a random delay of up to `reload_jitter`; changes made before it runs share it. A
//! reload still pending when the task stops (SIGTERM, SIGHUP removing the binding) runs
//! before the task ends, since after a restart nothing would trigger it. Just before a
//! reload the file is looked at again: an edit made since is applied first, and a file that
//! holds a refused edit is not reloaded (the next accepted change reloads).
//!
//! Template bindings: the document read and serialization are replaced by a template render
//! ([`super::template`]); `file_value` is then the rendered text. A notice concerns the task
//! only if the last render read that document ([`template::Reads::wants`]); before the first
//! render every notice does. A template error leaves the file alone and is reported (log,
//! `lichen_template_errors_total{reason}`, status); a template that does not compile at
//! start makes the task idle until it is stopped. Every render that reaches the file records
//! its [`Provenance`], which the check and reload commands get in their environment.
//!
//! Failures: a failed write or check is retried with exponential backoff (1 s doubling to
//! 60 s, at most 8 attempts, then until the next document change); so is a failed reload.
//! Each failure is logged and counted in `lichen_render_errors_total{reason}`; refused edits
//! in `lichen_ingest_errors_total{reason}`. Nothing here stops the agent.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use super::binding::{Binding, Mode};
use super::last::LastSeen;
use super::provenance::{self, Provenance};
use super::status::{now_ms, CommandOutcomeView};
use super::template::{self, Outcome, Reads};
use super::watch::{Activity, FileWatch, SharedActivity, Wake};
use super::write::{read_bounded, write_file, FileRead, Written};
use super::{command, format, ingest};
use crate::node::{Command, NodeHandle};

const RENDER_ERRORS: &str = "lichen_render_errors_total";
const INGEST_ERRORS: &str = "lichen_ingest_errors_total";
/// Template errors by reason (see [`template::REASONS`]).
pub(crate) const TEMPLATE_ERRORS: &str = "lichen_template_errors_total";
/// A writer that holds the file open without writing for this long is taken as done (it
/// may keep it open for other reasons); until then the file is not read.
pub(super) const OPEN_WRITER_GRACE: Duration = Duration::from_secs(5);
/// How long to wait before watching a directory again after it went away (or was missing).
const REWATCH: Duration = Duration::from_secs(2);

/// Exponential backoff with a bounded number of attempts.
#[derive(Default)]
struct Backoff {
    attempts: u32,
    due: Option<Instant>,
}

impl Backoff {
    const MAX_ATTEMPTS: u32 = 8;

    /// Schedule the next attempt; `None` when attempts are exhausted.
    fn fail(&mut self) -> Option<Duration> {
        self.attempts += 1;
        if self.attempts > Self::MAX_ATTEMPTS {
            self.due = None;
            return None;
        }
        let d = Duration::from_secs(1 << (self.attempts - 1).min(6)).min(Duration::from_secs(60));
        self.due = Some(Instant::now() + d);
        Some(d)
    }

    fn reset(&mut self) {
        self.attempts = 0;
        self.due = None;
    }
}

struct Task {
    b: Binding,
    node: NodeHandle,
    /// The on-disk copy of `seen` (as of the last render or accepted edit).
    last: LastSeen,
    /// What `last` holds, to skip rewriting it with the same bytes.
    recorded: Option<Vec<u8>>,
    seen: Option<Vec<u8>>,
    file_value: Option<Value>,
    /// A notice for the document arrived since start-up: an empty document may be rendered.
    armed: bool,
    waiting_logged: bool,
    /// The first comparison of file and document since start-up has been done.
    compared: bool,
    /// The file holds an edit that was refused (invalid, or refused by the check or the
    /// store): the service must not be reloaded onto it.
    rejected: bool,
    render_retry: Backoff,
    reload_retry: Backoff,
    reload_due: Option<Instant>,
    /// What the watcher has seen writers do to the file.
    activity: SharedActivity,
    /// The file's stamp when the debounce window opened (quiescence check).
    window_stamp: Option<Stamp>,
    /// A file over the size bound that was refused already (not counted twice).
    too_large: Option<Stamp>,
    /// What the last render that reached the file was made from (commands' environment).
    prov: Provenance,
    /// Template bindings: what the last render read (`None` before the first): only a
    /// change of one of those documents renders again.
    reads: Option<Reads>,
}

/// Size, mtime and inode of a file: equal stamps across a window mean nobody wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
}

impl Stamp {
    fn of(path: &std::path::Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            mtime: m.modified().ok(),
            ino: m.ino(),
        })
    }
}

/// Run one binding until `stop` or `shutdown` flips to true.
pub(super) async fn run(
    b: Binding,
    node: NodeHandle,
    last: LastSeen,
    mut stop: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Subscribe before reading anything, so no change falls between the two.
    let mut notices = node.notices.subscribe();
    let (wake_tx, mut wake_rx) = mpsc::channel::<Wake>(16);
    let mut watch: Option<FileWatch> = None;
    let mut rewatch_due = Some(Instant::now());
    settle_pending(&b, &node, &last).await;
    let mut t = Task::new(b, node, last);
    if let Some(spec) = &t.b.template {
        if let Err(e) = template::check(spec) {
            // Nothing to render with: the file stays as it is until the template is fixed
            // (and the config reloaded).
            tracing::error!(file = %t.b.file.display(), error = %e, "the template does not compile; the file is left as it is until it is fixed (then send SIGHUP)");
            t.node.metrics.inc_labelled(TEMPLATE_ERRORS, e.reason, 1);
            t.node
                .bindings
                .update(&t.b.file, |s| s.error = Some(e.to_string()));
            let _ = tokio::select! {
                r = stop.wait_for(|s| *s) => r.map(|_| ()),
                r = shutdown.wait_for(|s| *s) => r.map(|_| ()),
            };
            return;
        }
    }
    let mut doc_dirty = true;
    let mut debounce_due = Some(Instant::now());
    t.window_stamp = Stamp::of(&t.b.file);
    tracing::info!(
        doc = %t.b.target(),
        file = %t.b.file.display(),
        mode = ?t.b.mode,
        format = t.b.format.name(),
        "file binding started"
    );
    loop {
        if *stop.borrow() || *shutdown.borrow() {
            break;
        }
        let next = [
            debounce_due,
            t.render_retry.due,
            t.reload_due,
            if watch.is_none() { rewatch_due } else { None },
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = stop.changed() => if r.is_err() { break },
            r = shutdown.changed() => if r.is_err() { break },
            n = notices.recv() => {
                match n {
                    Ok(n) if !t.wants(&n.doc) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
                t.armed = true;
                doc_dirty = true;
                if debounce_due.is_none() {
                    debounce_due = Some(t.open_window());
                }
            }
            w = wake_rx.recv() => {
                if w == Some(Wake::Lost) {
                    tracing::warn!(file = %t.b.file.display(), "the file's directory went away; watching it again when it is back");
                    watch = None;
                    rewatch_due = Some(Instant::now() + REWATCH);
                }
                if debounce_due.is_none() {
                    debounce_due = Some(t.open_window());
                }
            }
            _ = sleep => {
                let now = Instant::now();
                if watch.is_none() && rewatch_due.is_some_and(|d| d <= now) {
                    match super::watch::watch(&t.b.file, wake_tx.clone(), t.activity.clone()) {
                        Ok(w) => {
                            watch = Some(w);
                            rewatch_due = None;
                            // Whatever happened while unwatched is looked at now.
                            debounce_due.get_or_insert(now);
                        }
                        Err(e) => {
                            tracing::warn!(file = %t.b.file.display(), error = %e, "cannot watch the file; trying again");
                            rewatch_due = Some(now + REWATCH * 5);
                        }
                    }
                }
                if debounce_due.is_some_and(|d| d <= now) {
                    // A file still being written is looked at once it has settled.
                    debounce_due = t.unsettled(now);
                    if debounce_due.is_some() {
                        continue;
                    }
                    let dirty = std::mem::take(&mut doc_dirty);
                    if dirty {
                        // A document change resets the retry budget.
                        t.render_retry.reset();
                    }
                    t.process(dirty).await;
                }
                if t.render_retry.due.is_some_and(|d| d <= now) {
                    t.render_retry.due = None;
                    match t.unsettled(now) {
                        Some(again) => t.render_retry.due = Some(again),
                        None => t.process(true).await,
                    }
                }
                if t.reload_due.is_some_and(|d| d <= now) {
                    if let Some(again) = t.unsettled(now) {
                        t.reload_due = Some(again);
                        continue;
                    }
                    // Look at the file first: an edit made since must be applied (or refused)
                    // before the service loads it.
                    t.process(false).await;
                    t.reload().await;
                }
            }
        }
    }
    if t.reload_due.is_some() {
        // The file changed and the service has not been told: do it now rather than never
        // (after a restart the file matches the document and nothing would trigger it).
        t.process(false).await;
        t.reload().await;
    }
    tracing::debug!(file = %t.b.file.display(), "file binding stopped");
}

/// How many changes of `doc` this node has signed.
async fn own_seq(node: &NodeHandle, doc: &str) -> Result<u64, crate::node::ApiError> {
    let doc = doc.to_string();
    node.ask(|reply| Command::OwnSeq { doc, reply }).await
}

/// Start-up: settle an edit that was sent but whose outcome was not recorded (the agent died
/// in between; see `super::last`). If this node has signed changes of the document since, the
/// edit was committed and its bytes become the record, so it is not ingested a second time
/// against the older one; otherwise the older record stays the base. Left in place (and
/// settled at the next start) if the outcome cannot be established or recorded now.
async fn settle_pending(b: &Binding, node: &NodeHandle, last: &LastSeen) {
    let file = b.file.display();
    let (seq, bytes) = match last.load_pending() {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%file, error = %e, "cannot read the pending edit record");
            return;
        }
    };
    match own_seq(node, &b.doc).await {
        Ok(now) if now > seq => {
            let (l, b2) = (last.clone(), bytes);
            let stored = tokio::task::spawn_blocking(move || l.store(&b2))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            if let Err(e) = stored {
                tracing::warn!(%file, error = %e, "cannot record the file's content in the data directory");
                return;
            }
            tracing::info!(%file, doc = %b.target(), "the last edit of the file was applied before the agent stopped");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(%file, error = %e.error, "cannot read the document to settle the pending edit record");
            return;
        }
    }
    if let Err(e) = last.clear_pending() {
        tracing::warn!(%file, error = %e, "cannot remove the pending edit record");
    }
}

impl Task {
    fn new(b: Binding, node: NodeHandle, last: LastSeen) -> Task {
        let mut seen = match read_bounded(&b.file, ingest::MAX_FILE) {
            Ok(FileRead::Bytes(s)) => Some(s),
            Ok(FileRead::Missing) => None,
            Ok(FileRead::TooLarge(len)) => {
                tracing::warn!(file = %b.file.display(), error = %ingest::too_large(len), "not reading the file");
                None
            }
            Err(e) => {
                tracing::warn!(file = %b.file.display(), error = %e, "cannot read the file");
                None
            }
        };
        // Only `sync` mode reads the record (an edit made while the agent was stopped); a
        // `render` binding (document or template) keeps none, which saves a write and an
        // fsync per render, and removes one left by an earlier `sync` configuration, which
        // would be stale if the binding went back to `sync` later (no record: the document
        // wins at that start).
        if b.mode == Mode::Render {
            if let Err(e) = last.clear() {
                tracing::warn!(file = %b.file.display(), error = %e, "cannot remove the binding's old record in the data directory");
            }
        }
        let recorded = match last.load() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(file = %b.file.display(), error = %e, "cannot read what the file held when the agent last ran; the document wins at start-up");
                None
            }
        };
        let mut file_value = seen.as_deref().and_then(|s| ingest::decode(&b, s).ok());
        if b.mode == Mode::Sync && seen.is_some() && recorded.is_some() && seen != recorded {
            // Edited while the agent was stopped: start from what the file held then, so the
            // first look at the file ingests the edit with that as the merge base.
            if let Some(base) = recorded.as_deref().and_then(|r| ingest::decode(&b, r).ok()) {
                tracing::info!(
                    file = %b.file.display(),
                    doc = %b.target(),
                    "the file was edited while the agent was stopped: applying the edit"
                );
                seen = recorded.clone();
                file_value = Some(base);
            }
        }
        node.bindings.update(&b.file, |s| {
            s.file = b.file.display().to_string();
            s.source = b.target();
            s.kind = match (&b.template, b.mode) {
                (Some(_), _) => "template",
                (None, Mode::Render) => "render",
                (None, Mode::Sync) => "sync",
            }
            .to_string();
            if b.template.is_none() {
                s.docs = vec![b.doc.clone()];
            }
        });
        Task {
            b,
            node,
            last,
            recorded,
            seen,
            file_value,
            armed: false,
            waiting_logged: false,
            compared: false,
            rejected: false,
            render_retry: Backoff::default(),
            reload_retry: Backoff::default(),
            reload_due: None,
            activity: Arc::new(Mutex::new(Activity::default())),
            window_stamp: None,
            too_large: None,
            prov: Provenance::default(),
            reads: None,
        }
    }

    /// Whether a change of `doc` concerns this binding.
    fn wants(&self, doc: &str) -> bool {
        match (&self.b.template, &self.reads) {
            (None, _) => doc == self.b.doc,
            (Some(_), Some(r)) => r.wants(doc),
            (Some(_), None) => true,
        }
    }

    /// A debounce window opens now: remember the file's stamp; returns when it closes.
    fn open_window(&mut self) -> Instant {
        self.window_stamp = Stamp::of(&self.b.file);
        Instant::now() + self.b.debounce
    }

    /// `None` if the file is quiescent (see the module docs); otherwise when to look again
    /// (the window opens again from now).
    fn unsettled(&mut self, now: Instant) -> Option<Instant> {
        let stamp = Stamp::of(&self.b.file);
        let a = self.activity.lock().map(|a| *a).unwrap_or_default();
        let held = a.writing
            && a.last_write
                .is_some_and(|t| t.elapsed() < OPEN_WRITER_GRACE);
        if stamp == self.window_stamp && !held {
            return None;
        }
        self.window_stamp = stamp;
        Some(now + self.b.debounce)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        self.prov.env(&self.b)
    }

    /// Keep `seen` on disk (it is the file content `file_value` was read from or rendered
    /// to), so a restart can tell an edit made meanwhile from the agent's own last write.
    /// Blocking file work (fsync) runs off the async workers, as in [`super::write`].
    async fn remember(&mut self) {
        // A refused edit leaves `seen` ahead of `file_value`: nothing consistent to keep.
        if self.b.mode == Mode::Render
            || self.rejected
            || self.seen.is_none()
            || self.file_value.is_none()
            || self.seen == self.recorded
        {
            return;
        }
        let bytes = self.seen.clone().unwrap_or_default();
        let (last, b2) = (self.last.clone(), bytes.clone());
        let stored = tokio::task::spawn_blocking(move || last.store(&b2))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match stored {
            Ok(()) => self.recorded = Some(bytes),
            Err(e) => {
                tracing::warn!(file = %self.b.file.display(), error = %e, "cannot record the file's content in the data directory; an edit made while the agent is stopped may be overwritten at the next start")
            }
        }
    }

    /// Look at the file, then at the document.
    async fn process(&mut self, doc_dirty: bool) {
        let file_changed = match self.b.mode {
            Mode::Sync => self.ingest().await,
            Mode::Render => self.restore_if_changed(),
        };
        if doc_dirty || file_changed {
            self.render().await;
        }
    }

    /// Render mode: someone else changed or removed the file; it will be rewritten.
    fn restore_if_changed(&mut self) -> bool {
        let current = match read_bounded(&self.b.file, ingest::MAX_FILE) {
            Ok(FileRead::Bytes(c)) => Some(c),
            Ok(FileRead::Missing) => None,
            // Never one of ours: rewritten from the document.
            Ok(FileRead::TooLarge(_)) => {
                self.seen = None;
                self.file_value = None;
                return true;
            }
            Err(e) => {
                tracing::warn!(file = %self.b.file.display(), error = %e, "cannot read the file");
                return false;
            }
        };
        if current == self.seen {
            return false;
        }
        if self.file_value.is_some() {
            tracing::warn!(
                file = %self.b.file.display(),
                doc = %self.b.target(),
                "the file was changed outside lichen (mode = render): restoring it from the document; use mode = \"sync\" to make edits propagate"
            );
        }
        self.seen = current;
        self.file_value = None;
        true
    }

    /// Sync mode: turn a new edit of the file into a change. Returns whether a render should
    /// follow (the merged document differs from the file).
    async fn ingest(&mut self) -> bool {
        let file = self.b.file.display().to_string();
        let bytes = match read_bounded(&self.b.file, ingest::MAX_FILE) {
            Ok(FileRead::Bytes(b)) => b,
            Ok(FileRead::TooLarge(len)) => {
                // Refused by its size, unread; once per version of the file.
                let stamp = Stamp::of(&self.b.file);
                if self.too_large != stamp || stamp.is_none() {
                    self.too_large = stamp;
                    let e = ingest::too_large(len);
                    tracing::warn!(%file, doc = %self.b.target(), reason = e.reason, "ignoring an invalid edit ({e}): the document keeps its last good value and the file is left as it is; fix the file to apply it");
                    self.node.metrics.inc_labelled(INGEST_ERRORS, e.reason, 1);
                }
                self.seen = None;
                self.rejected = true;
                return false;
            }
            Ok(FileRead::Missing) => {
                if self.seen.take().is_some() {
                    tracing::info!(%file, "the file was removed; the document is kept, and the file will be read again when it reappears");
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(%file, error = %e, "cannot read the file");
                return false;
            }
        };
        if self.seen.as_deref() == Some(&bytes[..]) {
            return false;
        }
        self.seen = Some(bytes.clone());
        let ours = match ingest::decode(&self.b, &bytes) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    %file,
                    doc = %self.b.target(),
                    reason = e.reason,
                    line = e.line,
                    column = e.column,
                    "ignoring an invalid edit ({e}): the document keeps its last good value and the file is left as it is; fix the file to apply it"
                );
                self.node.metrics.inc_labelled(INGEST_ERRORS, e.reason, 1);
                self.rejected = true;
                return false;
            }
        };
        if self.file_value.as_ref() == Some(&ours) {
            self.rejected = false;
            self.remember().await;
            return false; // only formatting changed
        }
        if let Some(check) = &self.b.check {
            let env = self.env();
            let env = provenance::borrow(&env);
            let r = command::run(check, Some(&self.b.file), &env, self.b.command_timeout).await;
            let outcome = CommandOutcomeView::of(&r);
            self.node
                .bindings
                .update(&self.b.file, |s| s.check = Some(outcome));
            if let Err(e) = r {
                tracing::warn!(%file, doc = %self.b.target(), error = %e, "the check refused the edit; it is not applied");
                self.node.metrics.inc_labelled(INGEST_ERRORS, "check", 1);
                self.rejected = true;
                return false;
            }
        }
        // If the agent dies after the commit but before `remember`, the next start must not
        // ingest this edit again against the older record (see `super::last`). This waits
        // while the node holds its writes after a start, so the document read next already
        // holds what the peers wrote while this node was down (an edit made meanwhile is
        // merged into that, not into the stale local copy).
        if !self.mark_pending(&bytes).await {
            self.seen = None;
            return false;
        }
        let theirs = match self.get().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(%file, error = %e.error, "cannot read the document; the edit will be applied at the next change of the file");
                self.node.metrics.inc_labelled(INGEST_ERRORS, "write", 1);
                self.seen = None;
                self.clear_pending().await;
                return false;
            }
        };
        let merged = ingest::merge(self.file_value.as_ref(), &ours, theirs.as_ref());
        let op = ingest::op_for(&self.b, merged.clone());
        let doc = self.b.doc.clone();
        let outcome = self
            .node
            .ask(|reply| Command::Write {
                doc,
                op,
                expect: None,
                reply,
            })
            .await
            .map(|w| w.hash);
        match outcome {
            Ok(hash) => {
                tracing::info!(
                    %file,
                    doc = %self.b.target(),
                    change = hash.as_deref().unwrap_or("none (no difference)"),
                    "applied a local edit of the file"
                );
                if hash.is_some() {
                    self.node.metrics.ingests.fetch_add(1, Relaxed);
                }
                let render = merged != ours;
                self.file_value = Some(ours);
                self.rejected = false;
                self.remember().await;
                if self.recorded == self.seen {
                    self.clear_pending().await;
                }
                // The service must load the edited file too (if a render follows, it shares
                // this reload).
                self.schedule_reload();
                render
            }
            Err(e) => {
                let reason = if e.kind == crate::error::ErrorKind::Denied {
                    "denied"
                } else {
                    "write"
                };
                tracing::warn!(%file, doc = %self.b.target(), error = %e.error, "the edit was refused; the file is left as it is");
                self.node.metrics.inc_labelled(INGEST_ERRORS, reason, 1);
                self.rejected = true;
                self.clear_pending().await;
                false
            }
        }
    }

    /// Record `bytes` as the edit about to be sent, with this node's count of signed changes
    /// of the document (see `super::last`). False if that count cannot be read (the edit is
    /// tried again at the next change of the file); a record that cannot be stored is logged
    /// and the edit goes ahead.
    async fn mark_pending(&mut self, bytes: &[u8]) -> bool {
        let seq = match own_seq(&self.node, &self.b.doc).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(file = %self.b.file.display(), error = %e.error, "cannot read the document; the edit will be applied at the next change of the file");
                self.node.metrics.inc_labelled(INGEST_ERRORS, "write", 1);
                return false;
            }
        };
        let (last, b2) = (self.last.clone(), bytes.to_vec());
        let stored = tokio::task::spawn_blocking(move || last.store_pending(seq, &b2))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = stored {
            tracing::warn!(file = %self.b.file.display(), error = %e, "cannot record the edit in the data directory before applying it; if the agent dies before it is recorded, the next start may apply it again");
        }
        true
    }

    async fn clear_pending(&self) {
        let last = self.last.clone();
        let r = tokio::task::spawn_blocking(move || last.clear_pending())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = r {
            tracing::warn!(file = %self.b.file.display(), error = %e, "cannot remove the pending edit record");
        }
    }

    async fn get(&self) -> Result<Option<Value>, crate::node::ApiError> {
        Ok(self.get_with_heads().await?.map(|(v, _heads)| v))
    }

    async fn get_with_heads(&self) -> Result<Option<(Value, String)>, crate::node::ApiError> {
        let (doc, path) = (self.b.doc.clone(), self.b.path.clone());
        self.node
            .ask(|reply| Command::Get { doc, path, reply })
            .await
    }

    fn wait(&mut self, why: &str) {
        self.node
            .bindings
            .update(&self.b.file, |s| s.waiting = Some(why.to_string()));
        if !self.waiting_logged {
            tracing::info!(
                doc = %self.b.target(),
                file = %self.b.file.display(),
                "{why}: not touching the file until it changes"
            );
            self.waiting_logged = true;
        }
    }

    /// The header line for `prov`, naming the authors of the values of each document read
    /// (a document binding: the values under its `path`; a template: the whole document).
    async fn header(&self, prefix: &str, prov: &Provenance) -> String {
        let mut authors = Vec::with_capacity(prov.docs.len());
        for (doc, heads) in &prov.docs {
            let path = if self.b.template.is_none() && *doc == self.b.doc {
                self.b.path.clone()
            } else {
                Vec::new()
            };
            let (doc, heads) = (doc.clone(), (!heads.is_empty()).then(|| heads.clone()));
            let names = match heads {
                None => Vec::new(),
                Some(_) => self
                    .node
                    .ask(|reply| Command::Authors {
                        doc,
                        heads,
                        path,
                        reply,
                    })
                    .await
                    .map(|(_, names)| names)
                    .unwrap_or_default(),
            };
            authors.push(names);
        }
        prov.header(prefix, &authors)
    }

    /// Template bindings: render the template (on a blocking thread, reading through the
    /// node task) and write the output if it differs from the file.
    async fn render_template(&mut self) {
        let Some(spec) = self.b.template.clone() else {
            return;
        };
        let file = self.b.file.display().to_string();
        let data: Arc<dyn template::Data> = Arc::new(NodeData {
            node: self.node.clone(),
            rt: tokio::runtime::Handle::current(),
        });
        let info = template::NodeInfo {
            id: self.node.bindings.node_id().to_string(),
            name: self.node.bindings.node_name().to_string(),
        };
        let root = (!self.b.doc.is_empty()).then(|| self.b.doc.clone());
        let rendered = tokio::task::spawn_blocking(move || {
            template::render(&spec, root.as_deref(), data, &info)
        })
        .await;
        let Ok((outcome, reads)) = rendered else {
            tracing::error!(%file, "the template render task failed");
            self.render_retry.fail();
            return;
        };
        self.node.metrics.template_renders.fetch_add(1, Relaxed);
        self.node.bindings.update(&self.b.file, |s| {
            s.renders += 1;
            s.docs = Provenance::of_reads(&reads)
                .docs
                .into_iter()
                .map(|d| d.0)
                .collect();
        });
        let prov = Provenance::of_reads(&reads);
        self.reads = Some(reads);
        match outcome {
            Outcome::Rendered(mut text) => {
                if let Some(prefix) = self.b.header.clone() {
                    text = format!("{}{text}", self.header(&prefix, &prov).await);
                }
                if text.len() > template::MAX_OUTPUT {
                    self.template_error(template::TemplateError {
                        reason: "too_large",
                        file: self.b.target(),
                        line: None,
                        column: None,
                        message: format!(
                            "the output is larger than {} MiB",
                            template::MAX_OUTPUT >> 20
                        ),
                    });
                    return;
                }
                self.waiting_logged = false;
                self.node
                    .bindings
                    .update(&self.b.file, |s| s.waiting = None);
                let v = Value::String(text);
                if self.file_value.as_ref() == Some(&v) {
                    self.prov = prov;
                    self.render_retry.reset();
                    self.up_to_date();
                    self.mark_rendered();
                    return;
                }
                let bytes = v.as_str().unwrap_or_default().as_bytes().to_vec();
                self.write(v, bytes, prov).await;
            }
            Outcome::Waiting(missing) => {
                let why = format!(
                    "the template reads {} which this node does not hold yet (use `| default(...)` to render without it)",
                    missing.join(", ")
                );
                self.wait(&why);
            }
            Outcome::Failed(e) => {
                let retry = e.reason == "data";
                self.template_error(e);
                if retry {
                    self.render_retry.fail();
                } else {
                    self.render_retry.reset();
                }
            }
        }
    }

    /// Report a template error: logged, counted, shown in status; the file is left as it is.
    fn template_error(&mut self, e: template::TemplateError) {
        tracing::error!(file = %self.b.file.display(), reason = e.reason, error = %e, "template error; the file is left as it is");
        self.node.metrics.inc_labelled(TEMPLATE_ERRORS, e.reason, 1);
        self.node
            .bindings
            .update(&self.b.file, |s| s.error = Some(e.to_string()));
    }

    /// The file holds the latest render: status shows its heads and time.
    fn mark_rendered(&self) {
        let heads = self.prov.heads(&self.b);
        self.node.bindings.update(&self.b.file, |s| {
            s.heads = Some(heads);
            s.rendered_at_ms = Some(now_ms());
            s.error = None;
            s.waiting = None;
        });
    }

    /// Make the file represent the document, if it does not already.
    async fn render(&mut self) {
        if self.b.template.is_some() {
            return self.render_template().await;
        }
        let file = self.b.file.display().to_string();
        let (v, heads) = match self.get_with_heads().await {
            Ok(Some(v)) => v,
            Ok(None) => return self.wait("the document (or path) does not exist yet"),
            Err(e) => {
                tracing::warn!(%file, error = %e.error, "cannot read the document");
                self.render_retry.fail();
                return;
            }
        };
        if !self.armed && v.as_object().is_some_and(|m| m.is_empty()) {
            return self.wait("the document is empty (not synced yet?)");
        }
        self.waiting_logged = false;
        self.node.bindings.update(&self.b.file, |s| {
            s.renders += 1;
            s.waiting = None;
        });
        let prov = Provenance::doc(&self.b.doc, heads);
        // With a header the heads are part of the content: compare bytes (below) instead.
        if self.file_value.as_ref() == Some(&v) && self.b.header.is_none() {
            self.prov = prov;
            self.render_retry.reset();
            self.remember().await;
            self.up_to_date();
            self.mark_rendered();
            return;
        }
        let mut bytes = match format::serialize(self.b.format, &v) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%file, doc = %self.b.target(), error = %e, "cannot render the document in this format; the file is left as it is");
                self.node.metrics.inc_labelled(RENDER_ERRORS, "write", 1);
                self.node
                    .bindings
                    .update(&self.b.file, |s| s.error = Some(e.clone()));
                self.render_retry.reset();
                return;
            }
        };
        if let Some(prefix) = self.b.header.clone() {
            let mut h = self.header(&prefix, &prov).await.into_bytes();
            h.extend_from_slice(&bytes);
            bytes = h;
        }
        self.write(v, bytes, prov).await;
    }

    /// Write `bytes` (representing `v`, made from `prov`) to the file, unless it holds them.
    async fn write(&mut self, v: Value, bytes: Vec<u8>, prov: Provenance) {
        let file = self.b.file.display().to_string();
        // Sync mode: an edit saved while the new content is staged must not be overwritten
        // (a refused edit is, by design, once the document changes).
        let guard = (self.b.mode == Mode::Sync && !self.rejected).then(|| self.seen.clone());
        let env = prov.env(&self.b);
        let written = write_file(&self.b, &bytes, guard, &env).await;
        if self.b.check.is_some() {
            let outcome = match &written {
                Ok(Written::Replaced) => Some(CommandOutcomeView::of(&Ok(()))),
                Err(e) => e
                    .check
                    .as_ref()
                    .map(|c| CommandOutcomeView::of(&Err(c.clone()))),
                _ => None,
            };
            if let Some(o) = outcome {
                self.node
                    .bindings
                    .update(&self.b.file, |s| s.check = Some(o));
            }
        }
        match written {
            Ok(Written::Changed) => {
                tracing::info!(%file, doc = %self.b.target(), "the file was edited while it was being rendered: reading the edit first");
                // The watcher reports the edit; look again after a debounce in any case.
                self.render_retry.due = Some(Instant::now() + self.b.debounce);
            }
            Ok(w) => {
                self.seen = Some(bytes);
                self.file_value = Some(v);
                self.rejected = false;
                self.render_retry.reset();
                self.prov = prov;
                self.mark_rendered();
                self.remember().await;
                if w == Written::Unchanged {
                    self.up_to_date();
                } else {
                    self.node.bindings.update(&self.b.file, |s| s.writes += 1);
                    self.compared = true;
                    tracing::info!(%file, doc = %self.b.target(), "rendered the file");
                    self.node.metrics.render_writes.fetch_add(1, Relaxed);
                    self.schedule_reload();
                }
            }
            Err(e) => {
                self.node.metrics.inc_labelled(RENDER_ERRORS, e.reason, 1);
                self.node
                    .bindings
                    .update(&self.b.file, |s| s.error = Some(e.message.clone()));
                match self.render_retry.fail() {
                    Some(d) => {
                        tracing::warn!(%file, doc = %self.b.target(), reason = e.reason, error = %e.message, retry_in_s = d.as_secs(), "render failed; will retry")
                    }
                    None => {
                        tracing::error!(%file, doc = %self.b.target(), reason = e.reason, error = %e.message, "render failed again; giving up until the document changes")
                    }
                }
            }
        }
    }

    /// The file's content changed (rendered, or a local edit applied): reload after a random
    /// delay of up to `reload_jitter`. Changes before the reload runs share it.
    fn schedule_reload(&mut self) {
        if self.b.reload.is_none() || (self.reload_due.is_some() && self.reload_retry.attempts == 0)
        {
            return;
        }
        let jitter = self.b.reload_jitter.as_millis() as u64;
        let delay = if jitter == 0 {
            0
        } else {
            getrandom::u64().unwrap_or(0) % (jitter + 1)
        };
        self.reload_retry.reset();
        self.reload_due = Some(Instant::now() + Duration::from_millis(delay));
    }

    /// Log (once) that start-up found the file already matching the document.
    fn up_to_date(&mut self) {
        if !std::mem::replace(&mut self.compared, true) {
            tracing::info!(
                file = %self.b.file.display(),
                doc = %self.b.target(),
                "the file is up to date with the document"
            );
        }
    }

    async fn reload(&mut self) {
        self.reload_due = None;
        let Some(cmd) = self.b.reload.clone() else {
            return;
        };
        if self.rejected {
            tracing::info!(
                file = %self.b.file.display(),
                "not reloading: the file holds an edit that was not applied; the next change reloads"
            );
            return;
        }
        let env = self.env();
        let env = provenance::borrow(&env);
        let file = self.b.file.display().to_string();
        let r = command::run(&cmd, None, &env, self.b.command_timeout).await;
        let outcome = CommandOutcomeView::of(&r);
        self.node
            .bindings
            .update(&self.b.file, |s| s.reload = Some(outcome));
        match r {
            Ok(()) => {
                tracing::info!(%file, "reload command succeeded");
                self.node.metrics.render_reloads.fetch_add(1, Relaxed);
                self.reload_retry.reset();
            }
            Err(e) => {
                self.node.metrics.inc_labelled(RENDER_ERRORS, "reload", 1);
                match self.reload_retry.fail() {
                    Some(d) => {
                        tracing::warn!(%file, error = %e, retry_in_s = d.as_secs(), "reload command failed; will retry");
                        self.reload_due = self.reload_retry.due;
                    }
                    None => {
                        tracing::error!(%file, error = %e, "reload command failed again; giving up until the next change")
                    }
                }
            }
        }
    }
}

/// A template's data, read from the node task. Called on a blocking thread (see
/// [`Task::render_template`]), so it waits for the node task's answers with `block_on`.
struct NodeData {
    node: NodeHandle,
    rt: tokio::runtime::Handle,
}

impl NodeData {
    fn ask<T>(&self, make: impl FnOnce(crate::node::Reply<T>) -> Command) -> Result<T, String> {
        self.rt.block_on(self.node.ask(make)).map_err(|e| e.error)
    }
}

impl template::Data for NodeData {
    fn doc(&self, name: &str) -> Result<Option<(Value, String)>, String> {
        let doc = name.to_string();
        self.ask(|reply| Command::Get {
            doc,
            path: Vec::new(),
            reply,
        })
    }

    fn list(&self) -> Result<Vec<String>, String> {
        let v = self.ask(|reply| Command::Ls {
            doc: None,
            path: Vec::new(),
            reply,
        })?;
        Ok(v.as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn members(&self) -> Result<(Value, String), String> {
        let list = self.ask(|reply| Command::Members { reply })?;
        let doc = lichen_crdt::MEMBERSHIP_DOC.to_string();
        let (heads, _) = self.ask(|reply| Command::Authors {
            doc,
            heads: None,
            path: Vec::new(),
            reply,
        })?;
        let list = serde_json::to_value(list).map_err(|e| e.to_string())?;
        Ok((list, heads))
    }
}
