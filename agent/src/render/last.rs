//! What each binding's file last held when its task wrote or read it, kept across restarts.
//!
//! Why it exists: the binding task compares the file with what it last wrote or read to tell
//! the agent's own renders from edits (see [`super::task`]). That memory used to die with the
//! process, so an edit made while the agent was stopped looked, at the next start, like any
//! other stale file and was overwritten by the document. With the last good content on disk
//! the task can tell the two apart at start-up: a file equal to the record is the agent's own
//! last write (the document is rendered as usual); a file that differs was edited while the
//! agent was down and, in `sync` mode, is ingested with a three-way merge whose base is the
//! record — exactly what the live watcher would have done.
//!
//! Layout: one file per binding in `<data_dir>/bindings/`, named by a hash of the binding's
//! identity (document, path, file, format), holding a header with that identity (so a hash
//! collision or a changed binding reads as "no record") followed by the file's bytes. Writes
//! go to a temporary file that is fsynced and renamed over the record, and the directory is
//! fsynced. The record is written *after* the file was rendered or the edit committed.
//!
//! A crash between an edit's commit and its record would leave an older record, and the next
//! start would ingest the already committed edit a second time against that older base: the
//! keys it changed would be written again over whatever peers wrote meanwhile (a concurrent
//! value that should stay a conflict, or a later change, would be reverted). So before an
//! edit is sent, a *pending* record (`<name>.pending`) holds its bytes and this node's count
//! of signed changes of the document (its version-vector entry); it is removed once the
//! outcome is recorded. At start-up a pending record left behind is settled first: if this
//! node's count has grown since, the edit was committed and its bytes become the record;
//! otherwise it was not, and the older record stays the base (the edit is ingested, once).
//! (A write of this node to the same document through the API, landing between the pending
//! record and the edit's commit, followed by a crash before that commit, would make the start
//! take the uncommitted edit as committed; the window is the time of one commit.)
//! Records of bindings that were removed from the config are left behind (a few bytes each).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::binding::Binding;

const MAGIC: &[u8] = b"lichen-binding-state 1\n";

/// The on-disk record of one binding.
#[derive(Debug, Clone)]
pub(super) struct LastSeen {
    path: PathBuf,
    identity: Vec<u8>,
}

/// FNV-1a, 64 bits: a stable file name (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl LastSeen {
    /// The record for binding `b` under `dir` (nothing is touched yet).
    pub(super) fn new(dir: &Path, b: &Binding) -> LastSeen {
        let identity = format!(
            "doc={:?} path={:?} file={:?} format={}",
            b.doc,
            lichen_crdt::format_path(&b.path),
            b.file.to_string_lossy(),
            b.format.name()
        )
        .into_bytes();
        LastSeen {
            path: dir.join(format!("{:016x}", fnv1a(&identity))),
            identity,
        }
    }

    /// The bytes last recorded, or `None` if there is no (matching) record.
    pub(super) fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        let data = match std::fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse(&data, &self.identity))
    }

    /// Record `bytes` durably (temporary file, fsync, rename, fsync of the directory).
    pub(super) fn store(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.write(&self.path, bytes)
    }

    /// Before an edit of the file is sent to the node task: record its bytes and how many
    /// changes of the document this node had signed when it was sent (`own_seq`), durably.
    /// Cleared with [`LastSeen::clear_pending`] once the edit's outcome is recorded.
    pub(super) fn store_pending(&self, own_seq: u64, bytes: &[u8]) -> std::io::Result<()> {
        let mut content = format!("{own_seq}\n").into_bytes();
        content.extend_from_slice(bytes);
        self.write(&self.pending_path(), &content)
    }

    /// The edit recorded by [`LastSeen::store_pending`], if any: `(own_seq, bytes)`.
    pub(super) fn load_pending(&self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        let data = match std::fs::read(self.pending_path()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse(&data, &self.identity).and_then(|c| {
            let nl = c.iter().position(|b| *b == b'\n')?;
            let seq = std::str::from_utf8(&c[..nl]).ok()?.parse().ok()?;
            Some((seq, c[nl + 1..].to_vec()))
        }))
    }

    /// Forget the record (a `render` binding keeps none: see `super::task`).
    pub(super) fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Forget the pending edit (its outcome is known and recorded).
    pub(super) fn clear_pending(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.pending_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn pending_path(&self) -> PathBuf {
        self.path.with_extension("pending")
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension(match path.extension() {
            Some(_) => "pending.tmp",
            None => "tmp",
        });
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(format!("{}\n", self.identity.len()).as_bytes())?;
            f.write_all(&self.identity)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The content of a record if it is well formed and belongs to `identity`.
fn parse(data: &[u8], identity: &[u8]) -> Option<Vec<u8>> {
    let rest = data.strip_prefix(MAGIC)?;
    let nl = rest.iter().position(|b| *b == b'\n')?;
    let len: usize = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
    let rest = &rest[nl + 1..];
    let (id, content) = (rest.get(..len)?, rest.get(len..)?);
    (id == identity).then(|| content.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(doc: &str, file: &str) -> Binding {
        let text = format!("doc = \"{doc}\"\nfile = \"{file}\"\nmode = \"sync\"");
        let f: super::super::BindingFile = toml::from_str(&text).expect("toml");
        Binding::resolve(&f, Path::new("/")).expect("valid binding")
    }

    #[test]
    fn round_trip_and_identity_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = LastSeen::new(dir.path(), &binding("app", "/x/a.json"));
        assert_eq!(a.load().expect("load"), None, "no record yet");
        a.store(b"{\"k\": 1}\n").expect("store");
        assert_eq!(
            a.load().expect("load").as_deref(),
            Some(&b"{\"k\": 1}\n"[..])
        );
        a.store(b"").expect("store empty");
        assert_eq!(a.load().expect("load").as_deref(), Some(&b""[..]));

        // A pending edit is kept apart from the record and cleared on its own.
        assert_eq!(a.load_pending().expect("load"), None);
        a.store_pending(7, b"{\"k\": 2}\n").expect("store pending");
        assert_eq!(
            a.load_pending().expect("load"),
            Some((7, b"{\"k\": 2}\n".to_vec()))
        );
        assert_eq!(a.load().expect("load").as_deref(), Some(&b""[..]));
        a.clear_pending().expect("clear");
        a.clear_pending().expect("clearing twice is fine");
        assert_eq!(a.load_pending().expect("load"), None);

        // Another binding of the same file has its own record.
        let b = LastSeen::new(dir.path(), &binding("other", "/x/a.json"));
        assert_eq!(b.load().expect("load"), None);
        // A record whose identity does not match (a collision, or a hand-copied file) reads
        // as no record; so do truncated or foreign files.
        std::fs::copy(&a.path, &b.path).expect("copy");
        assert_eq!(b.load().expect("load"), None);
        for junk in [
            &b""[..],
            b"lichen-binding-state 1\n",
            b"garbage",
            b"lichen-binding-state 1\n99999\nab",
        ] {
            std::fs::write(&b.path, junk).expect("write");
            assert_eq!(b.load().expect("load"), None, "{junk:?}");
        }
    }
}
