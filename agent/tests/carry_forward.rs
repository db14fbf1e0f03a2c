//! An honest acknowledged write never dies with a void one (issue 15, point 3), with real
//! `lichen` processes: a writer that received a removed member's post-removal write and wrote
//! on top of it has its write acknowledged; once the removal reaches it, that write is void
//! (it depends on a void change) and the writer carries it forward: its values stand on every
//! node, it says so at warn in its log, counts it and shows it in `status`.
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

use common::{http_get, iptables_usable, metric, wait_until, Cluster, Net, PATIENCE};
use serde_json::json;

fn carried_forward(net: Net, ip_base: u8) {
    // a: admin; b: the writer a removes; c: the honest writer.
    let mut c = Cluster::start(3, ip_base, net);
    assert!(c.agents[0].put("app", "base", "1"));
    c.wait_converged("app", PATIENCE);

    // The admin is cut off and removes b; b and c do not know yet.
    c.isolate(0);
    c.agents[0].ok(&["members", "remove", &c.agents[1].id.clone()]);
    assert!(c.agents[1].put("app", "r", "\"after removal\""));
    wait_until("c receives b's post-removal write", PATIENCE, || {
        c.agents[2].get("app", "r").is_some()
    });
    // c writes on top of it: acknowledged.
    assert!(c.agents[2].put("app", "x", r#"{"port": 8080, "hosts": ["h1", "h2"]}"#));
    let want = json!({"port": 8080, "hosts": ["h1", "h2"]});

    c.heal();
    // The removal reaches c: b's write is void there, and c's write with it; c carries its
    // own forward, and a (which never accepted either) gets c's values.
    for i in [0, 2] {
        let a = &c.agents[i];
        wait_until(
            &format!("{} holds c's values and not b's", a.name),
            Duration::from_secs(60),
            || a.get("app", "x") == Some(want.clone()) && a.get("app", "r").is_none(),
        );
    }
    let writer = &c.agents[2];
    let log = writer.log_text();
    assert!(
        log.contains("became void") && log.contains("depends_on_void"),
        "c's log must name what was voided"
    );
    assert!(
        log.contains("written again as a new change"),
        "c's log must say it carried its write forward"
    );
    let s = writer.status();
    assert_eq!(s["carried_forward"], json!(1), "{s}");
    assert!(s["voided"]["depends_on_void"].as_u64() >= Some(1), "{s}");
    assert!(s["voided"]["revoked"].as_u64() >= Some(1), "{s}");
    let text = http_get(&writer.api, "/metrics");
    assert_eq!(
        metric(&text, "lichen_writes_carried_forward_total"),
        Some(1.0)
    );
    assert!(
        metric(
            &text,
            "lichen_changes_voided_total{reason=\"depends_on_void\"}"
        ) >= Some(1.0)
    );
    let out = writer.ok(&["status"]);
    assert!(out.contains("own writes carried forward: 1"), "{out}");
    // a and c agree (b, removed, is refused by both).
    wait_until("a and c converge", PATIENCE, || {
        c.agents[0].get("app", "") == c.agents[2].get("app", "")
            && c.agents[0].heads("app") == c.agents[2].heads("app")
    });
}

/// As root with iptables (DROP rules around the admin); the in-process relay otherwise.
#[test]
fn an_acknowledged_write_built_on_a_revoked_write_is_carried_forward() {
    let net = if iptables_usable() {
        Net::Direct
    } else {
        eprintln!("no usable iptables: the agents talk through the in-process relay");
        Net::Relay
    };
    carried_forward(net, 80);
}
