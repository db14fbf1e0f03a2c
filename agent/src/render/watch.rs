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
//!
//! Writers: the watch also records in [`Activity`] whether a writer may still have the file
//! open: a write (or a creation) of the file sets it, the writer's close (`IN_CLOSE_WRITE`),
//! a rename onto the name, a removal or lost events clear it. The task does not read a file
//! that a writer still holds (see `task.rs`): an editor that writes half a file, pauses, then
//! writes the rest is read once, after its close. (Backends without close events, as on
//! macOS, leave `writing` set; the task then waits for a quiet period instead.)
//!
//! One watcher per directory: bindings whose files share a directory (100 templates
//! rendering into `/etc/nginx/conf.d`) share one notifier and its thread, which hands each
//! event to the bindings it names. With a notifier per binding, every event in the directory
//! woke every binding's thread: the cost of one change grew with the square of the number
//! of bindings there.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// What a watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Something happened to the file (or the watcher lost events): look at it.
    Changed,
    /// The watched directory is gone: watch again later.
    Lost,
}

/// What the watch has seen writers do to the file (shared with the binding task).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Activity {
    /// A writer may have the file open: written or created, and not closed since.
    pub writing: bool,
    /// When the last write event arrived.
    pub last_write: Option<Instant>,
}

/// [`Activity`], updated by the watcher's thread.
pub(super) type SharedActivity = Arc<Mutex<Activity>>;

/// One binding's interest in events of its directory.
struct Sub {
    id: u64,
    name: OsString,
    tx: mpsc::Sender<Wake>,
    activity: SharedActivity,
}

/// The shared watcher of one directory.
struct DirWatch {
    _watcher: RecommendedWatcher,
    subs: Arc<Mutex<Vec<Sub>>>,
    /// The directory went away: this watcher sees nothing more; a new watch makes a new one.
    dead: Arc<AtomicBool>,
}

/// Live directory watchers, by directory.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<DirWatch>>> {
    static DIRS: OnceLock<Mutex<HashMap<PathBuf, Weak<DirWatch>>>> = OnceLock::new();
    DIRS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A live watch; dropping it stops watching (the directory's watcher stops with its last
/// binding).
pub(super) struct FileWatch {
    dir: Arc<DirWatch>,
    id: u64,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.dir.subs.lock() {
            subs.retain(|s| s.id != self.id);
        }
    }
}

/// Watch the directory of `file` and send a [`Wake`] for events about `file`.
pub(super) fn watch(
    file: &Path,
    tx: mpsc::Sender<Wake>,
    activity: SharedActivity,
) -> Result<FileWatch, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir: PathBuf = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name: OsString = file
        .file_name()
        .map(|n| n.to_os_string())
        .ok_or_else(|| format!("{} has no file name", file.display()))?;
    let mut dirs = registry()
        .lock()
        .map_err(|_| "the watcher registry is poisoned".to_string())?;
    dirs.retain(|_, w| w.strong_count() > 0);
    let shared = dirs
        .get(&dir)
        .and_then(Weak::upgrade)
        .filter(|d| !d.dead.load(Ordering::Relaxed));
    let shared = match shared {
        Some(d) => d,
        None => {
            let d = Arc::new(start(&dir)?);
            dirs.insert(dir.clone(), Arc::downgrade(&d));
            d
        }
    };
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    shared
        .subs
        .lock()
        .map_err(|_| "a directory watcher is poisoned".to_string())?
        .push(Sub {
            id,
            name,
            tx,
            activity,
        });
    Ok(FileWatch { dir: shared, id })
}

/// Start the watcher of `dir`, handing each event to the subscribed bindings.
fn start(dir: &Path) -> Result<DirWatch, String> {
    let subs: Arc<Mutex<Vec<Sub>>> = Arc::new(Mutex::new(Vec::new()));
    let dead = Arc::new(AtomicBool::new(false));
    let (subs2, dead2, dir2) = (subs.clone(), dead.clone(), dir.to_path_buf());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(subs) = subs2.lock() else { return };
        for s in subs.iter() {
            let (wake, writing) = match &ev {
                Err(_) => (Some(Wake::Changed), Some(false)),
                Ok(ev) => classify(ev, &dir2, &s.name),
            };
            if let (Some(writing), Ok(mut a)) = (writing, s.activity.lock()) {
                a.writing = writing;
                if writing {
                    a.last_write = Some(Instant::now());
                }
            }
            if let Some(w) = wake {
                if w == Wake::Lost {
                    dead2.store(true, Ordering::Relaxed);
                }
                let _ = s.tx.try_send(w);
            }
        }
    })
    .map_err(|e| format!("cannot start a file watcher: {e}"))?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    Ok(DirWatch {
        _watcher: watcher,
        subs,
        dead,
    })
}

/// The wake-up an event calls for, and what it says about a writer holding the file open
/// (`Some(true)`: written or created; `Some(false)`: closed, replaced or gone; `None`: no
/// news).
fn classify(ev: &notify::Event, dir: &Path, name: &OsString) -> (Option<Wake>, Option<bool>) {
    let ours = ev
        .paths
        .iter()
        .any(|p| p.file_name() == Some(name.as_os_str()));
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            return (ours.then_some(Wake::Changed), ours.then_some(false))
        }
        EventKind::Access(_) => return (None, None),
        _ => {}
    }
    if ev.need_rescan() {
        return (Some(Wake::Changed), Some(false));
    }
    if matches!(ev.kind, EventKind::Remove(_)) && ev.paths.iter().any(|p| p == dir) {
        return (Some(Wake::Lost), Some(false));
    }
    if !ours {
        return (None, None);
    }
    let writing = match ev.kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_)) => Some(true),
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Some(false),
        _ => None,
    };
    (Some(Wake::Changed), writing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};

    fn ev(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn writes_open_the_file_and_closes_or_renames_settle_it() {
        let (dir, name) = (Path::new("/d"), OsString::from("c.toml"));
        let c = |k, p| classify(&ev(k, p), dir, &name);
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(c(write, "/d/c.toml"), (Some(Wake::Changed), Some(true)));
        assert_eq!(
            c(EventKind::Create(CreateKind::File), "/d/c.toml"),
            (Some(Wake::Changed), Some(true))
        );
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(c(close, "/d/c.toml"), (Some(Wake::Changed), Some(false)));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(c(renamed, "/d/c.toml"), (Some(Wake::Changed), Some(false)));
        // Other files in the directory (an editor's swap file) and reads say nothing.
        assert_eq!(c(write, "/d/.c.toml.swp"), (None, None));
        assert_eq!(c(close, "/d/other"), (None, None));
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert_eq!(c(read, "/d/c.toml"), (None, None));
    }
}
