//! `lichen`: the agent binary. One process per node: `lichen run` is the daemon; every other
//! command is a client of the local agent's HTTP API (see [`api`]).
//!
//! Flow: clap parses ([`cli`]) → [`config::Config::resolve`] validates → only then are runtime
//! handles built ([`daemon::run`]). Exit codes are in [`client::exit`] and the README.

mod alloc;
mod api;
mod cli;
mod client;
mod config;
mod daemon;
mod demo;
mod exec;
mod metrics;
mod node;
mod render;
mod server;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};

use crate::cli::{Cli, Command, MembersCommand, RunArgs};
use crate::client::{exit, Client, ClientError};
use crate::config::{Config, Overrides};

/// `lichen` with no command: the `run` flags, read from the environment only.
#[derive(Parser)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

fn overrides(a: &RunArgs, api: &str, api_given: bool) -> Overrides {
    Overrides {
        config: a.config.clone(),
        data_dir: a.data_dir.clone(),
        name: a.name.clone(),
        listen: a.listen.clone(),
        advertise: a.advertise.clone(),
        api: api_given.then(|| api.to_string()),
        log_format: a.log_format.clone(),
        join: a.join.clone(),
    }
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
    // `--api` counts as given if it differs from the default or came from the environment.
    let api_given = cli.api != config::DEFAULT_API || std::env::var_os("LICHEN_API").is_some();
    let code = match cli.command {
        // No command: `run` with no flags, but still honouring LICHEN_CONFIG, LICHEN_DATA_DIR…
        None => run_daemon(RunOnly::parse_from(["lichen"]).args, &cli.api, api_given),
        Some(Command::Run(a)) => run_daemon(a, &cli.api, api_given),
        Some(Command::Demo { keep }) => report(demo::run(keep)),
        Some(Command::Init(a)) => report(
            Config::resolve(&overrides(&a, &cli.api, api_given)).and_then(|c| daemon::init(&c)),
        ),
        Some(Command::Keygen { out }) => report((|| {
            let key = lichen_crdt::SecretKey::from_seed(daemon::random_seed()?);
            key.write_file(&out)?;
            println!("{}", key.node_id());
            Ok(())
        })()),
        Some(Command::Exec(opts)) => exec::run(Client::new(&cli.api), opts),
        Some(cmd) => match client_command(&Client::new(&cli.api), cmd, cli.json) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {}", e.message);
                e.code
            }
        },
    };
    std::process::exit(code);
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::FAILURE
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

fn run_daemon(a: RunArgs, api: &str, api_given: bool) -> i32 {
    let o = overrides(&a, api, api_given);
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

fn usage(msg: impl Into<String>) -> ClientError {
    ClientError {
        code: exit::USAGE,
        message: msg.into(),
    }
}

fn print(v: &Value, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn client_command(c: &Client, cmd: Command, as_json: bool) -> Result<(), ClientError> {
    match cmd {
        Command::Put { doc, path, value } => {
            let v: Value = serde_json::from_str(&value).map_err(|e| {
                usage(format!(
                    "VALUE must be JSON ({e}); for a string, quote it: lichen put {doc} {path} '\"{value}\"'"
                ))
            })?;
            let r = c.put("/v1/put", &[("doc", &doc), ("path", &path)], &v)?;
            if as_json {
                print(&r, true);
            } else if r["changed"] == json!(false) {
                eprintln!("unchanged");
            }
        }
        Command::Get { doc, path } => {
            let p = path.unwrap_or_default();
            let r = c.get("/v1/get", &[("doc", &doc), ("path", &p)])?;
            print(if as_json { &r } else { &r["value"] }, as_json);
        }
        Command::Del { doc, path } => {
            let r = c.delete("/v1/del", &[("doc", &doc), ("path", &path)])?;
            if as_json {
                print(&r, true);
            }
        }
        Command::Ls { doc, path } => {
            let mut q: Vec<(&str, &str)> = Vec::new();
            if let Some(d) = &doc {
                q.push(("doc", d));
            }
            if let Some(p) = &path {
                q.push(("path", p));
            }
            let r = c.get("/v1/ls", &q)?;
            if as_json {
                print(&r, true);
            } else if let Some(items) = r.as_array() {
                for i in items {
                    println!("{}", i.as_str().unwrap_or_default());
                }
            }
        }
        Command::Watch {
            doc,
            path,
            since,
            count,
        } => {
            let p = path.unwrap_or_default();
            let mut q = vec![("doc", doc.as_str()), ("path", p.as_str())];
            if let Some(s) = &since {
                q.push(("since", s));
            }
            let mut seen = 0usize;
            c.sse("/v1/watch", &q, |ev| {
                if as_json {
                    print(&ev, true);
                } else {
                    println!(
                        "{}",
                        serde_json::to_string(&ev["value"]).unwrap_or_default()
                    );
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                seen += 1;
                count.is_none_or(|n| seen < n)
            })?;
        }
        Command::History { doc, path, limit } => {
            let p = path.unwrap_or_default();
            let l = limit.to_string();
            let r = c.get("/v1/history", &[("doc", &doc), ("path", &p), ("limit", &l)])?;
            if as_json {
                print(&r, true);
            } else {
                for e in r.as_array().into_iter().flatten() {
                    let edits: Vec<String> = e["edits"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| match x.get("value") {
                            Some(v) => format!(
                                "{} {} = {}",
                                x["action"].as_str().unwrap_or(""),
                                x["path"].as_str().unwrap_or(""),
                                v
                            ),
                            None => format!(
                                "{} {}",
                                x["action"].as_str().unwrap_or(""),
                                x["path"].as_str().unwrap_or("")
                            ),
                        })
                        .collect();
                    println!(
                        "{} {} ({}) #{}: {}",
                        &e["hash"].as_str().unwrap_or("")
                            [..12.min(e["hash"].as_str().unwrap_or("").len())],
                        e["author_name"].as_str().unwrap_or(""),
                        &e["author"].as_str().unwrap_or("")
                            [..8.min(e["author"].as_str().unwrap_or("").len())],
                        e["seq"],
                        edits.join("; ")
                    );
                }
            }
        }
        Command::Conflicts { doc, path } => {
            let r = c.get("/v1/conflicts", &[("doc", &doc), ("path", &path)])?;
            print(&r, as_json);
        }
        Command::Members { command } => match command {
            MembersCommand::Ls => {
                let r = c.get("/v1/members", &[])?;
                if as_json {
                    print(&r, true);
                } else {
                    for m in r.as_array().into_iter().flatten() {
                        let scopes = m["scopes"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                            .unwrap_or_default();
                        let scopes = if scopes.is_empty() {
                            "all".to_string()
                        } else {
                            scopes.join(",")
                        };
                        println!(
                            "{}  {:8} {:16} scopes {:16} {}{}",
                            m["id"].as_str().unwrap_or(""),
                            m["role"].as_str().unwrap_or(""),
                            m["name"].as_str().unwrap_or(""),
                            scopes,
                            m["addrs"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(","))
                                .unwrap_or_default(),
                            if m["root"] == json!(true) {
                                "  (root)"
                            } else {
                                ""
                            }
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
                let r = c.post(
                    "/v1/members",
                    &json!({"id": id, "role": role, "name": name, "scopes": scopes, "addrs": addrs}),
                )?;
                if as_json {
                    print(&r, true);
                }
            }
            MembersCommand::Remove { id } => {
                let r = c.post("/v1/members/remove", &json!({"id": id}))?;
                if as_json {
                    print(&r, true);
                }
            }
            MembersCommand::Role { id, role } => {
                let r = c.post("/v1/members/role", &json!({"id": id, "role": role}))?;
                if as_json {
                    print(&r, true);
                }
            }
        },
        Command::Status => {
            let r = c.get("/v1/status", &[])?;
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
        | Command::Exec(_) => {}
    }
    Ok(())
}

fn print_status(r: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!(
        "node     {} ({}, {})",
        s(&r["node"]["id"]),
        s(&r["node"]["name"]),
        s(&r["node"]["role"])
    );
    if r["node"]["revoked"] == json!(true) {
        println!(
            "REMOVED  an admin removed this node from the cluster: its key is revoked, its writes are refused and it no longer syncs (to take part again: a new data directory, then `lichen members add` on an admin)"
        );
    }
    println!("cluster  {}", s(&r["cluster"]));
    println!("listen   {}", s(&r["node"]["listen"]));
    println!("join     lichen run --join {}", s(&r["join_token"]));
    println!("peers");
    for p in r["peers"].as_array().into_iter().flatten() {
        println!(
            "  {} {:16} {:12} rtt {} last sync {}",
            &s(&p["id"])[..16.min(s(&p["id"]).len())],
            s(&p["name"]),
            if p["connected"] == json!(true) {
                "connected"
            } else {
                "disconnected"
            },
            p["rtt_ms"]
                .as_f64()
                .map(|x| format!("{x:.2} ms"))
                .unwrap_or_else(|| "-".into()),
            p["last_sync_ms_ago"]
                .as_u64()
                .map(|x| format!("{x} ms ago"))
                .unwrap_or_else(|| "never".into()),
        );
    }
    println!("documents");
    for d in r["docs"].as_array().into_iter().flatten() {
        let heads: Vec<String> = d["heads"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| h.as_str().unwrap_or("")[..12.min(h.as_str().unwrap_or("").len())].to_string())
            .collect();
        println!(
            "  {:24} {:>6} changes  heads {}",
            s(&d["doc"]),
            d["changes"],
            heads.join(",")
        );
    }
    println!(
        "sync lag {} ms, pending {}",
        r["sync_lag_ms"], r["pending_changes"]
    );
    if let Some(n) = r["writes_held"].as_u64() {
        println!(
            "writes held: {n} (this node has not caught up with a peer since it started; see sync.hold_writes_ms)"
        );
    }
    let pending: Vec<&str> = r["restart_pending"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !pending.is_empty() {
        println!(
            "restart pending: {} (changed in the config file; they apply at the next start)",
            pending.join(", ")
        );
    }
    if let Some(rej) = r["rejected"].as_object() {
        if !rej.is_empty() {
            println!("rejected");
            for (k, v) in rej {
                println!("  {k}: {v}");
            }
        }
    }
    if let Some(errs) = r["store_errors"].as_object() {
        if !errs.is_empty() {
            println!("not stored (disk full or database failure; see the log)");
            for (k, v) in errs {
                println!("  {k}: {v}");
            }
        }
    }
    let st = &r["storage"];
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    if n("corrupt_ever") > 0 || n("quarantined") > 0 || n("snapshots_dropped") > 0 {
        println!(
            "storage  {} changes found damaged on disk since start ({} ever), {} quarantined waiting for a peer's good copy, {} healed, {} snapshots dropped",
            n("corrupt_found"),
            n("corrupt_ever"),
            n("quarantined"),
            n("healed"),
            n("snapshots_dropped")
        );
        if let Some(q) = st["quarantined_changes"].as_object() {
            for (doc, hashes) in q {
                for h in hashes.as_array().into_iter().flatten() {
                    println!("  quarantined {doc} {}", h.as_str().unwrap_or(""));
                }
            }
        }
    } else {
        println!(
            "storage  no damaged changes found ({} checked since start)",
            n("scrubbed")
        );
    }
    if let Some(void) = r["voided"].as_object() {
        if !void.is_empty() {
            println!("changes voided on this node since start (see the log)");
            for (k, v) in void {
                println!("  {k}: {v}");
            }
        }
    }
    if let Some(n) = r["carried_forward"].as_u64().filter(|n| *n > 0) {
        println!(
            "own writes carried forward: {n} (they were built on a void change; their values were written again as new changes)"
        );
    }
    let flagged: Vec<String> = r["equivocators"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    if !flagged.is_empty() {
        println!("keys flagged for equivocation (a cloned key? remove them and re-admit the machines with new keys)");
        for k in flagged {
            println!("  {k}");
        }
    }
}
