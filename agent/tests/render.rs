//! File bindings end to end: real `lichen` processes, real files, the real watcher.
//!
//! Every test starts agents on loopback in a temporary directory, waits on conditions with a
//! deadline (never a fixed sleep for correctness), and kills its agents in a `Drop` guard.
//! Where a test must show that something does *not* happen (an invalid edit is not applied,
//! an unchanged file is not rewritten) it first waits for a positive signal that the agent
//! has looked (a metric or a log line), then checks.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::io::{BufRead, Write as _};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const LICHEN: &str = env!("CARGO_BIN_EXE_lichen");

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free tcp port")
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

/// Patience for a condition that involves restarts and the write hold after a start
/// (sync.hold_writes_ms = 5 s) on a loaded machine, as `common::PATIENCE`.
const PATIENCE: u64 = 30;

/// Poll `cond` until it holds or `secs` pass.
fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One `lichen run` process.
struct Agent {
    child: Option<Child>,
    api: String,
    data: PathBuf,
    config: PathBuf,
    listen: String,
    log: PathBuf,
}

impl Agent {
    /// Start an agent with `config`; `listen` is `127.0.0.1:PORT` (a fixed port lets a
    /// restarted node be found again by its peers).
    fn start(dir: &Path, name: &str, config: &Path, listen: &str, join: Option<&str>) -> Agent {
        let mut a = Agent {
            child: None,
            api: format!("127.0.0.1:{}", free_tcp_port()),
            data: dir.join(format!("{name}-data")),
            config: config.to_path_buf(),
            listen: listen.to_string(),
            log: dir.join(format!("{name}.log")),
        };
        a.spawn(name, join);
        a
    }

    fn spawn(&mut self, name: &str, join: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(LICHEN);
        cmd.args([
            "--api",
            &self.api,
            "run",
            "--name",
            name,
            "--listen",
            &self.listen,
        ])
        .arg("--data-dir")
        .arg(&self.data)
        .arg("--config")
        .arg(&self.config)
        .env("RUST_LOG", "info")
        .env_remove("LICHEN_API")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(j) = join {
            cmd.args(["--join", j]);
        }
        self.child = Some(cmd.spawn().expect("start lichen"));
        let api = self.api.clone();
        let data = self.data.clone();
        wait_for(&format!("{name} API up"), 15, || {
            let Ok(t) = std::fs::read_to_string(data.join("api.token")) else {
                return false;
            };
            ureq::get(format!("http://{api}/v1/status"))
                .header("Authorization", format!("Bearer {}", t.trim()))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
    }

    /// `Bearer <the agent's API token>`.
    fn bearer(&self) -> String {
        let t = std::fs::read_to_string(self.data.join("api.token")).expect("api.token");
        format!("Bearer {}", t.trim())
    }

    /// `/v1/docs/{doc}/{seg}…` for a dotted path of plain keys.
    fn doc_url(&self, doc: &str, path: &str) -> String {
        let mut url = format!("http://{}/v1/docs/{}", self.api, doc.replace('/', "%2F"));
        for seg in path.split('.').filter(|s| !s.is_empty()) {
            url.push('/');
            url.push_str(seg);
        }
        url
    }

    /// Kill (SIGKILL) and wait.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop and start again with the same data, config and ports.
    fn restart(&mut self, name: &str) {
        self.kill();
        self.spawn(name, None);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_count(&self, needle: &str) -> usize {
        std::fs::File::open(&self.log)
            .map(|f| {
                std::io::BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .unwrap_or(0)
    }

    fn status(&self) -> Value {
        ureq::get(format!("http://{}/v1/status", self.api))
            .header("Authorization", self.bearer())
            .call()
            .expect("status")
            .body_mut()
            .read_json()
            .expect("status json")
    }

    fn get(&self, doc: &str, path: &str) -> Option<Value> {
        let mut r = ureq::get(self.doc_url(doc, path))
            .header("Authorization", self.bearer())
            .call()
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        let v: Value = r.body_mut().read_json().ok()?;
        Some(v["value"].clone())
    }

    fn put(&self, doc: &str, path: &str, value: Value) -> bool {
        let mut r = ureq::put(self.doc_url(doc, path))
            .header("Authorization", self.bearer())
            .send_json(&value)
            .expect("put");
        let v: Value = r.body_mut().read_json().expect("put json");
        v["changed"] == json!(true)
    }

    /// Value of one metric line, e.g. `lichen_ingest_errors_total{reason="syntax"}`.
    fn metric(&self, name: &str) -> u64 {
        let text = ureq::get(format!("http://{}/metrics", self.api))
            .header("Authorization", self.bearer())
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Run a CLI command against this agent.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(LICHEN)
            .arg("--api")
            .arg(&self.api)
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env_remove("LICHEN_API")
            .output()
            .expect("lichen cli");
        assert!(
            out.status.success(),
            "lichen {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A config file with one binding of `doc` to `file`; `extra` adds lines to the `[[bind]]`.
fn config(dir: &Path, name: &str, doc: &str, file: &Path, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let text = format!(
        "[sync]\nanti_entropy_ms = 200\n\n[[bind]]\ndoc = \"{doc}\"\nfile = \"{}\"\ndebounce_ms = 50\nreload_jitter_ms = 0\ncommand_timeout_ms = 5000\n{extra}\n",
        file.display()
    );
    std::fs::write(&p, text).expect("write config");
    p
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&read(p)).ok()
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Write `text` to a new file next to `p`, then rename it over `p` (how most editors save).
fn save_by_rename(p: &Path, text: &str) {
    let tmp = p.with_file_name(format!(
        ".{}.swp",
        p.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let mut f = std::fs::File::create(&tmp).expect("temp file");
    f.write_all(text.as_bytes()).expect("write temp");
    f.sync_all().expect("sync temp");
    drop(f);
    std::fs::rename(&tmp, p).expect("rename");
}

/// `sed -i` on a file.
fn sed(p: &Path, expr: &str) {
    let st = Command::new("sed")
        .arg("-i")
        .arg(expr)
        .arg(p)
        .status()
        .expect("sed");
    assert!(st.success());
}

/// Start node A (founder) and node B (joined, made a writer), both with `extra` bindings.
fn two_nodes(
    dir: &Path,
    doc: &str,
    extra: &str,
    before_b: impl FnOnce(&Path),
) -> (Agent, Agent, PathBuf, PathBuf) {
    two_nodes_with(dir, doc, "json", extra, before_b)
}

/// [`two_nodes`] with files `a.<ext>` and `b.<ext>`.
fn two_nodes_with(
    dir: &Path,
    doc: &str,
    ext: &str,
    extra: &str,
    before_b: impl FnOnce(&Path),
) -> (Agent, Agent, PathBuf, PathBuf) {
    let (fa, fb) = (dir.join(format!("a.{ext}")), dir.join(format!("b.{ext}")));
    let ca = config(dir, "a", doc, &fa, extra);
    let cb = config(dir, "b", doc, &fb, extra);
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let a = Agent::start(dir, "a", &ca, &format!("127.0.0.1:{pa}"), None);
    let st = a.status();
    let token = st["join_token"].as_str().expect("join token").to_string();
    before_b(&fb);
    let b = Agent::start(dir, "b", &cb, &format!("127.0.0.1:{pb}"), Some(&token));
    let b_id = b.status()["node"]["id"].as_str().expect("b id").to_string();
    a.cli(&[
        "members",
        "add",
        &b_id,
        "--role",
        "writer",
        "--name",
        "b",
        "--addr",
        &format!("127.0.0.1:{pb}"),
    ]);
    wait_for("B sees itself as a writer", 20, || {
        b.status()["node"]["role"] == json!("writer")
    });
    (a, b, fa, fb)
}

#[test]
fn edits_propagate_between_nodes_through_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    // B starts with a file of its own: it must not be touched before the document exists.
    let (a, b, fa, fb) = two_nodes(dir, "app/web", "mode = \"sync\"", |fb| {
        std::fs::write(fb, "{\"precious\": true}\n").expect("write b file")
    });
    wait_for("B waits for the document", 10, || {
        b.log_count("does not exist yet") > 0
    });
    assert_eq!(read(&fb), b"{\"precious\": true}\n");
    assert!(!fa.exists());

    // Document written on A → rendered on A and B.
    assert!(a.put("app/web", "", json!({"port": 8080, "host": "a.example"})));
    let want = json!({"port": 8080, "host": "a.example"});
    wait_for("B's file rendered", 15, || {
        read_json(&fb) == Some(want.clone())
    });
    wait_for("A's file rendered", 5, || {
        read_json(&fa) == Some(want.clone())
    });
    assert_eq!(
        read(&fa),
        read(&fb),
        "the same document renders to the same bytes"
    );

    // `sed -i` on B's file → A's document and file.
    sed(&fb, "s/8080/9090/");
    wait_for("A's document updated from B's sed edit", 15, || {
        a.get("app/web", "port") == Some(json!(9090))
    });
    wait_for("A's file updated", 5, || {
        read_json(&fa).is_some_and(|v| v["port"] == json!(9090))
    });

    // Write-then-rename on A's file → B's file.
    save_by_rename(
        &fa,
        "{\n  \"host\": \"a.example\",\n  \"port\": 9090,\n  \"workers\": 4\n}\n",
    );
    wait_for("B's file updated from A's renamed save", 15, || {
        read_json(&fb).is_some_and(|v| v["workers"] == json!(4))
    });
    assert_eq!(b.get("app/web", "workers"), Some(json!(4)));
    // The edited file is not rewritten by its own echo (the user's bytes stay).
    assert_eq!(
        read(&fa),
        b"{\n  \"host\": \"a.example\",\n  \"port\": 9090,\n  \"workers\": 4\n}\n"
    );
    // Remove A's file and save it again: still picked up.
    std::fs::remove_file(&fa).expect("remove");
    std::fs::write(
        &fa,
        "{\"host\": \"a.example\", \"port\": 9090, \"workers\": 8}",
    )
    .expect("w");
    wait_for("B's file updated after A's file reappeared", 15, || {
        read_json(&fb).is_some_and(|v| v["workers"] == json!(8))
    });
}

#[test]
fn invalid_edits_are_ignored_and_the_file_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let file = dir.join("app.json");
    let reloads = dir.join("reloads.log");
    let extra = format!(
        "mode = \"sync\"\nreload = [\"sh\", \"-c\", \"echo reloaded >> '{}'\"]",
        reloads.display()
    );
    let cfg = config(dir, "n", "app/cfg", &file, &extra);
    let a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);
    assert!(a.put("app/cfg", "", json!({"limit": 1})));
    wait_for("file rendered", 10, || {
        read_json(&file) == Some(json!({"limit": 1}))
    });
    wait_for("reloaded after the render", 10, || lines(&reloads) == 1);

    // A syntax error: counted, logged with its position, file and document untouched.
    let broken = "{\n  \"limit\": 2,\n  oops\n}\n";
    std::fs::write(&file, broken).expect("write");
    wait_for("syntax error counted", 10, || {
        a.metric("lichen_ingest_errors_total{reason=\"syntax\"}") >= 1
    });
    assert!(a.log_count("ignoring an invalid edit") >= 1);
    assert!(
        a.log_text().contains("line 3, column 3"),
        "the log names the line and column"
    );
    // Something else happens afterwards (another document): still untouched.
    assert!(a.put("other", "", json!({"x": 1})));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(&file), broken.as_bytes());
    assert_eq!(a.get("app/cfg", ""), Some(json!({"limit": 1})));

    // Valid syntax, wrong type at the top: refused the same way.
    std::fs::write(&file, "[1, 2, 3]\n").expect("write");
    wait_for("root error counted", 10, || {
        a.metric("lichen_ingest_errors_total{reason=\"root\"}") >= 1
    });
    assert_eq!(read(&file), b"[1, 2, 3]\n");
    assert_eq!(a.get("app/cfg", ""), Some(json!({"limit": 1})));

    assert_eq!(lines(&reloads), 1, "invalid edits do not reload");

    // Fixed: applied, and the service reloaded (the file changed effectively).
    std::fs::write(&file, "{\"limit\": 3}").expect("write");
    wait_for("fixed edit applied", 10, || {
        a.get("app/cfg", "limit") == Some(json!(3))
    });
    wait_for("reloaded after the edit", 10, || lines(&reloads) == 2);
    assert_eq!(read(&file), b"{\"limit\": 3}", "the user's bytes are kept");
    // A later document change renders over the user's file again.
    assert!(a.put("app/cfg", "limit", json!(4)));
    wait_for("re-rendered", 10, || {
        read_json(&file) == Some(json!({"limit": 4}))
    });
    wait_for("reloaded after the render", 10, || lines(&reloads) == 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&reloads), 3);
}

#[test]
fn reload_runs_once_per_effective_change_and_a_failing_check_keeps_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let file = dir.join("svc.yaml");
    let reloads = dir.join("reloads.log");
    let extra = format!(
        "check = [\"sh\", \"-c\", \"! grep -q forbidden \\\"$0\\\"\"]\nreload = [\"sh\", \"-c\", \"echo reloaded >> '{}'\"]",
        reloads.display()
    );
    let cfg = config(dir, "n", "svc", &file, &extra);
    let a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);

    assert!(a.put("svc", "", json!({"mode": "one"})));
    wait_for("first render", 10, || read(&file) == b"mode: one\n");
    wait_for("first reload", 10, || lines(&reloads) == 1);

    // A write that changes nothing, and a change to another document: no reload.
    assert!(!a.put("svc", "mode", json!("one")));
    assert!(a.put("unrelated", "", json!({"x": 1})));
    assert!(a.put("svc", "mode", json!("two")));
    wait_for("second render", 10, || read(&file) == b"mode: two\n");
    wait_for("second reload", 10, || lines(&reloads) == 2);

    // The check refuses: the old file stays, the failure is counted, no reload.
    assert!(a.put("svc", "mode", json!("forbidden")));
    wait_for("check failure counted", 10, || {
        a.metric("lichen_render_errors_total{reason=\"check\"}") >= 1
    });
    assert_eq!(read(&file), b"mode: two\n");
    assert!(a.log_count("check refused") >= 1);

    // The next good change is rendered and reloaded once.
    assert!(a.put("svc", "mode", json!("three")));
    wait_for("third render", 10, || read(&file) == b"mode: three\n");
    wait_for("third reload", 10, || lines(&reloads) == 3);
    // Quiet period: nothing more happens.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(lines(&reloads), 3);
    assert_eq!(a.metric("lichen_render_reloads_total"), 3);
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".lichen-"))
        .collect();
    assert!(leftovers.is_empty(), "no staged files left behind");
}

#[test]
fn start_up_never_renders_from_nothing_and_a_restart_leaves_the_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let file = dir.join("conf.toml");
    let reloads = dir.join("reloads.log");
    std::fs::write(&file, "# written by hand\nkeep = true\n").expect("write");
    let extra = format!(
        "reload = [\"sh\", \"-c\", \"echo reloaded >> '{}'\"]",
        reloads.display()
    );
    let cfg = config(dir, "n", "conf", &file, &extra);
    let mut a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);

    // The document does not exist: the file is not touched.
    wait_for("waiting logged", 10, || {
        a.log_count("does not exist yet") > 0
    });
    assert_eq!(read(&file), b"# written by hand\nkeep = true\n");
    assert_eq!(lines(&reloads), 0);

    // The first write renders.
    assert!(a.put("conf", "", json!({"keep": false, "level": 3})));
    wait_for("rendered", 10, || {
        String::from_utf8_lossy(&read(&file)).contains("level = 3")
    });
    wait_for("reloaded", 10, || lines(&reloads) == 1);
    let before = std::fs::metadata(&file).expect("meta");
    let bytes = read(&file);

    // Restart: the file already matches the document, so it is not rewritten or reloaded.
    a.restart("n");
    wait_for("binding started again", 10, || {
        a.log_count("file binding started") >= 2
    });
    wait_for("start-up check done", 10, || {
        a.log_count("is up to date") >= 1
    });
    let after = std::fs::metadata(&file).expect("meta");
    assert_eq!(before.ino(), after.ino(), "same inode");
    assert_eq!(
        (before.mtime(), before.mtime_nsec()),
        (after.mtime(), after.mtime_nsec()),
        "same mtime"
    );
    assert_eq!(read(&file), bytes);
    assert_eq!(lines(&reloads), 1);
}

#[test]
fn concurrent_edits_during_a_partition_merge_and_files_converge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (mut a, mut b, fa, fb) = two_nodes(dir, "app/site", "mode = \"sync\"", |_| {});
    assert!(a.put("app/site", "", json!({"shared": "base", "n": 1})));
    wait_for("B rendered the base", PATIENCE, || {
        read_json(&fb) == Some(json!({"shared": "base", "n": 1}))
    });
    // Each side edits its rendered file (an edit racing A's first render is another test).
    wait_for("A rendered the base", PATIENCE, || {
        read_json(&fa) == Some(json!({"shared": "base", "n": 1}))
    });

    // Partition: only one side runs at a time, each edits its own file.
    b.kill();
    std::fs::write(&fa, "{\"shared\": \"from-a\", \"n\": 1, \"a_only\": 1}").expect("w");
    wait_for("A ingested its edit", PATIENCE, || {
        a.get("app/site", "a_only") == Some(json!(1))
    });
    a.kill();
    b.restart("b");
    wait_for("B's binding is up", PATIENCE, || {
        b.log_count("is up to date") >= 1
    });
    std::fs::write(&fb, "{\"shared\": \"from-b\", \"n\": 1, \"b_only\": 2}").expect("w");
    wait_for("B ingested its edit", PATIENCE, || {
        b.get("app/site", "b_only") == Some(json!(2))
    });

    // Heal.
    a.restart("a");
    let merged = |v: &Value| v["a_only"] == json!(1) && v["b_only"] == json!(2);
    wait_for("A's file has both edits", PATIENCE, || {
        read_json(&fa).is_some_and(|v| merged(&v))
    });
    wait_for("B's file has both edits", PATIENCE, || {
        read_json(&fb).is_some_and(|v| merged(&v))
    });
    wait_for("both files identical", PATIENCE, || read(&fa) == read(&fb));
    let v = read_json(&fa).expect("json");
    assert!(v["shared"] == json!("from-a") || v["shared"] == json!("from-b"));
    // The losing value is visible as a conflict, on both nodes, in the same order.
    let ca: Value = serde_json::from_str(&a.cli(&["--json", "conflicts", "app/site", "shared"]))
        .expect("conflicts json");
    let cb: Value = serde_json::from_str(&b.cli(&["--json", "conflicts", "app/site", "shared"]))
        .expect("conflicts json");
    assert_eq!(ca, cb);
    let vals = ca.as_array().expect("array");
    assert_eq!(vals.len(), 2, "{ca}");
    assert_eq!(vals[0], v["shared"], "the winner is listed first");
}

#[test]
fn sighup_replaces_the_bindings_and_paths_render_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (whole, part) = (dir.join("whole.json"), dir.join("limits.toml"));
    let cfg = config(dir, "n", "app/svc", &whole, "");
    let a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);
    assert!(a.put(
        "app/svc",
        "",
        json!({"name": "svc", "limits": {"rate": 10, "burst": 20}})
    ));
    wait_for("whole document rendered", 10, || {
        read_json(&whole).is_some_and(|v| v["limits"]["rate"] == json!(10))
    });

    // New config: the whole-document binding goes, a path binding in TOML comes.
    config(dir, "n", "app/svc", &part, "path = \"limits\"");
    let pid = a.child.as_ref().expect("running").id().to_string();
    let st = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    wait_for("path rendered after SIGHUP", 10, || {
        read(&part) == b"burst = 20\nrate = 10\n"
    });
    assert!(a.put("app/svc", "limits.rate", json!(11)));
    wait_for("path re-rendered", 10, || {
        read(&part) == b"burst = 20\nrate = 11\n"
    });
    // Render mode: a file removed or edited by someone else is restored from the document.
    std::fs::remove_file(&part).expect("remove");
    wait_for("removed file restored", 10, || {
        read(&part) == b"burst = 20\nrate = 11\n"
    });
    std::fs::write(&part, "rate = 99\n").expect("write");
    wait_for("edited file restored", 10, || {
        read(&part) == b"burst = 20\nrate = 11\n"
    });
    assert_eq!(a.get("app/svc", "limits.rate"), Some(json!(11)));
    assert!(
        read_json(&whole).is_some_and(|v| v["limits"]["rate"] == json!(10)),
        "the removed binding no longer renders"
    );
}

#[test]
fn a_failing_reload_is_counted_retried_and_does_not_stop_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let file = dir.join("f.json");
    let attempts = dir.join("attempts.log");
    let extra = format!(
        "reload = [\"sh\", \"-c\", \"echo try >> '{}'; exit 1\"]",
        attempts.display()
    );
    let cfg = config(dir, "n", "f", &file, &extra);
    let a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);
    assert!(a.put("f", "", json!({"v": 1})));
    wait_for("reload retried after a failure", 10, || {
        lines(&attempts) >= 2
    });
    // The command has written its line before it exits; the agent counts the failure after.
    wait_for("both failures counted and logged", PATIENCE, || {
        a.metric("lichen_render_errors_total{reason=\"reload\"}") >= 2
            && a.log_count("reload command failed") >= 2
    });
    // Still rendering.
    assert!(a.put("f", "v", json!(2)));
    wait_for("still rendering", 10, || {
        read_json(&file) == Some(json!({"v": 2}))
    });
}

/// Sync mode: an edit made while the agent was stopped is ingested at the next start (a
/// signed change by this node, the user's bytes kept), instead of being overwritten by the
/// document; a file left as the agent last wrote it is not ingested again.
#[test]
fn an_edit_made_while_the_agent_was_stopped_is_ingested_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let file = dir.join("app.json");
    let cfg = config(dir, "n", "app/cfg", &file, "mode = \"sync\"");
    let mut a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);
    let me = a.status()["node"]["id"].as_str().expect("id").to_string();
    assert!(a.put("app/cfg", "", json!({"limit": 1, "name": "svc"})));
    wait_for("file rendered", 10, || {
        read_json(&file) == Some(json!({"limit": 1, "name": "svc"}))
    });
    let history = |a: &Agent| -> Vec<Value> {
        serde_json::from_str::<Value>(&a.cli(&["--json", "history", "app/cfg"]))
            .expect("history json")
            .as_array()
            .expect("history array")
            .clone()
    };
    assert_eq!(history(&a).len(), 1);
    // The agent records what it rendered after writing the file (agent/src/render/last.rs);
    // wait for that record, or a kill in between would leave no base to compare with.
    let rendered = read(&file);
    let records = dir.join("n-data").join("bindings");
    wait_for("the render is recorded", 10, || {
        std::fs::read_dir(&records).is_ok_and(|entries| {
            entries
                .flatten()
                // Not the record's temporary file (written before its fsync and rename).
                .filter(|e| e.path().extension().is_none())
                .any(|e| std::fs::read(e.path()).is_ok_and(|b| b.ends_with(&rendered)))
        })
    });

    // Stopped (SIGKILL: nothing gets a chance to run), the file is edited by hand.
    a.kill();
    let edited = "{\"limit\": 2, \"name\": \"svc\", \"added\": true}\n";
    std::fs::write(&file, edited).expect("edit");
    a.restart("n");
    wait_for("the edit is in the document", 10, || {
        a.get("app/cfg", "") == Some(json!({"limit": 2, "name": "svc", "added": true}))
    });
    assert_eq!(a.log_count("edited while the agent was stopped"), 1);
    // `lichen get` shows it; it is one new change, signed by this node.
    assert_eq!(a.cli(&["get", "app/cfg", "limit"]).trim(), "2");
    let h = history(&a);
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(
        h.iter().all(|e| e["author"].as_str() == Some(me.as_str())),
        "every change names this node as its author: {h:?}"
    );
    // The file keeps the user's bytes (the merge added nothing).
    assert_eq!(read(&file), edited.as_bytes());

    // Restarted again with the file as the agent last saw it: nothing is ingested again,
    // the file is up to date and untouched.
    let compared = a.log_count("is up to date");
    a.restart("n");
    wait_for("start-up comparison done", 10, || {
        a.log_count("is up to date") > compared
    });
    assert_eq!(a.log_count("edited while the agent was stopped"), 1);
    assert_eq!(history(&a).len(), 2);
    assert_eq!(read(&file), edited.as_bytes());

    // The live path still works after all this.
    assert!(a.put("app/cfg", "limit", json!(3)));
    wait_for("re-rendered", 10, || {
        read_json(&file).is_some_and(|v| v["limit"] == json!(3) && v["added"] == json!(true))
    });
}

/// Sync mode: an editor that writes half a file, pauses (0.6 s, with the file still open),
/// then writes the rest makes one change: the file is read once its writer closed it, never
/// half-written, so peers never render a file missing keys.
#[test]
fn a_slow_save_is_one_change_and_peers_never_render_the_half() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (a, _b, fa, fb) = two_nodes_with(dir, "app/slow", "toml", "mode = \"sync\"", |_| {});
    let full = json!({"k1": 1, "k2": 2, "k3": 3, "k4": 4});
    assert!(a.put("app/slow", "", full));
    for f in [&fa, &fb] {
        wait_for("both files rendered", 20, || {
            String::from_utf8_lossy(&read(f)).contains("k4 = 4")
        });
    }
    let history = || -> usize {
        serde_json::from_str::<Value>(&a.cli(&["--json", "history", "app/slow"]))
            .expect("history json")
            .as_array()
            .expect("history array")
            .len()
    };
    let before = history();
    // Watch B's file all along: it must always hold every key.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, fb) = (stop.clone(), fb.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = String::from_utf8_lossy(&read(&fb)).into_owned();
                if !(text.contains("k3") && text.contains("k4")) {
                    bad.push(text);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            bad
        })
    };
    // The slow save, in place: truncate, half, pause (the stimulus, not a wait), rest, close.
    let mut f = std::fs::File::create(&fa).expect("open for writing");
    f.write_all(b"k1 = 10\nk2 = 20\n").expect("first half");
    f.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(600));
    f.write_all(b"k3 = 30\nk4 = 40\n").expect("second half");
    drop(f);
    wait_for("B renders the whole edit", 20, || {
        String::from_utf8_lossy(&read(&fb)).contains("k4 = 40")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bad = sampler.join().expect("sampler");
    assert!(
        bad.is_empty(),
        "B rendered a file missing keys ({} samples), e.g. {:?}",
        bad.len(),
        bad.first()
    );
    assert_eq!(history(), before + 1, "the slow save is one change");
    assert_eq!(
        a.get("app/slow", ""),
        Some(json!({"k1": 10, "k2": 20, "k3": 30, "k4": 40}))
    );
    assert_eq!(
        a.metric("lichen_ingest_errors_total{reason=\"syntax\"}"),
        0,
        "nothing half-written was even parsed"
    );
}

/// Sync mode: an edit that was committed but whose record (agent/src/render/last.rs) was not
/// written when the agent died is not applied a second time at the next start. Applying it
/// again would write its keys over what peers wrote meanwhile: here a later change by B,
/// made after B had seen A's edit, would be reverted by A's restart. The crash window between
/// the commit and the record is opened deterministically by making the record unwritable (a
/// directory where its temporary file goes), then A is killed.
#[test]
fn an_edit_committed_just_before_a_crash_is_not_applied_again_at_restart() {
    let patience = PATIENCE;
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (mut a, b, fa, fb) = two_nodes(dir, "app/crash", "mode = \"sync\"", |_| {});
    assert!(a.put("app/crash", "", json!({"k": "base"})));
    wait_for("B rendered the base", patience, || {
        read_json(&fb) == Some(json!({"k": "base"}))
    });
    wait_for("A rendered the base", patience, || {
        read_json(&fa) == Some(json!({"k": "base"}))
    });
    let rendered = read(&fa);
    let records = dir.join("a-data").join("bindings");
    let mut record = None;
    wait_for("A's render is recorded", patience, || {
        record = std::fs::read_dir(&records).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_none()) // not a temporary file
                .find(|p| std::fs::read(p).is_ok_and(|b| b.ends_with(&rendered)))
        });
        record.is_some()
    });
    let blocker = record.expect("record").with_extension("tmp");
    std::fs::create_dir(&blocker)
        .unwrap_or_else(|e| panic!("block the record at {}: {e}", blocker.display()));

    // A's edit is committed (and reaches B), its record cannot be written; A dies.
    std::fs::write(&fa, "{\"k\": \"from-a\"}").expect("w");
    wait_for("A committed its edit", patience, || {
        a.get("app/crash", "k") == Some(json!("from-a"))
    });
    wait_for("A tried to record the edit", patience, || {
        a.log_count("cannot record the file's content") >= 1
    });
    a.kill();
    std::fs::remove_dir(&blocker).expect("unblock");
    wait_for("B rendered A's edit", patience, || {
        read_json(&fb) == Some(json!({"k": "from-a"}))
    });

    // B changes the key again, knowing A's edit: a later value, not a concurrent one.
    std::fs::write(&fb, "{\"k\": \"from-b\"}").expect("w");
    wait_for("B ingested its edit", patience, || {
        b.get("app/crash", "k") == Some(json!("from-b"))
    });

    // A restarts: its edit is not applied again, B's later value stands everywhere.
    a.restart("a");
    wait_for("A's file has B's later value", patience, || {
        read_json(&fa) == Some(json!({"k": "from-b"}))
    });
    assert_eq!(a.get("app/crash", "k"), Some(json!("from-b")));
    assert_eq!(b.get("app/crash", "k"), Some(json!("from-b")));
    assert_eq!(read_json(&fb), Some(json!({"k": "from-b"})));
    assert_eq!(a.log_count("applied a local edit of the file"), 1);
    assert_eq!(a.log_count("edited while the agent was stopped"), 0);
    assert_eq!(
        a.log_count("the last edit of the file was applied before the agent stopped"),
        1
    );
    let c: Value = serde_json::from_str(&a.cli(&["--json", "conflicts", "app/crash", "k"]))
        .expect("conflicts json");
    assert_eq!(c, json!(["from-b"]), "a later value is no conflict");
}

/// Sync mode: an edit made while the agent was stopped is merged, at the next start, into the
/// document as it is *after* the node has caught up with its peers (sync.hold_writes_ms), not
/// as it was on disk: a key a peer changed meanwhile keeps the peer's value.
#[test]
fn an_edit_made_while_stopped_keeps_what_peers_wrote_meanwhile() {
    let patience = PATIENCE;
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (mut a, b, fa, fb) = two_nodes(dir, "app/hold", "mode = \"sync\"", |_| {});
    assert!(a.put("app/hold", "", json!({"x": 1, "y": 1})));
    for f in [&fa, &fb] {
        wait_for("both files rendered", patience, || {
            read_json(f) == Some(json!({"x": 1, "y": 1}))
        });
    }
    let rendered = read(&fa);
    let records = dir.join("a-data").join("bindings");
    wait_for("A's render is recorded", patience, || {
        std::fs::read_dir(&records).is_ok_and(|entries| {
            entries
                .flatten()
                // Not the record's temporary file (written before its fsync and rename).
                .filter(|e| e.path().extension().is_none())
                .any(|e| std::fs::read(e.path()).is_ok_and(|b| b.ends_with(&rendered)))
        })
    });

    // A is stopped; its file is edited (x) while B changes y.
    a.kill();
    std::fs::write(&fa, "{\"x\": 2, \"y\": 1}").expect("w");
    assert!(b.put("app/hold", "y", json!(9)));

    a.restart("a");
    let want = json!({"x": 2, "y": 9});
    wait_for("A's file has both changes", patience, || {
        read_json(&fa) == Some(want.clone())
    });
    wait_for("B's file has both changes", patience, || {
        read_json(&fb) == Some(want.clone())
    });
    assert_eq!(a.get("app/hold", ""), Some(want.clone()));
    assert_eq!(b.get("app/hold", ""), Some(want));
    assert_eq!(a.log_count("edited while the agent was stopped"), 1);
}

/// Sync mode: an edit saved while a render is being staged (fsync, check command) is not
/// overwritten by that render; it is read and merged into the document. The check command
/// holds the render at the right moment: it signals `ready` and waits for `go`.
#[test]
fn an_edit_saved_during_a_render_is_merged_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (file, ready, go) = (dir.join("c.json"), dir.join("ready"), dir.join("go"));
    let extra = format!(
        "mode = \"sync\"\ncheck = [\"sh\", \"-c\", \"touch '{}'; while [ ! -e '{}' ]; do sleep 0.01; done\"]",
        ready.display(),
        go.display()
    );
    let cfg = config(dir, "n", "app/race", &file, &extra);
    std::fs::write(&go, "").expect("go");
    let a = Agent::start(dir, "n", &cfg, "127.0.0.1:0", None);
    assert!(a.put("app/race", "", json!({"v": 1})));
    wait_for("first render", PATIENCE, || {
        read_json(&file) == Some(json!({"v": 1}))
    });

    // The next render is held in its check; meanwhile the user saves an edit.
    std::fs::remove_file(&go).expect("rm go");
    let _ = std::fs::remove_file(&ready);
    assert!(a.put("app/race", "v", json!(2)));
    wait_for("the render is staged and checked", PATIENCE, || {
        ready.exists()
    });
    std::fs::write(&file, "{\"v\": 1, \"mine\": true}").expect("edit");
    std::fs::write(&go, "").expect("go");

    let want = json!({"v": 2, "mine": true});
    wait_for("the edit is merged into the document", PATIENCE, || {
        a.get("app/race", "") == Some(want.clone())
    });
    wait_for("the file shows both", PATIENCE, || {
        read_json(&file) == Some(want.clone())
    });
    assert_eq!(a.log_count("edited while it was being rendered"), 1);
}
