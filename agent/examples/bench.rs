//! End-to-end benchmark of three `lichen` agents on loopback.
//!
//! ```text
//! cargo build --release -p lichen-agent
//! cargo run --release -p lichen-agent --example bench -- [--writes N] [--seconds S] [--clients C] [--fsync local|always|never] [--docs D] [--bursts B]
//! ```
//!
//! The agent binary is found next to this example's directory (`target/release/lichen`) or
//! in `$LICHEN_BIN`. Measures:
//!
//! * write → visible on all: one write at a time through agent a's HTTP API, observed through
//!   the SSE watch API of b and c; the latency is the later of the two arrivals (p50, p99);
//! * the write's own acknowledgement latency (durable on a);
//! * throughput with C concurrent clients (default 8) writing through a's API, and the time
//!   for b and c to have everything afterwards;
//! * CPU time (utime + stime from /proc/PID/stat) summed over the three agents, per write;
//! * resident memory (VmRSS from /proc/PID/status): idle after start, and after the run, split
//!   into anonymous memory (the agent's own heap and stacks) and file pages (mostly the
//!   binary's code, shared with every process mapping it and reclaimable page cache);
//! * with `--bursts B`: B bursts of 200 sequential writes 1.5 s apart (visible p50, p99, max);
//! * with `--docs D`: D documents written once each and then rewritten, and agent a's
//!   anonymous memory before and after (the agent keeps a bounded number in memory).
//!
//! The clients run on the same machine and compete with the agents for the CPU.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Agent {
    name: String,
    api: String,
    child: Child,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

struct Cluster {
    agents: Vec<Agent>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

/// The API token file of each agent by API address (its data directory's `api.token`), and the
/// token once read.
type TokenEntry = (String, PathBuf, Option<String>);
static TOKENS: std::sync::Mutex<Vec<TokenEntry>> = std::sync::Mutex::new(Vec::new());

/// `Bearer <token>` for the agent at `api` (empty until its token file exists). The token is
/// read from the file once and then kept, so that no file is read inside a timed write.
fn bearer(api: &str) -> String {
    let Ok(mut tokens) = TOKENS.lock() else {
        return "Bearer ".to_string();
    };
    let Some(entry) = tokens.iter_mut().find(|(a, _, _)| a == api) else {
        return "Bearer ".to_string();
    };
    if entry.2.is_none() {
        entry.2 = std::fs::read_to_string(&entry.1)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| t.len() >= 64);
    }
    format!("Bearer {}", entry.2.as_deref().unwrap_or_default())
}

fn get(h: &ureq::Agent, api: &str, path: &str) -> Option<Value> {
    let mut r = h
        .get(format!("http://{api}{path}"))
        .header("Authorization", bearer(api))
        .call()
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.body_mut().read_json().ok()
}

/// A keep-alive HTTP/1.1 client for `PUT /v1/docs/{doc}/{path}` that sends each request in one write, as
/// curl and hyper do for a small body. (ureq writes the head and the body separately: the
/// agent then wakes up twice per request, which adds 30-60 µs to every write measured.)
struct Writer {
    api: String,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl Writer {
    fn new(api: &str) -> Writer {
        Writer {
            api: api.to_string(),
            conn: None,
        }
    }

    /// Write `v` at `doc`/`path`; Ok once the agent answered 200 (the write is durable).
    fn put(&mut self, doc: &str, path: &str, v: &Value) -> Result<()> {
        // The bench's names need no percent-encoding.
        let plain = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_/.-".contains(&b))
        };
        if !plain(doc) || !plain(path) {
            return Err(format!("bench names must be plain: {doc:?} {path:?}").into());
        }
        let body = serde_json::to_vec(v)?;
        let mut req = format!(
            "PUT /v1/docs/{}/{} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            doc.replace('/', "%2F"),
            path.replace('.', "/"),
            self.api,
            bearer(&self.api),
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let result = self.exchange(&req);
        if result.is_err() {
            // Never reuse a connection in an unknown state.
            self.conn = None;
        }
        let (status, answer) = result?;
        if status != 200 {
            return Err(format!("put answered {status}: {answer}").into());
        }
        Ok(())
    }

    fn exchange(&mut self, req: &[u8]) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect(&self.api)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.conn = Some(std::io::BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.get_mut().write_all(req)?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = None;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err("connection closed in the response head".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = Some(v.trim().parse::<usize>()?);
                } else if k == "transfer-encoding" || (k == "connection" && v.trim() == "close") {
                    return Err(format!("unexpected response header {l:?}").into());
                }
            }
        }
        let len = len.ok_or("response without content-length")?;
        if len > 1 << 20 {
            return Err(format!("response of {len} bytes").into());
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Writes in one burst of the `--bursts` phase.
const BURST: usize = 200;

/// Write `i` through a and wait until both watchers saw it: (acknowledged, visible on both).
fn one_write(
    w: &mut Writer,
    rx: &mpsc::Receiver<(i64, Instant)>,
    i: i64,
) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    w.put("bench", "lat", &json!(i))?;
    let ack = t0.elapsed();
    let mut got = 0;
    let mut last = t0;
    while got < 2 {
        let (v, at) = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("write {i} not seen on all agents within 10 s"))?;
        if v == i {
            got += 1;
            last = last.max(at);
        }
    }
    Ok((ack, last.duration_since(t0)))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(start.elapsed())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn node_ip(i: u8) -> IpAddr {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + i));
    if UdpSocket::bind((ip, 0)).is_ok() {
        ip
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

fn free_udp(ip: IpAddr) -> Result<SocketAddr> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?)
}

fn find_lichen() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LICHEN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench → target/<profile>/lichen
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lichen"))
        .ok_or("no parent directory")?;
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release -p lichen-agent` first, or set LICHEN_BIN",
            p.display()
        )
        .into())
    }
}

fn start(bin: &Path, fsync: &str) -> Result<Cluster> {
    let dir = std::env::temp_dir().join(format!("lichen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("log = \"warn\"\nfsync = \"{fsync}\"\n"))?;
    let mut c = Cluster {
        agents: Vec::new(),
        dir: dir.clone(),
    };
    let h = http();
    let mut token: Option<String> = None;
    for i in 0..3u8 {
        let name = ((b'a' + i) as char).to_string();
        let api = format!("127.0.0.1:{}", free_port());
        let listen = free_udp(node_ip(i))?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--api", &api, "run", "--name", &name])
            .arg("--data-dir")
            .arg(dir.join(&name))
            .arg("--config")
            .arg(&config)
            .args(["--listen", &listen.to_string()])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(t) = &token {
            cmd.args(["--join", t]);
        }
        let child = cmd.spawn()?;
        if let Ok(mut t) = TOKENS.lock() {
            t.push((api.clone(), dir.join(&name).join("api.token"), None));
        }
        c.agents.push(Agent {
            name,
            api: api.clone(),
            child,
        });
        wait_for("an agent to start", Duration::from_secs(20), || {
            get(&h, &api, "/v1/status").is_some()
        })?;
        let st = get(&h, &api, "/v1/status").ok_or("no status")?;
        if token.is_none() {
            token = st["join_token"].as_str().map(str::to_string);
        } else {
            let id = st["node"]["id"].as_str().unwrap_or_default().to_string();
            let r = h
                .post(format!("http://{}/v1/members", c.agents[0].api))
                .header("Authorization", bearer(&c.agents[0].api))
                .send_json(
                    json!({"id": id, "role": "writer", "name": c.agents[i as usize].name}),
                )?;
            if r.status() != 200 {
                return Err("members add failed".into());
            }
        }
    }
    for a in &c.agents {
        wait_for("the cluster to connect", Duration::from_secs(30), || {
            get(&h, &a.api, "/v1/status").is_some_and(|s| {
                s["node"]["role"] != "not a member"
                    && s["peers"]
                        .as_array()
                        .map(|p| p.iter().filter(|p| p["connected"] == true).count())
                        == Some(2)
            })
        })?;
    }
    Ok(c)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32, tck: f64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / tck
}

/// A counter from an agent's /metrics (0 if absent).
fn metric(h: &ureq::Agent, api: &str, name: &str) -> f64 {
    let text = h
        .get(format!("http://{api}/metrics"))
        .header("Authorization", bearer(api))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_each(c: &Cluster, tck: f64) -> Vec<f64> {
    c.agents.iter().map(|a| cpu_seconds(a.pid(), tck)).collect()
}

/// "total (a x, b y, c z)" in ms per write.
fn cpu_line(before: &[f64], after: &[f64], writes: f64) -> String {
    let per: Vec<f64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a - b) * 1000.0 / writes.max(1.0))
        .collect();
    format!(
        "{:.3} ms (a {:.3}, b {:.3}, c {:.3})",
        per.iter().sum::<f64>(),
        per[0],
        per[1],
        per[2]
    )
}

fn rss_line(c: &Cluster) -> String {
    c.agents
        .iter()
        .map(|a| {
            let mib = |k: u64| k as f64 / 1024.0;
            format!(
                "{} {:.1} MiB (anon {:.1}, file {:.1})",
                a.name,
                mib(rss_kib(a.pid())),
                mib(status_kib(a.pid(), "RssAnon:")),
                mib(status_kib(a.pid(), "RssFile:"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Follow `GET /v1/docs/{doc}/{path}?watch` and send (value, arrival time) for each event.
fn watcher(api: String, doc: &'static str, path: &'static str, tx: mpsc::Sender<(i64, Instant)>) {
    let agent =
        ureq::Agent::new_with_config(ureq::Agent::config_builder().timeout_global(None).build());
    let Ok(resp) = agent
        .get(format!("http://{api}/v1/docs/{doc}/{path}?watch"))
        .header("Authorization", bearer(&api))
        .call()
    else {
        return;
    };
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if let Some(d) = line.strip_prefix("data:") {
            let now = Instant::now();
            let v: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
            let n = v["value"].as_i64().unwrap_or(-1);
            if tx.send((n, now)).is_err() {
                return;
            }
        }
    }
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let writes: usize = arg(&args, "--writes", "2000").parse()?;
    let seconds: f64 = arg(&args, "--seconds", "5").parse()?;
    let clients: usize = arg(&args, "--clients", "8").parse()?;
    let docs: usize = arg(&args, "--docs", "0").parse()?;
    let bursts: usize = arg(&args, "--bursts", "0").parse()?;
    let fsync = arg(&args, "--fsync", "local");
    let bin = find_lichen()?;
    let tck = clk_tck();
    println!("agent: {} (fsync {fsync})", bin.display());
    let c = start(&bin, &fsync)?;
    let h = http();
    // Let start-up work (membership, first anti-entropy rounds) settle before measuring idle.
    std::thread::sleep(Duration::from_secs(2));
    println!("RSS idle                 : {}", rss_line(&c));

    // --- write → visible on all ---------------------------------------------------------
    let (tx, rx) = mpsc::channel();
    for a in &c.agents[1..] {
        let (api, tx) = (a.api.clone(), tx.clone());
        std::thread::spawn(move || watcher(api, "bench", "lat", tx));
    }
    // Both watchers deliver the initial value (null → -1) once subscribed.
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(10))?;
    }
    let a = c.agents[0].api.clone();
    let mut w = Writer::new(&a);
    // Warm-up.
    for i in 0..50i64 {
        w.put("bench", "lat", &json!(-100 - i))?;
    }
    wait_for("warm-up to arrive", Duration::from_secs(10), || {
        let mut seen = 0;
        while let Ok((v, _)) = rx.try_recv() {
            if v == -149 {
                seen += 1;
            }
        }
        seen >= 2
    })
    .ok();
    while rx.try_recv().is_ok() {}
    let cpu0 = cpu_each(&c, tck);
    let mut visible = Vec::with_capacity(writes);
    let mut acked = Vec::with_capacity(writes);
    let t_all = Instant::now();
    for i in 1..=writes as i64 {
        let (ack, vis) = one_write(&mut w, &rx, i)?;
        acked.push(ack);
        visible.push(vis);
    }
    let elapsed = t_all.elapsed();
    let cpu1 = cpu_each(&c, tck);
    visible.sort();
    acked.sort();
    println!(
        "\nsequential writes        : {writes} in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "write acknowledged (a)   : p50 {}  p99 {}",
        ms(pct(&acked, 0.5)),
        ms(pct(&acked, 0.99))
    );
    println!(
        "write → visible on b & c: p50 {}  p99 {}  max {}",
        ms(pct(&visible, 0.5)),
        ms(pct(&visible, 0.99)),
        ms(*visible.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "CPU per write (3 agents) : {}",
        cpu_line(&cpu0, &cpu1, writes as f64)
    );

    // --- bursts (optional) -----------------------------------------------------------------
    // Writes in bursts with pauses, as configuration changes tend to come: the agents
    // checkpoint their write-ahead logs in the pauses, not inside a write.
    if bursts > 0 {
        let (mut acked, mut visible) = (Vec::new(), Vec::new());
        let mut i = writes as i64;
        for _ in 0..bursts {
            std::thread::sleep(Duration::from_millis(1500));
            for _ in 0..BURST {
                i += 1;
                let (ack, vis) = one_write(&mut w, &rx, i)?;
                acked.push(ack);
                visible.push(vis);
            }
        }
        acked.sort();
        visible.sort();
        println!(
            "\n{bursts} bursts of {BURST}       : visible p50 {}  p99 {}  max {}; acknowledged max {}",
            ms(pct(&visible, 0.5)),
            ms(pct(&visible, 0.99)),
            ms(*visible.last().unwrap_or(&Duration::ZERO)),
            ms(*acked.last().unwrap_or(&Duration::ZERO))
        );
    }

    // --- throughput -----------------------------------------------------------------------
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_each(&c, tck);
    let writes0 = metric(&h, &a, "lichen_writes_total");
    let changes0 = metric(&h, &a, "lichen_changes_sent_total");
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|k| {
            let (stop, done, a) = (stop.clone(), done.clone(), a.clone());
            std::thread::spawn(move || {
                let mut w = Writer::new(&a);
                let mut lat = Vec::new();
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let t = Instant::now();
                    if w.put("tput", &format!("c{k}"), &json!(i)).is_ok() {
                        lat.push(t.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (k, i, lat)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut last = Vec::new();
    for t in threads {
        let (k, i, l) = t.join().map_err(|_| "client panicked")?;
        lat.extend(l);
        last.push((k, i));
    }
    let wall = t0.elapsed();
    let n = done.load(Ordering::Relaxed);
    // Until b and c have every write.
    let catch_up = wait_for("b and c to catch up", Duration::from_secs(60), || {
        c.agents[1..].iter().all(|ag| {
            get(&h, &ag.api, "/v1/docs/tput").is_some_and(|v| {
                last.iter()
                    .all(|(k, i)| v["value"][format!("c{k}")].as_i64() >= Some(*i - 1))
            })
        })
    })?;
    let cpu1 = cpu_each(&c, tck);
    let signed = metric(&h, &a, "lichen_changes_sent_total") - changes0;
    let acked = metric(&h, &a, "lichen_writes_total") - writes0;
    lat.sort();
    println!(
        "\nthroughput, {clients} clients     : {:.0} writes/s ({n} in {:.2} s)",
        n as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "  signed changes         : {signed:.0} for {acked:.0} writes (group commit shares one change per document)"
    );
    println!(
        "  acknowledged           : p50 {}  p99 {}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
    println!(
        "  b and c caught up      : {} after the last write",
        ms(catch_up)
    );
    println!(
        "  CPU per write (3 agents): {}",
        cpu_line(&cpu0, &cpu1, n as f64)
    );
    println!("\nRSS after                : {}", rss_line(&c));

    // --- many documents (optional) -------------------------------------------------------
    // Each document written once, then once more: the agent keeps at most
    // DEFAULT_MAX_LOADED_DOCS of them in memory, so its own memory stays flat.
    if docs > 0 {
        let a = &c.agents[0];
        let anon0 = status_kib(a.pid(), "RssAnon:");
        let t = Instant::now();
        for i in 0..docs {
            let v = json!({"host": format!("h{i}"), "port": 8000 + i, "limits": {"rate": i}});
            w.put(&format!("app/svc{i}"), "", &v)?;
        }
        let first = t.elapsed();
        let t = Instant::now();
        for i in 0..docs {
            w.put(&format!("app/svc{i}"), "port", &json!(9000 + i))?;
        }
        let second = t.elapsed();
        println!(
            "\n{docs} documents        : {:.0} writes/s, rewriting each {:.0} writes/s; a's anonymous memory {:.1} -> {:.1} MiB",
            docs as f64 / first.as_secs_f64(),
            docs as f64 / second.as_secs_f64(),
            anon0 as f64 / 1024.0,
            status_kib(a.pid(), "RssAnon:") as f64 / 1024.0
        );
    }
    Ok(())
}
