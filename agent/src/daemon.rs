//! `lichen run`: the daemon. Resolves the configuration, opens (or creates, or joins) the
//! store, starts the transport, the node task, the file bindings and the HTTP API, then waits
//! for signals: SIGTERM/SIGINT shut down cleanly (every acknowledged write is already
//! durable; the node answers what is queued and closes the store), SIGHUP reloads the
//! config file (an invalid one is reported and the old one kept): the settings that can
//! change while running are applied, each other changed setting is logged (name, old, new)
//! and listed by `status` as `restart_pending` until the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lichen_crdt::{NodeId, SecretKey, Store, StoreError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing_subscriber::{reload, EnvFilter};

use crate::config::{Config, JoinToken, LogFormat, Overrides};
use crate::metrics::Metrics;
use crate::node::{self, Gate, LiveSettings, NodeParts};

/// Handle to change the log filter at run time (SIGHUP).
pub(crate) type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Install the tracing subscriber. `RUST_LOG` wins over the config's `log`.
pub(crate) fn init_logging(format: LogFormat, filter: &str) -> LogHandle {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        // Colour only on a terminal: a log file or a journal must not get escape codes.
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    handle
}

/// File names inside the data directory.
pub(crate) fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.key")
}
fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("lichen.db")
}
/// Left by `lichen restore --with-key`; while it exists the node writes nothing before it has
/// caught up with a peer (removed then). See `node::NodeParts::restored`.
pub(crate) const RESTORED_MARKER: &str = "restored-with-key";
/// The database file of a data directory (for `lichen restore`).
pub(crate) fn db_file(data_dir: &Path) -> PathBuf {
    db_path(data_dir)
}
fn seeds_path(data_dir: &Path) -> PathBuf {
    data_dir.join("seeds")
}

/// Fresh secret bytes from the OS.
pub(crate) fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(seed)
}

/// Create the data directory (mode 0700) and load or generate the node key.
pub(crate) fn load_or_create_key(data_dir: &Path) -> Result<(SecretKey, bool)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = key_path(data_dir);
    if path.exists() {
        return Ok((SecretKey::read_file(&path)?, false));
    }
    let key = SecretKey::from_seed(random_seed()?);
    key.write_file(&path)?;
    Ok((key, true))
}

/// Open the store, or create a new cluster, or prepare to join one. Returns the store and
/// whether a new cluster was founded.
pub(crate) fn open_store(cfg: &Config, key: &SecretKey) -> Result<(Store, bool)> {
    let path = db_path(&cfg.data_dir);
    if path.exists() {
        let expected = cfg.join.as_ref().map(|j| j.cluster);
        let store = Store::open(&path, expected).map_err(|e| match e {
            StoreError::WrongCluster { .. } => anyhow::anyhow!(
                "{e}: this data directory belongs to another cluster; use another --data-dir to join a new one"
            ),
            other => anyhow::Error::new(other),
        })?;
        return Ok((store, false));
    }
    match &cfg.join {
        Some(j) => {
            let store = Store::join(&path, j.cluster)?;
            save_seed(&cfg.data_dir, j)?;
            Ok((store, false))
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            Ok((Store::create(&path, key, &cfg.name, now)?, true))
        }
    }
}

fn save_seed(data_dir: &Path, j: &JoinToken) -> Result<()> {
    let line = format!("{}@{}\n", j.seed, j.addr);
    let p = seeds_path(data_dir);
    let mut existing = std::fs::read_to_string(&p).unwrap_or_default();
    if !existing.contains(line.trim()) {
        existing.push_str(&line);
        std::fs::write(&p, existing).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn load_seeds(data_dir: &Path) -> Vec<(NodeId, String)> {
    std::fs::read_to_string(seeds_path(data_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (id, addr) = l.trim().split_once('@')?;
            Some((id.parse().ok()?, addr.to_string()))
        })
        .collect()
}

/// Load (or create) the key, open (or create) the store and apply the store settings.
fn prepare_store(cfg: &Config) -> Result<(SecretKey, bool, Store, bool)> {
    let (key, new_key) = load_or_create_key(&cfg.data_dir)?;
    let (mut store, founded) = open_store(cfg, &key)?;
    let (local, remote) = cfg.fsync.policy();
    store.set_fsync_policy(local, remote)?;
    if !local {
        tracing::warn!(
            "fsync = \"never\": after a power loss this node may lose writes it acknowledged, and writing again before it has resynced can flag its key as equivocating; use it for tests only"
        );
    }
    store.set_wal_autocheckpoint(cfg.wal_checkpoint_pages)?;
    store.set_max_loaded_docs(cfg.max_loaded_docs);
    // The agent is the database's only user while it runs: hold it (no per-transaction file
    // locks; a second agent on this data directory is refused).
    store.hold_exclusive()?;
    Ok((key, new_key, store, founded))
}

/// The token another node uses to join through this one.
pub(crate) fn join_token(
    cfg: &Config,
    store: &Store,
    me: NodeId,
    listen: std::net::SocketAddr,
) -> String {
    let addr = cfg.advertise.first().cloned().unwrap_or_else(|| {
        if listen.ip().is_unspecified() {
            format!("127.0.0.1:{}", listen.port())
        } else {
            listen.to_string()
        }
    });
    JoinToken {
        cluster: store.cluster_id(),
        seed: me,
        addr,
    }
    .to_string()
}

/// Run the daemon until a shutdown signal.
pub(crate) async fn run(overrides: Overrides, cfg: Config, log: LogHandle) -> Result<()> {
    // API connections, SQLite, the QUIC socket, file watches and rendered files all take
    // descriptors; the usual soft limit of 1,024 is too tight to share (see `server`).
    match crate::server::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            tracing::debug!(before, after, "raised the soft file descriptor limit")
        }
        Ok((before, _)) => {
            tracing::debug!(
                limit = before,
                "file descriptor limit unchanged (hard limit)"
            )
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    // Files and SQLite off the runtime, like everything on the store afterwards (the node
    // thread): nothing else runs yet, but a slow disk must not look like a hung runtime.
    let (key, new_key, store, founded) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare_store(&cfg))
            .await
            .context("opening the store failed")??
    };
    let me = key.node_id();
    if new_key {
        tracing::info!(node = %me, path = %key_path(&cfg.data_dir).display(), "generated a new node key");
    }
    let gate = Arc::new(Gate::default());
    let tcfg = transport_config(cfg.listen, key.seed(), store.cluster_id());
    let (endpoint, net_events) = lichen_transport::Endpoint::bind(tcfg, gate.clone())
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (port in use? set --listen)",
                cfg.listen
            )
        })?;
    let listen = endpoint.local_addr();
    let token = join_token(&cfg, &store, me, listen);
    let metrics = Arc::new(Metrics::default());
    let api = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| {
            format!(
                "cannot serve the API on {} (another agent running? set --api)",
                cfg.api
            )
        })?;
    let api_addr = api.local_addr()?;
    let (api_token, token_created) =
        crate::auth::ensure_token(&crate::auth::token_path(&cfg.data_dir))?;
    if token_created {
        tracing::info!(path = %crate::auth::token_path(&cfg.data_dir).display(), "generated the API token");
    }
    let read_token = cfg
        .api_read_token_file
        .as_deref()
        .map(|p| crate::auth::ensure_token(p).map(|(t, _)| t))
        .transpose()?;
    let socket_path = crate::auth::socket_path(&cfg.data_dir);
    let unix_api = crate::server::bind_unix(&socket_path, cfg.api_socket_group.as_deref())?;

    let member = store.membership().is_active(&me);
    let mut seeds = load_seeds(&cfg.data_dir);
    if let Some(j) = &cfg.join {
        if !seeds.iter().any(|(id, _)| *id == j.seed) {
            seeds.push((j.seed, j.addr.clone()));
        }
    }
    let sync = lichen_crdt::sync::Config {
        anti_entropy_interval_ms: cfg.anti_entropy.as_millis() as u64,
        anti_entropy_jitter_ms: (cfg.anti_entropy.as_millis() as u64) / 4,
        fanout: cfg.fanout,
        ..Default::default()
    };
    let marker = cfg.data_dir.join(RESTORED_MARKER);
    let was_restored = marker.exists();
    let restored = (was_restored && !overrides.allow_isolated_writes).then_some(marker);
    if restored.is_some() {
        tracing::warn!("restored from a backup with this node's key: writes are refused until it has caught up with a peer (--allow-isolated-writes to accept the risk of an equivocation)");
    } else if was_restored {
        tracing::warn!("restored from a backup with this node's key, started with --allow-isolated-writes: it may sign changes at sequence numbers its key already used, and other nodes would then flag the key for equivocation");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (handle, node_thread) = node::spawn(
        NodeParts {
            store,
            key: key.clone(),
            name: cfg.name.clone(),
            advertise: cfg.advertise.clone(),
            endpoint: endpoint.clone(),
            net_events,
            gate,
            seeds,
            sync,
            metrics: metrics.clone(),
            join_token: Some(token.clone()),
            hold_writes: cfg.hold_writes,
            scrub_rows_per_second: cfg.scrub_rows_per_second,
            restored,
        },
        shutdown_rx.clone(),
    )
    .context("cannot start the node thread")?;

    banner(&BannerFacts {
        json: cfg.log_format == LogFormat::Json,
        me,
        name: &cfg.name,
        data_dir: &cfg.data_dir,
        listen,
        api: api_addr,
        founded,
        member,
        token: &token,
    });

    let bindings = crate::render::Manager::start(
        cfg.bindings.clone(),
        handle.clone(),
        shutdown_rx.clone(),
        &cfg.data_dir.join("bindings"),
    );

    let tokens = crate::auth::Tokens {
        write: api_token,
        read: read_token,
        metrics_open: cfg.api_metrics_open,
        token_path: crate::auth::token_path(&cfg.data_dir),
        socket_path: socket_path.clone(),
    };
    let router = crate::api::router(
        handle.clone(),
        cfg.api_idle_timeout,
        crate::auth::Access::Tokens(Arc::new(tokens)),
    );
    let unix_router = crate::api::router(
        handle.clone(),
        cfg.api_idle_timeout,
        crate::auth::Access::Socket,
    );
    let limits = crate::server::Limits {
        max_connections: cfg.api_max_connections,
        idle_timeout: cfg.api_idle_timeout,
    };
    let server = tokio::spawn(crate::server::serve(
        api,
        router,
        limits,
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let unix_server = tokio::spawn(crate::server::serve(
        unix_api,
        unix_router,
        limits,
        metrics.clone(),
        shutdown_rx.clone(),
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let started = cfg.clone();
    let mut current = cfg;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                // Reading the file (and resolving `advertise` names) blocks: off the runtime.
                let o = overrides.clone();
                let resolved = tokio::task::spawn_blocking(move || Config::resolve(&o))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("the reload task failed: {e}")));
                match resolved {
                    Ok(new) => {
                        if let Err(e) = log.modify(|f| *f = EnvFilter::new(&new.log)) {
                            tracing::warn!(error = %e, "could not change the log filter");
                        }
                        // Against the configuration the agent started with: a change stays
                        // pending (and reported at every reload) until the next start.
                        let pending = started.restart_only_changes(&new);
                        for c in &pending {
                            tracing::warn!(setting = c.name, old = %c.old, new = %c.new, "changed setting: it will take effect at the next start");
                        }
                        for c in current.changes(&new).into_iter().filter(|c| c.live) {
                            tracing::info!(setting = c.name, old = %c.old, new = %c.new, "changed setting applied");
                        }
                        let live = LiveSettings {
                            max_loaded_docs: new.max_loaded_docs,
                            scrub_rows_per_second: new.scrub_rows_per_second,
                        };
                        let restart_pending = pending.iter().map(|c| c.name.to_string()).collect();
                        if let Err(e) = handle
                            .ask(|reply| node::Command::Reload { live, restart_pending, reply })
                            .await
                        {
                            tracing::warn!(error = %e.error, "the node did not take the reloaded settings");
                        }
                        bindings.reload(new.bindings.clone());
                        current = new;
                        metrics.config_reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => {
                        metrics.config_reload_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(error = format!("{e:#}"), "new configuration is invalid; keeping the old one");
                    }
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    let _ = unix_server.await;
    let _ = std::fs::remove_file(&socket_path);
    bindings.stop().await;
    node_thread.join().await.map_err(anyhow::Error::msg)?;
    endpoint.close().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// What the start-up banner says.
struct BannerFacts<'a> {
    json: bool,
    me: NodeId,
    name: &'a str,
    data_dir: &'a Path,
    listen: std::net::SocketAddr,
    api: std::net::SocketAddr,
    founded: bool,
    member: bool,
    token: &'a str,
}

/// The banner: what happened and what to do next. With `log_format = "json"` it is one
/// log event (every line the agent prints is then JSON); otherwise lines for a person.
fn banner(f: &BannerFacts) {
    let (me, api, token) = (f.me, f.api, f.token);
    let next = if f.member {
        format!("to add a node: on it run `lichen run --join {token}`, then here `lichen members add <its node id> --role writer --name <name>`")
    } else {
        format!(
            "this node is not a member yet: on an admin run `lichen members add {me} --role writer --name {}`",
            f.name
        )
    };
    if f.json {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            node = %me,
            data_dir = %f.data_dir.display(),
            peers = %f.listen,
            api = %format!("http://{api}"),
            founded = f.founded,
            member = f.member,
            join_token = token,
            next = %next,
            "lichen started"
        );
        return;
    }
    eprintln!("lichen {} — node {me}", env!("CARGO_PKG_VERSION"));
    eprintln!("  data dir : {}", f.data_dir.display());
    eprintln!("  peers    : QUIC on {}", f.listen);
    eprintln!(
        "  API      : http://{api} with the token in {} (the CLI reads it: try `lichen --data-dir {} status`), or the unix socket {}",
        crate::auth::token_path(f.data_dir).display(),
        f.data_dir.display(),
        crate::auth::socket_path(f.data_dir).display()
    );
    if f.founded {
        eprintln!("  founded a new cluster; this node is its root admin");
    }
    if f.member {
        eprintln!("  to add a node: on it run   lichen run --join {token}");
        eprintln!("                 then here   lichen members add <its node id> --role writer --name <name>");
    } else {
        eprintln!("  {next}");
    }
}

/// `lichen init`: prepare a data directory (key, and for a joining node its store), print the
/// node id and the next step.
pub(crate) fn init(cfg: &Config) -> Result<()> {
    let (key, created) = load_or_create_key(&cfg.data_dir)?;
    crate::auth::ensure_token(&crate::auth::token_path(&cfg.data_dir))?;
    let me = key.node_id();
    if cfg.join.is_none() && !db_path(&cfg.data_dir).exists() {
        println!("{me}");
        eprintln!(
            "key {} in {}; `lichen run` founds a new cluster, `lichen run --join <token>` joins one",
            if created { "created" } else { "kept" },
            cfg.data_dir.display()
        );
        return Ok(());
    }
    if let Some(j) = &cfg.join {
        if db_path(&cfg.data_dir).exists() {
            let s = Store::open(&db_path(&cfg.data_dir), Some(j.cluster))?;
            drop(s);
        } else {
            Store::join(&db_path(&cfg.data_dir), j.cluster)?;
        }
        save_seed(&cfg.data_dir, j)?;
    } else if !db_path(&cfg.data_dir).exists() {
        bail!("nothing to do");
    }
    println!("{me}");
    eprintln!(
        "ready to join. Next: on an admin run `lichen members add {me} --role writer --name {}`, and here `lichen run`",
        cfg.name
    );
    Ok(())
}

/// The transport's settings: a frame carries one sync message, so the frame limit is the sync
/// wire's message limit (a larger frame could only carry a message every peer refuses).
fn transport_config(
    listen: std::net::SocketAddr,
    seed: [u8; 32],
    cluster: [u8; 32],
) -> lichen_transport::Config {
    let mut tcfg = lichen_transport::Config::new(listen, seed, cluster);
    tcfg.keep_alive = std::time::Duration::from_secs(5);
    tcfg.idle_timeout = std::time::Duration::from_secs(20);
    tcfg.max_frame_len = lichen_crdt::sync::wire::MAX_MESSAGE_BYTES;
    tcfg
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_transports_frame_limit_is_the_sync_wires_message_limit() {
        let t = super::transport_config("127.0.0.1:0".parse().unwrap(), [1; 32], [2; 32]);
        assert_eq!(t.max_frame_len, lichen_crdt::sync::wire::MAX_MESSAGE_BYTES);
    }
}
