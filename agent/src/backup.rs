//! `lichen backup`, `lichen backup verify` and `lichen restore`.
//!
//! Why through the agent: a running agent holds its database in SQLite's exclusive locking
//! mode (`Store::hold_exclusive`), so no other process can read it, and a copy of the files
//! (database plus write-ahead log) taken from outside could be torn. `lichen backup` asks the
//! agent (`POST /v1/backup`); its node task copies the store with SQLite's online backup API
//! on its own connection, in one step between two commands, so the copy is exactly the
//! committed state at that moment, and every write acknowledged before the request was made
//! is in it (see `lichen_crdt::store::backup`). The copy travels back over the local API and
//! the CLI writes the file (mode 0600). The node's secret key never crosses the API: with
//! `--with-key` the CLI reads the key file from the data directory itself (so only a user who
//! can read the key can put it in a backup) and embeds it.
//!
//! `backup verify` and `restore` work on files only and need no agent. A restore with a new
//! key prints the `lichen members add` command that admits the node; a restore with the old
//! key leaves a marker in the data directory (`daemon::RESTORED_MARKER`) that makes the node
//! refuse writes until it has caught up with a peer (see `node::NodeParts::restored`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lichen_crdt::store::backup::{self, BackupSummary};
use lichen_crdt::{SecretKey, Store};

use crate::client::Client;
use crate::daemon;
use crate::error::ApiError;

/// `lichen backup`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BackupArgs {
    /// Write the backup to this file (it must not exist; mode 0600).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Also put this node's secret key in the backup (read from its data directory), so that
    /// `lichen restore --with-key` can bring the node back with its identity. Keep such a
    /// file as secret as the key.
    /// (The key is read from the data directory: `--data-dir`, `LICHEN_DATA_DIR`, `data_dir`
    /// in `--config`, else the default one.)
    #[arg(long)]
    pub with_key: bool,
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
}

/// `lichen backup verify`.
#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Check a backup file: SQLite integrity, schema, and every change's hash, signature and
    /// authorization against the membership chain rooted in the cluster id.
    Verify { file: PathBuf },
}

/// `lichen restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The backup file. The data directory to create is the global `--data-dir` (it must
    /// not exist or be empty).
    pub file: PathBuf,
    /// Restore the node's own key from the backup (taken with --with-key) instead of making a
    /// new one. The node then writes nothing until it has caught up with a peer.
    #[arg(long)]
    pub with_key: bool,
    /// Name for the restored node in the printed `members add` command (new key only).
    #[arg(long)]
    pub name: Option<String>,
    /// Address the restored node will listen on, for the printed `members add` command.
    #[arg(long)]
    pub advertise: Option<String>,
}

/// `lichen backup`: the whole command.
///
/// `client` connects to the agent (not called for `backup verify`); `data_dir` is where
/// `--with-key` reads the key. A refusal by the agent stays an [`ApiError`] in the error's
/// chain, so that the exit code is its kind's.
pub(crate) fn run_backup(
    client: impl FnOnce() -> Result<Client, ApiError>,
    data_dir: &Path,
    json: bool,
    a: &BackupArgs,
) -> Result<()> {
    if let Some(BackupCommand::Verify { file }) = &a.command {
        return verify(file, json);
    }
    let Some(out) = &a.output else {
        bail!("say where to write the backup: lichen backup -o FILE");
    };
    if out.exists() {
        bail!("{} already exists; refusing to overwrite it", out.display());
    }
    let key = if a.with_key {
        let path = daemon::key_path(data_dir);
        Some(SecretKey::read_file(&path).with_context(|| {
            format!(
                "--with-key reads the node key from {} (set --data-dir)",
                path.display()
            )
        })?)
    } else {
        None
    };
    let bytes = client().and_then(|c| c.post_for_bytes("/v1/backup"))?;
    let part = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("backup")
    ));
    let r = (|| -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        if let Some(k) = &key {
            backup::embed_key(&part, k)?;
        }
        std::fs::rename(&part, out)
            .with_context(|| format!("cannot rename {} to {}", part.display(), out.display()))?;
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    r?;
    println!(
        "backup written to {} ({} bytes, {}); check it with `lichen backup verify {}`",
        out.display(),
        bytes.len(),
        if key.is_some() {
            "WITH this node's secret key: keep it as secret as the key"
        } else {
            "without the secret key"
        },
        out.display()
    );
    Ok(())
}

fn scratch() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("lichen-verify-{}-{nanos}.db", std::process::id()))
}

fn verify(file: &Path, json: bool) -> Result<()> {
    match backup::verify(file, &scratch()) {
        Ok(s) => {
            if json {
                println!("{}", serde_json::json!({"ok": true, "summary": s}));
            } else {
                print_summary(file, &s);
            }
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": e.to_string()})
                );
            }
            Err(e.into())
        }
    }
}

fn print_summary(file: &Path, s: &BackupSummary) {
    println!("{}: OK", file.display());
    println!("  cluster        {}", s.cluster);
    println!("  schema         {}", s.schema_version);
    if let Some(src) = &s.source {
        println!("  taken on node  {src}");
    }
    if let Some(t) = s.taken_ms {
        println!("  taken at       {t} ms since the epoch");
    }
    println!(
        "  secret key     {}",
        if s.with_key {
            "included"
        } else {
            "not included"
        }
    );
    println!("  documents      {}", s.documents);
    println!(
        "  changes        {} ({} valid), every one checked",
        s.changes, s.valid_changes
    );
    let members: Vec<String> = s.members.iter().map(|(r, n)| format!("{n} {r}")).collect();
    println!("  members        {}", members.join(", "));
}

/// `lichen restore`.
pub(crate) fn run_restore(a: &RestoreArgs, dir: &Path) -> Result<()> {
    let existed = dir.exists();
    if existed
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty; restore builds a new data directory (choose another --data-dir)",
            dir.display()
        );
    }
    let summary = backup::verify(&a.file, &scratch())
        .with_context(|| format!("{} does not verify; nothing restored", a.file.display()))?;
    if a.with_key && !summary.with_key {
        bail!(
            "{} was taken without the key (`lichen backup --with-key`); restore without --with-key to give the node a new key",
            a.file.display()
        );
    }
    let r = build(a, dir);
    if r.is_err() {
        if existed {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    r
}

fn build(a: &RestoreArgs, dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let db = daemon::db_file(dir);
    let restored = backup::restore(&a.file, &db)?;
    let key_file = daemon::key_path(dir);
    if a.with_key {
        let key = restored
            .key
            .context("the backup holds no key (taken without --with-key)")?;
        key.write_file(&key_file)?;
        std::fs::write(
            dir.join(daemon::RESTORED_MARKER),
            b"restored with its key from a backup: writes wait for a catch-up with a peer\n",
        )
        .context("cannot write the restore marker")?;
        println!(
            "restored node {} with its own key into {}",
            key.node_id(),
            dir.display()
        );
        println!("Start it with `lichen run --data-dir {}`: it writes nothing until it has caught up with a peer (a write before that is refused), so it cannot reuse sequence numbers its key signed after the backup.", dir.display());
        return Ok(());
    }
    let key = SecretKey::from_seed(daemon::random_seed()?);
    key.write_file(&key_file)?;
    let store = Store::open(&db, Some(restored.cluster))?;
    let was = restored
        .source
        .and_then(|s| store.membership().members.get(&s).cloned());
    let name = a.name.clone().unwrap_or_else(|| {
        was.as_ref()
            .map(|m| format!("{}-restored", m.name))
            .unwrap_or_else(|| "restored".into())
    });
    let mut cmd = format!("lichen members add {} --name {name}", key.node_id());
    let role = was
        .as_ref()
        .map(|m| m.role.as_str())
        .filter(|r| *r == "admin" || *r == "reader")
        .unwrap_or("writer");
    cmd.push_str(&format!(" --role {role}"));
    for s in was.iter().flat_map(|m| &m.scopes) {
        cmd.push_str(&format!(" --scope {s}"));
    }
    if let Some(addr) = &a.advertise {
        cmd.push_str(&format!(" --addr {addr}"));
    }
    println!(
        "restored into {} with a new key: node {}",
        dir.display(),
        key.node_id()
    );
    println!("Admit it, on an admin node:");
    println!("  {cmd}");
    println!(
        "then start it with `lichen run --data-dir {} --name {name}`.",
        dir.display()
    );
    if let (Some(old), Some(_)) = (restored.source, &was) {
        println!("If the node the backup was taken from ({old}) is gone for good, remove its key: lichen members remove {old}");
    }
    Ok(())
}
