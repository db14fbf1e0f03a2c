//! Helpers for the integration tests that run real `lichen` processes.
//!
//! * [`Cluster`] starts agents (each with its own data directory, QUIC address and API port),
//!   joins and admits them, and kills every child in `Drop` (printing the agents' log tails
//!   if the test failed).
//! * Peer traffic goes either directly between the agents ([`Net::Direct`], per-node loopback
//!   addresses 127.0.0.11/12/13… when they can be bound) or through an in-process UDP relay
//!   ([`Net::Relay`]) that can cut nodes off without root. [`Iptables`] cuts direct links
//!   with DROP rules and always removes them in `Drop`.
//! * Nothing sleeps to synchronise: [`wait_until`] polls a condition against a deadline.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The agent binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lichen");

/// Default patience for a condition.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Poll `f` until it returns true; panic with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if f() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP port")
}

/// A UDP address on `ip` that was free a moment ago.
pub fn free_udp_addr(ip: IpAddr) -> SocketAddr {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .expect("bind a UDP port")
}

/// Loopback address for node `i`: 127.0.0.(base + i) if it can be bound, else 127.0.0.1.
pub fn node_ip(base: u8, i: usize) -> IpAddr {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, base + i as u8));
    if UdpSocket::bind((ip, 0)).is_ok() {
        ip
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

/// A small deterministic RNG for randomised schedules; the seed is printed so a failure can
/// be replayed with `LICHEN_TEST_SEED=<seed>`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("LICHEN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: seed {seed} (replay with LICHEN_TEST_SEED={seed})");
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// How peers reach each other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Net {
    /// Straight to each other's listen address.
    Direct,
    /// Through an in-process relay that can drop traffic between groups of nodes.
    Relay,
}

/// One `lichen run` process and the way to talk to it.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub api: String,
    pub join: Option<String>,
    pub id: String,
    child: Option<Child>,
}

impl Agent {
    /// Prepare (not start) an agent under `root`.
    pub fn new(root: &Path, name: &str, ip: IpAddr) -> Agent {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = root.join(format!("{name}.toml"));
        std::fs::write(&config, "log = \"info\"\n[sync]\nanti_entropy_ms = 200\n").unwrap();
        let listen = free_udp_addr(ip);
        let api = format!("127.0.0.1:{}", free_tcp_port());
        register_api(&api, &dir.join("data"));
        Agent {
            name: name.to_string(),
            dir: dir.join("data"),
            log: root.join(format!("{name}.log")),
            config,
            listen,
            advertise: listen,
            api,
            join: None,
            id: String::new(),
            child: None,
        }
    }

    /// Start `lichen run` (again, after a kill: same data directory and addresses).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["--api", &self.api, "run", "--name", &self.name])
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--config")
            .arg(&self.config)
            .args(["--listen", &self.listen.to_string()])
            .args(["--advertise", &self.advertise.to_string()])
            .env_remove("RUST_LOG")
            .env_remove("LICHEN_API")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(j) = &self.join {
            cmd.args(["--join", j]);
        }
        self.child = Some(cmd.spawn().expect("spawn lichen run"));
        let api = self.api.clone();
        wait_until(&format!("{}'s API at {api}", self.name), PATIENCE, || {
            if let Some(st) = self.try_wait() {
                panic!(
                    "{} exited with {st} during start-up:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            self.cli(&["status", "--json"]).status.success()
        });
        if self.id.is_empty() {
            self.id = self.status()["node"]["id"].as_str().unwrap().to_string();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Send a signal by name (`TERM`, `HUP`, `STOP`, `CONT`…) with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let mut c = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > PATIENCE {
                let _ = c.kill();
                panic!("{} did not stop after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Still alive? (reaps it if not)
    pub fn alive(&mut self) -> bool {
        self.try_wait().is_none() && self.child.is_some()
    }

    /// Run the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--api")
            .arg(&self.api)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("LICHEN_API")
            .env_remove("LICHEN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run the lichen CLI")
    }

    /// Run the CLI and return stdout; panic (with stderr) on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{}: lichen {args:?} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `lichen put`; true if the CLI reported success.
    pub fn put(&self, doc: &str, path: &str, value: &str) -> bool {
        self.cli(&["put", doc, path, value]).status.success()
    }

    /// `lichen get --json` → the value, or None if the CLI failed.
    pub fn get(&self, doc: &str, path: &str) -> Option<Value> {
        let out = self.cli(&["--json", "get", doc, path]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("get --json is JSON");
        Some(v["value"].clone())
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    /// The heads of `doc` as reported by `status`.
    pub fn heads(&self, doc: &str) -> Option<Vec<Value>> {
        let s = self.status();
        s["docs"]
            .as_array()?
            .iter()
            .find(|d| d["doc"] == doc)
            .and_then(|d| d["heads"].as_array().cloned())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL also ends a SIGSTOPped process
            let _ = c.wait();
        }
    }
}

/// A set of agents in one temporary directory.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub relay: Option<Relay>,
    pub iptables: Option<Iptables>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Start `n` agents: the first founds the cluster, the others join with its token and are
    /// admitted as writers. Returns once every agent is a member connected to every other.
    pub fn start(n: usize, ip_base: u8, net: Net) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut agents: Vec<Agent> = (0..n)
            .map(|i| {
                let name = ((b'a' + i as u8) as char).to_string();
                Agent::new(dir.path(), &name, node_ip(ip_base, i))
            })
            .collect();
        let relay = (net == Net::Relay).then(|| {
            let r = Relay::start(&agents.iter().map(|a| a.listen).collect::<Vec<_>>());
            for (a, front) in agents.iter_mut().zip(&r.fronts) {
                a.advertise = *front;
            }
            r
        });
        agents[0].start();
        let token = agents[0].status()["join_token"]
            .as_str()
            .unwrap()
            .to_string();
        for a in &mut agents[1..] {
            a.join = Some(token.clone());
            a.start();
        }
        for a in &agents[1..] {
            agents[0].ok(&[
                "members", "add", &a.id, "--role", "writer", "--name", &a.name,
            ]);
        }
        let c = Cluster {
            agents,
            relay,
            iptables: None,
            dir,
        };
        c.wait_connected();
        c
    }

    /// Every agent is a writer or admin and connected to all the others.
    pub fn wait_connected(&self) {
        let n = self.agents.len();
        for a in &self.agents {
            wait_until(
                &format!("{} is a member connected to all peers", a.name),
                PATIENCE,
                || {
                    let s = a.status();
                    let role = s["node"]["role"].as_str().unwrap_or("");
                    let connected = s["peers"]
                        .as_array()
                        .map(|p| p.iter().filter(|p| p["connected"] == true).count())
                        .unwrap_or(0);
                    (role == "writer" || role == "admin") && connected == n - 1
                },
            );
        }
    }

    /// Wait until every running agent has the same value for `doc` and the same heads.
    pub fn wait_converged(&self, doc: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("`{doc}` converges on all agents"), timeout, || {
            let views: Vec<(Option<Value>, Option<Vec<Value>>)> = self
                .agents
                .iter()
                .filter(|a| a.is_running())
                .map(|a| (a.get(doc, ""), a.heads(doc)))
                .collect();
            let same = views.windows(2).all(|w| w[0] == w[1]) && views[0].0.is_some();
            if same {
                last = views[0].0.clone().unwrap();
            }
            same
        });
        last
    }

    /// Cut agent `i` off from all the others (relay or iptables).
    pub fn isolate(&mut self, i: usize) {
        if let Some(r) = &self.relay {
            r.isolated.store(1 << i, Ordering::SeqCst);
        } else {
            let me = self.agents[i].listen;
            let others: Vec<SocketAddr> = (0..self.agents.len())
                .filter(|j| *j != i)
                .map(|j| self.agents[j].listen)
                .collect();
            let ipt = self.iptables.get_or_insert_with(Iptables::default);
            for o in others {
                ipt.drop_udp(me, o);
                ipt.drop_udp(o, me);
            }
        }
    }

    /// Undo [`Cluster::isolate`].
    pub fn heal(&mut self) {
        if let Some(r) = &self.relay {
            r.isolated.store(0, Ordering::SeqCst);
        }
        self.iptables = None; // Drop removes the rules
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.iptables = None;
        if std::thread::panicking() {
            for a in &self.agents {
                let log = a.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "---- last lines of {}'s log ({}) ----",
                    a.name,
                    a.log.display()
                );
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for a in &mut self.agents {
            a.kill9();
        }
    }
}

/// `iptables` can be used here: root, the command exists and `iptables -L` works.
pub fn iptables_usable() -> bool {
    if std::env::var_os("LICHEN_TEST_NO_IPTABLES").is_some() {
        return false;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    root && Command::new("iptables")
        .args(["-n", "-L", "INPUT"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// DROP rules for UDP between address pairs, removed in `Drop`. Rules name ports as well as
/// addresses so concurrent tests on the same loopback addresses are not affected.
#[derive(Default)]
pub struct Iptables {
    rules: Vec<Vec<String>>,
}

impl Iptables {
    pub fn drop_udp(&mut self, from: SocketAddr, to: SocketAddr) {
        let rule: Vec<String> = [
            "INPUT",
            "-p",
            "udp",
            "-s",
            &from.ip().to_string(),
            "--sport",
            &from.port().to_string(),
            "-d",
            &to.ip().to_string(),
            "--dport",
            &to.port().to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let st = Command::new("iptables")
            .arg("-I")
            .args(&rule)
            .status()
            .expect("run iptables");
        assert!(st.success(), "iptables -I {rule:?}");
        self.rules.push(rule);
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let _ = Command::new("iptables").arg("-D").args(&rule).status();
        }
    }
}

/// An in-process UDP relay: one front socket per node (its advertised address). A packet
/// from node j to node i's front is forwarded from a per-sender upstream socket to i's real
/// address, and answers go back through the front. Traffic between a node in `isolated`
/// (a bit set) and one outside it is dropped.
pub struct Relay {
    pub fronts: Vec<SocketAddr>,
    pub isolated: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(targets: &[SocketAddr]) -> Relay {
        let isolated = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let index: Arc<HashMap<SocketAddr, usize>> =
            Arc::new(targets.iter().enumerate().map(|(i, a)| (*a, i)).collect());
        let mut fronts = Vec::new();
        let mut threads = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let front = UdpSocket::bind((target.ip(), 0)).unwrap();
            front
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            fronts.push(front.local_addr().unwrap());
            let (target, isolated, stop, index) =
                (*target, isolated.clone(), stop.clone(), index.clone());
            threads.push(std::thread::spawn(move || {
                relay_front(i, front, target, isolated, stop, index)
            }));
        }
        Relay {
            fronts,
            isolated,
            stop,
            threads,
        }
    }
}

fn blocked(isolated: &AtomicU32, a: Option<usize>, b: usize) -> bool {
    let set = isolated.load(Ordering::SeqCst);
    match a {
        Some(a) => ((set >> a) & 1) != ((set >> b) & 1),
        None => false,
    }
}

fn relay_front(
    me: usize,
    front: UdpSocket,
    target: SocketAddr,
    isolated: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    index: Arc<HashMap<SocketAddr, usize>>,
) {
    let front = Arc::new(front);
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut back_threads = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = front.recv_from(&mut buf) else {
            continue;
        };
        let sender = index.get(&from).copied();
        if blocked(&isolated, sender, me) {
            continue;
        }
        let up = upstreams.entry(from).or_insert_with(|| {
            let up = UdpSocket::bind((target.ip(), 0)).unwrap();
            up.connect(target).unwrap();
            up.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let up = Arc::new(up);
            let (up2, front2, isolated2, stop2) =
                (up.clone(), front.clone(), isolated.clone(), stop.clone());
            back_threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop2.load(Ordering::SeqCst) {
                    if let Ok(n) = up2.recv(&mut buf) {
                        if !blocked(&isolated2, sender, me) {
                            let _ = front2.send_to(&buf[..n], from);
                        }
                    }
                }
            }));
            up
        });
        let _ = up.send(&buf[..n]);
    }
    for t in back_threads {
        let _ = t.join();
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

/// A child process whose stdout lines arrive on a channel (for `lichen watch`).
pub struct Lines {
    pub child: Child,
    pub rx: mpsc::Receiver<String>,
}

impl Lines {
    pub fn spawn(mut cmd: Command) -> Lines {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Lines { child, rx }
    }

    /// Wait for a line satisfying `f`; returns it.
    pub fn expect(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if f(&l) => return l,
                Ok(_) => continue,
                Err(_) => panic!("no line {what} within {timeout:?}"),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the CLI reported as successful, shared between writer threads.
pub type Acked = Arc<Mutex<Vec<(String, i64)>>>;

/// Kills (SIGKILL) and reaps a child when dropped.
pub struct Guard(pub Child);

impl Guard {
    /// Wait for the exit status, at most `timeout` (then kill and panic).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = self.0.kill();
                panic!("process {} still running after {timeout:?}", self.0.id());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Data directories of the agents by API address, for [`auth_header`].
static DATA_DIRS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// Remember which data directory (with its `api.token`) serves `api`.
pub fn register_api(api: &str, data_dir: &Path) {
    let mut d = DATA_DIRS.lock().unwrap();
    d.retain(|(a, _)| a != api);
    d.push((api.to_string(), data_dir.to_path_buf()));
}

/// The API token of the agent serving `api` (from its data directory's `api.token`).
pub fn token(api: &str) -> String {
    let dir = DATA_DIRS
        .lock()
        .unwrap()
        .iter()
        .find(|(a, _)| a == api)
        .map(|(_, d)| d.clone())
        .unwrap_or_else(|| panic!("no agent registered at {api}"));
    std::fs::read_to_string(dir.join("api.token"))
        .unwrap_or_else(|e| panic!("read {}/api.token: {e}", dir.display()))
        .trim()
        .to_string()
}

/// `Authorization: Bearer <token>\r\n` for the agent at `api`.
pub fn auth_header(api: &str) -> String {
    format!("Authorization: Bearer {}\r\n", token(api))
}

/// `/v1/docs/{doc}/{seg}…` for a document and a dotted path of plain keys.
pub fn doc_url(doc: &str, path: &str) -> String {
    let mut url = format!("/v1/docs/{}", doc.replace('/', "%2F"));
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        url.push('/');
        url.push_str(seg);
    }
    url
}

/// GET over plain HTTP/1.1 with the agent's token (for `/metrics`, which has no CLI command).
pub fn http_get(api: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).expect("connect to the API");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\n{}Connection: close\r\n\r\n",
        auth_header(api)
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `lichen put` over plain HTTP/1.1, for tests that write faster than a CLI process per write
/// allows: the HTTP status, or 0 if the connection failed.
pub fn http_put(api: &str, doc: &str, path: &str, json_body: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(api) else {
        return 0;
    };
    let req = format!(
        "PUT {} HTTP/1.1\r\nHost: {api}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json_body}",
        doc_url(doc, path),
        auth_header(api),
        json_body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return 0;
    }
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Read one whole HTTP/1.1 answer (the server closes the connection): status, headers
/// (lower-case names), body.
pub fn read_answer(s: &mut impl std::io::Read) -> (u16, Vec<(String, String)>, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}
