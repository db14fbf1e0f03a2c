//! The supervisor of `lichen exec`: the watch thread, the child's lifecycle and the signals.
//! The rules it follows are in the parent module's docs.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::env::flatten;
use super::{OnChange, Options};
use crate::client::{doc_url, exit, with_query, Client};
use crate::error::ApiError;

/// Longest pause between two attempts to reach the agent.
const RECONNECT_CAP: Duration = Duration::from_secs(5);

/// What the watch thread reports.
enum Update {
    /// The value at the path, and the heads it was read at.
    Value { heads: String, value: Value },
    /// The agent cannot be reached (reported once per outage).
    Lost(String),
    /// The agent refused the watch as invalid (bad document name or path) or refused the
    /// token: retrying cannot help.
    Refused(ApiError),
}

/// Run `lichen exec`; returns the exit code.
pub(crate) fn run(client: Client, opts: Options) -> i32 {
    if !lichen_crdt::valid_doc_name(&opts.doc) {
        eprintln!(
            "lichen exec: `{}` is not a valid document name (1-128 bytes of a-z 0-9 . _ - and / between segments)",
            opts.doc
        );
        return exit::INVALID;
    }
    if let Err(e) = lichen_crdt::parse_path(&opts.path) {
        eprintln!("lichen exec: invalid --path `{}`: {e}", opts.path);
        return exit::INVALID;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lichen exec: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    rt.block_on(supervise(client, opts))
}

/// Follow the agent's watch stream for ever, reconnecting and resuming from the last heads.
fn watch_thread(client: Client, doc: String, path: String, tx: mpsc::Sender<Update>) {
    let mut since: Option<String> = None;
    let mut pause = Duration::from_millis(100);
    let mut lost = false;
    loop {
        let resume = since.clone();
        let mut q = vec![("watch", None)];
        if let Some(s) = &resume {
            q.push(("since", Some(s.as_str())));
        }
        let r = doc_url(&doc, &path).and_then(|url| {
            client.sse(&with_query(&url, &q), |ev| {
                lost = false;
                pause = Duration::from_millis(100);
                since = Some(ev.heads.clone());
                tx.blocking_send(Update::Value {
                    heads: ev.heads,
                    value: ev.value,
                })
                .is_ok()
            })
        });
        if tx.is_closed() {
            return;
        }
        let why = match r {
            Ok(()) => "the agent ended the watch stream".to_string(),
            // Only a request the agent calls invalid (a bad document name or path) or a refused
            // token is final;
            // anything else (unreachable, 503 at the connection cap, a failure) is retried.
            Err(e) if e.code() == exit::INVALID || e.code() == exit::UNAUTHORIZED => {
                let _ = tx.blocking_send(Update::Refused(e));
                return;
            }
            Err(e) => e.error,
        };
        if !lost {
            lost = true;
            if tx.blocking_send(Update::Lost(why)).is_err() {
                return;
            }
        }
        // Pacing the reconnection attempts (not waiting for a condition).
        std::thread::sleep(pause);
        pause = (pause * 2).min(RECONNECT_CAP);
    }
}

struct Running {
    child: Child,
    env: BTreeMap<String, String>,
}

async fn supervise(client: Client, opts: Options) -> i32 {
    let (tx, mut rx) = mpsc::channel(16);
    {
        let (doc, path) = (opts.doc.clone(), opts.path.clone());
        std::thread::spawn(move || watch_thread(client, doc, path, tx));
    }
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("lichen exec: cannot install signal handlers");
            return exit::FAILURE;
        }
    };
    let what = format!(
        "{}{}{}",
        opts.doc,
        if opts.path.is_empty() { "" } else { " " },
        opts.path
    );
    let mut running: Option<Running> = None;
    // A change waiting for the end of its debounce window.
    let mut pending: Option<(BTreeMap<String, String>, String)> = None;
    let mut due: Option<Instant> = None;
    let mut waiting_said = false;
    let mut watch_ended = false;
    loop {
        let child_exit = async {
            match running.as_mut() {
                Some(r) => r.child.wait().await,
                None => std::future::pending().await,
            }
        };
        let debounce = async {
            match due {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            update = rx.recv(), if !watch_ended => {
                let Some(update) = update else {
                    // The watch thread ended after a refusal: the program keeps running
                    // with its last configuration until it exits or is signalled.
                    watch_ended = true;
                    continue;
                };
                match update {
                    Update::Value { heads, value } => {
                        if value.is_null() {
                            if running.is_none() && !waiting_said {
                                eprintln!("lichen exec: waiting for {what} to have a value");
                                waiting_said = true;
                            } else if running.is_some() {
                                eprintln!("lichen exec: {what} has no value now; the program keeps its last configuration");
                            }
                            continue;
                        }
                        let vars = match flatten(&value, &opts.prefix) {
                            Ok(v) => v,
                            Err(e) => {
                                eprintln!("lichen exec: {what} at {heads}: {e}; {}", if running.is_some() { "the program keeps its last configuration" } else { "not starting the program" });
                                continue;
                            }
                        };
                        match running.as_ref() {
                            None => match start(&opts, &vars, &heads) {
                                Ok(child) => running = Some(Running { child, env: vars }),
                                Err(e) => {
                                    eprintln!("lichen exec: cannot start `{}`: {e}", opts.command[0]);
                                    return exit::FAILURE;
                                }
                            },
                            Some(r) if r.env == vars => {
                                pending = None;
                                due = None;
                            }
                            Some(_) => {
                                pending = Some((vars, heads));
                                due = Some(Instant::now() + opts.debounce);
                            }
                        }
                    }
                    Update::Lost(why) => {
                        eprintln!("lichen exec: {why}; the program keeps running and the watch reconnects");
                    }
                    Update::Refused(e) => {
                        eprintln!("lichen exec: {}", e.message());
                        if running.is_none() {
                            return e.code();
                        }
                        eprintln!("lichen exec: the program keeps its last configuration");
                    }
                }
            }
            () = debounce => {
                due = None;
                let (Some((vars, heads)), Some(r)) = (pending.take(), running.as_mut()) else {
                    continue;
                };
                match opts.on_change {
                    OnChange::Signal(sig) => {
                        send(&r.child, sig);
                        r.env = vars;
                        eprintln!("lichen exec: {what} changed ({heads}): sent {sig:?}");
                    }
                    OnChange::Restart => {
                        eprintln!("lichen exec: {what} changed ({heads}): restarting the program");
                        stop(&mut r.child, rustix::process::Signal::TERM, opts.kill_timeout).await;
                        match start(&opts, &vars, &heads) {
                            Ok(child) => *r = Running { child, env: vars },
                            Err(e) => {
                                eprintln!("lichen exec: cannot start `{}` again: {e}", opts.command[0]);
                                return exit::FAILURE;
                            }
                        }
                    }
                }
            }
            status = child_exit => {
                return match status {
                    Ok(s) => code_of(s),
                    Err(e) => {
                        eprintln!("lichen exec: lost the program: {e}");
                        exit::FAILURE
                    }
                };
            }
            _ = term.recv() => return shutdown(running.as_mut(), rustix::process::Signal::TERM, opts.kill_timeout).await,
            _ = int.recv() => return shutdown(running.as_mut(), rustix::process::Signal::INT, opts.kill_timeout).await,
            _ = hup.recv() => {
                if let Some(r) = running.as_ref() {
                    send(&r.child, rustix::process::Signal::HUP);
                }
            }
        }
    }
}

/// Start the program with the document's variables.
fn start(opts: &Options, vars: &BTreeMap<String, String>, heads: &str) -> std::io::Result<Child> {
    let mut cmd = Command::new(&opts.command[0]);
    cmd.args(&opts.command[1..])
        .envs(vars)
        .env("LICHEN_DOC", &opts.doc)
        .env("LICHEN_HEADS", heads)
        .kill_on_drop(false);
    cmd.spawn()
}

fn send(child: &Child, sig: rustix::process::Signal) {
    let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, sig) {
        eprintln!("lichen exec: cannot signal the program ({sig:?}): {e}");
    }
}

/// Ask the child to stop with `sig`; SIGKILL after `timeout`. Returns its exit status.
async fn stop(
    child: &mut Child,
    sig: rustix::process::Signal,
    timeout: Duration,
) -> Option<ExitStatus> {
    send(child, sig);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            eprintln!("lichen exec: the program did not stop within {timeout:?}: killing it");
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    }
}

/// Forward a stopping signal and exit with the child's code.
async fn shutdown(
    running: Option<&mut Running>,
    sig: rustix::process::Signal,
    timeout: Duration,
) -> i32 {
    let Some(r) = running else {
        // Nothing started yet: exit as a program killed by that signal would.
        return 128 + sig.as_raw();
    };
    match stop(&mut r.child, sig, timeout).await {
        Some(s) => code_of(s),
        None => exit::FAILURE,
    }
}

/// The exit code a shell would report for this status.
fn code_of(s: ExitStatus) -> i32 {
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(exit::FAILURE)
}
