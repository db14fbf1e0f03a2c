//! Audit bundles (issue 19): a bundle exported from a store verifies offline against the
//! cluster id alone; any tampering (every single-byte mutation, a dropped, duplicated or
//! reordered change, a change or bundle re-signed by a key that is not a member) fails with
//! the offending change and the reason. The format is pinned by a fixture.
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
use lichen_crdt::audit::{verify, AuditError, Bundle};
use lichen_crdt::{Role, SecretKey, SignedChange};
use proptest::prelude::*;
use serde_json::json;

/// A small cluster with a writer, a removal and a few changes; the bundle of `app/web`.
fn sample() -> (Vec<u8>, [u8; 32], Cluster) {
    let mut c = Cluster::new(2);
    let w = key(2);
    let gone = key(3);
    c.add(&w, "eu-1", Role::Writer, &["app/"]);
    c.add(&gone, "old", Role::Writer, &[]);
    let a = c.admin.clone();
    put(
        &mut c.stores[0],
        &a,
        "app/web",
        "limits",
        json!({"rate": 10}),
    );
    c.sync_all();
    put(&mut c.stores[1], &w, "app/web", "limits.rate", json!(20));
    put(&mut c.stores[0], &gone, "app/web", "owner", json!("old"));
    c.sync_all();
    c.stores[0].remove_member(&a, gone.node_id(), T0).unwrap();
    put(&mut c.stores[0], &a, "app/web", "name", json!("web"));
    c.sync_all();
    let cluster = c.stores[0].cluster_id();
    let bytes = c.stores[0].audit_bundle(&a, "app/web", &[], T0).unwrap();
    (bytes, cluster, c)
}

#[test]
fn a_bundle_verifies_offline_and_prints_the_verified_history() {
    let (bytes, cluster, c) = sample();
    let v = verify(&bytes, &cluster).unwrap();
    assert_eq!(v.doc, "app/web");
    assert_eq!(v.document_changes, 4);
    assert_eq!(v.history.len(), 4);
    assert_eq!(v.exporter_name, "root");
    assert_eq!(Some(v.value), c.stores[0].get("app/web", &[]).unwrap());
    let names: Vec<&str> = v.history.iter().map(|e| e.author_name.as_str()).collect();
    assert!(
        names.contains(&"eu-1") && names.contains(&"old"),
        "{names:?}"
    );
    // Another node's bundle of the same document verifies too, and `--since` starts later.
    let mut c = c;
    let since = {
        let s = &mut c.stores[1];
        let h = s.history("app/web", &[], 2).unwrap();
        lichen_crdt::parse_heads(&h[0].hash).unwrap()
    };
    let since_hex = lichen_crdt::format_heads(&since);
    let w = key(2);
    let b = c.stores[1].audit_bundle(&w, "app/web", &since, T0).unwrap();
    let v = verify(&b, &cluster).unwrap();
    assert_eq!(v.exporter_name, "eu-1");
    assert!(
        !v.history.is_empty() && v.history.len() < 4,
        "{:?}",
        v.history
    );
    assert!(v.history.iter().all(|e| e.hash != since_hex));
}

#[test]
fn the_wrong_cluster_id_fails() {
    let (bytes, _, _) = sample();
    let e = verify(&bytes, &[9; 32]).unwrap_err();
    assert!(matches!(e, AuditError::WrongCluster { .. }), "{e}");
}

/// Re-encode a decoded bundle with its changes edited (and re-signed by the exporter, so
/// that only the change-level checks can catch the edit).
fn edited(bytes: &[u8], f: impl FnOnce(&mut Bundle)) -> Vec<u8> {
    let mut b = Bundle::decode(bytes).unwrap();
    f(&mut b);
    b.sign(&key(1));
    b.encode()
}

#[test]
fn a_dropped_change_fails_naming_the_change_that_needs_it_or_the_missing_head() {
    let (bytes, cluster, _) = sample();
    // Drop a change in the middle: its successor misses a dependency.
    let e = verify(
        &edited(&bytes, |b| {
            b.changes.remove(1);
        }),
        &cluster,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::MissingDependency {
                part: "document",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("truncated"), "{e}");
    // Drop the last change: the head the bundle names is missing.
    let e = verify(
        &edited(&bytes, |b| {
            b.changes.pop();
        }),
        &cluster,
    )
    .unwrap_err();
    assert!(matches!(e, AuditError::MissingHead { .. }), "{e}");
    // Drop a membership change (the writer's admission): its changes are not authorized.
    let e = verify(
        &edited(&bytes, |b| {
            b.members.truncate(1);
        }),
        &cluster,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::MissingDependency { .. }
                | AuditError::Change { .. }
                | AuditError::MissingHead { .. }
        ),
        "{e}"
    );
    // A change listed twice.
    let e = verify(
        &edited(&bytes, |b| {
            let c = b.changes[0].clone();
            b.changes.insert(1, c);
        }),
        &cluster,
    )
    .unwrap_err();
    assert!(
        matches!(e, AuditError::Change { .. } | AuditError::OutOfOrder { .. }),
        "{e}"
    );
}

#[test]
fn a_reordered_bundle_fails_naming_the_change_out_of_place() {
    let (bytes, cluster, _) = sample();
    let n = Bundle::decode(&bytes).unwrap().changes.len();
    for i in 0..n - 1 {
        let e = verify(&edited(&bytes, |b| b.changes.swap(i, i + 1)), &cluster).unwrap_err();
        match e {
            AuditError::OutOfOrder { part, position, .. } => {
                assert_eq!(part, "document");
                assert_eq!(position, i);
            }
            other => panic!("swap {i}: {other}"),
        }
    }
    let e = verify(&edited(&bytes, |b| b.members.swap(0, 1)), &cluster).unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::OutOfOrder {
                part: "membership",
                position: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_change_re_signed_by_a_key_that_is_not_a_member_fails() {
    let (bytes, cluster, _) = sample();
    let foreign = SecretKey::from_seed([42; 32]);
    // The foreign key signs the change's bytes as they are: the actor is not the signer.
    let e = verify(
        &edited(&bytes, |b| {
            let c = &b.changes[2];
            b.changes[2] = SignedChange::sign(&foreign, &cluster, &c.doc, c.bytes.clone()).unwrap();
        }),
        &cluster,
    )
    .unwrap_err();
    match &e {
        AuditError::Change {
            part,
            position,
            reason,
            ..
        } => {
            assert_eq!((*part, *position), ("document", 2));
            assert!(reason.contains("signer"), "{reason}");
        }
        other => panic!("{other}"),
    }
    // The whole bundle re-signed by a foreign key.
    let mut b = Bundle::decode(&bytes).unwrap();
    b.sign(&foreign);
    let e = verify(&b.encode(), &cluster).unwrap_err();
    assert!(matches!(e, AuditError::Exporter { .. }), "{e}");
    assert!(e.to_string().contains("foreign key"), "{e}");
    // A change with a forged signature (another author claimed).
    let e = verify(
        &edited(&bytes, |b| b.changes[1].author = foreign.node_id()),
        &cluster,
    )
    .unwrap_err();
    assert!(matches!(e, AuditError::Change { position: 1, .. }), "{e}");
}

#[test]
fn a_member_forging_a_change_outside_its_scope_fails_by_the_ingest_rule() {
    // The writer is scoped to `app/`; a change it signs for `ops/x` is refused by the same
    // rule that refuses it on ingest.
    let mut c = Cluster::new(1);
    let w = key(2);
    c.add(&w, "eu-1", Role::Writer, &["app/"]);
    let a = c.admin.clone();
    put(&mut c.stores[0], &a, "ops/x", "k", json!(1));
    let cluster = c.stores[0].cluster_id();
    let bytes = c.stores[0].audit_bundle(&a, "ops/x", &[], T0).unwrap();
    // Forge: make a change by w in a scratch automerge document on top of the admin's.
    let forged = {
        use automerge::transaction::Transactable;
        let b = Bundle::decode(&bytes).unwrap();
        let mut am = automerge::Automerge::new();
        am.apply_changes(
            b.changes
                .iter()
                .map(|c| automerge::Change::try_from(c.bytes.as_slice()).unwrap()),
        )
        .unwrap();
        am.set_actor(automerge::ActorId::from(w.node_id().0.as_slice()));
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "k", 2_i64).unwrap();
        tx.commit();
        let ch = am.get_last_local_change().unwrap().raw_bytes().to_vec();
        SignedChange::sign(&w, &cluster, "ops/x", ch).unwrap()
    };
    let e = verify(
        &edited(&bytes, |b| {
            b.changes.push(forged);
            b.heads = vec![b.changes.last().unwrap().hash().unwrap()];
        }),
        &cluster,
    )
    .unwrap_err();
    match &e {
        AuditError::Change { reason, .. } => assert!(reason.contains("scope"), "{reason}"),
        other => panic!("{other}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Every single-byte mutation of a bundle fails verification with a reason.
    #[test]
    fn every_single_byte_mutation_fails(pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let (bytes, cluster) = sample_cached();
        let mut m = bytes.clone();
        let i = pos.index(m.len());
        m[i] = m[i].wrapping_add(delta);
        let e = verify(&m, &cluster);
        prop_assert!(e.is_err(), "byte {} + {} verified", i, delta);
        prop_assert!(!e.unwrap_err().to_string().is_empty());
    }

    /// Every truncation fails.
    #[test]
    fn every_truncation_fails(pos in any::<prop::sample::Index>()) {
        let (bytes, cluster) = sample_cached();
        let cut = pos.index(bytes.len());
        prop_assert!(verify(&bytes[..cut], &cluster).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Dropping any one change (document or membership) fails, even with the bundle
    /// re-signed by its exporter.
    #[test]
    fn every_dropped_change_fails(pick in any::<prop::sample::Index>()) {
        let (bytes, cluster) = sample_cached();
        let b = Bundle::decode(&bytes).unwrap();
        let i = pick.index(b.members.len() + b.changes.len());
        let m = edited(&bytes, |b| {
            if i < b.members.len() {
                b.members.remove(i);
            } else {
                b.changes.remove(i - b.members.len());
            }
        });
        prop_assert!(verify(&m, &cluster).is_err(), "dropping change {} verified", i);
    }

    /// Any reordering of the document's or the membership's changes fails.
    #[test]
    fn every_reordering_fails(seed in any::<u64>(), members in any::<bool>()) {
        let (bytes, cluster) = sample_cached();
        let m = edited(&bytes, |b| {
            let list = if members { &mut b.members } else { &mut b.changes };
            let before: Vec<_> = list.iter().map(|c| c.hash()).collect();
            // A seeded shuffle; if it happens to be the identity, rotate by one.
            let mut x = seed | 1;
            for k in (1..list.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                list.swap(k, (x % (k as u64 + 1)) as usize);
            }
            if list.iter().map(|c| c.hash()).collect::<Vec<_>>() == before {
                list.rotate_left(1);
            }
        });
        let e = verify(&m, &cluster);
        prop_assert!(matches!(e, Err(AuditError::OutOfOrder { .. })), "{:?}", e.map(|_| ()));
    }
}

proptest! {
    /// What the fuzz target checks, on random input: decoding never panics, and whatever
    /// decodes encodes back to the same bytes (and its verification does not panic).
    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_round_trips(
        tail in prop::collection::vec(any::<u8>(), 0..600),
        header in any::<bool>(),
    ) {
        let mut data = if header { b"LCHAUDIT\x01".to_vec() } else { Vec::new() };
        data.extend_from_slice(&tail);
        if let Ok(b) = Bundle::decode(&data) {
            prop_assert_eq!(b.encode(), data.clone());
            let _ = verify(&data, &b.cluster);
        }
    }
}

fn sample_cached() -> (Vec<u8>, [u8; 32]) {
    static CELL: std::sync::OnceLock<(Vec<u8>, [u8; 32])> = std::sync::OnceLock::new();
    CELL.get_or_init(|| {
        let (b, c, _) = sample();
        (b, c)
    })
    .clone()
}

#[test]
fn the_format_is_pinned_by_a_fixture() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audit_bundle_v1.bin");
    let (bytes, cluster, _) = sample();
    if std::env::var_os("LICHEN_BLESS").is_some() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let fixture = std::fs::read(&path).expect("fixture (regenerate with LICHEN_BLESS=1)");
    assert_eq!(
        bytes, fixture,
        "the bundle encoding changed: bump BUNDLE_VERSION"
    );
    let b = Bundle::decode(&fixture).unwrap();
    assert_eq!(&fixture[..8], b"LCHAUDIT");
    assert_eq!(fixture[8], 1);
    assert_eq!(b.encode(), fixture);
    verify(&fixture, &cluster).unwrap();
}
