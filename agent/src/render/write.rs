//! Atomic write: put new content into the bound file atomically, after the check command agrees.
//!
//! Why it exists: an application must never read a half-written or unchecked config file.
//! [`write_file`] does, in order:
//!
//! 1. compare the new bytes with the file's current bytes: equal means nothing to do (no
//!    write, no reload, mtime and inode unchanged);
//! 2. write a staged file `.<name>.lichen-<pid>-<n>.tmp` in the *same directory* (so the
//!    rename cannot cross file systems), with the configured mode or the existing file's mode
//!    (0644 for a new file) and the configured owner/group or the existing file's (changing
//!    owners needs privileges: a failure to keep an existing owner is only logged, a failure to
//!    set a configured one is an error), then fsync it;
//! 3. run the check command with the staged file's path as its last argument; if it fails
//!    the staged file is removed and the old file stays exactly as it was;
//! 4. if the caller gave the content it last saw (`sync` mode), check that the target still
//!    holds it: a file edited while the new content was staged and checked (the fsync and
//!    the check command take a while) is left alone and [`Written::Changed`] returned, so
//!    the edit is read and merged instead of silently overwritten (what remains is the
//!    moment between this comparison and the rename);
//! 5. rename the staged file over the target and fsync the directory, so after a crash the
//!    file is either the old or the new content, never a mix.
//!
//! The staged file is removed on every error path. Callers (the binding task) handle
//! metrics, retries and the reload that follows a write.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::binding::Binding;
use super::command;

/// What [`write_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// The file already had these bytes.
    Unchanged,
    /// The file was replaced.
    Replaced,
    /// Not written: the file no longer held what the caller last saw (edited meanwhile).
    Changed,
}

/// Why a render failed; `reason` is the metric label (`check` or `write`).
#[derive(Debug, Clone)]
pub(super) struct RenderError {
    pub reason: &'static str,
    pub message: String,
    /// The check command's failure, when the check refused the content.
    pub check: Option<super::command::CommandError>,
}

impl RenderError {
    fn write(message: impl Into<String>) -> RenderError {
        RenderError {
            reason: "write",
            message: message.into(),
            check: None,
        }
    }
}

/// A bound file as [`read_bounded`] found it.
#[derive(Debug)]
pub(super) enum FileRead {
    Missing,
    /// Larger than the bound: not read at all.
    TooLarge(u64),
    Bytes(Vec<u8>),
}

/// Read a file of at most `max` bytes. The size is checked before reading (and the read
/// stops past `max` if the file grows meanwhile), so an oversized file costs no memory.
pub(super) fn read_bounded(path: &Path, max: usize) -> std::io::Result<FileRead> {
    use std::io::Read;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileRead::Missing),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len > max as u64 {
        return Ok(FileRead::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Ok(FileRead::TooLarge(bytes.len() as u64));
    }
    Ok(FileRead::Bytes(bytes))
}

/// Read a file; `None` if it does not exist.
pub(super) fn read_current(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replace `b.file` with `bytes` (see the module docs). With `last_seen`, only if the file
/// still holds those bytes (`None`: does not exist) just before the rename. `env` is the
/// check command's provenance environment ([`super::provenance`]).
pub(super) async fn write_file(
    b: &Binding,
    bytes: &[u8],
    last_seen: Option<Option<Vec<u8>>>,
    env: &[(&'static str, String)],
) -> Result<Written, RenderError> {
    let staged = {
        let (b2, bytes) = (b.clone(), bytes.to_vec());
        tokio::task::spawn_blocking(move || stage(&b2, &bytes))
            .await
            .map_err(|e| RenderError::write(format!("staging task failed: {e}")))??
    };
    let Some(staged) = staged else {
        return Ok(Written::Unchanged);
    };
    if let Some(check) = &b.check {
        let env = super::provenance::borrow(env);
        if let Err(e) = command::run(check, Some(&staged.path), &env, b.command_timeout).await {
            return Err(RenderError {
                reason: "check",
                message: format!("check refused the new content, old file kept: {e}"),
                check: Some(e),
            });
        }
    }
    let target = b.file.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(expected) = last_seen {
            let now = read_current(&target).map_err(|e| {
                RenderError::write(format!("cannot read {}: {e}", target.display()))
            })?;
            if now != expected {
                return Ok(Written::Changed); // the staged file is removed on drop
            }
        }
        staged.commit().map(|()| Written::Replaced)
    })
    .await
    .map_err(|e| RenderError::write(format!("rename task failed: {e}")))?
}

/// A staged file, removed on drop unless committed.
struct Staged {
    path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    fn commit(mut self) -> Result<(), RenderError> {
        std::fs::rename(&self.path, &self.target).map_err(|e| {
            RenderError::write(format!(
                "cannot rename {} to {}: {e}",
                self.path.display(),
                self.target.display()
            ))
        })?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            // The rename is durable only once the directory entry is.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| RenderError::write(format!("cannot fsync {}: {e}", dir.display())))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn dir_of(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Write the staged file; `None` if the target already holds `bytes`.
fn stage(b: &Binding, bytes: &[u8]) -> Result<Option<Staged>, RenderError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let target = &b.file;
    let current_meta = match std::fs::metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(RenderError::write(format!(
                "cannot stat {}: {e}",
                target.display()
            )))
        }
    };
    if current_meta
        .as_ref()
        .is_some_and(|m| m.len() == bytes.len() as u64)
    {
        let current = read_current(target)
            .map_err(|e| RenderError::write(format!("cannot read {}: {e}", target.display())))?;
        if current.as_deref() == Some(bytes) {
            return Ok(None);
        }
    }
    let dir = dir_of(target);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(format!(
        ".{name}.lichen-{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mode = b
        .file_mode
        .or(current_meta.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| RenderError::write(format!("cannot create {}: {e}", path.display())))?;
    let staged = Staged {
        path,
        target: target.clone(),
        committed: false,
    };
    let fail = |what: &str, e: std::io::Error| {
        RenderError::write(format!("cannot {what} {}: {e}", staged.path.display()))
    };
    f.write_all(bytes).map_err(|e| fail("write", e))?;
    // The umask applied at creation; set the exact mode now.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail("set the mode of", e))?;
    let keep = current_meta.as_ref().map(|m| (m.uid(), m.gid()));
    let (uid, gid) = (b.uid.or(keep.map(|k| k.0)), b.gid.or(keep.map(|k| k.1)));
    let mine = std::fs::metadata(&staged.path).map_err(|e| fail("stat", e))?;
    if (uid.is_some() && uid != Some(mine.uid())) || (gid.is_some() && gid != Some(mine.gid())) {
        if let Err(e) = std::os::unix::fs::chown(&staged.path, uid, gid) {
            if b.uid.is_some() || b.gid.is_some() {
                return Err(fail("set the configured owner/group of", e));
            }
            tracing::debug!(file = %target.display(), error = %e, "cannot keep the file's owner");
        }
        // chown may clear set-id bits: apply the mode again.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("set the mode of", e))?;
    }
    f.sync_all().map_err(|e| fail("fsync", e))?;
    Ok(Some(staged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::binding::BindingFile;

    fn binding(dir: &Path, extra: &str) -> Binding {
        let f: BindingFile = toml::from_str(&format!(
            "doc = \"d\"\nfile = \"out.json\"\ncommand_timeout_ms = 5000\n{extra}"
        ))
        .unwrap();
        Binding::resolve(&f, dir).unwrap()
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".lichen-"))
            .collect()
    }

    #[tokio::test]
    async fn writes_atomically_keeps_mode_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let b = binding(dir.path(), "");
        assert_eq!(
            write_file(&b, b"one\n", None, &[]).await.unwrap(),
            Written::Replaced
        );
        let meta = std::fs::metadata(&b.file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644);
        std::fs::set_permissions(&b.file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let ino = std::fs::metadata(&b.file).unwrap().ino();
        assert_eq!(
            write_file(&b, b"one\n", None, &[]).await.unwrap(),
            Written::Unchanged
        );
        assert_eq!(std::fs::metadata(&b.file).unwrap().ino(), ino);
        assert_eq!(
            write_file(&b, b"two\n", None, &[]).await.unwrap(),
            Written::Replaced
        );
        let meta = std::fs::metadata(&b.file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640, "the existing mode is kept");
        assert_ne!(meta.ino(), ino, "replaced by rename");
        assert_eq!(std::fs::read(&b.file).unwrap(), b"two\n");
        let b = binding(dir.path(), "file_mode = \"0600\"");
        write_file(&b, b"three\n", None, &[]).await.unwrap();
        assert_eq!(std::fs::metadata(&b.file).unwrap().mode() & 0o7777, 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_failing_check_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = binding(
            dir.path(),
            "check = [\"sh\", \"-c\", \"! grep -q bad \\\"$0\\\"\"]",
        );
        assert_eq!(
            write_file(&b, b"good\n", None, &[]).await.unwrap(),
            Written::Replaced
        );
        let e = write_file(&b, b"bad\n", None, &[]).await.unwrap_err();
        assert_eq!(e.reason, "check");
        assert_eq!(std::fs::read(&b.file).unwrap(), b"good\n");
        assert!(leftovers(dir.path()).is_empty());
    }
}
