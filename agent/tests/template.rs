//! Template bindings end to end: real `lichen` processes rendering minijinja templates into
//! files, with provenance (environment of check/reload, header line), status, errors that
//! keep the old file, and `lichen render` (dry run, one-off render).
//!
//! Agents use loopback addresses 127.0.0.190 and up. Bindings are added to a running agent
//! by rewriting its config and sending SIGHUP; every wait is on a condition with a deadline
//! (the reload counter metric, a file's content, the binding's status).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{metric, Agent, Cluster, Net, PATIENCE};
use serde_json::Value;

const IP_BASE: u8 = 190;

/// The metrics text of an agent.
fn metrics(a: &Agent) -> String {
    common::http_get(&a.api, "/metrics")
}

/// A labelled counter's value (0 if absent).
fn labelled(a: &Agent, family: &str, reason: &str) -> f64 {
    metric(&metrics(a), &format!("{family}{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// Replace `a`'s config with its base settings plus `binds`, send SIGHUP and wait until the
/// agent has read it (successfully or not).
fn reconfigure(a: &Agent, binds: &str) {
    let before = metric(&metrics(a), "lichen_config_reloads_total").unwrap_or(0.0)
        + metric(&metrics(a), "lichen_config_reload_errors_total").unwrap_or(0.0);
    std::fs::write(
        &a.config,
        format!("log = \"info\"\n[sync]\nanti_entropy_ms = 200\n\n{binds}"),
    )
    .unwrap();
    a.signal("HUP");
    common::wait_until("the agent read its new config", PATIENCE, || {
        let m = metrics(a);
        metric(&m, "lichen_config_reloads_total").unwrap_or(0.0)
            + metric(&m, "lichen_config_reload_errors_total").unwrap_or(0.0)
            > before
    });
}

/// The status entry of the binding of `file`.
fn binding(a: &Agent, file: &Path) -> Value {
    let st = a.status();
    st["bindings"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|b| b["file"] == file.display().to_string())
                .cloned()
        })
        .unwrap_or(Value::Null)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_content(what: &str, p: &Path, f: impl Fn(&str) -> bool) {
    common::wait_until(what, PATIENCE, || f(&read(p)));
}

/// A shell command (argv) appending a line to `log` per run.
fn counter(log: &Path) -> String {
    format!("[\"sh\", \"-c\", \"echo run >> {}\"]", log.display())
}

fn lines(p: &Path) -> usize {
    read(p).lines().count()
}

fn heads(a: &Agent, doc: &str) -> String {
    a.heads(doc)
        .unwrap_or_default()
        .iter()
        .map(|h| h.as_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join(",")
}

const UPSTREAM: &str = r#"upstream app {
{% for u in doc("app/nginx").upstreams %}
    server {{ u }};
{% endfor %}
}
{% for m in members() | sort(attribute="name") %}
# member {{ m.name }} {{ m.role }} {{ m.addrs | join(",") }}
{% endfor %}
listen {{ doc("app/nginx").port }};
rendered_by {{ node.name }};
"#;

#[test]
fn upstream_block_from_a_document_and_members_rerendered_only_where_read() {
    let c = Cluster::start(2, IP_BASE, Net::Direct);
    let (a, b) = (&c.agents[0], &c.agents[1]);
    let dir = c.dir.path();
    assert!(a.put("app/nginx", "upstreams", r#"["10.0.0.1:80","10.0.0.2:80"]"#));
    assert!(a.put("app/nginx", "port", "8080"));
    assert!(a.put("app/other", "x", "1"));
    common::wait_until("b holds both documents", PATIENCE, || {
        b.get("app/nginx", "port") == Some(Value::from(8080)) && b.get("app/other", "x").is_some()
    });
    std::fs::write(dir.join("up.tmpl"), UPSTREAM).unwrap();
    std::fs::write(dir.join("other.tmpl"), "x = {{ doc(\"app/other\").x }}\n").unwrap();
    let (up, other) = (dir.join("upstream.conf"), dir.join("other.conf"));
    let (up_reloads, other_reloads) = (dir.join("up-reloads"), dir.join("other-reloads"));
    let env_file = dir.join("check-env");
    reconfigure(
        b,
        &format!(
            r##"
[[bind]]
template = "up.tmpl"
file = "upstream.conf"
header = "# "
check = ["sh", "-c", "env | grep ^LICHEN_ | sort > {env}"]
reload = {up_reloads}
reload_jitter_ms = 0

[[bind]]
template = "other.tmpl"
file = "other.conf"
reload = {other_reloads}
reload_jitter_ms = 0
"##,
            env = env_file.display(),
            up_reloads = counter(&up_reloads),
            other_reloads = counter(&other_reloads),
        ),
    );
    wait_content("upstream.conf rendered", &up, |s| {
        s.contains("listen 8080;")
    });
    let text = read(&up);
    let body: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        body[..5],
        [
            "upstream app {",
            "    server 10.0.0.1:80;",
            "    server 10.0.0.2:80;",
            "}",
            &format!("# member a admin {}", a.advertise)
        ],
        "{text}"
    );
    assert!(
        text.contains(&format!("# member b writer {}", b.advertise)),
        "{text}"
    );
    assert!(text.ends_with("rendered_by b;\n"), "{text}");
    // The header names the heads and the authors of the changes at them.
    let nginx_heads = heads(b, "app/nginx");
    let member_heads = heads(b, "_members");
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("# lichen: _members@")
            && header.contains(&format!("_members@{member_heads} by "))
            && header.ends_with(&format!("; app/nginx@{nginx_heads} by a")),
        "{header}"
    );
    // The check saw the provenance variables.
    wait_content("the check's environment", &env_file, |s| {
        s.contains("LICHEN_HEADS")
    });
    let env = read(&env_file);
    assert!(env.contains("LICHEN_DOC=_members app/nginx\n"), "{env}");
    assert!(
        env.contains(&format!("LICHEN_FILE={}\n", up.display())),
        "{env}"
    );
    assert!(
        env.contains(&format!(
            "LICHEN_HEADS=_members={member_heads} app/nginx={nginx_heads}\n"
        )),
        "{env}"
    );
    assert!(env.contains("LICHEN_TEMPLATE="), "{env}");
    wait_content("other.conf rendered", &other, |s| s == "x = 1\n");
    common::wait_until("both reloads ran", PATIENCE, || {
        lines(&up_reloads) == 1 && lines(&other_reloads) == 1
    });
    let st = binding(b, &up);
    assert_eq!(st["kind"], "template");
    assert_eq!(st["reload"]["exit_code"], 0);
    assert_eq!(st["check"]["ok"], true);
    assert_eq!(
        st["heads"],
        format!("_members={member_heads} app/nginx={nginx_heads}")
    );
    assert!(
        st["error"].is_null() && st["rendered_at_ms"].is_u64(),
        "{st}"
    );
    let up_renders = st["renders"].as_u64().unwrap();
    let other_renders = binding(b, &other)["renders"].as_u64().unwrap();
    let other_ino = std::fs::metadata(&other).unwrap().ino();

    // A write on another node re-renders the file that read the document, only that one.
    assert!(a.put(
        "app/nginx",
        "upstreams",
        r#"["10.0.0.1:80","10.0.0.2:80","10.0.0.3:80"]"#
    ));
    wait_content("b re-rendered upstream.conf", &up, |s| {
        s.contains("server 10.0.0.3:80;")
    });
    common::wait_until("upstream reloaded again", PATIENCE, || {
        lines(&up_reloads) == 2
    });
    assert_eq!(binding(b, &up)["renders"].as_u64().unwrap(), up_renders + 1);
    // Then a change of the other document: only other.conf renders.
    assert!(a.put("app/other", "x", "2"));
    wait_content("b re-rendered other.conf", &other, |s| s == "x = 2\n");
    assert!(a.put("app/nginx", "port", "8081"));
    wait_content("b re-rendered upstream.conf again", &up, |s| {
        s.contains("listen 8081;")
    });
    assert_eq!(
        binding(b, &up)["renders"].as_u64().unwrap(),
        up_renders + 2,
        "upstream.conf's template does not read app/other: it is not evaluated again for it"
    );
    let st = binding(b, &other);
    assert_eq!(
        st["renders"].as_u64().unwrap(),
        other_renders + 1,
        "other.conf's template read neither app/nginx change: {st}"
    );
    assert_ne!(std::fs::metadata(&other).unwrap().ino(), other_ino);
    common::wait_until("other reloaded once more", PATIENCE, || {
        lines(&other_reloads) == 2
    });
    // `lichen status` (text) lists the bindings.
    let text = b.ok(&["status"]);
    assert!(
        text.contains("bindings") && text.contains(&up.display().to_string()),
        "{text}"
    );
    assert!(text.contains("reload ok (exit 0)"), "{text}");
}

#[test]
fn template_errors_keep_the_old_file_and_are_reported() {
    let c = Cluster::start(1, IP_BASE + 3, Net::Direct);
    let a = &c.agents[0];
    let dir = c.dir.path();
    assert!(a.put("app/web", "port", "80"));
    let t = dir.join("web.tmpl");
    std::fs::write(&t, "port={{ doc(\"app/web\").port }}\n").unwrap();
    let out = dir.join("web.conf");
    let reloads = dir.join("reloads");
    let web = format!(
        "[[bind]]\ntemplate = \"web.tmpl\"\nfile = \"web.conf\"\nreload = {}\nreload_jitter_ms = 0\n",
        counter(&reloads)
    );
    reconfigure(a, &web);
    wait_content("web.conf rendered", &out, |s| s == "port=80\n");
    common::wait_until("reloaded", PATIENCE, || lines(&reloads) == 1);

    // SIGHUP with a template that does not compile: the old template keeps running.
    std::fs::write(&t, "port={{ doc(\"app/web\").port }}\n{% for x in %}\n").unwrap();
    let syntax_before = labelled(a, "lichen_template_errors_total", "syntax");
    reconfigure(a, &web);
    common::wait_until("the syntax error is in status", PATIENCE, || {
        binding(a, &out)["config_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("{}:2:", t.display())) && e.contains("syntax"))
    });
    assert_eq!(
        labelled(a, "lichen_template_errors_total", "syntax"),
        syntax_before + 1.0
    );
    assert_eq!(read(&out), "port=80\n", "the old file stays");
    assert!(a.put("app/web", "port", "81"));
    wait_content("the old template still renders", &out, |s| s == "port=81\n");
    let text = a.ok(&["status"]);
    assert!(text.contains("ERROR: new template not loaded"), "{text}");

    // Errors while rendering: each keeps its file, is counted and shown with its position.
    let cases: [(&str, &str, &str, &str); 6] = [
        (
            "fuel",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
            "out of fuel",
        ),
        (
            "huge",
            "{% for i in range(1000) %}{{ \"x\" * 100000 }}{% endfor %}",
            "too_large",
            "larger than",
        ),
        (
            "recurse",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
            "recursion",
        ),
        ("env", "a\n{{ env.HOME }}\n", "env", ":2:"),
        (
            "name",
            "{{ doc(\"Not A/Name!\") }}",
            "doc_name",
            "Not A/Name!",
        ),
        (
            "undef",
            "x\ny\n  {{ doc(\"app/web\").nope.deeper }}",
            "undefined",
            ":3:",
        ),
    ];
    let mut binds = web.clone();
    for (name, src, _, _) in &cases {
        std::fs::write(dir.join(format!("{name}.tmpl")), src).unwrap();
        std::fs::write(dir.join(format!("{name}.conf")), "old\n").unwrap();
        binds.push_str(&format!(
            "\n[[bind]]\ntemplate = \"{name}.tmpl\"\nfile = \"{name}.conf\"\n"
        ));
    }
    let before: Vec<f64> = cases
        .iter()
        .map(|(_, _, r, _)| labelled(a, "lichen_template_errors_total", r))
        .collect();
    reconfigure(a, &binds);
    for (i, (name, _, reason, needle)) in cases.iter().enumerate() {
        let f = dir.join(format!("{name}.conf"));
        common::wait_until(&format!("{name}: the error is in status"), PATIENCE, || {
            binding(a, &f)["error"].as_str().is_some_and(|e| {
                e.starts_with(&format!("{}", dir.join(format!("{name}.tmpl")).display()))
                    && e.contains(needle)
            })
        });
        assert!(
            labelled(a, "lichen_template_errors_total", reason) > before[i],
            "{name}: counted as {reason}"
        );
        assert_eq!(read(&f), "old\n", "{name}: the file stays as it was");
    }
    // The agent is healthy: writes and renders go on.
    assert!(a.put("app/web", "port", "82"));
    wait_content("still rendering", &out, |s| s == "port=82\n");

    // A document this node does not hold: the binding waits, then renders when it arrives.
    std::fs::write(dir.join("later.tmpl"), "v={{ doc(\"app/later\").v }}\n").unwrap();
    let later = dir.join("later.conf");
    reconfigure(
        a,
        &format!("{web}\n[[bind]]\ntemplate = \"later.tmpl\"\nfile = \"later.conf\"\n"),
    );
    common::wait_until("the binding waits for app/later", PATIENCE, || {
        binding(a, &later)["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("app/later"))
    });
    assert!(!later.exists());
    assert!(a.put("app/later", "v", "\"here\""));
    wait_content("rendered once the document exists", &later, |s| {
        s == "v=here\n"
    });

    // Clear errors for a missing template file and for a bad binding.
    let errors_before = metric(&metrics(a), "lichen_config_reload_errors_total").unwrap_or(0.0);
    reconfigure(
        a,
        "[[bind]]\ntemplate = \"no-such.tmpl\"\nfile = \"x.conf\"\n",
    );
    assert_eq!(
        metric(&metrics(a), "lichen_config_reload_errors_total").unwrap_or(0.0),
        errors_before + 1.0
    );
    assert!(a.log_text().contains("no-such.tmpl does not exist"));
    reconfigure(
        a,
        "[[bind]]\ntemplate = \"web.tmpl\"\nfile = \"x.conf\"\nmode = \"sync\"\n",
    );
    assert!(a.log_text().contains("template bindings are one-way"));
    let o = a.cli(&["render", "--template", "/no/such/file.tmpl"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/no/such/file.tmpl does not exist"),
        "{o:?}"
    );
    let o = a.cli(&[
        "render",
        "--template",
        &t.display().to_string(),
        "--doc",
        "Bad Name",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("`Bad Name` is not a valid document name"));
    assert_eq!(a.status()["node"]["name"], "a", "the agent is healthy");
}

#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    let c = Cluster::start(1, IP_BASE + 5, Net::Direct);
    let a = &c.agents[0];
    let dir = c.dir.path();
    assert!(a.put("app/web", "hosts", r#"["h1","h2"]"#));
    let t = dir.join("hosts.tmpl");
    std::fs::write(&t, "{% for h in hosts %}host {{ h }}\n{% endfor %}").unwrap();
    let out: PathBuf = dir.join("hosts.conf");
    let reloads = dir.join("reloads");
    reconfigure(
        a,
        &format!(
            "[[bind]]\ntemplate = \"hosts.tmpl\"\ndoc = \"app/web\"\nfile = \"hosts.conf\"\nreload = {}\nreload_jitter_ms = 0\n\n[[bind]]\ndoc = \"app/web\"\nfile = \"web.yaml\"\nheader = \"# \"\n",
            counter(&reloads)
        ),
    );
    wait_content("hosts.conf rendered", &out, |s| s == "host h1\nhost h2\n");
    common::wait_until("reloaded", PATIENCE, || lines(&reloads) == 1);
    let yaml = read(&dir.join("web.yaml"));
    assert!(
        yaml.starts_with(&format!("# lichen: app/web@{} by a\n", heads(a, "app/web"))),
        "{yaml}"
    );
    let meta = std::fs::metadata(&out).unwrap();
    // Change the template on disk without telling the agent: the dry run shows the diff.
    std::fs::write(&t, "{% for h in hosts %}server {{ h }}\n{% endfor %}").unwrap();
    let config = a.config.display().to_string();
    let o = a.ok(&["render", "--dry-run", "--config", &config]);
    assert!(o.contains(&format!("== {}", out.display())), "{o}");
    assert!(
        o.contains("-host h1\n") && o.contains("+server h1\n"),
        "{o}"
    );
    assert!(o.contains("up to date: nothing would change"), "{o}");
    let o = a.ok(&[
        "render",
        "--dry-run",
        "--config",
        &config,
        "--file",
        &dir.join("web.yaml").display().to_string(),
    ]);
    assert!(!o.contains("hosts.conf"), "{o}");
    // Nothing was written or reloaded.
    let now = std::fs::metadata(&out).unwrap();
    assert_eq!(
        (now.ino(), now.mtime_nsec(), read(&out)),
        (
            meta.ino(),
            meta.mtime_nsec(),
            "host h1\nhost h2\n".to_string()
        )
    );
    assert_eq!(lines(&reloads), 1);
    // One-off render to stdout.
    let o = a.ok(&[
        "render",
        "--template",
        &t.display().to_string(),
        "--doc",
        "app/web",
    ]);
    assert_eq!(o, "server h1\nserver h2\n");
    std::fs::write(
        dir.join("n.tmpl"),
        "{{ doc(\"app/web\").hosts | tojson }} {{ node.name }}",
    )
    .unwrap();
    let o = a.ok(&[
        "render",
        "--template",
        &dir.join("n.tmpl").display().to_string(),
    ]);
    assert_eq!(o, "[\"h1\",\"h2\"] a");
    assert_eq!(lines(&reloads), 1);
}

/// The agent's inotify instances (file descriptors that are inotify watchers).
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| l.to_string_lossy().contains("inotify"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn bindings_in_one_directory_share_one_watcher() {
    let c = Cluster::start(1, IP_BASE + 7, Net::Direct);
    let a = &c.agents[0];
    let dir = c.dir.path();
    assert!(a.put("app/web", "v", "1"));
    std::fs::create_dir_all(dir.join("conf.d")).unwrap();
    std::fs::write(dir.join("v.tmpl"), "v={{ doc(\"app/web\").v }}\n").unwrap();
    let mut binds = String::new();
    for i in 0..10 {
        binds.push_str(&format!(
            "[[bind]]\ntemplate = \"v.tmpl\"\nfile = \"conf.d/f{i}.conf\"\n\n"
        ));
    }
    binds.push_str("[[bind]]\ndoc = \"app/web\"\nfile = \"elsewhere.json\"\n");
    reconfigure(a, &binds);
    for i in 0..10 {
        wait_content("rendered", &dir.join(format!("conf.d/f{i}.conf")), |s| {
            s == "v=1\n"
        });
    }
    common::wait_until("every binding watches its directory", PATIENCE, || {
        inotify_fds(a.pid()) >= 2
    });
    // One watcher for conf.d (10 bindings), one for elsewhere.json's directory.
    assert_eq!(inotify_fds(a.pid()), 2);
    // Each binding still sees its own file: a local edit is restored from the template.
    std::fs::write(dir.join("conf.d/f3.conf"), "edited\n").unwrap();
    wait_content("f3 restored", &dir.join("conf.d/f3.conf"), |s| s == "v=1\n");
    assert!(a.put("app/web", "v", "2"));
    for i in 0..10 {
        wait_content("re-rendered", &dir.join(format!("conf.d/f{i}.conf")), |s| {
            s == "v=2\n"
        });
    }
}

#[test]
fn a_sync_binding_reads_an_edit_back_without_its_header_line() {
    let c = Cluster::start(1, IP_BASE + 9, Net::Direct);
    let a = &c.agents[0];
    let dir = c.dir.path();
    assert!(a.put("app/web", "", r#"{"port": 80, "name": "web"}"#));
    let f = dir.join("web.yaml");
    reconfigure(
        a,
        "[[bind]]\ndoc = \"app/web\"\nfile = \"web.yaml\"\nmode = \"sync\"\nheader = \"# \"\ndebounce_ms = 50\n",
    );
    wait_content("rendered with a header", &f, |s| {
        s.starts_with("# lichen: app/web@") && s.contains("port: 80")
    });
    // Edit a value, keeping the (now stale) header line as an editor would.
    let edited = read(&f).replace("port: 80", "port: 81");
    std::fs::write(&f, &edited).unwrap();
    common::wait_until("the edit reached the document", PATIENCE, || {
        a.get("app/web", "port") == Some(Value::from(81))
    });
    let doc = a.get("app/web", "").unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"port": 81, "name": "web"}),
        "the header is not data"
    );
    // The file then names the new heads.
    let h = heads(a, "app/web");
    wait_content("the header names the edit's change", &f, |s| {
        s.starts_with(&format!("# lichen: app/web@{h} by a\n")) && s.contains("port: 81")
    });
    // An edit that drops the header line is read the same way.
    std::fs::write(&f, "name: web\nport: 82\n").unwrap();
    common::wait_until("the second edit reached the document", PATIENCE, || {
        a.get("app/web", "port") == Some(Value::from(82))
    });
}

/// The header names the authors of the values the file holds, not only the last writer:
/// a wrote `limits`, b wrote `name` on top of it (b's change is the only head), and the file
/// bound to the whole document names both; a file bound to `limits` names only a. The dry run
/// computes the same header, so it finds the files up to date.
#[test]
fn the_header_names_the_author_of_every_value_in_the_file() {
    let c = Cluster::start(2, 230, Net::Direct);
    let (a, b) = (&c.agents[0], &c.agents[1]);
    let dir = c.dir.path();
    assert!(a.put("app/web", "limits", r#"{"rate": 5}"#));
    common::wait_until("b holds a's write", PATIENCE, || {
        b.get("app/web", "limits.rate") == Some(Value::from(5))
    });
    assert!(b.put("app/web", "name", r#""web""#));
    reconfigure(
        b,
        "[[bind]]\ndoc = \"app/web\"\nfile = \"web.yaml\"\nheader = \"# \"\n\n[[bind]]\ndoc = \"app/web\"\npath = \"limits\"\nfile = \"limits.yaml\"\nheader = \"# \"\n",
    );
    let h = heads(b, "app/web");
    assert!(!h.contains(','), "one head, b's change: {h}");
    let (whole, limits) = (dir.join("web.yaml"), dir.join("limits.yaml"));
    wait_content("web.yaml rendered", &whole, |s| s.contains("name: web"));
    wait_content("limits.yaml rendered", &limits, |s| s.contains("rate: 5"));
    assert_eq!(
        read(&whole).lines().next().unwrap(),
        format!("# lichen: app/web@{h} by a,b")
    );
    assert_eq!(
        read(&limits).lines().next().unwrap(),
        format!("# lichen: app/web@{h} by a")
    );
    let config = b.config.display().to_string();
    let o = b.ok(&["render", "--dry-run", "--config", &config]);
    assert!(
        !o.contains("\n-# lichen"),
        "the dry run's header differs: {o}"
    );
    assert_eq!(
        o.matches("up to date: nothing would change").count(),
        2,
        "{o}"
    );
}
