//! Revocation stories: the cut-off recorded with a removal voids a removed key's later writes
//! everywhere, whatever order changes arrive in (see `lichen_crdt::membership`).
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
use lichen_crdt::{Outcome, RejectReason, Role, SignedChange, Store};
use serde_json::json;

/// Deliver `changes` to a fresh replica in the given order, one change per ingest call.
fn replica_from(c: &Cluster, name: &str, changes: &[SignedChange]) -> Store {
    let mut s = Store::join(&c.path(name), c.stores[0].cluster_id()).unwrap();
    s.set_fsync(false).unwrap();
    for ch in changes {
        s.ingest(vec![ch.clone()]).unwrap();
    }
    s
}

#[test]
fn a_removed_writer_backdating_on_a_fork_is_void_everywhere_in_any_order() {
    // Admin on replica 0, writer w on replica 1; both hold w's first write.
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    let before_removal = put(&mut c.stores[1], &w, "app/x", "k", json!("honest"));
    c.sync_all();

    // Partition. The admin removes w; w, on its fork that never saw the removal, keeps writing.
    let removal = c.stores[0].remove_member(&admin, w.node_id(), T0).unwrap();
    let backdated = put(&mut c.stores[1], &w, "app/x", "k", json!("backdated"));
    let also = put(&mut c.stores[1], &w, "app/y", "k", json!(1));

    // The admin's replica refuses the fork's writes as revoked.
    let r = c.stores[0]
        .ingest(vec![backdated.clone(), also.clone()])
        .unwrap();
    assert!(
        r.outcomes
            .iter()
            .all(|o| o.3 == Outcome::Rejected(RejectReason::Revoked)),
        "{:?}",
        r.outcomes
    );

    // The writer's replica voids them when the removal arrives.
    let r = c.stores[1].ingest(vec![removal.clone()]).unwrap();
    assert!(r.voided.contains(&backdated.hash().unwrap()));
    assert_eq!(get(&c.stores[1], "app/x", "k"), Some(json!("honest")));
    assert_eq!(get(&c.stores[1], "app/y", "k"), None);

    // Any arrival order gives the same result on a fresh replica.
    let base: Vec<SignedChange> = all_changes(&c.stores[0])
        .into_iter()
        .filter(|x| x.hash() != removal.hash())
        .collect();
    let orders: Vec<Vec<SignedChange>> = vec![
        [
            base.clone(),
            vec![removal.clone(), backdated.clone(), also.clone()],
        ]
        .concat(),
        [
            base.clone(),
            vec![backdated.clone(), also.clone(), removal.clone()],
        ]
        .concat(),
        [
            base.clone(),
            vec![backdated.clone(), removal.clone(), also.clone()],
        ]
        .concat(),
    ];
    for (i, order) in orders.iter().enumerate() {
        let s = replica_from(&c, &format!("order{i}.db"), order);
        assert_eq!(get(&s, "app/x", "k"), Some(json!("honest")), "order {i}");
        assert_eq!(
            s.heads("app/x").unwrap(),
            c.stores[0].heads("app/x").unwrap(),
            "order {i}"
        );
        assert_eq!(
            s.get("app/y", &[]).unwrap(),
            c.stores[0].get("app/y", &[]).unwrap()
        );
        assert_eq!(s.membership(), c.stores[0].membership(), "order {i}");
    }
    // The write made before the removal stays.
    assert!(c.stores[0]
        .get_change(&before_removal.hash().unwrap())
        .unwrap()
        .is_some());
}

#[test]
fn honest_changes_on_top_of_a_void_change_are_void_too() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let w = key(2);
    let h = key(3);
    c.add(&w, "w", Role::Writer, &[]);
    c.add(&h, "h", Role::Writer, &[]);
    // Admin removes w; meanwhile w writes, and h (which received w's write) builds on it.
    let removal = c.stores[0].remove_member(&admin, w.node_id(), T0).unwrap();
    let bad = put(&mut c.stores[1], &w, "app/x", "a", json!(1));
    c.stores[2].ingest(vec![bad.clone()]).unwrap();
    let honest = put(&mut c.stores[2], &h, "app/x", "b", json!(2));
    let honest_elsewhere = put(&mut c.stores[2], &h, "app/z", "c", json!(3));
    let r = c.stores[2].ingest(vec![removal]).unwrap();
    assert!(r.voided.contains(&bad.hash().unwrap()));
    assert!(r.voided.contains(&honest.hash().unwrap()), "{r:?}");
    // No change of app/x stands any more, so on this replica the document does not exist.
    assert_eq!(c.stores[2].get("app/x", &[]).unwrap(), None);
    // h's independent change in another document is untouched.
    assert_eq!(get(&c.stores[2], "app/z", "c"), Some(json!(3)));
    let _ = honest_elsewhere;
}

#[test]
fn a_junior_admin_cannot_remove_a_senior_one_and_its_concurrent_acts_die_with_it() {
    let mut c = Cluster::new(3);
    let b = key(2);
    let cc = key(3);
    let d = key(4);
    c.add(&b, "b", Role::Admin, &[]); // b became admin first: senior to c
    c.add(&cc, "c", Role::Admin, &[]);
    // Seniority: c may not remove b.
    let err = c.stores[2].remove_member(&cc, b.node_id(), T0).unwrap_err();
    assert!(err.to_string().contains("senior"), "{err}");
    // Concurrently: b removes c, while c (not yet knowing) adds d as an admin.
    let b_removes_c = c.stores[1].remove_member(&b, cc.node_id(), T0).unwrap();
    let c_adds_d = c.stores[2]
        .add_member(&cc, d.node_id(), "d", Role::Admin, vec![], vec![], T0)
        .unwrap();
    let base = all_changes(&c.stores[0]);
    let mut seen = Vec::new();
    for (i, order) in [
        vec![b_removes_c.clone(), c_adds_d.clone()],
        vec![c_adds_d.clone(), b_removes_c.clone()],
    ]
    .into_iter()
    .enumerate()
    {
        let s = replica_from(&c, &format!("m{i}.db"), &[base.clone(), order].concat());
        let m = s.membership().clone();
        assert_eq!(m.get(&b.node_id()).unwrap().role, Role::Admin, "order {i}");
        assert_eq!(
            m.get(&cc.node_id()).unwrap().role,
            Role::Removed,
            "order {i}"
        );
        assert!(
            m.get(&d.node_id()).is_none(),
            "order {i}: d's admission was past c's cut-off"
        );
        seen.push((m, s.heads(lichen_crdt::MEMBERSHIP_DOC).unwrap()));
    }
    assert_eq!(seen[0], seen[1]);
    // The junior admin's own replica learns it lost, and d with it.
    let r = c.stores[2].ingest(vec![b_removes_c]).unwrap();
    assert!(r.membership_changed);
    assert!(c.stores[2].membership().get(&d.node_id()).is_none());
}

#[test]
fn the_root_admin_cannot_be_removed_and_a_removed_key_cannot_return() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let b = key(2);
    c.add(&b, "b", Role::Admin, &[]);
    let err = c.stores[1]
        .remove_member(&b, admin.node_id(), T0)
        .unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
    let w = key(4);
    c.add(&w, "w", Role::Writer, &[]);
    c.stores[0].remove_member(&admin, w.node_id(), T0).unwrap();
    let err = c.stores[0]
        .add_member(
            &admin,
            w.node_id(),
            "again",
            Role::Writer,
            vec![],
            vec![],
            T0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("new key"), "{err}");
}

#[test]
fn a_demoted_writer_keeps_its_past_writes_but_cannot_write_more() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    c.add(&w, "w", Role::Writer, &[]);
    put(&mut c.stores[1], &w, "app/x", "k", json!(1));
    c.sync_all();
    c.stores[0]
        .set_role(&admin, w.node_id(), Role::Reader, T0)
        .unwrap();
    let late = put(&mut c.stores[1], &w, "app/x", "k", json!(2));
    let r = c.stores[0].ingest(vec![late]).unwrap();
    assert_eq!(outcome(&r), Outcome::Rejected(RejectReason::Revoked));
    c.sync_all();
    assert_eq!(get(&c.stores[0], "app/x", "k"), Some(json!(1)));
    assert_eq!(get(&c.stores[1], "app/x", "k"), Some(json!(1)));
}

#[test]
fn config_changes_wait_for_the_membership_that_authorizes_them() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let w = key(2);
    let add = c.stores[0]
        .add_member(&admin, w.node_id(), "w", Role::Writer, vec![], vec![], T0)
        .unwrap();
    c.stores[1].ingest(vec![add.clone()]).unwrap();
    let ch = put(&mut c.stores[1], &w, "app/x", "k", json!(1));
    // A fresh replica that gets the writer's change before the membership change holds it...
    let genesis = all_changes(&c.stores[0])
        .into_iter()
        .filter(|x| x.hash() != add.hash())
        .collect::<Vec<_>>();
    let mut s = replica_from(&c, "late.db", &genesis);
    let r = s.ingest(vec![ch.clone()]).unwrap();
    assert_eq!(outcome(&r), Outcome::Pending(RejectReason::NotAMember));
    // ...and applies it as soon as the membership arrives.
    let r = s.ingest(vec![add]).unwrap();
    assert!(r.applied().any(|h| Some(*h) == ch.hash()), "{r:?}");
    assert_eq!(get(&s, "app/x", "k"), Some(json!(1)));
}

#[test]
fn an_honest_writer_whose_change_was_voided_can_write_the_document_again() {
    let mut c = Cluster::new(3);
    let admin = c.admin.clone();
    let w = key(2);
    let h = key(3);
    c.add(&w, "w", Role::Writer, &[]);
    c.add(&h, "h", Role::Writer, &[]);
    let removal = c.stores[0].remove_member(&admin, w.node_id(), T0).unwrap();
    let bad = put(&mut c.stores[1], &w, "app/x", "a", json!(1));
    c.stores[2].ingest(vec![bad]).unwrap();
    let voided = put(&mut c.stores[2], &h, "app/x", "b", json!(2));
    c.stores[2].ingest(vec![removal]).unwrap();
    assert_eq!(c.stores[2].get("app/x", &[]).unwrap(), None);
    // h writes again: its new change reuses the voided change's seq, and everyone accepts it.
    let again = put(&mut c.stores[2], &h, "app/x", "b", json!(3));
    assert_ne!(again.hash(), voided.hash());
    c.sync_all();
    for s in &c.stores {
        assert_eq!(get(s, "app/x", "b"), Some(json!(3)));
        assert_eq!(get(s, "app/x", "a"), None);
        assert_eq!(
            s.heads("app/x").unwrap(),
            c.stores[0].heads("app/x").unwrap()
        );
    }
    // A replica that holds the voided change too still converges.
    let mut late = Store::join(&c.path("late.db"), c.stores[0].cluster_id()).unwrap();
    let mut all = all_changes(&c.stores[0]);
    all.push(voided);
    late.ingest(all).unwrap();
    assert_eq!(get(&late, "app/x", "b"), Some(json!(3)));
}
