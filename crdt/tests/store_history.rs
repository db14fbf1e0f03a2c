//! Stories of issue 19 in the store: reading the past, diffs, reverting to old heads,
//! undoing one change (skipping what was overwritten since, unless forced), blame after a
//! membership removal, and export/import.
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
use lichen_crdt::{
    format_heads, import_content, parse_heads, parse_path, DiffKind, HistoryError, ImportError, Op,
    Role,
};
use serde_json::json;

fn heads(s: &lichen_crdt::Store, doc: &str) -> Vec<[u8; 32]> {
    s.heads(doc).unwrap()
}

#[test]
fn an_operator_reads_a_document_as_it_was_and_diffs_it_with_now() {
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &a, "app/web", "limits.rate", json!(10));
    put(s, &a, "app/web", "name", json!("web"));
    let old = heads(s, "app/web");
    put(s, &a, "app/web", "limits.rate", json!(20));
    put(s, &a, "app/web", "limits.burst", json!(5));
    s.write(
        &a,
        "app/web",
        &Op::Delete {
            path: parse_path("name").unwrap(),
        },
        T0,
    )
    .unwrap();

    assert_eq!(
        s.get_at("app/web", &[], &old).unwrap(),
        Some(json!({"limits": {"rate": 10}, "name": "web"}))
    );
    assert_eq!(
        s.get_at("app/web", &parse_path("limits.rate").unwrap(), &old)
            .unwrap(),
        Some(json!(10))
    );
    // The heads as printed parse back.
    assert_eq!(parse_heads(&format_heads(&old)).unwrap(), old);
    // The empty heads: the document before its first change.
    assert_eq!(s.get_at("app/web", &[], &[]).unwrap(), Some(json!({})));

    let d = s.diff("app/web", &[], &old, None).unwrap();
    let summary: Vec<(String, DiffKind)> = d.iter().map(|e| (e.path.clone(), e.kind)).collect();
    assert_eq!(
        summary,
        vec![
            ("limits.burst".to_string(), DiffKind::Added),
            ("limits.rate".to_string(), DiffKind::Changed),
            ("name".to_string(), DiffKind::Removed),
        ]
    );
    assert_eq!(d[1].old, Some(json!(10)));
    assert_eq!(d[1].new, Some(json!(20)));
    // Diff of a path, between two past states.
    let now = heads(s, "app/web");
    let d = s
        .diff("app/web", &parse_path("limits").unwrap(), &old, Some(&now))
        .unwrap();
    assert_eq!(d.len(), 2);
}

#[test]
fn unknown_heads_are_refused_naming_the_current_heads() {
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &a, "app/web", "x", json!(1));
    let cur = format_heads(&heads(s, "app/web"));
    let e = s.get_at("app/web", &[], &[[7; 32]]).unwrap_err();
    match &e {
        HistoryError::UnknownHeads { current, .. } => assert_eq!(current, &cur),
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains(&cur), "{e}");
    // A change of another document is not a head of this one.
    put(s, &a, "app/db", "y", json!(1));
    let other = heads(s, "app/db");
    assert!(matches!(
        s.get_at("app/web", &[], &other),
        Err(HistoryError::UnknownHeads { .. })
    ));
    assert!(matches!(
        parse_heads("zz"),
        Err(HistoryError::BadHeads { .. })
    ));
}

#[test]
fn revert_to_old_heads_restores_the_document_and_a_subtree_in_one_signed_change() {
    let mut c = Cluster::new(2);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &a, "app/web", "limits", json!({"rate": 10, "burst": 1}));
    put(s, &a, "app/web", "name", json!("web"));
    let old = heads(s, "app/web");
    put(s, &a, "app/web", "limits.rate", json!(99));
    put(s, &a, "app/web", "name", json!("renamed"));
    put(s, &a, "app/web", "extra", json!([1, 2]));

    // Only the subtree.
    let ch = s
        .revert_to(&a, "app/web", &parse_path("limits").unwrap(), &old, T0)
        .unwrap()
        .expect("a change");
    assert_eq!(ch.author, a.node_id());
    assert_eq!(
        get(s, "app/web", "limits"),
        Some(json!({"rate": 10, "burst": 1}))
    );
    assert_eq!(get(s, "app/web", "name"), Some(json!("renamed")));
    // The whole document.
    s.revert_to(&a, "app/web", &[], &old, T0)
        .unwrap()
        .expect("a change");
    assert_eq!(
        s.get("app/web", &[]).unwrap(),
        s.get_at("app/web", &[], &old).unwrap()
    );
    // Nothing left to revert.
    assert!(s.revert_to(&a, "app/web", &[], &old, T0).unwrap().is_none());
    // The revert syncs like any change.
    c.sync_all();
    assert_eq!(
        c.stores[1].get("app/web", &[]).unwrap(),
        Some(json!({"limits": {"rate": 10, "burst": 1}, "name": "web"}))
    );
}

#[test]
fn a_writer_outside_the_scope_cannot_revert() {
    let mut c = Cluster::new(2);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["team/"]);
    let a = c.admin.clone();
    put(&mut c.stores[0], &a, "app/web", "x", json!(1));
    let old = heads(&c.stores[0], "app/web");
    put(&mut c.stores[0], &a, "app/web", "x", json!(2));
    c.sync_all();
    let e = c.stores[1]
        .revert_to(&w, "app/web", &[], &old, T0)
        .unwrap_err();
    assert!(
        matches!(e, HistoryError::Store(lichen_crdt::StoreError::Denied(_))),
        "{e:?}"
    );
}

#[test]
fn undo_puts_back_what_a_change_replaced_and_skips_what_was_overwritten_since() {
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    put(s, &a, "app/web", "a", json!(1));
    put(s, &a, "app/web", "b", json!(1));
    // One change setting a, b and creating c.
    let bad = s
        .write(
            &a,
            "app/web",
            &Op::Replace {
                value: json!({"a": 2, "b": 2, "c": {"deep": true}}),
            },
            T0,
        )
        .unwrap()
        .unwrap();
    let bad = bad.hash().unwrap();
    // b is overwritten later.
    put(s, &a, "app/web", "b", json!(3));

    let plan = s.undo_plan("app/web", &bad, false).unwrap();
    assert_eq!(plan.undone, vec!["a".to_string(), "c".to_string()]);
    assert_eq!(plan.skipped.len(), 1);
    assert_eq!(plan.skipped[0].path, "b");
    assert_eq!(plan.skipped[0].set, Some(json!(2)));
    assert_eq!(plan.skipped[0].now, Some(json!(3)));
    let (ch, _) = s.undo(&a, "app/web", &bad, false, T0).unwrap();
    assert!(ch.is_some());
    assert_eq!(
        s.get("app/web", &[]).unwrap(),
        Some(json!({"a": 1, "b": 3}))
    );

    // --force reverts the overwritten value too.
    let (ch, plan) = s.undo(&a, "app/web", &bad, true, T0).unwrap();
    assert!(ch.is_some());
    assert!(plan.skipped.is_empty());
    assert_eq!(
        s.get("app/web", &[]).unwrap(),
        Some(json!({"a": 1, "b": 1}))
    );

    // A hash prefix finds the change; an unknown one is a clear error.
    let prefix = lichen_crdt::NodeId(bad).to_string()[..12].to_string();
    assert_eq!(s.find_change("app/web", &prefix).unwrap(), bad);
    assert!(matches!(
        s.find_change("app/web", "abcdef"),
        Err(HistoryError::UnknownChange { .. })
    ));
}

#[test]
fn undo_of_a_documents_first_change_deletes_what_it_created() {
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    let first = put(s, &a, "app/web", "x", json!({"list": [1, 2]}))
        .hash()
        .unwrap();
    put(s, &a, "app/web", "y", json!(1));
    let (ch, plan) = s.undo(&a, "app/web", &first, false, T0).unwrap();
    assert!(ch.is_some(), "{plan:?}");
    assert_eq!(s.get("app/web", &[]).unwrap(), Some(json!({"y": 1})));
}

#[test]
fn blame_names_the_author_of_each_leaf_and_every_side_of_a_conflict_after_a_removal() {
    let mut c = Cluster::new(3);
    let (w1, w2) = (key(2), key(3));
    c.add(&w1, "eu-1", Role::Writer, &[]);
    c.add(&w2, "us-1", Role::Writer, &[]);
    let a = c.admin.clone();
    put(&mut c.stores[0], &a, "app/web", "owner", json!("root"));
    put(&mut c.stores[1], &w1, "app/web", "limits.rate", json!(10));
    c.sync_all();
    // A conflict: both writers set `mode` concurrently.
    put(&mut c.stores[1], &w1, "app/web", "mode", json!("eu"));
    put(&mut c.stores[2], &w2, "app/web", "mode", json!("us"));
    c.sync_all();
    // w1 is removed afterwards; its values stand (they are below the cut-off).
    c.stores[0].remove_member(&a, w1.node_id(), T0).unwrap();
    c.sync_all();

    let b = c.stores[0].blame("app/web", &[]).unwrap();
    let paths: Vec<&str> = b.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(paths, vec!["limits.rate", "mode", "owner"]);
    let rate = &b[0];
    assert_eq!(rate.setters.len(), 1);
    assert_eq!(rate.setters[0].author, w1.node_id());
    assert_eq!(rate.setters[0].author_name, "eu-1");
    assert!(!rate.setters[0].member, "eu-1 was removed");
    assert_eq!(rate.setters[0].hash.len(), 64);
    let mode = &b[1];
    assert_eq!(mode.setters.len(), 2, "{mode:?}");
    let mut authors: Vec<String> = mode.setters.iter().map(|s| s.author_name.clone()).collect();
    authors.sort();
    assert_eq!(authors, vec!["eu-1", "us-1"]);
    assert_eq!(mode.value, mode.setters[0].value);
    assert_eq!(
        Some(mode.value.clone()),
        get(&c.stores[0], "app/web", "mode")
    );
    let owner = &b[2];
    assert_eq!(owner.setters[0].author_name, "root");
    assert!(owner.setters[0].member);
    // Blame of a path.
    let b = c.stores[0]
        .blame("app/web", &parse_path("limits").unwrap())
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].path, "limits.rate");
}

#[test]
fn the_automerge_export_loads_in_automerge_from_scratch_with_the_same_content() {
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    put(
        s,
        &a,
        "app/web",
        "limits",
        json!({"rate": 10, "hosts": ["a", "b"], "f": 1.5}),
    );
    put(s, &a, "app/web", "on", json!(true));
    put(s, &a, "app/web", "none", json!(null));
    let bytes = s.export_automerge("app/web").unwrap();
    let am = automerge::Automerge::load(&bytes).unwrap();
    let value = automerge_json(&am, &automerge::ROOT);
    assert_eq!(Some(value), s.get("app/web", &[]).unwrap());
    assert_eq!(
        s.export_json("app/web").unwrap(),
        s.get("app/web", &[]).unwrap().unwrap()
    );
    // And it imports back as the same content, as one change signed by this node.
    let content = import_content(&bytes).unwrap();
    let ch = s.import(&a, "app/copy", content, T0).unwrap().unwrap();
    assert_eq!(ch.author, a.node_id());
    assert_eq!(
        s.get("app/copy", &[]).unwrap(),
        s.get("app/web", &[]).unwrap()
    );
}

/// An independent Automerge → JSON reader (not the store's).
fn automerge_json(am: &automerge::Automerge, obj: &automerge::ObjId) -> serde_json::Value {
    use automerge::{ObjType, ReadDoc, ScalarValue, Value};
    let scalar = |s: &ScalarValue| match s {
        ScalarValue::Str(s) => json!(s.to_string()),
        ScalarValue::Int(i) => json!(i),
        ScalarValue::Uint(u) => json!(u),
        ScalarValue::F64(f) => json!(f),
        ScalarValue::Boolean(b) => json!(b),
        ScalarValue::Null => serde_json::Value::Null,
        other => panic!("unexpected {other:?}"),
    };
    match am.object_type(obj).unwrap() {
        ObjType::Map | ObjType::Table => {
            let mut m = serde_json::Map::new();
            for k in am.keys(obj) {
                let (v, id) = am.get(obj, k.as_str()).unwrap().unwrap();
                m.insert(
                    k,
                    match v {
                        Value::Object(_) => automerge_json(am, &id),
                        Value::Scalar(s) => scalar(&s),
                    },
                );
            }
            serde_json::Value::Object(m)
        }
        ObjType::List => (0..am.length(obj))
            .map(|i| {
                let (v, id) = am.get(obj, i).unwrap().unwrap();
                match v {
                    Value::Object(_) => automerge_json(am, &id),
                    Value::Scalar(s) => scalar(&s),
                }
            })
            .collect(),
        ObjType::Text => json!(am.text(obj).unwrap()),
    }
}

#[test]
fn a_foreign_automerge_document_imports_as_one_change_by_this_node() {
    use automerge::transaction::Transactable;
    let mut foreign = automerge::AutoCommit::new();
    foreign.put(automerge::ROOT, "port", 8080_i64).unwrap();
    let list = foreign
        .put_object(automerge::ROOT, "hosts", automerge::ObjType::List)
        .unwrap();
    foreign.insert(&list, 0, "a").unwrap();
    let bytes = foreign.save();
    let mut c = Cluster::new(1);
    let a = c.admin.clone();
    let s = &mut c.stores[0];
    let ch = s
        .import(&a, "app/x", import_content(&bytes).unwrap(), T0)
        .unwrap()
        .unwrap();
    assert_eq!(ch.author, a.node_id());
    assert_eq!(
        s.get("app/x", &[]).unwrap(),
        Some(json!({"port": 8080, "hosts": ["a"]}))
    );
    // Only this node's change is stored: one change, by this node.
    assert_eq!(
        s.clock("app/x").unwrap().into_iter().collect::<Vec<_>>(),
        vec![(a.node_id(), 1)]
    );
}

#[test]
fn invalid_files_are_refused_clearly() {
    assert_eq!(import_content(b"").unwrap_err(), ImportError::Empty);
    assert!(matches!(
        import_content(b"{not json").unwrap_err(),
        ImportError::BadJson(_)
    ));
    assert_eq!(
        import_content(b"[1,2]").unwrap_err(),
        ImportError::NotAnObject("an array")
    );
    let mut bad = vec![0x85, 0x6f, 0x4a, 0x83];
    bad.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7]);
    assert!(matches!(
        import_content(&bad).unwrap_err(),
        ImportError::BadAutomerge(_)
    ));
    assert!(import_content(br#"{"a": 1}"#).is_ok());
}
