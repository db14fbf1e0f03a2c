//! Membership edge cases: a removed member learns of its removal through the sync engine
//! (and is served nothing else), and member entries that break the rules of
//! `lichen_crdt::membership` (name, addresses, scopes) are refused on every replica, even
//! signed by an admin.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use automerge::{
    transaction::CommitOptions, transaction::Transactable, ActorId, Automerge, Change, ObjType,
    ReadDoc, ROOT,
};
use common::*;
use lichen_crdt::sync::{Config, Event, SyncEngine};
use lichen_crdt::{
    NodeId, Outcome, RejectReason, Role, SecretKey, SignedChange, Store, StoreError, MEMBERSHIP_DOC,
};
use serde_json::json;

/// Deliver every queued message between `nodes` (engine, store) until none is left.
fn pump(nodes: &mut [(SyncEngine, &mut Store)], now: u64) {
    for _ in 0..1000 {
        let mut moved = false;
        for i in 0..nodes.len() {
            while let Some((to, msg)) = nodes[i].0.poll_transmit() {
                moved = true;
                let from = nodes[i].0.node_id();
                let j = nodes
                    .iter()
                    .position(|(e, _)| e.node_id() == to)
                    .expect("a known peer");
                let (e, s) = &mut nodes[j];
                e.handle(now, from, msg, &mut **s).unwrap();
            }
        }
        if !moved {
            return;
        }
    }
    panic!("messages kept flowing");
}

fn engine(id: NodeId) -> SyncEngine {
    SyncEngine::new(id, Config::default(), 1)
}

fn events(e: &mut SyncEngine) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

fn assert_learned_removal(s: &mut Store, w: &SecretKey) {
    assert_eq!(
        s.membership().get(&w.node_id()).map(|m| m.role),
        Some(Role::Removed),
        "the removed node's own store knows it is removed"
    );
    let e = s
        .write(
            w,
            "app/x",
            &lichen_crdt::Op::Put {
                path: lichen_crdt::parse_path("k").unwrap(),
                value: json!("after"),
            },
            T0,
        )
        .expect_err("a removed node refuses its own writes");
    assert!(
        matches!(&e, StoreError::Denied(m) if m.contains("revoked")),
        "{e}"
    );
}

/// Removed while connected: the admin's engine sends the removed writer the proof, then
/// nothing else, and refuses (and counts) what it sends.
#[test]
fn a_member_removed_while_connected_learns_it_and_is_served_nothing_else() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let (s0, s1) = c.stores.split_at_mut(1);
    let (sa, sw) = (&mut s0[0], &mut s1[0]);
    let mut nodes = [(engine(admin.node_id()), sa), (engine(w.node_id()), sw)];
    let (ia, iw) = (admin.node_id(), w.node_id());
    nodes[0].0.peer_up(0, iw, &mut *nodes[0].1).unwrap();
    nodes[1].0.peer_up(0, ia, &mut *nodes[1].1).unwrap();
    pump(&mut nodes, 0);

    let ch = put(nodes[1].1, &w, "app/x", "k", json!("before"));
    nodes[1].0.local_commit(1, &[ch], &mut *nodes[1].1).unwrap();
    pump(&mut nodes, 1);
    assert_eq!(get(nodes[0].1, "app/x", "k"), Some(json!("before")));

    let removal = nodes[0].1.remove_member(&admin, iw, T0).unwrap();
    nodes[0]
        .0
        .local_commit(2, &[removal], &mut *nodes[0].1)
        .unwrap();
    pump(&mut nodes, 2);
    assert_learned_removal(nodes[1].1, &w);
    assert_eq!(nodes[0].0.stats().former_served, 1);
    assert!(
        nodes[0].0.peers_up().is_empty(),
        "a former member is not a peer"
    );

    // Nothing else reaches it, and what it sends is refused and counted.
    let ch = put(nodes[0].1, &admin, "app/y", "k", json!("secret"));
    nodes[0].0.local_commit(3, &[ch], &mut *nodes[0].1).unwrap();
    nodes[1].0.handle_timeout(10_000, &mut *nodes[1].1).unwrap();
    pump(&mut nodes, 10_000);
    assert_eq!(get(nodes[1].1, "app/y", "k"), None);
    assert!(nodes[0].0.stats().refused_former >= 1);
    assert!(events(&mut nodes[0].0).iter().any(|e| matches!(
        e,
        Event::Rejected {
            label: "former_member",
            ..
        }
    )));
}

/// Removed while cut off: when the link comes back, the removed node gets the proof first
/// thing and nothing else.
#[test]
fn a_member_removed_while_cut_off_learns_it_when_the_link_heals() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let removal = c.stores[0].remove_member(&admin, w.node_id(), T0).unwrap();
    let later = put(&mut c.stores[0], &admin, "app/y", "k", json!("secret"));
    let _ = (removal, later);
    // Meanwhile w, unaware, still signs writes.
    put(&mut c.stores[1], &w, "app/x", "k", json!("unaware"));
    let (s0, s1) = c.stores.split_at_mut(1);
    let mut nodes = [
        (engine(admin.node_id()), &mut s0[0]),
        (engine(w.node_id()), &mut s1[0]),
    ];
    let (ia, iw) = (admin.node_id(), w.node_id());
    nodes[0].0.peer_up(0, iw, &mut *nodes[0].1).unwrap();
    nodes[1].0.peer_up(0, ia, &mut *nodes[1].1).unwrap();
    pump(&mut nodes, 0);
    assert_learned_removal(nodes[1].1, &w);
    assert_eq!(get(nodes[1].1, "app/y", "k"), None);
    assert_eq!(
        get(nodes[0].1, "app/x", "k"),
        None,
        "its void write stays out"
    );
}

/// A membership change signed by the root admin, made directly with Automerge (as a
/// modified agent could), that sets `members/<id>` to `entry`.
fn crafted(
    store: &Store,
    admin: &SecretKey,
    id: &NodeId,
    entry: serde_json::Value,
) -> SignedChange {
    let mut am = Automerge::new();
    let mut changes = Vec::new();
    for a in store.all_clocks().unwrap()[MEMBERSHIP_DOC].keys() {
        for c in store
            .changes_after(MEMBERSHIP_DOC, a, 0, usize::MAX >> 1)
            .unwrap()
        {
            changes.push(Change::try_from(c.bytes.as_slice()).unwrap());
        }
    }
    am.apply_changes(changes).unwrap();
    am.set_actor(ActorId::from(admin.node_id().0.as_slice()));
    let mut tx = am.transaction();
    let (_, members) = tx.get(ROOT, "members").unwrap().expect("members map");
    let m = tx
        .put_object(&members, id.to_string(), ObjType::Map)
        .unwrap();
    for (k, v) in entry.as_object().unwrap() {
        match v {
            serde_json::Value::String(s) => tx.put(&m, k.as_str(), s.as_str()).unwrap(),
            serde_json::Value::Array(items) => {
                let l = tx.put_object(&m, k.as_str(), ObjType::List).unwrap();
                for (i, it) in items.iter().enumerate() {
                    tx.insert(&l, i, it.as_str().unwrap()).unwrap();
                }
            }
            _ => unreachable!(),
        }
    }
    tx.put_object(&m, "cutoff", ObjType::Map).unwrap();
    tx.commit_with(CommitOptions::default().with_time(T0));
    let change = am.get_last_local_change().expect("a change");
    SignedChange::sign(
        admin,
        &store.cluster_id(),
        MEMBERSHIP_DOC,
        change.raw_bytes().to_vec(),
    )
    .unwrap()
}

#[test]
fn membership_changes_with_invalid_entries_are_refused_on_every_replica() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    let before: Vec<Fingerprint> = c.stores.iter().map(fingerprint).collect();
    let long = "n".repeat(100_000);
    let cases = [
        (
            "empty name",
            json!({"name": "", "role": "writer", "addrs": [], "scopes": []}),
        ),
        (
            "100,000-byte name",
            json!({"name": long, "role": "writer", "addrs": [], "scopes": []}),
        ),
        (
            "control char",
            json!({"name": "a\u{7}b", "role": "writer", "addrs": [], "scopes": []}),
        ),
        (
            "bad address",
            json!({"name": "x", "role": "writer", "addrs": ["not an address"], "scopes": []}),
        ),
        (
            "no port",
            json!({"name": "x", "role": "writer", "addrs": ["10.0.0.1"], "scopes": []}),
        ),
        (
            "port 70000",
            json!({"name": "x", "role": "writer", "addrs": ["10.0.0.1:70000"], "scopes": []}),
        ),
        (
            "scope ../../",
            json!({"name": "x", "role": "writer", "addrs": [], "scopes": ["../../"]}),
        ),
        (
            "scope /etc",
            json!({"name": "x", "role": "writer", "addrs": [], "scopes": ["/etc"]}),
        ),
        (
            "scope a//b",
            json!({"name": "x", "role": "writer", "addrs": [], "scopes": ["a//b"]}),
        ),
        (
            "scope _members",
            json!({"name": "x", "role": "writer", "addrs": [], "scopes": ["_members"]}),
        ),
    ];
    for (what, entry) in cases {
        // A new member, and the existing writer `w` rewritten.
        for target in [key(9).node_id(), w.node_id()] {
            let bad = crafted(&c.stores[0], &admin, &target, entry.clone());
            for (i, s) in c.stores.iter_mut().enumerate() {
                let r = s.ingest(vec![bad.clone()]).unwrap();
                assert!(
                    matches!(
                        outcome(&r),
                        Outcome::Rejected(RejectReason::InvalidMember(_))
                    ),
                    "{what} on replica {i}: {:?}",
                    r.outcomes
                );
            }
        }
    }
    let after: Vec<Fingerprint> = c.stores.iter().map(fingerprint).collect();
    assert_eq!(before, after, "nothing was stored");
    // A valid entry made the same way is accepted (the crafting is not what is refused).
    let good = crafted(
        &c.stores[0],
        &admin,
        &key(9).node_id(),
        json!({"name": "ok-1", "role": "writer", "addrs": ["node-1.example:7946", "[::1]:7946", "10.0.0.1:7946"], "scopes": ["region/eu/", "app"]}),
    );
    for s in &mut c.stores {
        assert_eq!(
            outcome(&s.ingest(vec![good.clone()]).unwrap()),
            Outcome::Applied
        );
    }
}

#[test]
fn local_membership_edits_with_invalid_entries_are_refused_before_signing() {
    let mut c = Cluster::new(1);
    let admin = c.admin.clone();
    let s = &mut c.stores[0];
    let id = key(5).node_id();
    let add = |s: &mut Store, name: &str, addrs: &[&str], scopes: &[&str]| {
        s.add_member(
            &admin,
            id,
            name,
            Role::Writer,
            addrs.iter().map(|a| a.to_string()).collect(),
            scopes.iter().map(|a| a.to_string()).collect(),
            T0,
        )
    };
    let before = fingerprint(s);
    for (name, addrs, scopes) in [
        ("", &[][..], &[][..]),
        (&*"n".repeat(65), &[], &[]),
        ("x", &["nope"], &[]),
        ("x", &[], &["../../"]),
    ] {
        let e = add(s, name, addrs, scopes).expect_err("refused");
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    }
    assert_eq!(fingerprint(s), before);
    add(s, "x", &["127.0.0.1:1"], &["app/"]).unwrap();
    let e = s
        .set_scopes(&admin, id, vec!["a/../b".into()], T0)
        .expect_err("refused");
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
}
