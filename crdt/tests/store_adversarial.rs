//! Attacks on the store. Each one is offered to a replica that already holds real data, and
//! each must be refused with a named reason while leaving every stored change and every
//! document exactly as it was.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use automerge::{transaction::Transactable, ActorId, Automerge, ROOT};
use common::*;
use lichen_crdt::{Outcome, RejectReason, Role, SecretKey, SignedChange, Store};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A cluster (admin + writer `w` scoped to `app/`) whose replica 1 holds a document.
fn setup() -> (Cluster, SecretKey) {
    let mut c = Cluster::new(2);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    let admin = c.admin.clone();
    put(&mut c.stores[0], &admin, "app/x", "a", json!(1));
    put(&mut c.stores[0], &admin, "app/x", "b", json!("two"));
    c.sync_all();
    (c, w)
}

/// The admin's two changes to app/x written by [`setup`], as replica 1 holds them.
fn admin_changes_of_x(c: &Cluster) -> Vec<SignedChange> {
    let of_x = c.stores[1]
        .changes_after("app/x", &c.admin.node_id(), 0, 10)
        .unwrap();
    assert_eq!(of_x.len(), 2);
    of_x
}

/// An Automerge change authored by `actor` (the next seq after `prev`) putting `k = v`, for
/// crafting attacks; for `doc` (a change without dependencies names its document, as the
/// store requires).
fn raw_change(actor: &SecretKey, doc: &str, prev: &[SignedChange], k: &str, v: i64) -> Vec<u8> {
    let mut am = Automerge::new();
    let changes: Vec<automerge::Change> = prev
        .iter()
        .map(|c| automerge::Change::try_from(c.bytes.as_slice()).unwrap())
        .collect();
    am.apply_changes(changes).unwrap();
    am.set_actor(ActorId::from(actor.node_id().0.as_slice()));
    let mut tx = am.transaction();
    tx.put(ROOT, k, v).unwrap();
    let mut options = automerge::transaction::CommitOptions::default();
    if prev.is_empty() {
        options = options.with_message(doc.to_string());
    }
    tx.commit_with(options);
    am.get_last_local_change().unwrap().raw_bytes().to_vec()
}

fn assert_refused(c: &mut Cluster, change: SignedChange, want: impl Fn(&Outcome) -> bool) {
    let s = &mut c.stores[1];
    let before = fingerprint(s);
    let report = s.ingest(vec![change]).unwrap();
    let got = outcome(&report);
    assert!(want(&got), "unexpected outcome {got:?}");
    assert_eq!(report.applied_count(), 0);
    assert_eq!(fingerprint(s), before, "a refused change altered the store");
    // And after reopening, nothing of it is on disk either.
    let path = s.path().to_path_buf();
    let cluster = s.cluster_id();
    let reopened = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(fingerprint(&reopened), before);
}

fn rejected(r: RejectReason) -> impl Fn(&Outcome) -> bool {
    rejected_as(Outcome::Rejected(r))
}

fn rejected_as(want: Outcome) -> impl Fn(&Outcome) -> bool {
    move |o| *o == want
}

fn writer_change(c: &mut Cluster, w: &SecretKey) -> SignedChange {
    let prev = all_changes(&c.stores[1])
        .into_iter()
        .filter(|x| x.doc == "app/x")
        .collect::<Vec<_>>();
    let cluster = c.stores[1].cluster_id();
    SignedChange::sign(w, &cluster, "app/x", raw_change(w, "app/x", &prev, "c", 3)).unwrap()
}

#[test]
fn a_valid_writer_change_is_accepted_as_the_control_case() {
    let (mut c, w) = setup();
    let ch = writer_change(&mut c, &w);
    let r = c.stores[1].ingest(vec![ch]).unwrap();
    assert_eq!(outcome(&r), Outcome::Applied);
    assert_eq!(get(&c.stores[1], "app/x", "c"), Some(json!(3)));
}

#[test]
fn forged_signature_is_rejected() {
    let (mut c, w) = setup();
    let mut ch = writer_change(&mut c, &w);
    ch.sig[10] ^= 1;
    assert_refused(&mut c, ch, rejected(RejectReason::BadSignature));
}

#[test]
fn a_change_signed_by_someone_else_than_its_claimed_author_is_rejected() {
    let (mut c, w) = setup();
    let mut ch = writer_change(&mut c, &w);
    ch.author = c.admin.node_id();
    assert_refused(&mut c, ch, rejected(RejectReason::BadSignature));
}

#[test]
fn every_tampered_byte_is_rejected() {
    let (mut c, w) = setup();
    let ch = writer_change(&mut c, &w);
    for i in 0..ch.bytes.len() {
        let mut t = ch.clone();
        t.bytes[i] ^= 0x40;
        assert_refused(&mut c, t, |o| matches!(o, Outcome::Rejected(_)));
    }
}

#[test]
fn a_change_replayed_into_another_document_is_rejected() {
    let (mut c, w) = setup();
    let mut ch = writer_change(&mut c, &w);
    ch.doc = "app/y".into();
    assert_refused(&mut c, ch, rejected(RejectReason::BadSignature));
}

#[test]
fn a_change_signed_for_another_cluster_is_rejected() {
    let (mut c, w) = setup();
    let prev: Vec<SignedChange> = Vec::new();
    let ch = SignedChange::sign(
        &w,
        &[7; 32],
        "app/x",
        raw_change(&w, "app/x", &prev, "z", 1),
    )
    .unwrap();
    assert_refused(&mut c, ch, rejected(RejectReason::BadSignature));
}

#[test]
fn a_change_whose_actor_is_not_its_signer_is_rejected() {
    let (mut c, w) = setup();
    let admin = c.admin.clone();
    let prev: Vec<SignedChange> = all_changes(&c.stores[1])
        .into_iter()
        .filter(|x| x.doc == "app/x")
        .collect();
    let cluster = c.stores[1].cluster_id();
    // The writer signs a change whose Automerge actor is the admin.
    let ch = SignedChange::sign(
        &w,
        &cluster,
        "app/x",
        raw_change(&admin, "app/x", &prev, "z", 1),
    )
    .unwrap();
    assert_refused(&mut c, ch, rejected(RejectReason::ActorNotSigner));
}

#[test]
fn a_non_member_author_is_not_stored() {
    let (mut c, _) = setup();
    let stranger = key(7);
    let prev: Vec<SignedChange> = Vec::new();
    let cluster = c.stores[1].cluster_id();
    let ch = SignedChange::sign(
        &stranger,
        &cluster,
        "app/z",
        raw_change(&stranger, "app/z", &prev, "k", 1),
    )
    .unwrap();
    assert_refused(&mut c, ch, |o| {
        *o == Outcome::Pending(RejectReason::NotAMember)
    });
    assert_eq!(
        c.stores[1].pending_len(),
        1,
        "held in the bounded pending set only"
    );
}

#[test]
fn a_member_writing_outside_its_scope_is_rejected() {
    let (mut c, w) = setup();
    let prev: Vec<SignedChange> = Vec::new();
    let cluster = c.stores[1].cluster_id();
    let ch = SignedChange::sign(
        &w,
        &cluster,
        "region/us/x",
        raw_change(&w, "region/us/x", &prev, "k", 1),
    )
    .unwrap();
    assert_refused(&mut c, ch, rejected(RejectReason::OutOfScope));
    // The writer's own store refuses to make such a change in the first place.
    let err = c.stores[1]
        .write(
            &w,
            "region/us/x",
            &lichen_crdt::Op::Put {
                path: lichen_crdt::parse_path("k").unwrap(),
                value: json!(1),
            },
            T0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("may not write"), "{err}");
}

#[test]
fn a_reader_cannot_write() {
    let (mut c, _) = setup();
    let r = key(3);
    c.add(&r, "reader", Role::Reader, &[]);
    let prev: Vec<SignedChange> = Vec::new();
    let cluster = c.stores[1].cluster_id();
    let ch = SignedChange::sign(
        &r,
        &cluster,
        "app/r",
        raw_change(&r, "app/r", &prev, "k", 1),
    )
    .unwrap();
    assert_refused(&mut c, ch, |o| {
        matches!(o, Outcome::Rejected(RejectReason::NotAuthorized(_)))
    });
}

#[test]
fn a_writer_cannot_change_membership() {
    let (mut c, w) = setup();
    let err = c.stores[1]
        .add_member(&w, key(9).node_id(), "x", Role::Admin, vec![], vec![], T0)
        .unwrap_err();
    assert!(err.to_string().contains("not an admin"), "{err}");
    assert!(c.stores[1].membership().get(&key(9).node_id()).is_none());
}

/// Everything observable that must agree between replicas: heads and state of every
/// document, membership included, and the flagged keys.
fn observable(s: &Store) -> (Fingerprint, Vec<lichen_crdt::NodeId>) {
    (fingerprint(s), s.equivocators().unwrap())
}

#[test]
fn concurrent_equivocation_voids_both_variants_whatever_the_order() {
    // A cluster of four replicas; the writer's key is cloned onto two machines that each
    // write seq 1 of app/q, concurrently.
    let mut c = Cluster::new(4);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    let admin = c.admin.clone();
    let before = put(&mut c.stores[0], &admin, "app/x", "a", json!(1));
    let w_ok = SignedChange::sign(
        &w,
        &c.stores[1].cluster_id(),
        "app/w",
        raw_change(&w, "app/w", &[], "mine", 1),
    )
    .unwrap();
    c.stores[0].ingest(vec![w_ok.clone()]).unwrap();
    c.sync_all();
    let cluster = c.stores[1].cluster_id();
    let x1 =
        SignedChange::sign(&w, &cluster, "app/q", raw_change(&w, "app/q", &[], "k", 1)).unwrap();
    let x2 =
        SignedChange::sign(&w, &cluster, "app/q", raw_change(&w, "app/q", &[], "k", 2)).unwrap();
    // The admin's replica saw x1 first and built an honest change on it.
    assert_eq!(
        outcome(&c.stores[0].ingest(vec![x1.clone()]).unwrap()),
        Outcome::Applied
    );
    let h = put(&mut c.stores[0], &admin, "app/q", "h", json!("on x1"));
    // Then x2 reaches it: both variants and the honest change on x1 become void.
    let r = c.stores[0].ingest(vec![x2.clone()]).unwrap();
    assert_eq!(outcome(&r), Outcome::Rejected(RejectReason::Equivocation));
    let voided: std::collections::BTreeSet<[u8; 32]> = r.voided.iter().copied().collect();
    assert!(voided.contains(&x1.hash().unwrap()) && voided.contains(&h.hash().unwrap()));
    assert_eq!(get(&c.stores[0], "app/q", "k"), None);
    assert_eq!(c.stores[0].equivocators().unwrap(), vec![w.node_id()]);
    // The admin writes its value again: it reuses the seq of its voided change, and that is
    // not an equivocation.
    let h2 = put(&mut c.stores[0], &admin, "app/q", "h", json!("again"));
    assert_eq!(
        lichen_crdt::header::parse(&h2.bytes).unwrap().seq,
        lichen_crdt::header::parse(&h.bytes).unwrap().seq
    );
    // The key's owner may not write app/q any more (on a replica that knows the fork).
    let refused = c.stores[0].write(
        &w,
        "app/q",
        &lichen_crdt::Op::Put {
            path: lichen_crdt::parse_path("z").unwrap(),
            value: json!(1),
        },
        T0,
    );
    assert!(matches!(refused, Err(lichen_crdt::StoreError::Denied(_))));

    // Replica 1: x1 then x2. Replica 2: x2 then x1, h, h2. Replica 3: x1, h, then h2 (which
    // looks like the admin equivocating until x2 arrives), then x2.
    for b in [
        vec![x1.clone()],
        vec![x2.clone()],
        vec![h.clone(), h2.clone()],
    ] {
        c.stores[1].ingest(b).unwrap();
    }
    for b in [
        vec![x2.clone()],
        vec![x1.clone(), h.clone()],
        vec![h2.clone()],
    ] {
        c.stores[2].ingest(b).unwrap();
    }
    for b in [
        vec![x1.clone(), h.clone()],
        vec![h2.clone()],
        vec![x2.clone()],
    ] {
        c.stores[3].ingest(b).unwrap();
    }
    let want = observable(&c.stores[0]);
    for i in 1..4 {
        assert_eq!(observable(&c.stores[i]), want, "replica {i} differs");
        let s = &c.stores[i];
        assert!(s.get_change(&x1.hash().unwrap()).unwrap().is_none());
        assert!(s.get_change(&x2.hash().unwrap()).unwrap().is_none());
        assert!(s.get_change(&h.hash().unwrap()).unwrap().is_none());
        assert!(s.get_change(&h2.hash().unwrap()).unwrap().is_some());
        assert!(s.get_change(&before.hash().unwrap()).unwrap().is_some());
        // The key's changes in other documents and below the fork seq stand.
        assert!(s.get_change(&w_ok.hash().unwrap()).unwrap().is_some());
        assert_eq!(get(s, "app/q", "h"), Some(json!("again")));
        assert_eq!(s.equivocators().unwrap(), vec![w.node_id()]);
    }
    // Flags survive a restart.
    let path = c.stores[2].path().to_path_buf();
    let reopened = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(observable(&reopened), want);
    assert_eq!(
        reopened.fork_evidence("app/q", &w.node_id()).unwrap().len(),
        2,
        "both variants are kept as proof"
    );
}

#[test]
fn a_third_variant_or_a_later_change_by_a_flagged_key_is_refused() {
    let (mut c, w) = setup();
    let cluster = c.stores[1].cluster_id();
    let v: Vec<SignedChange> = (1..=3)
        .map(|i| {
            SignedChange::sign(&w, &cluster, "app/q", raw_change(&w, "app/q", &[], "k", i)).unwrap()
        })
        .collect();
    c.stores[1]
        .ingest(vec![v[0].clone(), v[1].clone()])
        .unwrap();
    assert_eq!(c.stores[1].equivocators().unwrap(), vec![w.node_id()]);
    let next = SignedChange::sign(
        &w,
        &cluster,
        "app/q",
        raw_change(&w, "app/q", &[v[0].clone()], "k", 9),
    )
    .unwrap();
    assert_refused(&mut c, v[2].clone(), rejected(RejectReason::Equivocation));
    assert_refused(&mut c, next, |o| matches!(o, Outcome::Rejected(_)));
}

/// Rebuild a change chunk with a different start_op, fixing up length and checksum, so that
/// only the start_op check can catch it.
fn with_start_op(bytes: &[u8], new_start_op: u64) -> Vec<u8> {
    fn uleb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn read_uleb(b: &[u8], pos: &mut usize) -> u64 {
        let (mut r, mut s) = (0u64, 0);
        loop {
            let x = b[*pos];
            *pos += 1;
            r |= u64::from(x & 0x7f) << s;
            s += 7;
            if x & 0x80 == 0 {
                return r;
            }
        }
    }
    let mut pos = 9;
    let len = read_uleb(bytes, &mut pos) as usize;
    let data = &bytes[pos..pos + len];
    let mut p = 0;
    let ndeps = read_uleb(data, &mut p) as usize;
    p += 32 * ndeps;
    let alen = read_uleb(data, &mut p) as usize;
    p += alen;
    read_uleb(data, &mut p); // seq
    let so_start = p;
    read_uleb(data, &mut p); // start_op
    let mut new_data = data[..so_start].to_vec();
    uleb(new_start_op, &mut new_data);
    new_data.extend_from_slice(&data[p..]);
    let mut hashed = vec![1u8];
    uleb(new_data.len() as u64, &mut hashed);
    hashed.extend_from_slice(&new_data);
    let hash = Sha256::digest(&hashed);
    let mut out = bytes[..4].to_vec();
    out.extend_from_slice(&hash[..4]);
    out.extend_from_slice(&hashed);
    out
}

#[test]
fn an_inflated_start_op_is_rejected() {
    let (mut c, w) = setup();
    let honest = writer_change(&mut c, &w);
    let cluster = c.stores[1].cluster_id();
    let hdr = lichen_crdt::header::parse(&honest.bytes).unwrap();
    let forged = with_start_op(&honest.bytes, hdr.start_op + 1000);
    let ch = SignedChange::sign(&w, &cluster, "app/x", forged).unwrap();
    assert_refused(&mut c, ch, |o| {
        matches!(o, Outcome::Rejected(RejectReason::BadStartOp { .. }))
    });
    // One that would not fit Automerge's 32-bit counters is rejected before Automerge sees it.
    // (The header check runs before the signature check, so the signature does not matter.)
    let huge = with_start_op(&honest.bytes, 1 << 33);
    assert!(SignedChange::sign(&w, &cluster, "app/x", huge.clone()).is_err());
    let ch = SignedChange {
        bytes: huge,
        ..honest
    };
    assert_refused(&mut c, ch, rejected(RejectReason::InflatedStartOp));
}

#[test]
fn truncated_and_random_bytes_are_rejected() {
    let (mut c, w) = setup();
    let ch = writer_change(&mut c, &w);
    for n in [0, 1, 8, 9, ch.bytes.len() / 2, ch.bytes.len() - 1] {
        let mut t = ch.clone();
        t.bytes.truncate(n);
        assert_refused(&mut c, t, |o| matches!(o, Outcome::Rejected(_)));
    }
    let mut seed = 0x1234_5678_u64;
    for len in [0usize, 3, 40, 200, 5000] {
        let mut t = ch.clone();
        t.bytes = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert_refused(&mut c, t, |o| matches!(o, Outcome::Rejected(_)));
    }
}

/// Whether `id` is an active member of the store's membership.
fn is_member(s: &Store, who: &SecretKey) -> bool {
    s.membership().is_active(&who.node_id())
}

#[test]
fn a_cloned_admin_key_editing_membership_concurrently_is_void_whatever_the_order() {
    // Key 5 is a second admin; its key is copied onto a second machine. Each copy adds a
    // different member at the same seq of the membership document, on a different replica,
    // before either has seen the other's change.
    let mut c = Cluster::new(4);
    let a2 = key(5);
    c.add(&a2, "a2", Role::Admin, &[]);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    let root = c.admin.clone();
    let scopes = || vec!["app/".to_string(), "ops/".to_string()];
    let (x, y) = (key(7), key(8));
    let v1 = c.stores[1]
        .add_member(&a2, x.node_id(), "x", Role::Writer, vec![], vec![], T0)
        .unwrap();
    let v2 = c.stores[2]
        .add_member(&a2, y.node_id(), "y", Role::Writer, vec![], vec![], T0)
        .unwrap();
    let seq = |c: &SignedChange| lichen_crdt::header::parse(&c.bytes).unwrap().seq;
    assert_eq!(seq(&v1), seq(&v2), "two variants at one seq");
    assert!(is_member(&c.stores[1], &x) && is_member(&c.stores[2], &y));
    // On replica 1, x (admitted by v1) writes, and the root widens w's scopes on top of v1.
    let xw = put(&mut c.stores[1], &x, "app/x", "by", json!("x"));
    let on_v1 = c.stores[1]
        .set_scopes(&root, w.node_id(), scopes(), T0)
        .unwrap();

    // Replica 1 then learns v2: both variants are void, and what stood on v1 with them.
    let r = c.stores[1].ingest(vec![v2.clone()]).unwrap();
    assert_eq!(outcome(&r), Outcome::Rejected(RejectReason::Equivocation));
    assert!(!is_member(&c.stores[1], &x) && !is_member(&c.stores[1], &y));
    assert_eq!(c.stores[1].equivocators().unwrap(), vec![a2.node_id()]);
    assert!(r.voided.contains(&v1.hash().unwrap()));
    assert!(
        r.voided.contains(&on_v1.hash().unwrap()),
        "built on a void variant"
    );
    assert!(
        r.voided.contains(&xw.hash().unwrap()),
        "x is no member any more"
    );
    // The flagged key may not edit membership any more; the root may, and re-does its edit
    // (reusing the seq of its voided change is no equivocation).
    let refused = c.stores[1].set_role(&a2, w.node_id(), Role::Reader, T0);
    assert!(
        matches!(refused, Err(lichen_crdt::StoreError::Denied(ref m)) if m.contains("cloned")),
        "{refused:?}"
    );
    let again = c.stores[1]
        .set_scopes(&root, w.node_id(), scopes(), T0)
        .unwrap();
    assert_eq!(seq(&again), seq(&on_v1));

    // The other replicas receive the same set in other orders and reach the same verdict.
    for b in [
        vec![v1.clone(), xw.clone(), on_v1.clone()],
        vec![again.clone()],
    ] {
        c.stores[2].ingest(b).unwrap();
    }
    for b in [
        vec![v2.clone()],
        vec![v1.clone()],
        vec![again.clone(), on_v1.clone(), xw.clone()],
    ] {
        c.stores[0].ingest(b).unwrap();
    }
    for b in [
        vec![on_v1.clone(), again.clone(), xw.clone(), v1.clone()],
        vec![v2.clone()],
    ] {
        c.stores[3].ingest(b).unwrap();
    }
    let want = observable(&c.stores[1]);
    for (i, s) in c.stores.iter().enumerate() {
        assert_eq!(observable(s), want, "replica {i} differs");
        assert!(!is_member(s, &x) && !is_member(s, &y), "replica {i}");
        assert!(s.get_change(&v1.hash().unwrap()).unwrap().is_none());
        assert!(s.get_change(&v2.hash().unwrap()).unwrap().is_none());
        assert!(s.get_change(&again.hash().unwrap()).unwrap().is_some());
        assert_eq!(
            s.membership().get(&w.node_id()).unwrap().scopes,
            scopes(),
            "replica {i}"
        );
        // The second admin's earlier standing is untouched: still an admin, but flagged.
        assert!(is_member(s, &a2));
        assert_eq!(s.equivocators().unwrap(), vec![a2.node_id()], "replica {i}");
    }
    // The verdict survives a restart, and the proof is kept for peers.
    let path = c.stores[3].path().to_path_buf();
    let cluster = c.stores[3].cluster_id();
    let reopened = Store::open(&path, Some(cluster)).unwrap();
    assert_eq!(observable(&reopened), want);
    assert_eq!(
        reopened
            .fork_evidence(lichen_crdt::MEMBERSHIP_DOC, &a2.node_id())
            .unwrap()
            .len(),
        2
    );
    // The root removes the cloned admin: that is how an operator ends it.
    c.stores[0].remove_member(&root, a2.node_id(), T0).unwrap();
    assert_eq!(
        c.stores[0].membership().get(&a2.node_id()).unwrap().role,
        Role::Removed
    );
}

#[test]
fn many_membership_variants_in_one_batch_flag_the_key_once() {
    // A writer may change its own addresses. Its key, copied onto three machines, changes
    // them three ways at the same seq; all three variants reach one replica in one batch.
    let mut c = Cluster::new(4);
    let w = key(2);
    c.add(&w, "w", Role::Writer, &["app/"]);
    let variants: Vec<SignedChange> = (1..4)
        .map(|i| {
            c.stores[i]
                .set_own_addrs(&w, vec![format!("10.0.0.{i}:7946")], T0)
                .unwrap()
                .expect("a change")
        })
        .collect();
    let r = c.stores[0].ingest(variants.clone()).unwrap();
    assert_eq!(r.applied_count(), 0);
    assert!(r
        .outcomes
        .iter()
        .all(|o| o.3 == Outcome::Rejected(RejectReason::Equivocation)));
    assert_eq!(c.stores[0].equivocators().unwrap(), vec![w.node_id()]);
    assert!(c.stores[0]
        .membership()
        .get(&w.node_id())
        .unwrap()
        .addrs
        .is_empty());
    // Every other replica, whatever it held first, reaches the same verdict.
    for i in 1..4 {
        c.stores[i].ingest(variants.clone()).unwrap();
        assert_eq!(
            observable(&c.stores[i]),
            observable(&c.stores[0]),
            "replica {i}"
        );
    }
}

/// Automerge names a change by the hash of its content, and the content does not say which
/// document it belongs to. A key's first change in two documents can therefore be the very
/// same bytes: the same put, at the same millisecond, with no dependencies, e.g. one group
/// commit that sets `enabled = true` in two new documents. Each document's first change
/// carries the document name (as its Automerge message), so those two are different
/// changes and the commit succeeds.
#[test]
fn the_same_first_edit_of_two_new_documents_in_one_commit_makes_two_changes() {
    let mut c = Cluster::new(2);
    let admin = c.admin.clone();
    let op = lichen_crdt::Op::Put {
        path: lichen_crdt::parse_path("enabled").unwrap(),
        value: json!(true),
    };
    let results = c.stores[0].write_batch(
        &admin,
        &[("app/a".to_string(), op.clone()), ("app/b".to_string(), op)],
        T0,
    );
    let changes: Vec<SignedChange> = results
        .into_iter()
        .map(|r| {
            r.expect("both writes stored")
                .expect("both change something")
        })
        .collect();
    assert_ne!(changes[0].hash(), changes[1].hash());
    c.sync_all();
    for s in &c.stores {
        assert_eq!(get(s, "app/a", "enabled"), Some(json!(true)));
        assert_eq!(get(s, "app/b", "enabled"), Some(json!(true)));
    }
}

/// Automerge hashes a change's content only, and changes are stored by hash, so a member
/// that signed one change for two documents would have it kept in whichever copy reached a
/// node first, and nodes that got the copies in different orders would disagree for good. A
/// change without dependencies must therefore name its document (as its Automerge message;
/// the store's own writes do), which makes it valid in one document at most, and so is every
/// change built on it. Whatever the order, each node keeps the copy for the document it names
/// and refuses the other; a change without dependencies that names no document is refused.
#[test]
fn a_change_signed_for_two_documents_is_kept_only_in_the_one_it_names() {
    let (mut c, w) = setup();
    let cluster = c.stores[1].cluster_id();
    let bytes = raw_change(&w, "app/a", &[], "k", 1);
    let in_a = SignedChange::sign(&w, &cluster, "app/a", bytes.clone()).unwrap();
    let in_b = SignedChange::sign(&w, &cluster, "app/b", bytes).unwrap();
    let unnamed = Outcome::Rejected(RejectReason::Malformed(
        "a change without dependencies must name its document",
    ));
    // Replica 0 gets app/a's copy first, replica 1 app/b's.
    for (s, order) in c.stores.iter_mut().zip([[&in_a, &in_b], [&in_b, &in_a]]) {
        for ch in order {
            let want = if ch.doc == "app/a" {
                Outcome::Applied
            } else {
                unnamed.clone()
            };
            assert_eq!(outcome(&s.ingest(vec![ch.clone()]).unwrap()), want);
        }
        assert_eq!(get(s, "app/a", "k"), Some(json!(1)));
        assert_eq!(get(s, "app/b", "k"), None);
        assert!(!s.list_docs().unwrap().iter().any(|d| d == "app/b"));
    }
    assert_eq!(
        c.stores[0].heads("app/a").unwrap(),
        c.stores[1].heads("app/a").unwrap()
    );
    // A change without dependencies and without a message.
    let mut am = Automerge::new();
    am.set_actor(ActorId::from(w.node_id().0.as_slice()));
    let mut tx = am.transaction();
    tx.put(ROOT, "k", 2).unwrap();
    tx.commit();
    let bytes = am.get_last_local_change().unwrap().raw_bytes().to_vec();
    let nameless = SignedChange::sign(&w, &cluster, "app/c", bytes).unwrap();
    assert_refused(&mut c, nameless, rejected_as(unnamed));
}

/// A change that names, as a dependency, a change of another document does not belong to
/// the document it is signed for: Automerge would hold it back forever, waiting for a
/// dependency this document never gets, while the store counted it as applied (and the
/// author's next honest change there as an equivocation). It is refused, not stored, and the
/// document carries on without it.
#[test]
fn a_change_depending_on_another_documents_change_is_not_applied() {
    let (mut c, w) = setup();
    let cluster = c.stores[1].cluster_id();
    // w's first change, built on the admin's changes to app/x, is signed for app/b.
    let bytes = raw_change(&w, "app/b", &admin_changes_of_x(&c), "j", 2);
    let crossed = SignedChange::sign(&w, &cluster, "app/b", bytes).unwrap();
    let report = c.stores[1].ingest(vec![crossed.clone()]).unwrap();
    assert_eq!(
        outcome(&report),
        Outcome::Rejected(RejectReason::Malformed(
            "depends on a change of another document"
        ))
    );
    assert!(c.stores[1]
        .get_change(&crossed.hash().unwrap())
        .unwrap()
        .is_none());
    assert_eq!(get(&c.stores[1], "app/b", "j"), None);
    // w's honest first change to app/b is taken as usual.
    let honest =
        SignedChange::sign(&w, &cluster, "app/b", raw_change(&w, "app/b", &[], "j", 3)).unwrap();
    assert_eq!(
        outcome(&c.stores[1].ingest(vec![honest]).unwrap()),
        Outcome::Applied
    );
    assert_eq!(get(&c.stores[1], "app/b", "j"), Some(json!(3)));
}

/// An Automerge put names the ops it overwrites (its `pred`); an honest one names the values
/// visible at its own key. A crafted put at `k` that names the op behind `a`'s value makes
/// Automerge drop `a` too. The replica must show what Automerge holds, as every other replica
/// does, rather than a view that kept `a` (what a fast forward that trusted the key alone did).
#[test]
fn a_put_that_names_another_keys_value_as_overwritten_is_applied_as_automerge_does() {
    let (mut c, w) = setup();
    let cluster = c.stores[1].cluster_id();
    let of_x = admin_changes_of_x(&c);
    let honest =
        automerge::Change::try_from(raw_change(&w, "app/x", &of_x, "k", 5).as_slice()).unwrap();
    let mut e = honest.decode();
    e.hash = None;
    // The op that put app/x's "a" (the admin's first change, first op).
    let first = automerge::Change::try_from(of_x[0].bytes.as_slice())
        .unwrap()
        .decode();
    assert_eq!(
        first.operations[0].key,
        automerge::legacy::Key::Map("a".into())
    );
    e.operations[0].pred = vec![automerge::legacy::OpId(
        first.start_op.get(),
        first.actor_id.clone(),
    )]
    .into();
    let crafted = automerge::Change::from(e);
    let signed = SignedChange::sign(&w, &cluster, "app/x", crafted.raw_bytes().to_vec()).unwrap();
    for s in &mut c.stores {
        assert_eq!(
            outcome(&s.ingest(vec![signed.clone()]).unwrap()),
            Outcome::Applied
        );
        assert_eq!(get(s, "app/x", ""), Some(json!({"b": "two", "k": 5})));
        assert_eq!(
            s.check_view("app/x").unwrap(),
            None,
            "the view is what Automerge holds"
        );
    }
}
