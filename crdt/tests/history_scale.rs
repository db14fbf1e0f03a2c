//! Reading the past at scale (issue 19): `get --at`, `diff` (and `blame`, reported) on a
//! document with 100k changes. Ignored by default (building the history takes a while); run with
//! `cargo test -p lichen-crdt --test history_scale -- --ignored --nocapture`, which prints
//! the figures (test profile: dependencies optimized, this crate not).
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

use std::time::Instant;

use lichen_crdt::{parse_path, Op, SecretKey, Store};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

#[test]
#[ignore]
fn at_and_diff_on_100k_changes_stay_under_200_ms() {
    let n: u64 = std::env::var("LICHEN_PAST_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed([1; 32]);
    let mut s = Store::create(&dir.path().join("big.db"), &key, "bench", T0).unwrap();
    s.set_no_sync().unwrap();
    let t = Instant::now();
    let mut middle = Vec::new();
    for i in 0..n {
        let op = Op::Put {
            path: parse_path(&format!("k{}", i % 1000)).unwrap(),
            value: json!(i),
        };
        s.write(&key, "app/big", &op, T0).unwrap();
        if i == n / 2 {
            middle = s.heads("app/big").unwrap();
        }
    }
    println!("built {n} changes in {:?}", t.elapsed());
    // Load the document once (as the agent has it after any history read).
    s.get_at("app/big", &[], &middle).unwrap();
    let mut worst = [0f64; 3];
    for _ in 0..5 {
        let t = Instant::now();
        let v = s.get_at("app/big", &[], &middle).unwrap().unwrap();
        worst[0] = worst[0].max(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(v.as_object().unwrap().len(), 1000);
        let t = Instant::now();
        let v = s
            .get_at("app/big", &parse_path("k7").unwrap(), &middle)
            .unwrap();
        worst[1] = worst[1].max(t.elapsed().as_secs_f64() * 1e3);
        assert!(v.is_some());
        let t = Instant::now();
        let d = s.diff("app/big", &[], &middle, None).unwrap();
        worst[2] = worst[2].max(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.len(), 1000);
    }
    let t = Instant::now();
    let b = s.blame("app/big", &[]).unwrap();
    let blame_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(b.len(), 1000);
    assert!(b
        .iter()
        .all(|l| l.setters.len() == 1 && l.setters[0].hash.len() == 64));
    println!("{n} changes: blame of the whole document (1000 leaves) {blame_ms:.1} ms");
    println!(
        "{n} changes: get --at (whole doc, 1000 keys) {:.1} ms, get --at (one key) {:.1} ms, diff (1000 keys changed) {:.1} ms (worst of 5)",
        worst[0], worst[1], worst[2]
    );
    assert!(worst.iter().all(|w| *w < 200.0), "{worst:?}");
}
