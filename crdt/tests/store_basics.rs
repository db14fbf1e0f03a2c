//! The store as a user sees it: create a cluster, write and read documents, see conflicts and
//! history, reopen, and refuse databases that are not ours.
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
use lichen_crdt::{parse_path, Op, Outcome, Role, Store, StoreError};
use serde_json::json;

#[test]
fn founding_admin_writes_reads_and_lists_documents() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &admin, "app/nginx", "workers", json!(4));
    put(
        s,
        &admin,
        "app/nginx",
        "limits",
        json!({"rate": 10, "burst": [1, 2]}),
    );
    put(s, &admin, "region/eu/limits", "max", json!(null));
    assert_eq!(get(s, "app/nginx", "workers"), Some(json!(4)));
    assert_eq!(get(s, "app/nginx", "limits.rate"), Some(json!(10)));
    assert_eq!(get(s, "app/nginx", "limits.burst.1"), Some(json!(2)));
    assert_eq!(get(s, "app/nginx", "missing"), None);
    assert_eq!(
        get(s, "app/nginx", ""),
        Some(json!({"workers": 4, "limits": {"rate": 10, "burst": [1, 2]}}))
    );
    assert_eq!(
        s.list_docs().unwrap(),
        vec!["app/nginx", "region/eu/limits"]
    );
    assert_eq!(
        s.keys("app/nginx", &[]).unwrap().unwrap(),
        vec!["limits", "workers"]
    );
    // Writing the same value again makes no change at all.
    let again = s
        .write(
            &admin,
            "app/nginx",
            &Op::Put {
                path: parse_path("workers").unwrap(),
                value: json!(4),
            },
            T0,
        )
        .unwrap();
    assert!(again.is_none());
    // Delete by path.
    s.write(
        &admin,
        "app/nginx",
        &Op::Delete {
            path: parse_path("limits.rate").unwrap(),
        },
        T0,
    )
    .unwrap();
    assert_eq!(
        get(s, "app/nginx", "limits"),
        Some(json!({"burst": [1, 2]}))
    );
}

#[test]
fn invalid_document_names_and_paths_are_refused() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let s = &mut c.stores[0];
    for bad in ["", "App", "_members", "a//b", "/x"] {
        let r = s.write(
            &admin,
            bad,
            &Op::Put {
                path: parse_path("k").unwrap(),
                value: json!(1),
            },
            T0,
        );
        assert!(r.is_err(), "{bad:?} accepted");
    }
    assert!(parse_path("a..b").is_err());
}

#[test]
fn everything_survives_close_and_reopen() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let writer = key(2);
    c.add(&writer, "w", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "a", json!("b"));
    let cluster = c.stores[0].cluster_id();
    let heads = c.stores[0].heads("app/x").unwrap();
    let path = c.stores[0].path().to_path_buf();
    drop(c.stores.pop());
    let mut s = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(get(&s, "app/x", "a"), Some(json!("b")));
    assert_eq!(s.heads("app/x").unwrap(), heads);
    assert_eq!(
        s.membership().get(&writer.node_id()).unwrap().role,
        Role::Writer
    );
    // And the lazily loaded document continues the author's chain correctly.
    put(&mut s, &admin, "app/x", "c", json!(1));
    assert_eq!(get(&s, "app/x", ""), Some(json!({"a": "b", "c": 1})));
}

#[test]
fn a_held_store_refuses_a_second_opener_until_it_is_closed() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let cluster = c.stores[0].cluster_id();
    let path = c.stores[0].path().to_path_buf();
    c.stores[0].hold_exclusive().unwrap();
    // The holder keeps reading and writing (with no per-transaction file locks)...
    put(&mut c.stores[0], &admin, "app/x", "a", json!(1));
    assert_eq!(get(&c.stores[0], "app/x", "a"), Some(json!(1)));
    // ...while a second opener (another agent on the same data directory) is refused with
    // an error that says why, and the holder is undisturbed.
    match Store::open(&path, Some(cluster)) {
        Err(e @ StoreError::InUse { .. }) => {
            assert!(e.to_string().contains("in use by another process"), "{e}")
        }
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("a second store opened a held database"),
    }
    put(&mut c.stores[0], &admin, "app/x", "b", json!(2));
    // Closing the holder releases the file; everything it wrote is there.
    drop(c.stores.pop());
    let s = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(get(&s, "app/x", ""), Some(json!({"a": 1, "b": 2})));
}

#[test]
fn the_write_ahead_log_is_checkpointed_at_the_mark_the_owner_sets() {
    let wal_len = |s: &Store| {
        let mut p = s.path().as_os_str().to_owned();
        p.push("-wal");
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    };
    let frame = 4096 + 24;
    for (mark, checkpointed) in [(100u32, true), (4000, false)] {
        let mut c = Cluster::new(1);
        let admin = c.admin.clone();
        c.stores[0].hold_exclusive().unwrap();
        c.stores[0].set_wal_autocheckpoint(mark).unwrap();
        // 300 writes append ~1,900 frames: well over 100 and over SQLite's default mark
        // (1000), under 4000.
        for i in 0..300 {
            put(&mut c.stores[0], &admin, "app/x", "n", json!(i));
        }
        let frames = wal_len(&c.stores[0]) / frame;
        eprintln!("mark {mark}: {frames} frames in the log after 300 writes");
        if checkpointed {
            // Checkpointed at 100 pages: the log restarted from its beginning each time.
            assert!(
                frames < 150,
                "{frames} frames in the log with a mark of {mark}"
            );
        } else {
            assert!(frames > 1200, "only {frames} frames with a mark of {mark}");
        }
        assert_eq!(get(&c.stores[0], "app/x", "n"), Some(json!(299)));
    }
    // An explicit checkpoint (what the agent does when idle) copies the log into the
    // database, so that the next writes start it again from its beginning: 20 more writes
    // overwrite the first frames instead of growing the file.
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    c.stores[0].hold_exclusive().unwrap();
    for i in 0..30 {
        put(&mut c.stores[0], &admin, "app/x", "n", json!(i));
    }
    let full = wal_len(&c.stores[0]);
    c.stores[0].checkpoint().unwrap();
    for i in 30..50 {
        put(&mut c.stores[0], &admin, "app/x", "n", json!(i));
    }
    assert_eq!(
        wal_len(&c.stores[0]),
        full,
        "the log restarted from its beginning"
    );
    // Without the checkpoint the same 20 writes append.
    for i in 50..70 {
        put(&mut c.stores[0], &admin, "app/x", "n", json!(i));
    }
    assert!(wal_len(&c.stores[0]) > full);
    let path = c.stores[0].path().to_path_buf();
    let cluster = c.stores[0].cluster_id();
    drop(c.stores.pop());
    let s = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(get(&s, "app/x", "n"), Some(json!(69)));
    drop(s);
    let mut c = Cluster::new(1);
    for bad in [0, 99, 1_000_001] {
        assert!(c.stores[0].set_wal_autocheckpoint(bad).is_err(), "{bad}");
    }
}

#[test]
fn concurrent_writes_to_one_key_are_visible_as_a_conflict() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "port", json!(80));
    put(&mut c.stores[1], &w, "app/x", "port", json!(8080));
    c.sync_all();
    let a = get(&c.stores[0], "app/x", "port");
    assert_eq!(a, get(&c.stores[1], "app/x", "port"));
    let all = c.stores[0]
        .conflicts("app/x", &parse_path("port").unwrap())
        .unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(Some(all[0].clone()), a, "the winner comes first");
    assert!(all.contains(&json!(80)) && all.contains(&json!(8080)));
}

/// The view remembers which ops are behind each key (`kv.ops`): the writer's fast path names
/// them as what a put overwrites. A concurrent change can replace the *losing* value of a
/// conflict while the winner stays; nothing visible changes, so Automerge's diff does not
/// name that key, and the row kept the old op (found by the fast-path story). Here the admin,
/// not having seen w's edits, overwrites its own losing value at `a` and a value at `b` that
/// w already overwrote (so the replica takes the diff path): the row of `a` must list the
/// admin's new op.
#[test]
fn replacing_the_losing_value_of_a_conflict_updates_the_ops_behind_the_row() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "b", json!(1));
    c.sync_all();
    // Concurrently: the admin puts a; w, whose op counters run ahead, puts a and b.
    let from_admin = put(&mut c.stores[0], &admin, "app/x", "a", json!(1));
    for i in 0..5 {
        put(&mut c.stores[1], &w, "app/x", "z", json!(i));
    }
    put(&mut c.stores[1], &w, "app/x", "a", json!(2));
    put(&mut c.stores[1], &w, "app/x", "b", json!(2));
    c.stores[1].ingest(vec![from_admin]).unwrap();
    assert_eq!(
        get(&c.stores[1], "app/x", "a"),
        Some(json!(2)),
        "w's op wins"
    );
    assert_eq!(c.stores[1].check_view("app/x").unwrap(), None);
    // The admin, still without w's edits, overwrites its own a and the b w overwrote.
    let both = c.stores[0]
        .write_batch(
            &admin,
            &[
                (
                    "app/x".into(),
                    Op::Put {
                        path: parse_path("a").unwrap(),
                        value: json!(3),
                    },
                ),
                (
                    "app/x".into(),
                    Op::Put {
                        path: parse_path("b").unwrap(),
                        value: json!(3),
                    },
                ),
            ],
            T0,
        )
        .pop()
        .unwrap()
        .unwrap()
        .unwrap();
    c.stores[1].ingest(vec![both]).unwrap();
    assert_eq!(
        get(&c.stores[1], "app/x", "a"),
        Some(json!(2)),
        "w's op still wins"
    );
    assert_eq!(c.stores[1].check_view("app/x").unwrap(), None);
    // And w's next put at a overwrites both values, as Automerge's own put would.
    put(&mut c.stores[1], &w, "app/x", "a", json!(4));
    let all = c.stores[1]
        .conflicts("app/x", &parse_path("a").unwrap())
        .unwrap();
    assert_eq!(all, vec![json!(4)]);
}

/// Writers that take turns (each has the other's change before it writes) make changes that
/// name, besides the heads, their own previous change: Automerge adds it whenever the heads
/// do not name it. Such a change still extends everything a replica holds, so the replica
/// applies it as a fast forward, without Automerge (whose apply grows with the history).
#[test]
fn writers_taking_turns_stay_on_the_replicas_fast_path() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let mut most_deps = 0;
    for i in 0..10 {
        let (at, k) = if i % 2 == 0 { (0, &admin) } else { (1, &w) };
        let ch = put(&mut c.stores[at], k, "app/x", "k", json!(i));
        let cluster = c.stores[at].cluster_id();
        most_deps = most_deps.max(ch.authenticate(&cluster).unwrap().deps.len());
        for r in 0..3 {
            if r != at {
                let report = c.stores[r].ingest(vec![ch.clone()]).unwrap();
                assert_eq!(report.applied_count(), 1);
            }
        }
    }
    assert_eq!(
        most_deps, 2,
        "a change names its author's previous change too"
    );
    assert_eq!(
        c.stores[2].loaded_docs(),
        0,
        "replica 2 never needed Automerge"
    );
    assert_eq!(get(&c.stores[2], "app/x", "k"), Some(json!(9)));
    assert_eq!(c.stores[2].check_view("app/x").unwrap(), None);
}

#[test]
fn history_names_who_changed_what_in_causal_order() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "eu-writer", Role::Writer, &[]);
    put(&mut c.stores[0], &admin, "app/x", "a", json!(1));
    c.sync_all();
    put(&mut c.stores[1], &w, "app/x", "b", json!({"c": 2}));
    c.sync_all();
    let h = c.stores[0].history("app/x", &[], 100).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].author, admin.node_id());
    assert_eq!(h[0].author_name, "root");
    assert_eq!(h[0].edits[0].path, "a");
    assert_eq!(h[1].author, w.node_id());
    assert_eq!(h[1].author_name, "eu-writer");
    assert_eq!(h[1].edits[0].path, "b");
    assert_eq!(h[1].edits[0].value, Some(json!({"c": 2})));
    // Filter by path.
    let hb = c.stores[0]
        .history("app/x", &parse_path("b.c").unwrap(), 100)
        .unwrap();
    assert_eq!(hb.len(), 1);
    assert_eq!(hb[0].author, w.node_id());
}

#[test]
fn a_database_of_another_cluster_is_refused_and_untouched() {
    let c1 = Cluster::new(1);
    let other = Store::create(&c1.path("other.db"), &key(9), "other", T0).unwrap();
    assert_ne!(other.cluster_id(), c1.stores[0].cluster_id());
    let path = c1.stores[0].path().to_path_buf();
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path, Some(other.cluster_id())).err().unwrap();
    assert!(matches!(err, StoreError::WrongCluster { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    let junk = b"this is not sqlite at all, just some bytes that happen to be here".repeat(100);
    std::fs::write(&path, &junk).unwrap();
    let err = Store::open(&path, None).err().unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), junk);
    // Creating over it is refused too.
    assert!(Store::create(&path, &key(1), "x", T0).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), junk);
}

#[test]
fn another_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(conn);
    let err = Store::open(&path, None).err().unwrap();
    assert!(err.to_string().contains("not a Lichen database"), "{err}");
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let c = Cluster::new(1);
    let path = c.stores[0].path().to_path_buf();
    drop(c.stores);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(&path, None).err().unwrap();
    assert!(
        matches!(err, StoreError::NewerSchema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn a_damaged_database_file_gives_a_clear_error() {
    let c = Cluster::new(1);
    let path = c.stores[0].path().to_path_buf();
    drop(c.stores);
    // Overwrite the middle of the file (past the header) with garbage.
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100).take(4000) {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    match Store::open(&path, None) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(s) => {
            // If SQLite could still open it, reads must fail cleanly rather than panic.
            let _ = s.list_docs();
        }
    }
}

/// Concurrent writes to one document committed together become one signed change (one
/// signature for peers to verify); a write that fails gets its own error and the others
/// still land, each in its own change.
#[test]
fn a_group_commit_to_one_document_is_one_change_and_a_failure_stays_its_own() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let put_op = |p: &str, v| Op::Put {
        path: parse_path(p).unwrap(),
        value: v,
    };
    let s = &mut c.stores[0];
    let before = s.change_count("app/x").unwrap();
    let r = s.write_batch(
        &admin,
        &[
            ("app/x".into(), put_op("a", json!(1))),
            ("app/y".into(), put_op("a", json!(2))),
            ("app/x".into(), put_op("b.c", json!(3))),
            ("app/x".into(), put_op("a", json!(1))), // same value again: no change
        ],
        T0,
    );
    let hashes: Vec<_> = r
        .iter()
        .map(|r| r.as_ref().unwrap().as_ref().map(|c| c.hash().unwrap()))
        .collect();
    assert_eq!(hashes[0], hashes[2], "both app/x writes share one change");
    assert_ne!(hashes[0], hashes[1]);
    assert_eq!(hashes[3], None);
    assert_eq!(s.change_count("app/x").unwrap(), before + 1);
    assert_eq!(get(s, "app/x", ""), Some(json!({"a": 1, "b": {"c": 3}})));

    // A path through a scalar fails; the other writes of the batch still commit.
    let r = s.write_batch(
        &admin,
        &[
            ("app/x".into(), put_op("d", json!(4))),
            ("app/x".into(), put_op("a.deeper", json!(5))),
            ("app/x".into(), put_op("e", json!(6))),
        ],
        T0,
    );
    assert!(r[0].as_ref().unwrap().is_some());
    assert!(r[1].is_err(), "{:?}", r[1]);
    assert!(r[2].as_ref().unwrap().is_some());
    assert_eq!(get(s, "app/x", "d"), Some(json!(4)));
    assert_eq!(get(s, "app/x", "e"), Some(json!(6)));
    assert_eq!(get(s, "app/x", "a"), Some(json!(1)));

    // The replica applies the combined changes to the same state.
    c.sync_all();
    assert_eq!(
        get(&c.stores[1], "app/x", ""),
        get(&c.stores[0], "app/x", "")
    );
}

/// A replica applies plain overwrites on top of its heads without Automerge (deferred), and
/// its in-memory document catches up before it is next used: its own write, the view and the
/// heads all agree with a replica that applied everything the slow way.
#[test]
fn fast_forward_changes_are_deferred_and_caught_up_before_use() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let writer = key(2);
    c.add(&writer, "w", Role::Writer, &[]);
    // Replica 1 has the document loaded (it wrote to it); replica 2 only ever ingests.
    let first = put(&mut c.stores[1], &writer, "app/x", "mine", json!(0));
    c.stores[0].ingest(vec![first.clone()]).unwrap();
    c.stores[2].ingest(vec![first]).unwrap();
    let mut remote = Vec::new();
    for i in 0..5 {
        remote.push(put(&mut c.stores[0], &admin, "app/x", "hot", json!(i)));
    }
    // A delete and a nested object take the Automerge path, in the same stream.
    remote.push(put(
        &mut c.stores[0],
        &admin,
        "app/x",
        "nested",
        json!({"a": [1]}),
    ));
    for ch in &remote {
        c.stores[1].ingest(vec![ch.clone()]).unwrap();
    }
    c.stores[2].ingest(remote.clone()).unwrap();
    assert_eq!(get(&c.stores[1], "app/x", "hot"), Some(json!(4)));
    // Its own write builds on the caught-up document.
    let mine = put(&mut c.stores[1], &writer, "app/x", "mine", json!(1));
    for s in [0, 2] {
        c.stores[s].ingest(vec![mine.clone()]).unwrap();
    }
    for s in 0..3 {
        assert_eq!(
            c.stores[s].check_view("app/x").unwrap(),
            None,
            "replica {s}"
        );
        assert_eq!(
            c.stores[s].heads("app/x").unwrap(),
            vec![mine.hash().unwrap()]
        );
        assert_eq!(
            get(&c.stores[s], "app/x", ""),
            Some(json!({"mine": 1, "hot": 4, "nested": {"a": [1]}}))
        );
    }
}

/// Deferred fast-forward changes are part of every snapshot: a replica that has the document
/// loaded ingests more than a deferral's worth of overwrites one by one, snapshots, reopens,
/// and still holds exactly what the writer holds.
#[test]
fn snapshots_include_deferred_changes_and_survive_reopen() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let writer = key(2);
    c.add(&writer, "w", Role::Writer, &[]);
    let first = put(&mut c.stores[1], &writer, "app/x", "mine", json!(0));
    c.stores[0].ingest(vec![first]).unwrap();
    // Load the document on the replica (a scalar put does not: the writer's fast path).
    c.stores[1]
        .conflicts("app/x", &parse_path("mine").unwrap())
        .unwrap();
    assert_eq!(c.stores[1].loaded_docs(), 1);
    for i in 0..1500 {
        let ch = put(
            &mut c.stores[0],
            &admin,
            "app/x",
            &format!("k{}", i % 7),
            json!(i),
        );
        c.stores[1].ingest(vec![ch]).unwrap();
    }
    assert_eq!(c.stores[1].maintenance().unwrap(), 1, "one snapshot saved");
    let expected = get(&c.stores[0], "app/x", "");
    let heads = c.stores[0].heads("app/x").unwrap();
    let path = c.stores[1].path().to_path_buf();
    let cluster = c.stores[1].cluster_id();
    c.stores.truncate(1);
    let mut reopened = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(get(&reopened, "app/x", ""), expected);
    assert_eq!(reopened.heads("app/x").unwrap(), heads);
    // Loading the document from the snapshot gives the same state as the view.
    assert_eq!(reopened.check_view("app/x").unwrap(), None);
    // And the replica writes on top of all of it.
    let mine = put(&mut reopened, &writer, "app/x", "mine", json!(1));
    let report = c.stores[0].ingest(vec![mine]).unwrap();
    assert_eq!(report.applied_count(), 1);
    assert_eq!(get(&c.stores[0], "app/x", ""), get(&reopened, "app/x", ""));
}

/// A document only ever written through the fast paths (a writer's scalar puts, a replica's
/// fast forwards) is never loaded, yet it still gets its snapshot, so that a later load (for
/// history, conflicts or a nested edit) replays a bounded tail; it is not kept in memory.
#[test]
fn a_document_that_is_never_loaded_still_gets_snapshots() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    for i in 0..1200 {
        let ch = put(&mut c.stores[0], &admin, "app/hot", "k", json!(i));
        c.stores[1].ingest(vec![ch]).unwrap();
    }
    for s in &mut c.stores {
        assert_eq!(s.loaded_docs(), 0);
        assert_eq!(s.maintenance().unwrap(), 1, "one snapshot saved");
        assert_eq!(s.loaded_docs(), 0, "and the document dropped again");
        assert_eq!(s.maintenance().unwrap(), 0, "nothing new since");
        assert_eq!(s.check_view("app/hot").unwrap(), None);
    }
}

#[test]
fn documents_beyond_the_memory_cap_are_dropped_and_come_back_from_disk_intact() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    c.stores[0].set_max_loaded_docs(4);
    // Twenty documents written (objects: Automerge's path, which loads the document; a
    // scalar put takes the fast path and loads nothing, see the end): only the four used
    // last stay in memory.
    for i in 0..20 {
        put(
            &mut c.stores[0],
            &admin,
            &format!("app/d{i}"),
            "v",
            json!({ "n": i }),
        );
        c.stores[0].trim_cache();
    }
    assert_eq!(c.stores[0].loaded_docs(), 4);
    // Writing to a dropped document rebuilds it from disk and carries on from its last
    // change (the next seq, built on the stored history): no fork, nothing lost.
    for i in 0..20 {
        let ch = put(
            &mut c.stores[0],
            &admin,
            &format!("app/d{i}"),
            "w",
            json!([i * 10]),
        );
        let cluster = c.stores[0].cluster_id();
        assert_eq!(ch.authenticate(&cluster).unwrap().seq, 2, "app/d{i}");
        c.stores[0].trim_cache();
        assert!(c.stores[0].loaded_docs() <= 4);
    }
    c.sync_all();
    for i in 0..20 {
        let doc = format!("app/d{i}");
        let want = Some(json!({"v": {"n": i}, "w": [i * 10]}));
        assert_eq!(get(&c.stores[0], &doc, ""), want, "{doc}");
        assert_eq!(get(&c.stores[1], &doc, ""), want, "{doc} on the replica");
    }
    assert!(c.stores[0].equivocators().unwrap().is_empty());
    // A scalar put to a document not in memory leaves it on disk.
    let loaded = c.stores[0].loaded_docs();
    put(&mut c.stores[0], &admin, "app/d0", "x", json!(1));
    assert_eq!(c.stores[0].loaded_docs(), loaded);
    assert_eq!(get(&c.stores[0], "app/d0", "x"), Some(json!(1)));
    assert_eq!(c.stores[0].check_view("app/d0").unwrap(), None);
}

/// Two writers edit one document concurrently, so its heads keep going from one hash to two
/// and back. A document's snapshot (saved by `maintenance`; here ~50 KiB, mostly one big value)
/// must not be copied into the write-ahead log by each of those commits: SQLite rewrites a
/// whole row, overflow pages included, whenever its size changes, so the snapshot lives in
/// a table of its own. Measured in log frames (4 KiB pages) per round of two concurrent
/// changes, before and after the snapshot exists.
#[test]
fn a_documents_snapshot_is_not_rewritten_by_commits_that_change_its_heads() {
    let wal_frames = |s: &Store| {
        let mut p = s.path().as_os_str().to_owned();
        p.push("-wal");
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) / (4096 + 24)
    };
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let writer = key(2);
    c.add(&writer, "w", Role::Writer, &[]);
    // Nothing checkpoints the log during the story: it only grows.
    c.stores[0].set_wal_autocheckpoint(1_000_000).unwrap();
    // 64 KiB that Automerge's compression cannot shrink much (a fixed xorshift sequence).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: String = (0..64 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'0' + (x % 64) as u8)
        })
        .collect();
    let first = put(&mut c.stores[0], &admin, "app/x", "big", json!(big));
    c.stores[1].ingest(vec![first]).unwrap();
    for i in 0..1000 {
        let ch = put(&mut c.stores[0], &admin, "app/x", "n", json!(i));
        c.stores[1].ingest(vec![ch]).unwrap();
    }
    // One round: each side writes on its own heads, then receives the other's change.
    let round = |c: &mut Cluster, i: i64| {
        let a = put(&mut c.stores[0], &admin, "app/x", "a", json!(i));
        let b = put(&mut c.stores[1], &writer, "app/x", "b", json!(i));
        assert_eq!(
            outcome(&c.stores[0].ingest(vec![b]).unwrap()),
            Outcome::Applied
        );
        assert_eq!(c.stores[0].heads("app/x").unwrap().len(), 2);
        c.stores[1].ingest(vec![a]).unwrap();
    };
    let rounds = 10;
    let before = wal_frames(&c.stores[0]);
    for i in 0..rounds {
        round(&mut c, i);
    }
    let without = (wal_frames(&c.stores[0]) - before) as f64 / rounds as f64;
    assert_eq!(c.stores[0].maintenance().unwrap(), 1, "a snapshot saved");
    let before = wal_frames(&c.stores[0]);
    for i in rounds..2 * rounds {
        round(&mut c, i);
    }
    let with = (wal_frames(&c.stores[0]) - before) as f64 / rounds as f64;
    eprintln!("log frames per round: {without:.1} without a snapshot, {with:.1} with one");
    assert!(
        with < without + 3.0,
        "{with:.1} frames per round with a snapshot against {without:.1} without"
    );
    // The snapshot is used: after a reopen the document loads from it, intact.
    c.sync_all();
    let path = c.stores[0].path().to_path_buf();
    let cluster = c.stores[0].cluster_id();
    let want = get(&c.stores[0], "app/x", "");
    c.stores.truncate(1);
    drop(c.stores.pop());
    let mut s = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(s.check_view("app/x").unwrap(), None);
    assert_eq!(get(&s, "app/x", ""), want);
}

#[test]
fn a_document_whose_values_were_all_deleted_is_not_listed_with_values() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &admin, "app/a", "k", json!(1));
    put(s, &admin, "app/b", "k", json!(1));
    s.write(&admin, "app/b", &Op::Replace { value: json!({}) }, 0)
        .unwrap();
    assert_eq!(s.list_docs().unwrap(), vec!["app/a", "app/b"]);
    assert_eq!(s.list_docs_with_values().unwrap(), vec!["app/a"]);
    put(s, &admin, "app/b", "k", json!(2));
    assert_eq!(s.list_docs_with_values().unwrap(), vec!["app/a", "app/b"]);
}
