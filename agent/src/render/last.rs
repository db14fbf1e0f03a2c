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
//! fsynced. The record is written *after* the file was rendered or the edit committed: a
//! crash in between leaves an older record, which makes the next start merge the file against
//! an older base — the document already holds those values, so the merge changes nothing.
//! Records of bindings that were removed from the config are left behind (a few bytes each).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::binding::Binding;

const MAGIC: &[u8] = b"lichen-binding-state 1\n";

/// The on-disk record of one binding.
#[derive(Debug, Clone)]
pub struct LastSeen {
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
    pub fn new(dir: &Path, b: &Binding) -> LastSeen {
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
    pub fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        let data = match std::fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse(&data, &self.identity))
    }

    /// Record `bytes` durably (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(format!("{}\n", self.identity.len()).as_bytes())?;
            f.write_all(&self.identity)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
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
