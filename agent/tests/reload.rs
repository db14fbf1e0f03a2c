//! SIGHUP on a real agent: a changed setting that can apply while running is applied at once
//! (`max_loaded_docs`: the document cache shrinks to it), and every changed setting that only
//! applies at the next start is logged, one warning each with its running and new values,
//! and listed by `lichen status` as `restart_pending` (cleared when the file changes back).
//!
//! Agents use loopback addresses 127.0.0.182 and up.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use common::*;
use serde_json::{json, Value};

fn pending(a: &Agent) -> Value {
    a.status()["restart_pending"].clone()
}

#[test]
fn sighup_applies_live_settings_and_reports_each_one_that_waits_for_a_restart() {
    let mut c = Cluster::start(1, 182, Net::Direct);
    let a = &mut c.agents[0];
    for i in 0..6 {
        let doc = format!("reload/d{i}");
        a.ok(&["put", &doc, "x", &i.to_string()]);
        // A simple write takes the store's fast path; history needs (and keeps) the document.
        a.ok(&["history", &doc, "x"]);
    }
    let loaded = |a: &Agent| a.status()["storage"]["loaded_docs"].as_u64().unwrap();
    let l = loaded(a);
    assert!(l >= 6, "the written documents are in memory: {l}");
    assert_eq!(pending(a), json!([]));

    let good = std::fs::read_to_string(&a.config).unwrap();
    // `good` ends inside its [sync] table: the top-level settings go first.
    std::fs::write(
        &a.config,
        format!("max_loaded_docs = 2\nwal_checkpoint_pages = 5000\n{good}fanout = 3\n"),
    )
    .unwrap();
    a.signal("HUP");
    wait_until("the restart-only settings are pending", PATIENCE, || {
        pending(a) == json!(["wal_checkpoint_pages", "sync.fanout"])
    });
    // Applied live: the cache is trimmed to the new cap after the reload.
    wait_until(
        "the document cache shrinks to max_loaded_docs",
        PATIENCE,
        || loaded(a) <= 2,
    );
    let log = a.log_text();
    let line = |setting: &str| {
        log.lines()
            .find(|l| {
                l.contains("take effect at the next start")
                    && l.contains(&format!("setting=\"{setting}\""))
            })
            .unwrap_or_else(|| panic!("no restart warning for {setting} in:\n{log}"))
            .to_string()
    };
    let wal = line("wal_checkpoint_pages");
    assert!(
        wal.contains("WARN") && wal.contains("old=4000") && wal.contains("new=5000"),
        "{wal}"
    );
    let fanout = line("sync.fanout");
    assert!(
        fanout.contains("old=6") && fanout.contains("new=3"),
        "{fanout}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("take effect at the next start") && l.contains("max_loaded_docs")),
        "max_loaded_docs applies live:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("changed setting applied")
            && l.contains("max_loaded_docs")
            && l.contains("new=2")),
        "{log}"
    );
    let human = a.ok(&["status"]);
    assert!(
        human.contains("restart pending: wal_checkpoint_pages, sync.fanout"),
        "{human}"
    );

    // Back to the running values: nothing is pending any more.
    std::fs::write(&a.config, &good).unwrap();
    a.signal("HUP");
    wait_until("nothing is pending", PATIENCE, || pending(a) == json!([]));
    assert!(a.alive());
}
