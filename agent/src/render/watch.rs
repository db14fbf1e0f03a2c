//! File watching: tell the binding task that its file may have changed.
//!
//! Why it exists: editors save in many ways — write in place (`echo > f`), write a new file
//! and rename it over the old one (`sed -i`, vim, most IDEs), delete and recreate. Watching
//! the file itself loses track after the first rename, so this watches the *parent
//! directory* (non-recursively, with the platform's notifier through `notify`) and keeps the
//! events whose path has the bound file's name. Reads (open/close without writing) are
//! ignored, so the task reading the file does not wake itself up.
//!
//! Events carry no content: they only wake the task (a bounded channel of unit messages; a
//! full channel means a wake-up is already pending), which then reads the file, compares it
//! with what it last wrote or read, and debounces. If the directory itself goes away the
//! watch reports [`Wake::Lost`] and the task sets it up again later.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// What a watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something happened to the file (or the watcher lost events): look at it.
    Changed,
    /// The watched directory is gone: watch again later.
    Lost,
}

/// A live watch; dropping it stops watching.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

/// Watch the directory of `file` and send a [`Wake`] for events about `file`.
pub fn watch(file: &Path, tx: mpsc::Sender<Wake>) -> Result<FileWatch, String> {
    let dir: PathBuf = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name: OsString = file
        .file_name()
        .map(|n| n.to_os_string())
        .ok_or_else(|| format!("{} has no file name", file.display()))?;
    let dir2 = dir.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let wake = match ev {
            Err(_) => Some(Wake::Changed),
            Ok(ev) => classify(&ev, &dir2, &name),
        };
        if let Some(w) = wake {
            let _ = tx.try_send(w);
        }
    })
    .map_err(|e| format!("cannot start a file watcher: {e}"))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    Ok(FileWatch { _watcher: watcher })
}

fn classify(ev: &notify::Event, dir: &Path, name: &OsString) -> Option<Wake> {
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return None,
        _ => {}
    }
    if ev.need_rescan() {
        return Some(Wake::Changed);
    }
    if matches!(ev.kind, EventKind::Remove(_)) && ev.paths.iter().any(|p| p == dir) {
        return Some(Wake::Lost);
    }
    ev.paths
        .iter()
        .any(|p| p.file_name() == Some(name.as_os_str()))
        .then_some(Wake::Changed)
}
