//! Backups (issue 20, points 2 and 3): a copy taken while the store is open verifies, a copy
//! altered in any way that matters does not, and a restore gives back the same documents (and
//! the key only when one was embedded).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use common::*;
use lichen_crdt::store::backup::{self, BackupError};
use lichen_crdt::{Role, Store};
use serde_json::json;

/// A cluster of two: the root admin and a writer (key 2), with writes by both, a nested
/// document and a removed member whose late write is void.
fn populated() -> Cluster {
    let mut c = Cluster::new(2);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let admin = c.admin.clone();
    for i in 0..20 {
        put(&mut c.stores[0], &admin, "app", "n", json!(i));
        put(
            &mut c.stores[1],
            &w,
            "web",
            &format!("k{i}"),
            json!({"v": i}),
        );
    }
    c.sync_all();
    c
}

#[test]
fn a_backup_verifies_and_restores_to_the_same_documents() {
    let c = populated();
    let file = c.path("b.lichen");
    c.stores[1].backup_to(&file, key(2).node_id(), T0).unwrap();
    let s = backup::verify(&file, &c.path("scratch.db")).unwrap();
    assert!(
        !c.path("scratch.db").exists(),
        "the scratch store is removed"
    );
    assert_eq!(s.source, Some(key(2).node_id()));
    assert_eq!(s.taken_ms, Some(T0));
    assert!(!s.with_key);
    assert_eq!(s.documents, 2);
    assert_eq!(s.valid_changes, s.changes);
    assert_eq!(s.members.get("admin"), Some(&1));
    assert_eq!(s.members.get("writer"), Some(&1));

    // Without a key: restore gives none back.
    let r = backup::restore(&file, &c.path("r.db")).unwrap();
    assert!(r.key.is_none());
    let restored = Store::open(&c.path("r.db"), Some(c.stores[0].cluster_id())).unwrap();
    assert_eq!(fingerprint(&restored), fingerprint(&c.stores[1]));
    assert!(matches!(
        backup::restore(&file, &c.path("r.db")),
        Err(BackupError::Exists(_))
    ));

    // With the key: only the source's own key can be embedded, and restore returns it.
    assert!(backup::embed_key(&file, &key(1)).is_err());
    backup::embed_key(&file, &key(2)).unwrap();
    let s = backup::verify(&file, &c.path("scratch.db")).unwrap();
    assert!(s.with_key);
    let r = backup::restore(&file, &c.path("r2.db")).unwrap();
    assert_eq!(r.key.map(|k| k.node_id()), Some(key(2).node_id()));
    let conn = rusqlite::Connection::open(c.path("r2.db")).unwrap();
    let left: i64 = conn
        .query_row(
            "SELECT count(*) FROM meta WHERE key LIKE 'backup%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "the restored database holds no key");
}

/// Each alteration of a copy, made with SQL so that the file stays a sound SQLite database.
#[test]
fn a_tampered_backup_fails_verification() {
    let c = populated();
    let cases: &[(&str, &str)] = &[
        ("signature", "UPDATE changes SET sig = zeroblob(64) WHERE id = (SELECT max(id) FROM changes)"),
        ("bytes", "UPDATE changes SET bytes = CAST(bytes || x'00' AS BLOB) WHERE id = (SELECT max(id) FROM changes)"),
        ("view", "UPDATE kv SET value = '999' WHERE doc = 'app' AND key = 'n'"),
        ("dropped change", "DELETE FROM changes WHERE id = (SELECT min(id) FROM changes WHERE doc = 'web')"),
        ("cluster", "UPDATE meta SET value = zeroblob(32) WHERE key = 'cluster_id'"),
    ];
    for (i, (what, sql)) in cases.iter().enumerate() {
        let file = c.path(&format!("t{i}.lichen"));
        c.stores[0].backup_to(&file, key(1).node_id(), T0).unwrap();
        backup::verify(&file, &c.path("scratch.db")).unwrap();
        rusqlite::Connection::open(&file)
            .unwrap()
            .execute(sql, [])
            .unwrap();
        let e = backup::verify(&file, &c.path("scratch.db"));
        assert!(
            matches!(e, Err(BackupError::Tampered { .. })),
            "{what}: {e:?}"
        );
    }
    // Bytes flipped in the file itself.
    let file = c.path("raw.lichen");
    c.stores[0].backup_to(&file, key(1).node_id(), T0).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    assert!(backup::verify(&file, &c.path("scratch.db")).is_err());
}
