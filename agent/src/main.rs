//! `lichen`: the agent binary. One process per node: `lichen run` is the daemon; every other
//! command is a client of the local agent's HTTP API (see [`api`]), over its unix socket or
//! TCP with the API token ([`client`]); `audit verify`, `backup verify` and `restore` run
//! without an agent.
//!
//! Flow: clap parses ([`cli`]) → [`config::Config::resolve`] validates → only then are runtime
//! handles built ([`daemon::run`]). One error kind ([`error::ErrorKind`]) gives both the HTTP
//! status and the CLI's exit code (table in the README).

mod alloc;
mod api;
mod auth;
mod backup;
mod cli;
mod client;
mod config;
mod daemon;
mod demo;
mod error;
mod exec;
mod history;
mod history_cli;
mod metrics;
mod node;
mod render;
mod server;
mod views;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};

use crate::cli::{AuditCommand, Cli, Command, MembersCommand, RunArgs};
use crate::client::{doc_url, with_query, Client, Endpoint};
use crate::config::{Config, Overrides};
use crate::error::{exit, ApiError, ErrorKind};
use crate::views::{
    AddMemberRequest, DocValue, HashView, HistoryView, MemberView, PatchMemberRequest, StatusView,
    ValueView, WriteView,
};

/// `lichen` with no command: the `run` flags, read from the environment only.
#[derive(Parser)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

fn overrides(a: &RunArgs, cli: &Cli) -> Overrides {
    Overrides {
        config: cli.config.clone(),
        data_dir: cli.data_dir.clone(),
        name: a.name.clone(),
        listen: a.listen.clone(),
        advertise: a.advertise.clone(),
        api: cli.api.clone(),
        log_format: a.log_format.clone(),
        join: a.join.clone(),
        allow_isolated_writes: a.allow_isolated_writes,
    }
}

/// The data directory a CLI command looks in for the token and the socket (`--data-dir` or
/// `LICHEN_DATA_DIR`, else `data_dir` in `--config`, else the default one), and the TCP
/// address it falls back to (`api` in `--config`, else the default).
fn cli_places(cli: &Cli) -> (PathBuf, String) {
    let file = cli
        .config
        .as_deref()
        .and_then(|c| config::read_file(c).ok())
        .unwrap_or_default();
    let dir = cli
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(config::default_data_dir);
    let api = file.api.unwrap_or_else(|| config::DEFAULT_API.to_string());
    (dir, api)
}

/// The client a CLI command uses (the rules are in [`client`]'s docs and the README).
fn make_client(cli: &Cli) -> Result<Client, ApiError> {
    let (dir, default_api) = cli_places(cli);
    let endpoint = match cli.api.as_deref() {
        Some(a) => match a.strip_prefix("unix:") {
            Some(p) => Endpoint::Unix(PathBuf::from(p)),
            None => Endpoint::Tcp(a.to_string()),
        },
        None => {
            let sock = auth::socket_path(&dir);
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                Endpoint::Unix(sock)
            } else {
                Endpoint::Tcp(default_api)
            }
        }
    };
    if matches!(endpoint, Endpoint::Unix(_)) {
        return Ok(Client::new(endpoint, None));
    }
    if let Some(f) = &cli.token_file {
        let t =
            auth::read_token(f).map_err(|e| ApiError::new(ErrorKind::Usage, format!("{e:#}")))?;
        return Ok(Client::new(endpoint, Some(t)));
    }
    if let Some(t) = std::env::var("LICHEN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Client::new(endpoint, Some(t.trim().to_string())));
    }
    // Without a readable token file the request goes out without one, and the agent's
    // answer (401) says where the token is.
    let token = auth::read_token(&auth::token_path(&dir)).ok();
    Ok(Client::new(endpoint, token))
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let code = match &cli.command {
        // No command: `run` with no flags, but still honouring LICHEN_CONFIG, LICHEN_DATA_DIR…
        None => run_daemon(RunOnly::parse_from(["lichen"]).args, &cli),
        Some(Command::Run(a)) => run_daemon(a.clone(), &cli),
        Some(Command::Demo { keep }) => report(demo::run(*keep)),
        Some(Command::Init(a)) => {
            report(Config::resolve(&overrides(a, &cli)).and_then(|c| daemon::init(&c)))
        }
        Some(Command::Keygen { out }) => report((|| {
            let key = lichen_crdt::SecretKey::from_seed(daemon::random_seed()?);
            key.write_file(out)?;
            println!("{}", key.node_id());
            Ok(())
        })()),
        Some(Command::Backup(a)) => report(backup::run_backup(
            || make_client(&cli),
            &cli_places(&cli).0,
            cli.json,
            a,
        )),
        Some(Command::Restore(a)) => match cli.data_dir.as_deref() {
            Some(dir) => report(backup::run_restore(a, dir)),
            None => {
                eprintln!("error: say where to build the new data directory: lichen restore FILE --data-dir D");
                exit::USAGE
            }
        },
        Some(Command::Exec(opts)) => match make_client(&cli) {
            Ok(c) => exec::run(c, opts.clone()),
            Err(e) => {
                eprintln!("error: {e}");
                e.code()
            }
        },
        Some(Command::Render(opts)) => match make_client(&cli)
            .and_then(|c| render::dryrun::run(&c, cli.config.as_deref(), opts.clone()))
        {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {}", e.message());
                e.code()
            }
        },
        // Offline: no agent, no data directory.
        Some(Command::Audit {
            command: AuditCommand::Verify { file, cluster },
        }) => match history_cli::audit_verify(file, cluster, cli.json) {
            Ok(text) => {
                print!("{text}");
                if cli.json {
                    println!();
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILURE
            }
        },
        Some(cmd) => match make_client(&cli).and_then(|c| client_command(&c, cmd, cli.json)) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {}", e.message());
                e.code()
            }
        },
    };
    std::process::exit(code);
}

/// The exit code of a command that fails with context: an [`ApiError`] in the chain (the
/// agent's answer, an unreachable agent) gives its kind's code, anything else is a failure.
fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.chain()
                .find_map(|c| c.downcast_ref::<ApiError>())
                .map_or(exit::FAILURE, ApiError::code)
        }
    }
}

/// An error of `lichen run` before logging is set up: a JSON line if JSON logs were asked
/// for (so that every line the daemon prints parses), else plain text.
fn early_error(json: bool, e: &anyhow::Error) {
    if json {
        let line =
            json!({"level": "ERROR", "target": "lichen", "fields": {"message": format!("{e:#}")}});
        eprintln!("{line}");
    } else {
        eprintln!("error: {e:#}");
    }
}

fn run_daemon(a: RunArgs, cli: &Cli) -> i32 {
    let o = overrides(&a, cli);
    let cfg = match Config::resolve(&o) {
        Ok(c) => c,
        Err(e) => {
            early_error(o.log_format.as_deref() == Some("json"), &e);
            return exit::USAGE;
        }
    };
    let json_logs = cfg.log_format == config::LogFormat::Json;
    let log = daemon::init_logging(cfg.log_format, &cfg.log);
    alloc::start_background_purge();
    // One thread runs the async side of the agent: the HTTP API, the QUIC endpoint (drivers,
    // keep-alives, dialers, stream readers), the file bindings. They mostly hand data to the
    // node, which runs on its own thread (`node::spawn`) so that store work (SQLite, fsync,
    // checkpoints) never stalls them. Across more worker threads every hand-over was a futex
    // wake and a context switch for no gain. Big received batches verify on scoped threads
    // (`authenticate_all`); file writes run on the blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            early_error(json_logs, &e);
            return exit::FAILURE;
        }
    };
    match rt.block_on(daemon::run(o, cfg, log)) {
        Ok(()) => exit::OK,
        Err(e) => {
            // Through the log, so that it is JSON with `log_format = "json"`.
            tracing::error!(error = format!("{e:#}"), "the agent stopped on an error");
            if !json_logs {
                eprintln!("error: {e:#}");
            }
            exit::FAILURE
        }
    }
}

fn usage(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Usage, msg)
}

fn print(v: &impl serde::Serialize, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// A `DOC` that ends in `/` stands for `--prefix DOC` (no document name ends in `/`).
fn prefix_of(doc: &Option<String>, prefix: &Option<String>) -> Option<String> {
    prefix
        .clone()
        .or_else(|| doc.clone().filter(|d| d.ends_with('/')))
}

/// An `If-Match` header for `--if-match HEADS`.
fn if_match_header(h: &Option<String>) -> Vec<(&'static str, String)> {
    h.iter()
        .map(|h| ("If-Match", format!("\"{}\"", h.trim_matches('"'))))
        .collect()
}

fn print_write(r: &WriteView, as_json: bool) {
    if as_json {
        print(r, true);
    } else if !r.changed {
        eprintln!("unchanged");
    }
}

/// Run one client command; a failure's kind is the exit code.
fn client_command(c: &Client, cmd: &Command, as_json: bool) -> Result<(), ApiError> {
    match cmd {
        Command::Put {
            doc,
            path,
            value,
            if_match,
        } => {
            let v: Value = serde_json::from_str(value).map_err(|e| {
                usage(format!(
                    "VALUE must be JSON ({e}); for a string, quote it: lichen put {doc} {path} '\"{value}\"'"
                ))
            })?;
            let h = if_match_header(if_match);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r: WriteView = c.send_json("PUT", &doc_url(doc, path)?, &h, Some(&v))?;
            print_write(&r, as_json);
        }
        Command::Get {
            doc,
            path,
            raw,
            prefix,
            at,
        } => {
            if let Some(at) = at {
                let doc = doc.as_deref().unwrap_or_default();
                let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
                let r: Value = c.get(&with_query(&url, &[("at", Some(at))]))?;
                print(if as_json { &r } else { &r["value"] }, as_json);
                return Ok(());
            }
            if let Some(p) = prefix_of(doc, prefix) {
                if path.is_some() {
                    return Err(usage(
                        "give no PATH with a prefix: every whole document under it is printed",
                    ));
                }
                let r: std::collections::BTreeMap<String, DocValue> = c.get(&with_query(
                    "/v1/docs",
                    &[("prefix", Some(&p)), ("values", None)],
                ))?;
                if as_json {
                    print(&r, true);
                } else {
                    let values: std::collections::BTreeMap<&String, &Value> =
                        r.iter().map(|(d, v)| (d, &v.value)).collect();
                    print(&values, false);
                }
                return Ok(());
            }
            let doc = doc.as_deref().unwrap_or_default();
            let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
            if *raw {
                let (ct, text) = c.get_text(&with_query(&url, &[("raw", None)]))?;
                if ct.starts_with("text/plain") {
                    // The string as it is, with one newline after it unless it has one.
                    if text.ends_with('\n') {
                        print!("{text}");
                    } else {
                        println!("{text}");
                    }
                } else {
                    println!("{}", text.trim_end());
                }
                return Ok(());
            }
            let r: ValueView = c.get(&url)?;
            if as_json {
                print(&r, true);
            } else {
                print(&r.value, false);
            }
        }
        Command::Del {
            doc,
            path,
            all,
            if_match,
        } => {
            let path = match (path, all) {
                (Some(p), _) => p.as_str(),
                (None, true) => "",
                (None, false) => {
                    return Err(usage(format!(
                        "give the PATH to delete, or --all to delete every value of `{doc}`: lichen del {doc} --all"
                    )))
                }
            };
            let h = if_match_header(if_match);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r: WriteView = c.send_json("DELETE", &doc_url(doc, path)?, &h, None::<&Value>)?;
            if as_json {
                print(&r, true);
            }
        }
        Command::Ls { doc, path } => {
            let r: Vec<String> = match doc {
                None => c.get("/v1/docs")?,
                Some(d) => c.get(&with_query(
                    &doc_url(d, path.as_deref().unwrap_or_default())?,
                    &[("keys", None)],
                ))?,
            };
            if as_json {
                print(&r, true);
            } else {
                for i in r {
                    println!("{i}");
                }
            }
        }
        Command::Watch {
            doc,
            path,
            prefix,
            since,
            count,
        } => {
            let (url, by_prefix) = match prefix_of(doc, prefix) {
                Some(p) => {
                    if path.is_some() || since.is_some() {
                        return Err(usage("a prefix watch takes no PATH and no --since: it starts with every document's current value"));
                    }
                    (
                        with_query("/v1/docs", &[("prefix", Some(&p)), ("watch", None)]),
                        true,
                    )
                }
                None => {
                    let doc = doc.as_deref().unwrap_or_default();
                    let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
                    let mut q = vec![("watch", None)];
                    if let Some(s) = since {
                        q.push(("since", Some(s.as_str())));
                    }
                    (with_query(&url, &q), false)
                }
            };
            let mut seen = 0usize;
            c.sse(&url, |ev| {
                if as_json {
                    print(&ev, true);
                } else if by_prefix {
                    println!(
                        "{} {}",
                        ev.doc,
                        serde_json::to_string(&ev.value).unwrap_or_default()
                    );
                } else {
                    println!("{}", serde_json::to_string(&ev.value).unwrap_or_default());
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                seen += 1;
                count.is_none_or(|n| seen < n)
            })?;
        }
        Command::History { doc, path, limit } => {
            let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
            let l = limit.to_string();
            let r: Vec<HistoryView> =
                c.get(&with_query(&url, &[("history", None), ("limit", Some(&l))]))?;
            if as_json {
                print(&r, true);
            } else {
                for e in r {
                    let edits: Vec<String> = e
                        .edits
                        .iter()
                        .map(|x| match &x.value {
                            Some(v) => format!("{} {} = {}", x.action, x.path, v),
                            None => format!("{} {}", x.action, x.path),
                        })
                        .collect();
                    println!(
                        "{} {} ({}) #{}: {}",
                        short(&e.hash, 12),
                        e.author_name,
                        short(&e.author, 8),
                        e.seq,
                        edits.join("; ")
                    );
                }
            }
        }
        Command::Conflicts { doc, path } => {
            let r: Vec<Value> = c.get(&with_query(&doc_url(doc, path)?, &[("conflicts", None)]))?;
            print(&r, as_json);
        }
        Command::Members { command } => match command {
            MembersCommand::Ls => {
                let r: Vec<MemberView> = c.get("/v1/members")?;
                if as_json {
                    print(&r, true);
                } else {
                    for m in r {
                        let scopes = if m.scopes.is_empty() {
                            "all".to_string()
                        } else {
                            m.scopes.join(",")
                        };
                        println!(
                            "{}  {:8} {:16} scopes {:16} {}{}",
                            m.id,
                            m.role,
                            m.name,
                            scopes,
                            m.addrs.join(","),
                            if m.root { "  (root)" } else { "" }
                        );
                    }
                }
            }
            MembersCommand::Add {
                id,
                role,
                name,
                scopes,
                addrs,
            } => {
                let r: HashView = c.send_json(
                    "POST",
                    "/v1/members",
                    &[],
                    Some(&AddMemberRequest {
                        id: id.clone(),
                        name: name.clone(),
                        role: Some(role.clone()),
                        addrs: addrs.clone(),
                        scopes: scopes.clone(),
                    }),
                )?;
                if as_json {
                    print(&r, true);
                }
            }
            MembersCommand::Remove { id } => {
                let r: HashView = c.send_json(
                    "DELETE",
                    &format!("/v1/members/{}", client::encode(id)),
                    &[],
                    None::<&Value>,
                )?;
                if as_json {
                    print(&r, true);
                }
            }
            MembersCommand::Role { id, role } => {
                let r: HashView = c.send_json(
                    "PATCH",
                    &format!("/v1/members/{}", client::encode(id)),
                    &[],
                    Some(&PatchMemberRequest {
                        role: Some(role.clone()),
                        scopes: None,
                    }),
                )?;
                if as_json {
                    print(&r, true);
                }
            }
            MembersCommand::Set {
                id,
                role,
                scopes,
                all_docs,
            } => {
                let body = PatchMemberRequest {
                    role: role.clone(),
                    scopes: (!scopes.is_empty() || *all_docs).then(|| scopes.clone()),
                };
                if body == PatchMemberRequest::default() {
                    return Err(usage(
                        "nothing to change: give --role, --scope (repeatable) or --all-docs",
                    ));
                }
                let r: HashView = c.send_json(
                    "PATCH",
                    &format!("/v1/members/{}", client::encode(id)),
                    &[],
                    Some(&body),
                )?;
                if as_json {
                    print(&r, true);
                }
            }
        },
        Command::Diff {
            doc,
            path,
            from,
            to,
        } => {
            let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
            let mut q = vec![("diff", None), ("from", Some(from.as_str()))];
            if let Some(t) = to {
                q.push(("to", Some(t.as_str())));
            }
            let r: Value = c.get(&with_query(&url, &q))?;
            if as_json {
                print(&r, true);
            } else {
                print!("{}", history_cli::render_diff(&r));
            }
        }
        Command::Blame { doc, path } => {
            let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
            let r: Value = c.get(&with_query(&url, &[("blame", None)]))?;
            if as_json {
                print(&r, true);
            } else {
                print!("{}", history_cli::render_blame(&r));
            }
        }
        Command::Revert {
            doc,
            path,
            to,
            undo,
            force,
        } => {
            let url = doc_url(doc, path.as_deref().unwrap_or_default())?;
            let body = match (to, undo) {
                (Some(t), _) => json!({ "to": t }),
                (None, Some(u)) => json!({ "undo": u, "force": force }),
                (None, None) => return Err(usage("give --to HEADS or --undo HASH")),
            };
            let r: Value = c.send_json(
                "POST",
                &with_query(&url, &[("revert", None)]),
                &[],
                Some(&body),
            )?;
            if as_json {
                print(&r, true);
            } else {
                print!("{}", history_cli::render_write(&r));
            }
        }
        Command::Export { doc, format, out } => {
            let f: history::ExportFormat = format.parse().map_err(usage)?;
            let url = with_query(&doc_url(doc, "")?, &[("export", Some(format.as_str()))]);
            let mut bytes = c.get_bytes(&url)?;
            if f == history::ExportFormat::Json {
                // Pretty, with a final newline, like `get`.
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::new(
                        ErrorKind::Internal,
                        format!(
                            "the agent's JSON export does not parse ({e}); nothing was written"
                        ),
                    )
                })?;
                bytes = serde_json::to_vec_pretty(&v).map_err(|e| {
                    ApiError::new(
                        ErrorKind::Internal,
                        format!("cannot format the export: {e}"),
                    )
                })?;
                bytes.push(b'\n');
            }
            write_out(out.as_deref(), &bytes)?;
            if let (Some(o), true) = (out, as_json) {
                print(&json!({"file": o, "bytes": bytes.len()}), true);
            }
        }
        Command::Import { doc, file } => {
            // The agent takes at most MAX_BODY bytes: refuse a bigger file before reading it.
            let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            if len > api::MAX_BODY as u64 {
                return Err(ApiError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{} is {len} bytes; an import is at most {} bytes (split the document)",
                        file.display(),
                        api::MAX_BODY
                    ),
                ));
            }
            let bytes = std::fs::read(file).map_err(|e| {
                ApiError::new(
                    ErrorKind::Invalid,
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            let url = with_query(&doc_url(doc, "")?, &[("import", None)]);
            let r: Value = c.send_bytes("PUT", &url, "application/octet-stream", &bytes)?;
            if as_json {
                print(&r, true);
            } else {
                print!("{}", history_cli::render_write(&r));
            }
        }
        Command::Audit { command } => match command {
            AuditCommand::Export { doc, since, out } => {
                let url = format!("/v1/audit/{}", client::encode(doc));
                let url = match since {
                    Some(s) => with_query(&url, &[("since", Some(s.as_str()))]),
                    None => url,
                };
                let bytes = c.get_bytes(&url)?;
                write_out(Some(out), &bytes)?;
                if as_json {
                    print(&json!({"file": out, "bytes": bytes.len()}), true);
                } else {
                    eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
                }
            }
            // Handled in `main`, without an agent.
            AuditCommand::Verify { .. } => {}
        },
        Command::Status => {
            let r: StatusView = c.get("/v1/status")?;
            if as_json {
                print(&r, true);
            } else {
                print_status(&r);
            }
        }
        Command::Run(_)
        | Command::Init(_)
        | Command::Keygen { .. }
        | Command::Demo { .. }
        | Command::Exec(_)
        | Command::Render(_)
        | Command::Backup(_)
        | Command::Restore(_) => {}
    }
    Ok(())
}

/// Write `bytes` to `out` (standard output if `None`), atomically for a file.
fn write_out(out: Option<&std::path::Path>, bytes: &[u8]) -> Result<(), ApiError> {
    use std::io::Write;
    let fail = |what: &dyn std::fmt::Display, e: std::io::Error| {
        ApiError::new(ErrorKind::Internal, format!("cannot write {what}: {e}"))
    };
    match out {
        None => std::io::stdout()
            .write_all(bytes)
            .map_err(|e| fail(&"standard output", e)),
        Some(p) => {
            let tmp = p.with_extension("lichen-tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, p))
                .map_err(|e| fail(&p.display(), e))
        }
    }
}

/// The first `n` characters of `s` (ids and hashes are ASCII hex).
fn short(s: &str, n: usize) -> &str {
    s.get(..n.min(s.len())).unwrap_or(s)
}

fn print_status(r: &StatusView) {
    let node = &r.node;
    println!("node     {} ({}, {})", node.id, node.name, node.role);
    if node.revoked {
        println!(
            "REMOVED  an admin removed this node from the cluster: its key is revoked, its writes are refused and it no longer syncs (to take part again: a new data directory, then `lichen members add` on an admin)"
        );
    }
    println!("cluster  {}", r.cluster);
    println!("listen   {}", node.listen);
    println!(
        "join     lichen run --join {}",
        r.join_token.as_deref().unwrap_or("")
    );
    println!("peers");
    for p in &r.peers {
        println!(
            "  {} {:16} {:12} rtt {} last sync {}",
            short(&p.id, 16),
            p.name,
            if p.connected {
                "connected"
            } else {
                "disconnected"
            },
            p.rtt_ms
                .map(|x| format!("{x:.2} ms"))
                .unwrap_or_else(|| "-".into()),
            p.last_sync_ms_ago
                .map(|x| format!("{x} ms ago"))
                .unwrap_or_else(|| "never".into()),
        );
    }
    println!("documents");
    for d in &r.docs {
        let heads: Vec<&str> = d.heads.iter().map(|h| short(h, 12)).collect();
        println!(
            "  {:24} {:>6} changes  heads {}",
            d.doc,
            d.changes,
            heads.join(",")
        );
    }
    println!(
        "sync lag {} ms, pending {}",
        r.sync_lag_ms, r.pending_changes
    );
    if let Some(n) = r.writes_held {
        println!(
            "writes held: {n} (this node has not caught up with a peer since it started; see sync.hold_writes_ms)"
        );
    }
    if !r.restart_pending.is_empty() {
        println!(
            "restart pending: {} (changed in the config file; they apply at the next start)",
            r.restart_pending.join(", ")
        );
    }
    if !r.rejected.is_empty() {
        println!("rejected");
        for (k, v) in &r.rejected {
            println!("  {k}: {v}");
        }
    }
    if !r.store_errors.is_empty() {
        println!("not stored (disk full or database failure; see the log)");
        for (k, v) in &r.store_errors {
            println!("  {k}: {v}");
        }
    }
    let st = &r.storage;
    if st.corrupt_ever > 0 || st.quarantined > 0 || st.snapshots_dropped > 0 {
        println!(
            "storage  {} changes found damaged on disk since start ({} ever), {} quarantined waiting for a peer's good copy, {} healed, {} snapshots dropped",
            st.corrupt_found, st.corrupt_ever, st.quarantined, st.healed, st.snapshots_dropped
        );
        for (doc, hashes) in &st.quarantined_changes {
            for h in hashes {
                println!("  quarantined {doc} {h}");
            }
        }
    } else {
        println!(
            "storage  no damaged changes found ({} checked since start)",
            st.scrubbed
        );
    }
    if !r.voided.is_empty() {
        println!("changes voided on this node since start (see the log)");
        for (k, v) in &r.voided {
            println!("  {k}: {v}");
        }
    }
    if r.carried_forward > 0 {
        println!(
            "own writes carried forward: {} (they were built on a void change; their values were written again as new changes)",
            r.carried_forward
        );
    }
    render::print_bindings(&r.bindings);
    if !r.equivocators.is_empty() {
        println!("keys flagged for equivocation (a cloned key? remove them and re-admit the machines with new keys)");
        for k in &r.equivocators {
            println!("  {k}");
        }
    }
}
