//! Tests of the JSON view: paths parse and print back, documents round-trip, reconciling
//! makes the fewest ops and merges cleanly, and mistakes are errors. Each test builds an
//! in-memory Automerge document, edits it with `put_path`/`reconcile_root`/`delete_path` and
//! reads it back with `to_json`/`get_path`/`conflicts_at`.

use super::path::{MAX_PATH_BYTES, MAX_PATH_SEGMENTS};
use super::read::keys_at;
use super::*;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ReadDoc, Value, ROOT};
use proptest::prelude::*;
use serde_json::json;
use serde_json::Value as Json;

fn p(s: &str) -> Vec<PathSeg> {
    parse_path(s).expect("test path parses")
}

fn doc_with(v: &Json) -> AutoCommit {
    let mut doc = AutoCommit::new();
    reconcile_root(&mut doc, v).expect("reconcile into empty doc");
    doc.commit();
    doc
}

fn root(doc: &AutoCommit) -> Json {
    to_json(doc, &ROOT).expect("to_json")
}

/// Number of ops in the change made by `edit` (0 when no change at all).
fn ops_made_by(doc: &mut AutoCommit, edit: impl FnOnce(&mut AutoCommit)) -> usize {
    let heads = doc.get_heads();
    edit(doc);
    if doc.commit().is_none() {
        assert_eq!(doc.get_heads(), heads);
        return 0;
    }
    doc.get_last_local_change().map(|c| c.len()).unwrap_or(0)
}

fn nginx() -> Json {
    json!({
        "workers": 4,
        "ratio": 2.0,
        "big": u64::MAX,
        "neg": -17,
        "enabled": true,
        "comment": null,
        "limits": {"rate": 10, "burst": 20},
        "servers": [
            {"host": "a.example", "port": 80},
            {"host": "b.example", "port": 8080, "tags": ["x", "y"]}
        ],
        "a.b": {"c": "quoted"},
        "empty": {},
        "nothing": []
    })
}

#[test]
fn a_nested_document_round_trips_and_paths_reach_into_it() {
    let v = nginx();
    let doc = doc_with(&v);
    assert_eq!(root(&doc), v);

    // Integral floats stay floats, huge integers stay exact.
    assert_eq!(get_path(&doc, &p("ratio")).unwrap(), Some(json!(2.0)));
    assert!(get_path(&doc, &p("ratio")).unwrap().unwrap().is_f64());
    assert_eq!(get_path(&doc, &p("big")).unwrap(), Some(json!(u64::MAX)));

    // Both index spellings, quoted keys, and absent values.
    assert_eq!(
        get_path(&doc, &p("servers[1].port")).unwrap(),
        Some(json!(8080))
    );
    assert_eq!(
        get_path(&doc, &p("servers.1.tags[0]")).unwrap(),
        Some(json!("x"))
    );
    assert_eq!(
        get_path(&doc, &p("\"a.b\".c")).unwrap(),
        Some(json!("quoted"))
    );
    assert_eq!(get_path(&doc, &p("servers[7]")).unwrap(), None);
    assert_eq!(get_path(&doc, &p("missing.deeper")).unwrap(), None);
    assert_eq!(get_path(&doc, &[]).unwrap(), Some(v.clone()));

    assert_eq!(keys_at(&doc, &p("limits")).unwrap(), vec!["burst", "rate"]);
    assert_eq!(keys_at(&doc, &p("servers")).unwrap(), vec!["0", "1"]);
    assert_eq!(keys_at(&doc, &p("nope")).unwrap(), Vec::<String>::new());
    assert_eq!(
        keys_at(&doc, &[]).unwrap().first().map(String::as_str),
        Some("a.b")
    );

    // It survives save/load too.
    let loaded = Automerge::load(&doc.clone().save()).unwrap();
    assert_eq!(to_json(&loaded, &ROOT).unwrap(), v);
}

#[test]
fn writing_what_is_already_there_makes_no_change() {
    let mut doc = doc_with(&nginx());
    let before = doc.get_heads();

    assert!(!put_path(&mut doc, &p("workers"), &json!(4)).unwrap());
    assert!(!put_path(&mut doc, &p("limits"), &json!({"rate": 10, "burst": 20})).unwrap());
    assert!(!put_path(&mut doc, &p("servers[0].host"), &json!("a.example")).unwrap());
    assert!(!reconcile_root(&mut doc, &nginx()).unwrap());
    assert_eq!(doc.pending_ops(), 0);
    assert_eq!(doc.commit(), None);
    assert_eq!(doc.get_heads(), before);

    // Same story through an explicit transaction on a plain Automerge.
    let mut plain = Automerge::load(&doc.save()).unwrap();
    let heads = plain.get_heads();
    let mut tx = plain.transaction();
    assert!(!reconcile_root(&mut tx, &nginx()).unwrap());
    assert_eq!(tx.pending_ops(), 0);
    let (hash, _) = tx.commit();
    assert_eq!(hash, None);
    assert_eq!(plain.get_heads(), heads);

    // A real change is exactly one op.
    let n = ops_made_by(&mut doc, |d| {
        assert!(put_path(d, &p("workers"), &json!(8)).unwrap());
    });
    assert_eq!(n, 1);
}

#[test]
fn two_nodes_editing_different_nested_keys_both_win() {
    let mut alice = doc_with(&nginx());
    let mut bob = alice.fork();

    // Each side saves the whole file with one nested key changed.
    let mut a_file = nginx();
    a_file["limits"]["rate"] = json!(11);
    assert_eq!(
        ops_made_by(&mut alice, |d| assert!(reconcile_root(d, &a_file).unwrap())),
        1
    );

    let mut b_file = nginx();
    b_file["limits"]["burst"] = json!(30);
    b_file["servers"][1]["tags"] = json!(["x", "y", "z"]);
    assert_eq!(
        ops_made_by(&mut bob, |d| assert!(reconcile_root(d, &b_file).unwrap())),
        2
    );

    alice.merge(&mut bob).unwrap();
    bob.merge(&mut alice).unwrap();

    let mut expected = nginx();
    expected["limits"] = json!({"rate": 11, "burst": 30});
    expected["servers"][1]["tags"] = json!(["x", "y", "z"]);
    assert_eq!(root(&alice), expected);
    assert_eq!(root(&bob), expected);
    assert_eq!(
        conflicts_at(&alice, &p("limits.rate")).unwrap(),
        vec![json!(11)]
    );
}

#[test]
fn the_same_key_edited_on_both_nodes_is_a_visible_conflict() {
    let mut alice = doc_with(&nginx());
    let mut bob = alice.fork();
    put_path(&mut alice, &p("limits.rate"), &json!(100)).unwrap();
    alice.commit();
    put_path(&mut bob, &p("limits.rate"), &json!(200)).unwrap();
    bob.commit();
    alice.merge(&mut bob).unwrap();

    let all = conflicts_at(&alice, &p("limits.rate")).unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.contains(&json!(100)) && all.contains(&json!(200)));
    // The winner is listed first and is what get_path shows.
    let winner = get_path(&alice, &p("limits.rate")).unwrap();
    assert_eq!(all.first(), winner.as_ref());

    // Untouched keys are not in conflict; absent keys have no values.
    assert_eq!(
        conflicts_at(&alice, &p("limits.burst")).unwrap(),
        vec![json!(20)]
    );
    assert!(conflicts_at(&alice, &p("limits.nope")).unwrap().is_empty());

    // Writing a different value settles it.
    put_path(&mut alice, &p("limits.rate"), &json!(150)).unwrap();
    assert_eq!(
        conflicts_at(&alice, &p("limits.rate")).unwrap(),
        vec![json!(150)]
    );
}

#[test]
fn list_reconcile_only_touches_the_middle() {
    let letters: Vec<Json> = "abcdefghij".chars().map(|c| json!(c.to_string())).collect();
    let mut doc = doc_with(&json!({ "l": letters }));
    let edit_to = |doc: &mut AutoCommit, new: Json| {
        let n = ops_made_by(doc, |d| {
            put_path(d, &p("l"), &new).unwrap();
        });
        assert_eq!(get_path(doc, &p("l")).unwrap(), Some(new));
        n
    };

    // Insert one element in the middle: one op.
    assert_eq!(
        edit_to(
            &mut doc,
            json!(["a", "b", "c", "d", "e", "X", "f", "g", "h", "i", "j"])
        ),
        1
    );
    // Delete two in the middle: two ops.
    assert_eq!(
        edit_to(
            &mut doc,
            json!(["a", "b", "c", "d", "e", "g", "h", "i", "j"])
        ),
        2
    );
    // Replace one: one op.
    assert_eq!(
        edit_to(
            &mut doc,
            json!(["a", "b", "c", "D", "e", "g", "h", "i", "j"])
        ),
        1
    );
    // Prepend and append: one op each.
    assert_eq!(
        edit_to(
            &mut doc,
            json!(["0", "a", "b", "c", "D", "e", "g", "h", "i", "j", "k"])
        ),
        2
    );

    // A rotation costs no more than rewriting every element.
    let mut doc = doc_with(&json!({ "l": ["x1", "x2", "x3", "Y"] }));
    assert_eq!(edit_to(&mut doc, json!(["Y", "z1", "z2", "z3"])), 4);
    // Moving one element is one delete and one insert.
    let mut doc = doc_with(&json!({ "l": [1, 2, 3, 4, 5, 6] }));
    assert_eq!(edit_to(&mut doc, json!([1, 3, 4, 5, 2, 6])), 2);

    // Elements that are maps are updated in place, key by key.
    let mut doc = doc_with(&nginx());
    let n = ops_made_by(&mut doc, |d| {
        let servers = json!([
            {"host": "a.example", "port": 81},
            {"host": "b.example", "port": 8080, "tags": ["x", "y"]}
        ]);
        assert!(put_path(d, &p("servers"), &servers).unwrap());
    });
    assert_eq!(n, 1);
}

#[test]
fn put_creates_what_is_missing_and_delete_removes_it() {
    let mut doc = AutoCommit::new();
    assert!(put_path(&mut doc, &p("a.b.c"), &json!(1)).unwrap());
    assert!(put_path(&mut doc, &p("servers[0].host"), &json!("h")).unwrap());
    assert!(put_path(&mut doc, &p("servers[1]"), &json!({"host": "i"})).unwrap());
    assert!(put_path(&mut doc, &p("servers.1.port"), &json!(2)).unwrap());
    assert_eq!(
        root(&doc),
        json!({"a": {"b": {"c": 1}}, "servers": [{"host": "h"}, {"host": "i", "port": 2}]})
    );

    // Replacing a scalar by a container (and back) works.
    assert!(put_path(&mut doc, &p("a.b.c"), &json!([1, 2])).unwrap());
    assert!(put_path(&mut doc, &p("a.b"), &json!("flat")).unwrap());
    assert_eq!(get_path(&doc, &p("a")).unwrap(), Some(json!({"b": "flat"})));

    assert!(delete_path(&mut doc, &p("servers[0]")).unwrap());
    assert!(delete_path(&mut doc, &p("a.b")).unwrap());
    assert!(!delete_path(&mut doc, &p("a.b")).unwrap());
    assert!(!delete_path(&mut doc, &p("x.y.z")).unwrap());
    assert!(!delete_path(&mut doc, &p("servers[5]")).unwrap());
    assert_eq!(
        root(&doc),
        json!({"a": {}, "servers": [{"host": "i", "port": 2}]})
    );
}

#[test]
fn navigation_mistakes_are_errors_not_panics() {
    let mut doc = doc_with(&nginx());
    let pending = doc.pending_ops();

    assert!(matches!(
        put_path(&mut doc, &p("workers.x"), &json!(1)),
        Err(JsonError::NotAContainer { path }) if path == "workers"
    ));
    assert!(matches!(
        get_path(&doc, &p("limits[0]")),
        Err(JsonError::KindMismatch {
            expected: "list",
            found: "map",
            ..
        })
    ));
    assert!(matches!(
        get_path(&doc, &p("servers.first")),
        Err(JsonError::KindMismatch {
            expected: "map",
            found: "list",
            ..
        })
    ));
    assert!(matches!(
        put_path(&mut doc, &p("servers[5]"), &json!(1)),
        Err(JsonError::IndexOutOfRange {
            index: 5,
            len: 2,
            ..
        })
    ));
    // Rejected before any intermediate container is created.
    assert!(matches!(
        put_path(&mut doc, &p("fresh.list[3]"), &json!(1)),
        Err(JsonError::IndexOutOfRange {
            index: 3,
            len: 0,
            ..
        })
    ));
    assert_eq!(doc.pending_ops(), pending);
    assert_eq!(
        reconcile_root(&mut doc, &json!([1])),
        Err(JsonError::RootNotObject)
    );
    assert!(matches!(
        delete_path(&mut doc, &[]),
        Err(JsonError::InvalidPath { .. })
    ));
    assert!(matches!(
        keys_at(&doc, &p("workers")),
        Err(JsonError::NotAContainer { .. })
    ));
}

#[test]
fn nesting_is_limited_in_both_directions() {
    let nest = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "n": v });
        }
        v
    };
    let mut doc = AutoCommit::new();
    // The root map counts as one level.
    assert!(reconcile_root(&mut doc, &nest(MAX_DEPTH)).is_ok());
    assert_eq!(to_json(&doc, &ROOT).unwrap(), nest(MAX_DEPTH));

    let mut doc = AutoCommit::new();
    assert_eq!(
        reconcile_root(&mut doc, &nest(MAX_DEPTH + 1)),
        Err(JsonError::TooDeep)
    );
    assert_eq!(
        put_path(&mut doc, &p("a"), &nest(MAX_DEPTH)),
        Err(JsonError::TooDeep)
    );
    assert_eq!(doc.pending_ops(), 0);

    // A document built deeper by other means is refused on read.
    let mut obj = ROOT;
    for _ in 0..MAX_DEPTH {
        obj = doc.put_object(&obj, "n", ObjType::Map).unwrap();
    }
    assert_eq!(to_json(&doc, &ROOT), Err(JsonError::TooDeep));
}

#[test]
fn foreign_value_types_read_sensibly_and_reconcile_as_no_ops() {
    let mut doc = AutoCommit::new();
    let text = doc.put_object(ROOT, "motd", ObjType::Text).unwrap();
    doc.splice_text(&text, 0, 0, "hello").unwrap();
    doc.put(ROOT, "hits", ScalarValue::counter(5)).unwrap();
    doc.put(ROOT, "at", ScalarValue::Timestamp(1_700_000_000))
        .unwrap();
    doc.put(ROOT, "key", ScalarValue::Bytes(vec![0x00, 0xab, 0xff]))
        .unwrap();
    doc.put(ROOT, "nan", ScalarValue::F64(f64::NAN)).unwrap();
    doc.commit();

    let v = root(&doc);
    assert_eq!(
        v,
        json!({"motd": "hello", "hits": 5, "at": 1_700_000_000, "key": "00abff", "nan": null})
    );
    // Saving back what was read changes nothing, except the NaN which
    // cannot be represented and so is replaced by a real null.
    let n = ops_made_by(&mut doc, |d| {
        reconcile_root(d, &v).unwrap();
    });
    assert_eq!(n, 1);
    assert_eq!(
        ops_made_by(&mut doc, |d| assert!(!reconcile_root(d, &v).unwrap())),
        0
    );

    // Changing the text stores a plain scalar string.
    put_path(&mut doc, &p("motd"), &json!("bye")).unwrap();
    assert!(matches!(
        doc.get(ROOT, "motd"),
        Ok(Some((Value::Scalar(_), _)))
    ));
}

#[test]
fn paths_parse_as_documented() {
    use PathSeg::{Index, Key};
    let k = |s: &str| Key(s.to_string());
    assert_eq!(p(""), vec![]);
    assert_eq!(p("workers"), vec![k("workers")]);
    assert_eq!(p("limits.rate"), vec![k("limits"), k("rate")]);
    assert_eq!(p("servers.0.host"), vec![k("servers"), k("0"), k("host")]);
    assert_eq!(
        p("servers[0].host"),
        vec![k("servers"), Index(0), k("host")]
    );
    assert_eq!(p("m[1][2]"), vec![k("m"), Index(1), Index(2)]);
    assert_eq!(p("\"a.b\".c"), vec![k("a.b"), k("c")]);
    assert_eq!(p(r#""q\"\\"[3]"#), vec![k("q\"\\"), Index(3)]);
    assert_eq!(p("\"\""), vec![k("")]);
    assert_eq!(format_path(&p("servers[0].host")), "servers[0].host");
    assert_eq!(format_path(&[k("a.b"), k("c")]), "\"a.b\".c");
}

#[test]
fn invalid_paths_are_rejected_with_a_reason() {
    let long_key = "k".repeat(MAX_PATH_BYTES + 1);
    let many = vec!["a"; MAX_PATH_SEGMENTS + 1].join(".");
    for bad in [
        "a..b",
        ".a",
        "a.",
        ".",
        "a[",
        "a]",
        "a[0",
        "a[x]",
        "a[]",
        "a[-1]",
        "[0",
        "\"abc",
        "a\"b",
        "\"a\"b",
        "a[0]b",
        "a.[0]",
        "\"a\\x\"",
        "a[99999999999999999999999]",
        long_key.as_str(),
        many.as_str(),
    ] {
        match parse_path(bad) {
            Err(JsonError::InvalidPath { path, reason }) => {
                assert_eq!(path, bad);
                assert!(!reason.is_empty());
            }
            other => panic!("{bad:?} should be invalid, got {other:?}"),
        }
    }
    // Exactly at the limits is fine.
    let ok = vec!["a"; MAX_PATH_SEGMENTS].join(".");
    assert_eq!(parse_path(&ok).map(|v| v.len()), Ok(MAX_PATH_SEGMENTS));
}

fn arb_seg() -> impl Strategy<Value = PathSeg> {
    prop_oneof![
        "\\PC{0,8}".prop_map(PathSeg::Key),
        "[a-z0-9.\\[\\]\"\\\\]{0,6}".prop_map(PathSeg::Key),
        (0usize..100_000).prop_map(PathSeg::Index),
    ]
}

fn arb_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        (i64::MAX as u64..=u64::MAX).prop_map(Json::from),
        (-3i64..3).prop_map(Json::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        (-3i32..3).prop_map(|i| json!(f64::from(i))),
        "[a-c]{0,2}".prop_map(Json::String),
        "\\PC{0,6}".prop_map(Json::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::btree_map("[a-e]", inner, 0..5)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_root() -> impl Strategy<Value = Json> {
    prop::collection::btree_map("[a-f]{1,2}", arb_json(), 0..6)
        .prop_map(|m| Json::Object(m.into_iter().collect()))
}

proptest! {
    #[test]
    fn format_then_parse_is_identity(path in prop::collection::vec(arb_seg(), 0..12)) {
        let text = format_path(&path);
        prop_assert_eq!(parse_path(&text), Ok(path));
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,40}") {
        if let Ok(path) = parse_path(&s) {
            prop_assert_eq!(parse_path(&format_path(&path)), Ok(path));
        }
    }

    #[test]
    fn reconciling_v1_into_v2_yields_exactly_v2(v1 in arb_root(), v2 in arb_root()) {
        let mut doc = doc_with(&v1);
        prop_assert_eq!(root(&doc), v1);
        reconcile_root(&mut doc, &v2).unwrap();
        prop_assert_eq!(root(&doc), v2.clone());
        doc.commit();
        // Doing it again is a no-op.
        prop_assert!(!reconcile_root(&mut doc, &v2).unwrap());
        prop_assert_eq!(doc.pending_ops(), 0);
    }

    #[test]
    fn list_edits_are_never_worse_than_rewriting(
        old in prop::collection::vec(0u8..4, 0..12),
        new in prop::collection::vec(0u8..4, 0..12),
    ) {
        let mut doc = doc_with(&json!({ "l": old.clone() }));
        let target = json!(new.clone());
        let n = ops_made_by(&mut doc, |d| {
            put_path(d, &p("l"), &target).unwrap();
        });
        prop_assert_eq!(get_path(&doc, &p("l")).unwrap(), Some(target));
        prop_assert!(n <= old.len().max(new.len()));
        prop_assert_eq!(n == 0, old == new);
    }

    #[test]
    fn put_path_then_get_path_agree(v1 in arb_root(), key in "[a-f]{1,2}", v in arb_json()) {
        let mut doc = doc_with(&v1);
        let path = vec![PathSeg::Key(key)];
        put_path(&mut doc, &path, &v).unwrap();
        prop_assert_eq!(get_path(&doc, &path).unwrap(), Some(v.clone()));
        prop_assert!(!put_path(&mut doc, &path, &v).unwrap());
    }
}
