//! `lichen demo`: three agents on loopback, a write seen everywhere, a partition, writes on
//! both sides, healing, and the converged result with the conflict it resolved.
//!
//! The agents are this same executable (`lichen run`), each with its own temporary data
//! directory, API port and QUIC port. Their peer traffic goes through a small UDP relay in
//! this process (each agent advertises its relay address), which is how the demo cuts a node
//! off without root or firewall rules. Everything is stopped and deleted at the end (or on
//! error), unless `--keep`.
//!
//! The last part shows a file binding, the product's main use: b renders the document `web`
//! into a file in the demo directory (mode `sync`) and runs a reload command when the file
//! changes; a write on a shows up in that file, and an edit of the file on b becomes a change
//! signed by b that a reads.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::client::{doc_url, with_query, Client, Endpoint};
use crate::views::{HashView, HistoryView, StatusView, ValueView, WriteView};

const PATIENCE: Duration = Duration::from_secs(30);

struct Node {
    name: &'static str,
    api: String,
    listen: SocketAddr,
    front: SocketAddr,
    dir: PathBuf,
    id: String,
    client: Client,
}

/// Owns the processes, the relay and the directory; cleans up in `Drop`.
struct Demo {
    root: PathBuf,
    keep: bool,
    children: Vec<Child>,
    relay: Option<Relay>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.relay = None;
        if self.keep {
            println!(
                "\nThe agents' data and logs are kept in {}",
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn free_api_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f().unwrap_or(false) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > PATIENCE {
            bail!("timed out after {PATIENCE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A moment to read, when a person is watching (not when the output is piped or tested).
fn pause() {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        std::thread::sleep(Duration::from_millis(1200));
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Run the demo.
pub(crate) fn run(keep: bool) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the lichen executable")?;
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let root = std::env::temp_dir().join(format!(
        "lichen-demo-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut demo = Demo {
        root: root.clone(),
        keep,
        children: Vec::new(),
        relay: None,
    };
    let r = tour(&exe, &root, &mut demo);
    if r.is_err() {
        demo.keep = true; // keep the logs for a look
    }
    r
}

fn tour(exe: &Path, root: &Path, demo: &mut Demo) -> Result<()> {
    println!(
        "Lichen demo: three agents on this machine, each with its own data directory and ports."
    );
    println!(
        "Their peer traffic (QUIC over UDP) passes through a relay inside this demo, so it can"
    );
    println!(
        "cut a node off without root. Agents' data and logs: {}",
        root.display()
    );

    // --- Start the cluster ---------------------------------------------------------------
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let api = format!("127.0.0.1:{}", free_api_port()?);
        let dir = root.join(name);
        nodes.push(Node {
            name,
            client: Client::with_token_file(
                Endpoint::Tcp(api.clone()),
                crate::auth::token_path(&dir),
            ),
            api,
            listen: free_udp()?,
            front: "127.0.0.1:0".parse()?,
            dir,
            id: String::new(),
        });
    }
    let relay = Relay::start(&nodes.iter().map(|n| n.listen).collect::<Vec<_>>())?;
    for (n, f) in nodes.iter_mut().zip(&relay.fronts) {
        n.front = *f;
    }
    let isolated = relay.isolated.clone();
    demo.relay = Some(relay);
    let config = root.join("agent.toml");
    std::fs::write(&config, "log = \"info\"\n[sync]\nanti_entropy_ms = 250\n")?;
    let binding = Binding::new(root, &config)?;

    println!("\n== Starting the cluster");
    let t0 = Instant::now();
    let mut token = None::<String>;
    for n in nodes.iter_mut() {
        let log = std::fs::File::create(root.join(format!("{}.log", n.name)))?;
        let mut cmd = Command::new(exe);
        cmd.args(["--api", &n.api, "run", "--name", n.name])
            .arg("--data-dir")
            .arg(&n.dir)
            .arg("--config")
            .arg(if n.name == "b" {
                &binding.config
            } else {
                &config
            })
            .args(["--listen", &n.listen.to_string()])
            .args(["--advertise", &n.front.to_string()])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(t) = &token {
            cmd.args(["--join", t]);
        }
        demo.children
            .push(cmd.spawn().context("cannot start an agent")?);
        let c = &n.client;
        wait_for(&format!("agent {} to start", n.name), || {
            Ok(c.get::<StatusView>("/v1/status").is_ok())
        })?;
        let st: StatusView = n.client.get("/v1/status")?;
        n.id = st.node.id.clone();
        match &token {
            None => {
                println!(
                    "  {}  $ lichen --api {} run --name a ...   founds the cluster (its root admin)",
                    n.name, n.api
                );
                token = st.join_token.clone();
            }
            Some(_) => println!(
                "  {}  $ lichen --api {} run --name {} --join <a's token> ...",
                n.name, n.api, n.name
            ),
        }
    }
    for n in &nodes[1..] {
        let _: HashView = nodes[0].client.send_json(
            "POST",
            "/v1/members",
            &[],
            Some(&json!({"id": n.id, "role": "writer", "name": n.name})),
        )?;
        println!(
            "  a  $ lichen members add {}… --role writer --name {}",
            &n.id[..12],
            n.name
        );
    }
    for n in &nodes {
        wait_for(
            &format!("{} to be connected to both others", n.name),
            || {
                let st: StatusView = n.client.get("/v1/status")?;
                let connected = st.peers.iter().filter(|p| p.connected).count();
                Ok(st.node.role != "not a member" && connected == 2)
            },
        )?;
    }
    println!(
        "  3 members, all connected ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    pause();
    // --- 1. A write reaches everyone -------------------------------------------------------
    println!("\n== 1. A write on a reaches b and c");
    // Watchers on b and c (the SSE API behind `lichen watch`). Each first receives the
    // current (absent) value, which means it is subscribed; then the write.
    let (tx, rx) = mpsc::channel::<(&str, Instant, Value)>();
    for n in &nodes[1..] {
        let (tx, client, name) = (tx.clone(), n.client.clone(), n.name);
        let url = with_query(&doc_url("app", "replicas")?, &[("watch", None)]);
        std::thread::spawn(move || {
            let _ = client.sse(&url, |ev| {
                let _ = tx.send((name, Instant::now(), ev.value.clone()));
                ev.value != json!(3)
            });
        });
    }
    for _ in 0..2 {
        rx.recv_timeout(PATIENCE)
            .context("a watcher did not start")?;
    }
    let doc = json!({"replicas": 3, "color": "red"});
    println!("  a  $ lichen put app '' '{}'", compact(&doc));
    let t = Instant::now();
    let _: WriteView = nodes[0]
        .client
        .send_json("PUT", &doc_url("app", "")?, &[], Some(&doc))?;
    for _ in 0..2 {
        let (name, at, v) = rx
            .recv_timeout(PATIENCE)
            .context("a watcher did not see the write")?;
        if v != json!(3) {
            bail!("{name}'s watcher saw {v} instead of 3");
        }
        println!(
            "  {name}  `lichen watch app replicas` printed {} {} after the write",
            compact(&v),
            ms(at.duration_since(t))
        );
    }

    pause();
    // --- 2. Partition ------------------------------------------------------------------------
    println!(
        "\n== 2. Cut c off from a and b (the relay drops its packets), then write on both sides"
    );
    isolated.store(1 << 2, Ordering::SeqCst);
    let writes = [
        (0, "color", json!("blue")),
        (2, "color", json!("green")),
        (2, "region", json!("eu-west")),
        (0, "replicas", json!(5)),
    ];
    for (i, path, v) in &writes {
        let n = &nodes[*i];
        let _: WriteView = n
            .client
            .send_json("PUT", &doc_url("app", path)?, &[], Some(v))?;
        println!("  {}  $ lichen put app {path} '{}'", n.name, compact(v));
    }
    let b = &nodes[1].client;
    wait_for("b to receive a's writes", || {
        Ok(b.get::<ValueView>(&doc_url("app", "replicas")?)?.value == json!(5))
    })?;
    for n in &nodes {
        let v: ValueView = n.client.get(&doc_url("app", "")?)?;
        println!("  {} reads {}", n.name, compact(&v.value));
    }
    println!("  a and b agree; c, cut off, has its own version.");

    pause();
    // --- 3. Heal ------------------------------------------------------------------------------
    println!("\n== 3. Heal the network");
    isolated.store(0, Ordering::SeqCst);
    let mut converged = Value::Null;
    let took = wait_for("the three agents to converge", || {
        let mut views = Vec::new();
        for n in &nodes {
            let v: ValueView = n.client.get(&doc_url("app", "")?)?;
            views.push((v.value, v.heads));
        }
        let same = views.windows(2).all(|w| w[0] == w[1]);
        converged = views[0].0.clone();
        Ok(same)
    })?;
    println!("  converged {} after healing; every node reads:", ms(took));
    println!(
        "  {}",
        serde_json::to_string_pretty(&converged)?.replace('\n', "\n  ")
    );

    pause();
    // --- 4. The conflict ----------------------------------------------------------------------
    println!("\n== 4. How the conflict on `color` was resolved");
    println!("  $ lichen conflicts app color");
    let mut answers = Vec::new();
    for n in &nodes {
        let v: Vec<Value> = n.client.get(&with_query(
            &doc_url("app", "color")?,
            &[("conflicts", None)],
        ))?;
        answers.push(v);
    }
    if !answers.windows(2).all(|w| w[0] == w[1]) {
        bail!("the nodes disagree about the conflict: {answers:?}");
    }
    let vals = answers[0].clone();
    let who = |v: &Value| {
        writes
            .iter()
            .find(|(_, p, x)| *p == "color" && x == v)
            .map(|(i, _, _)| nodes[*i].name)
            .unwrap_or("?")
    };
    match vals.as_slice() {
        [winner, losers @ ..] if !losers.is_empty() => {
            println!(
                "  winner: {} (written on {})  <- what `get` returns, on every node",
                compact(winner),
                who(winner)
            );
            for l in losers {
                println!(
                    "  loser : {} (written on {})  <- kept and visible until someone writes `color` again",
                    compact(l),
                    who(l)
                );
            }
            println!("  Concurrent writes to one key resolve the same way everywhere (the change with the");
            println!("  greater operation id wins); edits to different keys (region, replicas) simply merge.");
        }
        _ => bail!("expected a conflict on `color`, got {:?}", answers[0]),
    }

    pause();
    binding.show(&nodes)?;

    println!("\nThat is Lichen: every node keeps working on its own, and they converge when they can talk.");
    println!(
        "Next: `lichen run` on a machine, then on another `lichen run --join <token it printed>`."
    );
    Ok(())
}

/// Part 5: b's `[[bind]]` of the document `web` to `web.json` (both ways), whose reload
/// command appends a line to `reloads.log`, so the demo can show that it ran.
struct Binding {
    config: PathBuf,
    file: PathBuf,
    reloads: PathBuf,
}

impl Binding {
    /// Write b's config: the shared one plus the binding.
    fn new(root: &Path, shared: &Path) -> Result<Binding> {
        let (file, reloads) = (root.join("web.json"), root.join("reloads.log"));
        let config = root.join("b.toml");
        let reload = format!("echo reloaded >> '{}'", reloads.display());
        let text = format!(
            "{}\n[[bind]]\ndoc = \"web\"\nfile = {}\nmode = \"sync\"\nreload = [\"/bin/sh\", \"-c\", {}]\ndebounce_ms = 50\nreload_jitter_ms = 0\n",
            std::fs::read_to_string(shared)?,
            toml::Value::String(file.display().to_string()),
            toml::Value::String(reload),
        );
        std::fs::write(&config, text)?;
        Ok(Binding {
            config,
            file,
            reloads,
        })
    }

    fn reload_count(&self) -> usize {
        std::fs::read_to_string(&self.reloads).map_or(0, |s| s.lines().count())
    }

    fn show(&self, nodes: &[Node]) -> Result<()> {
        let (a, b) = (&nodes[0], &nodes[1]);
        println!("\n== 5. A file binding: b keeps the document `web` in a file, both ways");
        println!("  b's config:  [[bind]] doc = \"web\"  file = \"web.json\"  mode = \"sync\"  reload = [...]");
        let doc = json!({"port": 8080, "workers": 4});
        println!("  a  $ lichen put web '' '{}'", compact(&doc));
        let _: WriteView = a
            .client
            .send_json("PUT", &doc_url("web", "")?, &[], Some(&doc))?;
        let took = wait_for("b to render web.json and reload", || {
            let on_disk = std::fs::read(&self.file).ok();
            let parsed = on_disk.and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            Ok(parsed.as_ref() == Some(&doc) && self.reload_count() >= 1)
        })?;
        println!(
            "  b wrote {} and ran its reload command {} after the write:",
            self.file.display(),
            ms(took)
        );
        self.cat()?;

        let edited = json!({"port": 8080, "workers": 8});
        println!("  b  (an operator edits web.json on b: workers = 8)");
        let tmp = self.file.with_file_name(".web.json.tmp");
        std::fs::write(
            &tmp,
            format!("{}\n", serde_json::to_string_pretty(&edited)?),
        )?;
        std::fs::rename(&tmp, &self.file)?;
        self.cat()?;
        let t = Instant::now();
        wait_for("a to read the edit made in b's file", || {
            Ok(a.client.get::<ValueView>(&doc_url("web", "")?)?.value == edited)
        })?;
        let history: Vec<HistoryView> = a
            .client
            .get(&with_query(&doc_url("web", "")?, &[("history", None)]))?;
        let by_b = history
            .into_iter()
            .find(|e| e.author == b.id)
            .context("a's history of `web` has no change signed by b")?;
        println!(
            "  a  $ lichen get web workers   -> 8, {} after the save",
            ms(t.elapsed())
        );
        println!(
            "  a  $ lichen history web       -> change {}… seq {} signed by {} ({}…)",
            by_b.hash.get(..12).unwrap_or_default(),
            by_b.seq,
            by_b.author_name,
            &b.id[..12],
        );
        println!("  The file is a replica like any other: edits in it are signed changes, checked and synced.");
        Ok(())
    }

    fn cat(&self) -> Result<()> {
        println!("  $ cat web.json");
        for line in std::fs::read_to_string(&self.file)?.lines() {
            println!("    {line}");
        }
        Ok(())
    }
}

/// The UDP relay: one front socket per agent (its advertised address). Packets from agent j
/// to agent i's front go out of a per-sender upstream socket to i's real address; replies
/// come back through the front. Traffic between an isolated agent and the others is dropped.
struct Relay {
    fronts: Vec<SocketAddr>,
    isolated: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(targets: &[SocketAddr]) -> Result<Relay> {
        let isolated = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let index: Arc<HashMap<SocketAddr, usize>> =
            Arc::new(targets.iter().enumerate().map(|(i, a)| (*a, i)).collect());
        let mut fronts = Vec::new();
        let mut threads = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let front = UdpSocket::bind((target.ip(), 0))?;
            front.set_read_timeout(Some(Duration::from_millis(50)))?;
            fronts.push(front.local_addr()?);
            let ctx = RelayCtx {
                me: i,
                target: *target,
                isolated: isolated.clone(),
                stop: stop.clone(),
                index: index.clone(),
            };
            threads.push(std::thread::spawn(move || ctx.run(front)));
        }
        Ok(Relay {
            fronts,
            isolated,
            stop,
            threads,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Clone)]
struct RelayCtx {
    me: usize,
    target: SocketAddr,
    isolated: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    index: Arc<HashMap<SocketAddr, usize>>,
}

impl RelayCtx {
    fn blocked(&self, from: Option<usize>) -> bool {
        let set = self.isolated.load(Ordering::SeqCst);
        from.is_some_and(|j| ((set >> j) & 1) != ((set >> self.me) & 1))
    }

    fn run(self, front: UdpSocket) {
        let front = Arc::new(front);
        let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut back = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !self.stop.load(Ordering::SeqCst) {
            let Ok((n, from)) = front.recv_from(&mut buf) else {
                continue;
            };
            let sender = self.index.get(&from).copied();
            if self.blocked(sender) {
                continue;
            }
            let up = match upstreams.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let Ok(u) = self.upstream() else { continue };
                    let (u2, f2, ctx) = (u.clone(), front.clone(), self.clone());
                    back.push(std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while !ctx.stop.load(Ordering::SeqCst) {
                            if let Ok(n) = u2.recv(&mut buf) {
                                if !ctx.blocked(sender) {
                                    let _ = f2.send_to(&buf[..n], from);
                                }
                            }
                        }
                    }));
                    upstreams.insert(from, u.clone());
                    u
                }
            };
            let _ = up.send(&buf[..n]);
        }
        for t in back {
            let _ = t.join();
        }
    }

    fn upstream(&self) -> std::io::Result<Arc<UdpSocket>> {
        let u = UdpSocket::bind((self.target.ip(), 0))?;
        u.connect(self.target)?;
        u.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Arc::new(u))
    }
}
