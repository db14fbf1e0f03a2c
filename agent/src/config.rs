//! Agent configuration, in two stages (like ripgrep): `clap` parses the command line, a TOML
//! file is read, and [`Config::resolve`] validates and merges them (defaults < file < flags)
//! into a [`Config`] with every value checked. Only then are runtime handles built. SIGHUP
//! re-runs the same resolution; a config that fails it is reported and the old one kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lichen_crdt::sync::Config as SyncConfig;
use serde::Deserialize;

use crate::render::{Binding, BindingFile};

/// Default QUIC port for peer traffic.
pub(crate) const DEFAULT_PEER_PORT: u16 = 7420;
/// Default size of the SQLite write-ahead log before a checkpoint, in 4 KiB pages. SQLite's
/// own default (1000) checkpoints every ~140 writes, each time inside a commit that then
/// takes 2-10 ms: with three agents ~2% of writes met one, which put them in the p99. At 4000
/// ~0.5% of writes meet one (longer: ~25 ms on the benchmark machine) and p50 is unchanged.
pub(crate) const DEFAULT_WAL_PAGES: u32 = 4000;
/// Default local API address.
pub(crate) const DEFAULT_API: &str = "127.0.0.1:7421";

/// Default cap on concurrent API connections.
pub(crate) const DEFAULT_API_MAX_CONNECTIONS: usize = 256;

/// The TOML file, as written by an operator. Every field is optional.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Where the key and the database live.
    pub data_dir: Option<PathBuf>,
    /// This node's name in the membership document.
    pub name: Option<String>,
    /// QUIC listen address (`0.0.0.0:7420`).
    pub listen: Option<String>,
    /// Addresses other nodes should dial (`host:port`), published in the membership document.
    pub advertise: Option<Vec<String>>,
    /// Local HTTP API address (must be loopback).
    pub api: Option<String>,
    /// Most API connections open at once (default 256); one more is answered `503` and
    /// closed at once. Each holds a file descriptor, so this bounds what the API can take
    /// from peers, the store and file bindings.
    pub api_max_connections: Option<usize>,
    /// An API connection that is idle, or sends a request head or body slower than this, is
    /// closed (milliseconds, default 10000). Watch streams (`?watch`) are not affected once
    /// their request is in.
    pub api_idle_timeout_ms: Option<u64>,
    /// A file holding a read-only API token (created with a random token if missing; relative
    /// to the config file's directory): it may `GET` (status, values, `/metrics`) but not
    /// write. For monitoring. Default: none.
    pub api_read_token_file: Option<PathBuf>,
    /// Serve `/metrics` without a token (default false: the API token or the read-only one).
    pub api_metrics_open: Option<bool>,
    /// Group (name or numeric id) of the API's unix socket `data_dir/api.sock` (mode 0660):
    /// its members may use the API through it without a token. Default: the agent's group.
    pub api_socket_group: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// `RUST_LOG`-style filter.
    pub log: Option<String>,
    /// `local` (default: fsync this node's own writes; received changes survive a process
    /// crash and are fetched again after a power loss), `always` (fsync every commit) or
    /// `never` (every commit survives a process crash only; for tests: after a power loss
    /// a write made before resyncing can flag this node's key, see the README).
    pub fsync: Option<String>,
    /// Pages (4 KiB) the SQLite write-ahead log may hold before a commit checkpoints it into
    /// the database file (default 4000, ~16 MiB): fewer, longer checkpoints; see the README.
    /// Independently, the agent checkpoints the log once writes pause for a second.
    pub wal_checkpoint_pages: Option<u32>,
    /// Documents kept in memory, least recently used dropped first (default 128; each holds
    /// its whole Automerge history, ~20 KiB for a small configuration document).
    pub max_loaded_docs: Option<usize>,
    /// Stored changes the background scrub checks per second (hash, signature and the
    /// stored fields; default 200; 0 turns it off). A change found damaged is quarantined
    /// and fetched again from a peer.
    pub scrub_rows_per_second: Option<u32>,
    /// Sync tuning.
    #[serde(default)]
    pub sync: SyncFile,
    /// File bindings (document ⇄ file).
    #[serde(default, rename = "bind")]
    pub bindings: Vec<BindingFile>,
}

/// `[sync]` section.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct SyncFile {
    /// Anti-entropy period in milliseconds.
    pub anti_entropy_ms: Option<u64>,
    /// Gossip fanout.
    pub fanout: Option<usize>,
    /// After start, hold this node's own writes (API, file bindings, membership edits) until
    /// it has caught up with a peer, for at most this many milliseconds (default 5000; 0: do
    /// not hold). A node whose data directory is older than its last run (restored from a
    /// backup or disk image, or a power loss with `fsync = "never"`) first gets back the
    /// changes it made since, instead of reusing their sequence numbers, which would flag
    /// its key as equivocating. A node with no other member never holds.
    pub hold_writes_ms: Option<u64>,
}

/// Command-line overrides for `lichen run`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub listen: Option<String>,
    pub advertise: Vec<String>,
    pub api: Option<String>,
    pub log_format: Option<String>,
    pub join: Option<String>,
    /// `--allow-isolated-writes`: a node restored with its key writes after the usual hold
    /// even if it has not reached a peer (see `daemon::RESTORED_MARKER`).
    pub allow_isolated_writes: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Which commits are fsynced (see the README's durability section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fsync {
    /// This node's own writes (acknowledged to clients) survive a power loss; received
    /// changes survive a process crash and are re-fetched from peers after a power loss.
    Local,
    /// Every commit survives a power loss.
    Always,
    /// Every commit survives a process crash only.
    Never,
}

impl Fsync {
    /// (local writes fsynced, received changes fsynced).
    pub(crate) fn policy(self) -> (bool, bool) {
        match self {
            Fsync::Local => (true, false),
            Fsync::Always => (true, true),
            Fsync::Never => (false, false),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub data_dir: PathBuf,
    pub name: String,
    pub listen: SocketAddr,
    pub advertise: Vec<String>,
    pub api: SocketAddr,
    pub api_max_connections: usize,
    pub api_idle_timeout: Duration,
    pub api_read_token_file: Option<PathBuf>,
    pub api_metrics_open: bool,
    pub api_socket_group: Option<String>,
    pub log_format: LogFormat,
    pub log: String,
    pub fsync: Fsync,
    pub wal_checkpoint_pages: u32,
    pub max_loaded_docs: usize,
    pub scrub_rows_per_second: u32,
    pub anti_entropy: Duration,
    pub fanout: usize,
    pub hold_writes: Duration,
    pub join: Option<JoinToken>,
    pub bindings: Vec<Binding>,
}

/// One setting that differs between two configurations, by its config-file name, with both
/// values as the file would write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SettingChange {
    pub name: &'static str,
    pub old: String,
    pub new: String,
    /// A reload applies it to the running agent; otherwise it waits for the next start.
    pub live: bool,
}

impl Config {
    /// Every setting that differs between `self` and `new`. A reload applies the live ones
    /// (the log filter, `max_loaded_docs`, `scrub_rows_per_second`; the file bindings are
    /// reloaded on their own); the others shape the socket, the API listener, the open
    /// database or the sync engine and wait for the next start. Every field is named below,
    /// so a new setting cannot be left out of this report without a compile error.
    pub(crate) fn changes(&self, new: &Config) -> Vec<SettingChange> {
        let Config {
            data_dir,
            name,
            listen,
            advertise,
            api,
            api_max_connections,
            api_idle_timeout,
            api_read_token_file,
            api_metrics_open,
            api_socket_group,
            log_format,
            log,
            fsync,
            wal_checkpoint_pages,
            max_loaded_docs,
            scrub_rows_per_second,
            anti_entropy,
            fanout,
            hold_writes,
            join,
            // Reloaded by the bindings manager, which reports what it starts and stops.
            bindings: _,
        } = self;
        let ms = |d: &Duration| d.as_millis().to_string();
        let join_s = |j: &Option<JoinToken>| j.as_ref().map(|j| j.to_string()).unwrap_or_default();
        let all = [
            (
                "data_dir",
                false,
                data_dir.display().to_string(),
                new.data_dir.display().to_string(),
            ),
            ("name", false, name.clone(), new.name.clone()),
            ("listen", false, listen.to_string(), new.listen.to_string()),
            (
                "advertise",
                false,
                format!("{advertise:?}"),
                format!("{:?}", new.advertise),
            ),
            ("api", false, api.to_string(), new.api.to_string()),
            (
                "api_max_connections",
                false,
                api_max_connections.to_string(),
                new.api_max_connections.to_string(),
            ),
            (
                "api_idle_timeout_ms",
                false,
                ms(api_idle_timeout),
                ms(&new.api_idle_timeout),
            ),
            (
                "log_format",
                false,
                format!("{log_format:?}"),
                format!("{:?}", new.log_format),
            ),
            ("log", true, log.clone(), new.log.clone()),
            (
                "fsync",
                false,
                format!("{fsync:?}"),
                format!("{:?}", new.fsync),
            ),
            (
                "api_read_token_file",
                false,
                format!("{api_read_token_file:?}"),
                format!("{:?}", new.api_read_token_file),
            ),
            (
                "api_metrics_open",
                false,
                api_metrics_open.to_string(),
                new.api_metrics_open.to_string(),
            ),
            (
                "api_socket_group",
                false,
                format!("{api_socket_group:?}"),
                format!("{:?}", new.api_socket_group),
            ),
            (
                "wal_checkpoint_pages",
                false,
                wal_checkpoint_pages.to_string(),
                new.wal_checkpoint_pages.to_string(),
            ),
            (
                "max_loaded_docs",
                true,
                max_loaded_docs.to_string(),
                new.max_loaded_docs.to_string(),
            ),
            (
                "scrub_rows_per_second",
                true,
                scrub_rows_per_second.to_string(),
                new.scrub_rows_per_second.to_string(),
            ),
            (
                "sync.anti_entropy_ms",
                false,
                ms(anti_entropy),
                ms(&new.anti_entropy),
            ),
            (
                "sync.fanout",
                false,
                fanout.to_string(),
                new.fanout.to_string(),
            ),
            (
                "sync.hold_writes_ms",
                false,
                ms(hold_writes),
                ms(&new.hold_writes),
            ),
            ("join", false, join_s(join), join_s(&new.join)),
        ];
        all.into_iter()
            .filter(|(_, _, old, new)| old != new)
            .map(|(name, live, old, new)| SettingChange {
                name,
                old,
                new,
                live,
            })
            .collect()
    }

    /// The settings that differ between `self` and `new` and only apply at the next start.
    pub(crate) fn restart_only_changes(&self, new: &Config) -> Vec<SettingChange> {
        self.changes(new).into_iter().filter(|c| !c.live).collect()
    }
}

/// What a new node needs to join: the cluster id and one member to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinToken {
    pub cluster: [u8; 32],
    pub seed: lichen_crdt::NodeId,
    pub addr: String,
}

impl JoinToken {
    /// `<cluster id hex>@<seed node id hex>@<host:port>`.
    pub(crate) fn parse(s: &str) -> Result<JoinToken> {
        let parts: Vec<&str> = s.trim().split('@').collect();
        let [cluster, seed, addr] = parts.as_slice() else {
            bail!("a join token looks like <cluster-id>@<node-id>@<host:port>; print one with `lichen status` on a member");
        };
        let cluster: lichen_crdt::NodeId = cluster
            .parse()
            .context("the cluster id in the join token is not 64 hex digits")?;
        let seed = seed
            .parse()
            .context("the node id in the join token is not 64 hex digits")?;
        if addr.is_empty() {
            bail!("the join token has no address");
        }
        Ok(JoinToken {
            cluster: cluster.0,
            seed,
            addr: addr.to_string(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}@{}",
            lichen_crdt::NodeId(self.cluster),
            self.seed,
            self.addr
        )
    }
}

/// The default data directory: `$LICHEN_DATA_DIR`, else `$XDG_DATA_HOME/lichen`, else
/// `$HOME/.local/share/lichen`, else `./lichen-data`.
pub(crate) fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LICHEN_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("lichen");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/lichen");
    }
    PathBuf::from("lichen-data")
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Resolve `host:port` (names allowed) to one socket address.
pub(crate) fn resolve_addr(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("`{s}` is not a host:port address"))?
        .next()
        .with_context(|| format!("`{s}` resolves to no address"))
}

impl Config {
    /// Read the config file (if any) and merge it with the flags; validate everything.
    pub(crate) fn resolve(o: &Overrides) -> Result<Config> {
        let file = match &o.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::resolve_with(o, file)
    }

    fn resolve_with(o: &Overrides, f: FileConfig) -> Result<Config> {
        let data_dir = o
            .data_dir
            .clone()
            .or(f.data_dir.clone())
            .unwrap_or_else(default_data_dir);
        let name = o
            .name
            .clone()
            .or(f.name.clone())
            .unwrap_or_else(default_name);
        if let Err(e) = lichen_crdt::validate_name(&name) {
            bail!("invalid `name`: {e} (set it with --name or `name` in the config file)");
        }
        let listen_s = o
            .listen
            .clone()
            .or(f.listen.clone())
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_PEER_PORT}"));
        let listen = resolve_addr(&listen_s).context("invalid `listen`")?;
        let api_s = o
            .api
            .clone()
            .or(f.api.clone())
            .unwrap_or_else(|| DEFAULT_API.to_string());
        let api = resolve_addr(&api_s).context("invalid `api`")?;
        if !api.ip().is_loopback() {
            bail!(
                "`api` must be a loopback address (the API serves local clients only): got {api}"
            );
        }
        let api_max_connections = f.api_max_connections.unwrap_or(DEFAULT_API_MAX_CONNECTIONS);
        if !(4..=65_536).contains(&api_max_connections) {
            bail!("api_max_connections must be between 4 and 65536, not {api_max_connections}");
        }
        let api_idle_timeout = Duration::from_millis(f.api_idle_timeout_ms.unwrap_or(10_000));
        if api_idle_timeout < Duration::from_millis(100)
            || api_idle_timeout > Duration::from_secs(3600)
        {
            bail!("api_idle_timeout_ms must be between 100 and 3600000");
        }
        let mut advertise = if o.advertise.is_empty() {
            f.advertise.clone().unwrap_or_default()
        } else {
            o.advertise.clone()
        };
        if advertise.is_empty() && !listen.ip().is_unspecified() {
            advertise.push(listen.to_string());
        }
        for a in &advertise {
            // The membership rule (every node checks it) comes first: an address it refuses
            // could not be published.
            lichen_crdt::validate_addr(a)
                .map_err(anyhow::Error::msg)
                .and_then(|()| resolve_addr(a))
                .with_context(|| format!("invalid advertise address `{a}`"))?;
        }
        if advertise.len() > lichen_crdt::membership::MAX_MEMBER_ADDRS {
            bail!(
                "at most {} advertise addresses",
                lichen_crdt::membership::MAX_MEMBER_ADDRS
            );
        }
        let log_format = match o
            .log_format
            .as_deref()
            .or(f.log_format.as_deref())
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => bail!("log_format must be `text` or `json`, not `{other}`"),
        };
        let log = f.log.clone().unwrap_or_else(|| "info".to_string());
        tracing_subscriber::EnvFilter::try_new(&log)
            .with_context(|| format!("invalid log filter `{log}`"))?;
        let fsync = match f.fsync.as_deref().unwrap_or("local") {
            "local" => Fsync::Local,
            "always" => Fsync::Always,
            "never" => Fsync::Never,
            other => bail!("fsync must be `local`, `always` or `never`, not `{other}`"),
        };
        let wal_checkpoint_pages = f.wal_checkpoint_pages.unwrap_or(DEFAULT_WAL_PAGES);
        if !(100..=1_000_000).contains(&wal_checkpoint_pages) {
            bail!(
                "wal_checkpoint_pages must be between 100 and 1000000, not {wal_checkpoint_pages}"
            );
        }
        let max_loaded_docs = f
            .max_loaded_docs
            .unwrap_or(lichen_crdt::DEFAULT_MAX_LOADED_DOCS);
        if !(1..=1_000_000).contains(&max_loaded_docs) {
            bail!("max_loaded_docs must be between 1 and 1000000, not {max_loaded_docs}");
        }
        let scrub_rows_per_second = f.scrub_rows_per_second.unwrap_or(200);
        if scrub_rows_per_second > 1_000_000 {
            bail!(
                "scrub_rows_per_second must be between 0 and 1000000, not {scrub_rows_per_second}"
            );
        }
        let anti_entropy = Duration::from_millis(f.sync.anti_entropy_ms.unwrap_or(1000));
        if anti_entropy < Duration::from_millis(50) || anti_entropy > Duration::from_secs(3600) {
            bail!("sync.anti_entropy_ms must be between 50 and 3600000");
        }
        let fanout = f.sync.fanout.unwrap_or(SyncConfig::default().fanout);
        if fanout == 0 || fanout > 64 {
            bail!("sync.fanout must be between 1 and 64");
        }
        let hold_writes = Duration::from_millis(f.sync.hold_writes_ms.unwrap_or(5000));
        if hold_writes > Duration::from_secs(3600) {
            bail!("sync.hold_writes_ms must be between 0 and 3600000");
        }
        let join = o.join.as_deref().map(JoinToken::parse).transpose()?;
        let base = o
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let api_read_token_file = f.api_read_token_file.as_ref().map(|p| base.join(p));
        let api_metrics_open = f.api_metrics_open.unwrap_or(false);
        let api_socket_group = f.api_socket_group.clone();
        if let Some(g) = &api_socket_group {
            crate::server::group_id(g).context("invalid `api_socket_group`")?;
        }
        let bindings = f
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Binding::resolve(b, &base).with_context(|| format!("[[bind]] #{}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut seen = std::collections::BTreeSet::new();
        for b in &bindings {
            if !seen.insert(b.file.clone()) {
                bail!("file {} is bound twice", b.file.display());
            }
        }
        Ok(Config {
            data_dir,
            name,
            listen,
            advertise,
            api,
            api_max_connections,
            api_idle_timeout,
            api_read_token_file,
            api_metrics_open,
            api_socket_group,
            log_format,
            log,
            fsync,
            wal_checkpoint_pages,
            max_loaded_docs,
            scrub_rows_per_second,
            anti_entropy,
            fanout,
            hold_writes,
            join,
            bindings,
        })
    }
}

pub(crate) fn read_file(p: &Path) -> Result<FileConfig> {
    let meta =
        std::fs::metadata(p).with_context(|| format!("cannot read config {}", p.display()))?;
    if meta.len() > 1 << 20 {
        bail!("config {} is larger than 1 MiB", p.display());
    }
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read config {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_without_a_file() {
        let c = Config::resolve_with(&Overrides::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen.port(), DEFAULT_PEER_PORT);
        assert!(c.api.ip().is_loopback());
        assert_eq!(c.fsync, Fsync::Local);
        assert_eq!(c.hold_writes, Duration::from_secs(5));
        assert_eq!(c.wal_checkpoint_pages, DEFAULT_WAL_PAGES);
        assert_eq!(c.max_loaded_docs, lichen_crdt::DEFAULT_MAX_LOADED_DOCS);
        assert!(c.advertise.is_empty());
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let f: FileConfig = toml::from_str("api = \"0.0.0.0:1\"").unwrap();
        let e = Config::resolve_with(&Overrides::default(), f).unwrap_err();
        assert!(format!("{e:#}").contains("loopback"), "{e:#}");
        let f: FileConfig = toml::from_str("fsync = \"sometimes\"").unwrap();
        assert!(Config::resolve_with(&Overrides::default(), f).is_err());
        let base = Config::resolve_with(&Overrides::default(), FileConfig::default()).unwrap();
        let f: FileConfig = toml::from_str(
            "wal_checkpoint_pages = 5000\nmax_loaded_docs = 7\nlog = \"debug\"\n[sync]\nfanout = 3",
        )
        .unwrap();
        let new = Config::resolve_with(&Overrides::default(), f).unwrap();
        let names = |v: Vec<SettingChange>| v.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(base.restart_only_changes(&new)),
            ["wal_checkpoint_pages", "sync.fanout"]
        );
        let live: Vec<SettingChange> = base.changes(&new).into_iter().filter(|c| c.live).collect();
        assert_eq!(names(live.clone()), ["log", "max_loaded_docs"]);
        assert_eq!(
            (live[1].old.as_str(), live[1].new.as_str()),
            (
                lichen_crdt::DEFAULT_MAX_LOADED_DOCS.to_string().as_str(),
                "7"
            )
        );
        assert!(base.restart_only_changes(&base).is_empty());
        assert!(base.changes(&base).is_empty());
        let f: FileConfig = toml::from_str("max_loaded_docs = 0").unwrap();
        let e = Config::resolve_with(&Overrides::default(), f).unwrap_err();
        assert!(format!("{e:#}").contains("max_loaded_docs"), "{e:#}");
        let f: FileConfig = toml::from_str("wal_checkpoint_pages = 10").unwrap();
        let e = Config::resolve_with(&Overrides::default(), f).unwrap_err();
        assert!(format!("{e:#}").contains("wal_checkpoint_pages"), "{e:#}");
        let f: FileConfig = toml::from_str("[sync]\nhold_writes_ms = 99999999").unwrap();
        let e = Config::resolve_with(&Overrides::default(), f).unwrap_err();
        assert!(format!("{e:#}").contains("sync.hold_writes_ms"), "{e:#}");
        assert!(toml::from_str::<FileConfig>("unknown_key = 1").is_err());
    }

    #[test]
    fn join_tokens_round_trip() {
        let t = JoinToken {
            cluster: [1; 32],
            seed: lichen_crdt::NodeId([2; 32]),
            addr: "127.0.0.1:7420".into(),
        };
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        assert!(JoinToken::parse("nonsense").is_err());
    }
}
