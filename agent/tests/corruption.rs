//! A stored change damaged on disk is found and healed, with real processes (issue 15,
//! point 4): two agents converge, agent b is stopped, one change in its `lichen.db` is altered
//! through SQL (SQLite's own structures stay consistent, as after bit rot inside a page with
//! no checksum), and b restarts. b's background scrub finds the change, quarantines it (with
//! the changes depending on it), stops claiming it, gets the good copy from a, and converges;
//! the metric and `status` (text and JSON) show it, and writes flow both ways again.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::time::Duration;

use common::{http_get, metric, wait_until, Cluster, Net, PATIENCE};
use rusqlite::{params, Connection};
use serde_json::Value;

const DOC: &str = "app/web";

/// Flip one byte in the middle of the `n`-th stored change of `doc` (by row order) in the
/// database of a stopped agent; returns its hash (hex).
fn damage_change(db: &std::path::Path, doc: &str, n: i64) -> String {
    let conn = Connection::open(db).unwrap();
    let (hash, mut bytes): (Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT hash, bytes FROM changes WHERE doc = ?1 AND status = 0 ORDER BY id LIMIT 1 OFFSET ?2",
            params![doc, n],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    conn.execute(
        "UPDATE changes SET bytes = ?2 WHERE hash = ?1",
        params![hash, bytes],
    )
    .unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_change_damaged_on_disk_is_quarantined_fetched_again_and_counted() {
    let mut c = Cluster::start(2, 110, Net::Direct);
    for i in 0..8 {
        assert!(c.agents[0].put(DOC, &format!("a{i}"), &format!("\"{i}\"")));
        assert!(c.agents[1].put(DOC, &format!("b{i}"), &format!("\"{i}\"")));
    }
    c.wait_converged(DOC, PATIENCE);

    let st = c.agents[1].terminate();
    assert!(st.success(), "b stopped cleanly: {st}");
    let db = c.agents[1].dir.join("lichen.db");
    // Early in the document, so that most later changes depend on it.
    let victim = damage_change(&db, DOC, 3);
    // a writes on while b is down: b must still receive.
    assert!(c.agents[0].put(DOC, "while_down", "1"));
    c.agents[1].start();

    let b = &c.agents[1];
    wait_until(
        "b finds and quarantines the damaged change",
        PATIENCE,
        || b.status()["storage"]["corrupt_found"].as_u64().unwrap_or(0) >= 1,
    );
    assert!(
        b.log_text().contains(&victim),
        "the error log names the damaged change {victim}"
    );
    let value = c.wait_converged(DOC, Duration::from_secs(30));
    assert_eq!(value["while_down"], serde_json::json!(1));
    assert_eq!(value["a3"], serde_json::json!("3"));

    let b = &c.agents[1];
    wait_until("b holds the good copy again", PATIENCE, || {
        let s = b.status();
        s["storage"]["quarantined"] == 0 && s["storage"]["healed"].as_u64().unwrap_or(0) >= 1
    });
    // The metrics follow at the next scrub tick.
    wait_until("the metrics count it, and nothing waits", PATIENCE, || {
        let metrics = http_get(&b.api, "/metrics");
        metric(&metrics, "lichen_corrupt_changes_total").unwrap_or(0.0) >= 1.0
            && metric(&metrics, "lichen_quarantined_changes") == Some(0.0)
            && metric(&metrics, "lichen_healed_changes").unwrap_or(0.0) >= 1.0
    });
    let text = b.ok(&["status"]);
    assert!(text.contains("found damaged on disk"), "{text}");
    let json: Value = b.status();
    assert_eq!(json["storage"]["corrupt_ever"], 1);

    // get and conflicts agree on b for every key.
    let view = b.get(DOC, "").unwrap();
    for (k, v) in view.as_object().unwrap() {
        let out = b.ok(&["--json", "conflicts", DOC, k]);
        let all: Value = serde_json::from_str(&out).unwrap();
        let first = all
            .get("values")
            .and_then(|v| v.get(0))
            .or_else(|| all.get(0))
            .cloned();
        assert_eq!(first.as_ref(), Some(v), "conflicts of {k}: {out}");
    }

    // Writes flow both ways again.
    assert!(c.agents[1].put(DOC, "from_b", "2"));
    assert!(c.agents[0].put(DOC, "from_a", "3"));
    let value = c.wait_converged(DOC, Duration::from_secs(30));
    assert_eq!(value["from_b"], serde_json::json!(2));
    assert_eq!(value["from_a"], serde_json::json!(3));
}
