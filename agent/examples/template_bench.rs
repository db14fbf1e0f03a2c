//! Benchmark of template bindings: many bindings on one agent, a write on another.
//!
//! ```text
//! cargo build --release -p lichen-agent
//! cargo run --release -p lichen-agent --example template_bench -- [--bindings N] [--writes W] [--debounce-ms D] [--unaffected U]
//! ```
//!
//! (A debug build works the same: `cargo build -p lichen-agent && cargo run -p lichen-agent
//! --example template_bench`; its figures are a debug build's.) The agent binary is found
//! next to this example's directory (`target/<profile>/lichen`) or in `$LICHEN_BIN`.
//!
//! Two agents on loopback: `a` takes the writes, `b` has N template bindings (default 100),
//! each rendering an nginx-style upstream block of 20 servers from the document
//! `bench/shared` into its own file, plus U bindings (default 0) whose template reads another
//! document (they must not be rendered). For each of W writes (default 20) on `a`, the bench
//! polls b's N files (stat: a new inode) until every one was replaced, checks after the last
//! write that each holds its value, and reports:
//!
//! * write → first file replaced, and → every affected file replaced (p50, p99, max);
//! * agent b's CPU time (utime + stime, /proc/PID/stat) over the writes, per affected file:
//!   receiving and verifying the change, one template render, the staged write, fsync,
//!   rename and directory fsync;
//! * renders counted by `lichen_template_renders_total` (to show unaffected bindings were
//!   not rendered).
//!
//! `--debounce-ms` sets the bindings' debounce window (default 0 here, to measure the
//! machinery; the agent's default is 200 ms, which adds that much to every latency).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Agents {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
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

/// The API token of each agent by API address (read from its data directory's `api.token`).
static TOKENS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// `Bearer <token>` for the agent at `api` (empty until its token file exists).
fn bearer(api: &str) -> String {
    let file = TOKENS
        .lock()
        .ok()
        .and_then(|t| t.iter().find(|(a, _)| a == api).map(|(_, f)| f.clone()));
    let token = file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .unwrap_or_default();
    format!("Bearer {}", token.trim())
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

/// `PUT /v1/docs/{doc}[/{key}]` (a one-key path; the whole document when `key` is empty).
fn put(h: &ureq::Agent, api: &str, doc: &str, key: &str, v: &Value) -> Result<()> {
    let mut url = format!("http://{api}/v1/docs/{}", doc.replace('/', "%2F"));
    if !key.is_empty() {
        url.push('/');
        url.push_str(key);
    }
    let r = h
        .put(url)
        .header("Authorization", bearer(api))
        .send_json(v)?;
    if r.status() != 200 {
        return Err(format!("put answered {}", r.status()).into());
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn free_udp(i: u8) -> Result<SocketAddr> {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 31 + i));
    let ip = if UdpSocket::bind((ip, 0)).is_ok() {
        ip
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?)
}

fn find_lichen() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LICHEN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lichen"))
        .ok_or("no parent directory")?;
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build lichen-agent first, or set LICHEN_BIN",
            p.display()
        )
        .into())
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let tck: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / tck
}

fn metric(h: &ureq::Agent, api: &str, name: &str) -> f64 {
    h.get(format!("http://{api}/metrics"))
        .header("Authorization", bearer(api))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

const TEMPLATE: &str = r#"# binding {{ n }}
upstream app_{{ n }} {
{% for s in doc("bench/shared").servers %}
    server {{ s }} weight={{ loop.index }};
{% endfor %}
}
# seq {{ doc("bench/shared").seq }}
"#;

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--bindings", 100)?;
    let writes = arg(&args, "--writes", 20)?;
    let debounce = arg(&args, "--debounce-ms", 0)?;
    let unaffected = arg(&args, "--unaffected", 0)?;
    let bin = find_lichen()?;
    let dir = std::env::temp_dir().join(format!("lichen-tbench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("out"))?;
    let mut agents = Agents {
        children: Vec::new(),
        dir: dir.clone(),
    };
    // b's bindings: one template file per binding (the binding number is in the text).
    let mut config = String::from("log = \"warn\"\n");
    for i in 0..n + unaffected {
        let t = dir.join(format!("t{i}.tmpl"));
        let src = if i < n {
            TEMPLATE.replace("{{ n }}", &i.to_string())
        } else {
            format!("other {{{{ doc(\"bench/other\").v | default(0) }}}} {i}\n")
        };
        std::fs::write(&t, src)?;
        config.push_str(&format!(
            "\n[[bind]]\ntemplate = \"{}\"\nfile = \"{}\"\ndebounce_ms = {debounce}\n",
            t.display(),
            dir.join("out").join(format!("f{i}.conf")).display()
        ));
    }
    std::fs::write(dir.join("a.toml"), "log = \"warn\"\n")?;
    std::fs::write(dir.join("b.toml"), config)?;
    let h = http();
    let mut apis: Vec<String> = Vec::new();
    let mut token: Option<String> = None;
    for (i, name) in ["a", "b"].iter().enumerate() {
        let api = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--api", &api, "run", "--name", name])
            .arg("--data-dir")
            .arg(dir.join(name))
            .arg("--config")
            .arg(dir.join(format!("{name}.toml")))
            .args(["--listen", &free_udp(i as u8)?.to_string()])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(t) = &token {
            cmd.args(["--join", t]);
        }
        agents.children.push(cmd.spawn()?);
        if let Ok(mut t) = TOKENS.lock() {
            t.push((api.clone(), dir.join(name).join("api.token")));
        }
        wait_for("an agent to start", Duration::from_secs(30), || {
            get(&h, &api, "/v1/status").is_some()
        })?;
        let st = get(&h, &api, "/v1/status").ok_or("no status")?;
        match &token {
            None => token = st["join_token"].as_str().map(str::to_string),
            Some(_) => {
                let id = st["node"]["id"].as_str().unwrap_or_default().to_string();
                let r = h
                    .post(format!("http://{}/v1/members", apis[0]))
                    .header("Authorization", bearer(&apis[0]))
                    .send_json(json!({"id": id, "role": "writer", "name": name}))?;
                if r.status() != 200 {
                    return Err("members add failed".into());
                }
            }
        }
        apis.push(api);
    }
    let (a, b) = (apis[0].clone(), apis[1].clone());
    let b_pid = agents.children[1].id();
    wait_for(
        "b to be a connected writer",
        Duration::from_secs(30),
        || {
            get(&h, &b, "/v1/status").is_some_and(|s| {
                s["node"]["role"] == "writer"
                    && s["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p["connected"] == true))
            })
        },
    )?;
    let servers: Vec<String> = (1..=20).map(|i| format!("10.0.0.{i}:8080")).collect();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| dir.join("out").join(format!("f{i}.conf")))
        .collect();
    let all_hold = |marker: &str| {
        files.iter().all(|f| {
            std::fs::read_to_string(f)
                .map(|s| s.contains(marker))
                .unwrap_or(false)
        })
    };
    // Warm-up: the first value, rendered everywhere.
    put(
        &h,
        &a,
        "bench/shared",
        "",
        &json!({"servers": servers, "seq": 0}),
    )?;
    wait_for(
        "the first render of every file",
        Duration::from_secs(120),
        || all_hold("# seq 0\n"),
    )?;
    let renders0 = metric(&h, &b, "lichen_template_renders_total");
    let cpu0 = cpu_seconds(b_pid);
    let (mut first, mut last) = (Vec::new(), Vec::new());
    // A file is replaced by a rename: a new inode. Polled with stat(2), which (unlike opening
    // the file) raises no inotify event for the agent's directory watchers; the content is
    // checked once after the measured writes.
    let ino = |f: &Path| std::fs::metadata(f).map(|m| m.ino()).unwrap_or(0);
    for seq in 1..=writes {
        let mut pending: Vec<(&PathBuf, u64)> = files.iter().map(|f| (f, ino(f))).collect();
        let t0 = Instant::now();
        put(&h, &a, "bench/shared", "seq", &json!(seq))?;
        let mut first_at = None;
        while !pending.is_empty() {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(format!("write {seq}: {} files never updated", pending.len()).into());
            }
            pending.retain(|(f, before)| ino(f) == *before);
            if pending.len() < n && first_at.is_none() {
                first_at = Some(t0.elapsed());
            }
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        last.push(t0.elapsed().as_secs_f64() * 1000.0);
        first.push(first_at.unwrap_or_default().as_secs_f64() * 1000.0);
        // Let the agent go idle before the next write.
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = cpu_seconds(b_pid) - cpu0;
    let renders = metric(&h, &b, "lichen_template_renders_total") - renders0;
    if !all_hold(&format!("# seq {writes}\n")) {
        return Err("a file does not hold the last value".into());
    }
    first.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    println!(
        "{n} template bindings (+{unaffected} reading another document) on b, {writes} writes on a, debounce {debounce} ms"
    );
    println!(
        "write -> first file replaced   p50 {:.1} ms  p99 {:.1} ms",
        percentile(&first, 0.5),
        percentile(&first, 0.99)
    );
    println!(
        "write -> all {n} files replaced p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&last, 0.5),
        percentile(&last, 0.99),
        last.last().copied().unwrap_or(0.0)
    );
    println!(
        "agent b CPU: {:.3} s over {writes} writes = {:.3} ms per affected file (render + write + fsync), {renders} renders counted (expected {})",
        cpu,
        cpu * 1000.0 / (writes * n) as f64,
        writes * n
    );
    Ok(())
}
