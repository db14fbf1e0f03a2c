//! Unit tests of the engine's control flow against `Fake`, a replica with fixed clocks and no
//! changes: bounded queues, clock pages, a pull page by page, quiet while fetching, garbage
//! input and digests. (The simulator in `crdt/tests` drives real stores.)

use super::pull::page;
use super::*;
use crate::error::StoreError;
use crate::store::IngestReport;
use crate::sync::wire::{Frontiers, VersionVector};

/// A replica with fixed clocks and no changes: enough to drive the control flow.
#[derive(Default)]
struct Fake {
    clocks: Clocks,
    ingested: usize,
}

impl Replica for Fake {
    fn clocks(&self) -> Result<Clocks, StoreError> {
        Ok(self.clocks.clone())
    }
    fn changes_after(
        &self,
        _: &str,
        _: &NodeId,
        _: u64,
        _: usize,
    ) -> Result<Vec<SignedChange>, StoreError> {
        Ok(Vec::new())
    }
    fn get_change(&self, _: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        Ok(None)
    }
    fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        self.ingested += batch.len();
        Ok(IngestReport::default())
    }
}

fn change(i: u8) -> SignedChange {
    SignedChange {
        doc: "app/x".into(),
        author: NodeId([i; 32]),
        sig: [0; 64],
        bytes: vec![i; 100],
    }
}

fn drain(e: &mut SyncEngine) -> Vec<(NodeId, SyncMessage)> {
    std::iter::from_fn(|| e.poll_transmit()).collect()
}

#[test]
fn a_stalled_peers_queue_is_bounded_and_drops_are_counted() {
    let cfg = Config {
        queue_messages: 2,
        ..Config::default()
    };
    let (me, slow, fast) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
    let mut e = SyncEngine::new(me, cfg, 7);
    let mut r = Fake::default();
    e.peer_up(0, slow, &mut r).unwrap();
    e.peer_up(0, fast, &mut r).unwrap();
    e.set_peer_ready(slow, false);
    for i in 0..5 {
        e.local_commit(i, &[change(i as u8)], &mut r).unwrap();
        // The fast peer's queue is drained as it goes; the slow one's is not.
        assert!(drain(&mut e).iter().all(|(p, _)| *p == fast));
    }
    assert_eq!(e.queued(&slow).0, 2);
    // Digest + 1 push fit; 4 pushes were dropped for the slow peer only.
    assert_eq!(e.stats().dropped_pushes, 4);
    e.set_peer_ready(slow, true);
    assert_eq!(drain(&mut e).len(), 2);
    // A peer that goes down loses its queue.
    e.local_commit(9, &[change(9)], &mut r).unwrap();
    e.peer_down(9, slow);
    assert_eq!(e.queued(&slow), (0, 0));
}

#[test]
fn large_clocks_are_sent_in_pages_under_the_message_limit() {
    // 300 documents × 1,000 authors: 300,000 entries, ~12 MB as one clock list.
    let mut clocks = Clocks::new();
    for d in 0..300u32 {
        let vv: super::super::VersionVector = (0..1_000u32)
            .map(|a| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&a.to_be_bytes());
                (NodeId(id), u64::from(a) + 1)
            })
            .collect();
        clocks.insert(format!("app/d{d:03}"), vv);
    }
    let mut frontiers = Frontiers::new();
    frontiers.insert("app/d007".into(), Default::default());
    frontiers.entry("app/d007".into()).or_default().heads = vec![[9; 32]];
    let sum = Summary {
        digest: super::super::clocks_digest(&clocks, &frontiers),
        clocks: clocks.clone(),
        frontiers: frontiers.clone(),
    };
    let (pages, got, got_f) = walk_pages(&sum, Config::default().clocks_page_bytes);
    assert!(pages >= 12, "{pages} pages");
    assert_eq!(got, clocks);
    assert_eq!(got_f, frontiers);
}

/// Every page of `sum` from the first, each checked under the size bound and through the
/// wire; the number of pages and the clocks and frontiers they carried, merged.
fn walk_pages(sum: &Summary, page_bytes: usize) -> (usize, Clocks, Frontiers) {
    let (mut start, mut pages) = (Pos::default(), 0);
    let (mut got, mut got_f) = (Clocks::new(), Frontiers::new());
    loop {
        let (range, c, f) = page(sum, &start, page_bytes);
        let msg = SyncMessage::Clocks {
            reply: false,
            pull: true,
            range: range.clone(),
            clocks: c.clone(),
            frontiers: f.clone(),
            wants: Vec::new(),
        };
        let bytes = msg.encode();
        assert!(bytes.len() <= page_bytes + 64 * 1024, "{}", bytes.len());
        assert!(bytes.len() < super::super::wire::MAX_MESSAGE_BYTES);
        assert_eq!(SyncMessage::decode(&bytes).unwrap(), msg);
        pages += 1;
        for (doc, vv) in c {
            got.entry(doc).or_default().extend(vv);
        }
        for (doc, fr) in f {
            assert!(got_f.insert(doc, fr).is_none(), "a frontier sent twice");
        }
        match range.end {
            Some(e) => {
                let next = (e, range.end_author);
                assert!(next > start, "no progress");
                start = next;
            }
            None => return (pages, got, got_f),
        }
    }
}

fn author(a: u32) -> NodeId {
    let mut id = [0u8; 32];
    id[..4].copy_from_slice(&a.to_be_bytes());
    NodeId(id)
}

#[test]
fn one_document_with_more_authors_than_a_message_holds_is_split_across_pages() {
    // 250,000 authors in one document: 10 MB as one version vector, over the 8 MiB
    // message limit. Pages cut the document between authors.
    let vv: VersionVector = (0..250_000u32).map(|a| (author(a), 1)).collect();
    let mut clocks = Clocks::new();
    clocks.insert("app/big".into(), vv);
    clocks.insert("app/small".into(), [(author(7), 3)].into_iter().collect());
    let mut frontiers = Frontiers::new();
    frontiers.entry("app/big".into()).or_default().heads = vec![[9; 32]];
    let sum = Summary {
        digest: super::super::clocks_digest(&clocks, &frontiers),
        clocks: clocks.clone(),
        frontiers: frontiers.clone(),
    };
    let (pages, got, got_f) = walk_pages(&sum, Config::default().clocks_page_bytes);
    assert!(pages >= 10, "{pages} pages");
    assert_eq!(got, clocks);
    assert_eq!(got_f, frontiers);
    // The same at a tiny page size: every page holds a few authors.
    let (pages, got, got_f) = walk_pages(&sum, 200);
    assert!(pages > 50_000, "{pages} pages");
    assert_eq!(got, clocks);
    assert_eq!(got_f, frontiers);
}

#[test]
fn a_pull_walks_every_page_then_catches_up() {
    let cfg = Config {
        clocks_page_bytes: 200,
        ..Config::default()
    };
    let (a_id, b_id) = (NodeId([1; 32]), NodeId([2; 32]));
    let mut a = SyncEngine::new(a_id, cfg, 1);
    let mut ra = Fake::default();
    for d in 0..10 {
        ra.clocks
            .entry(format!("app/d{d}"))
            .or_default()
            .insert(a_id, 1);
    }
    a.peer_up(0, b_id, &mut ra).unwrap();
    drain(&mut a);
    // B's digest differs: A pulls, one page at a time.
    a.handle(1, b_id, SyncMessage::Digest { digest: [0; 32] }, &mut ra)
        .unwrap();
    let mut seen = Clocks::new();
    for step in 0..20 {
        let out = drain(&mut a);
        let [(_, SyncMessage::Clocks { range, clocks, .. })] = out.as_slice() else {
            panic!("step {step}: {out:?}")
        };
        seen.extend(clocks.clone());
        let last = range.end.is_none();
        a.handle(
            2 + step,
            b_id,
            SyncMessage::Changes {
                more: false,
                changes: Vec::new(),
            },
            &mut ra,
        )
        .unwrap();
        if last {
            assert!(drain(&mut a).is_empty());
            assert!(step >= 3, "only {step} pages");
            assert_eq!(seen, ra.clocks);
            assert_eq!(a.poll_event(), Some(Event::CaughtUp { peer: b_id }));
            return;
        }
    }
    panic!("never reached the last page");
}

#[test]
fn a_steady_stream_of_announcements_does_not_starve_anti_entropy() {
    let (me, peer) = (NodeId([1; 32]), NodeId([2; 32]));
    let mut e = SyncEngine::new(me, Config::default(), 3);
    let mut r = Fake::default();
    e.peer_up(0, peer, &mut r).unwrap();
    drain(&mut e);
    let (mut digests, mut ignored, mut pulls) = (0, 0, 0);
    for k in 0..20u8 {
        // A new change is announced (and fetched, never delivered) just before every
        // round and every digest from the peer.
        let due = e.poll_timeout().unwrap();
        e.handle(
            due - 1,
            peer,
            SyncMessage::AnnounceOne { id: [k; 8] },
            &mut r,
        )
        .unwrap();
        assert!(matches!(
            drain(&mut e).as_slice(),
            [(_, SyncMessage::FetchOne { .. })]
        ));
        e.handle_timeout(due, &mut r).unwrap();
        let out = drain(&mut e);
        digests += out
            .iter()
            .filter(|(_, m)| matches!(m, SyncMessage::ShortDigest { .. }))
            .count();
        // A mismatched digest from the peer while the fetch is under way.
        e.handle(
            due + 1,
            peer,
            SyncMessage::ShortDigest {
                nonce: [k; 4],
                tag: [k; 6],
            },
            &mut r,
        )
        .unwrap();
        let out = drain(&mut e);
        if out.is_empty() {
            ignored += 1;
        } else {
            pulls += 1;
        }
        // The pull gets its answer, so the next mismatch may start another.
        e.handle(
            due + 2,
            peer,
            SyncMessage::Changes {
                more: false,
                changes: Vec::new(),
            },
            &mut r,
        )
        .unwrap();
        drain(&mut e);
    }
    // Rounds are skipped while fetching, but never two in a row; mismatched digests are
    // ignored at most once per interval (rounds are about one interval apart).
    assert!(digests >= 10, "{digests} digests in 20 rounds");
    assert!(digests < 20, "no round was ever skipped");
    assert!(pulls >= 6, "{pulls} pulls, {ignored} ignored");
    assert!(ignored > 0, "no digest was ever ignored");
}

#[test]
fn garbage_from_the_network_is_an_event_not_an_error() {
    let mut e = SyncEngine::new(NodeId([1; 32]), Config::default(), 1);
    let mut r = Fake::default();
    let peer = NodeId([2; 32]);
    for bytes in [
        &[][..],
        &[9, 9],
        &[1, 2, 0xff],
        &[1, 4, 0xff, 0xff, 0xff, 0xff],
    ] {
        e.handle_bytes(0, peer, bytes, &mut r).unwrap();
    }
    assert_eq!(e.stats().decode_errors, 4);
    assert!(matches!(
        e.poll_event(),
        Some(Event::Rejected {
            label: "decode",
            ..
        })
    ));
    assert_eq!(r.ingested, 0);
}

#[test]
fn equal_digests_cost_one_message_and_mean_caught_up() {
    let (a_id, b_id) = (NodeId([1; 32]), NodeId([2; 32]));
    let mut a = SyncEngine::new(a_id, Config::default(), 1);
    let mut b = SyncEngine::new(b_id, Config::default(), 2);
    let mut ra = Fake::default();
    let mut rb = Fake::default();
    a.peer_up(0, b_id, &mut ra).unwrap();
    b.peer_up(0, a_id, &mut rb).unwrap();
    drain(&mut b);
    // A's timer fires: one Digest to its only peer.
    let due = a.poll_timeout().unwrap();
    drain(&mut a);
    a.handle_timeout(due, &mut ra).unwrap();
    let out = drain(&mut a);
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].1, SyncMessage::ShortDigest { .. }));
    b.handle(due + 1, a_id, out[0].1.clone(), &mut rb).unwrap();
    assert!(drain(&mut b).is_empty(), "nothing to say when in sync");
    assert_eq!(b.poll_event(), Some(Event::CaughtUp { peer: a_id }));
    // Different clocks: B answers with its clocks and asks to pull.
    rb.clocks.entry("app/x".into()).or_default().insert(b_id, 3);
    b.invalidate();
    b.handle(due + 2, a_id, out[0].1.clone(), &mut rb).unwrap();
    let reply = drain(&mut b);
    assert!(matches!(
        reply.as_slice(),
        [(
            _,
            SyncMessage::Clocks {
                reply: true,
                pull: true,
                ..
            }
        )]
    ));
    assert!(a.poll_timeout().unwrap() > due);
}

/// A real (hashable) change by `author`, for tests that look at change ids.
fn real_change(author: u8, v: i64) -> SignedChange {
    use automerge::transaction::Transactable;
    let mut doc = automerge::Automerge::new();
    doc.set_actor(automerge::ActorId::from([author; 32].as_slice()));
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "k", v).unwrap();
    tx.commit();
    SignedChange {
        doc: "app/x".into(),
        author: NodeId([author; 32]),
        sig: [0; 64],
        bytes: doc.get_last_local_change().unwrap().raw_bytes().to_vec(),
    }
}

/// A peer whose push of a new change a full queue dropped is not counted as holding it, so
/// the next anti-entropy round goes to that peer (the one that may lack it) rather than to a
/// random one. Checked for several seeds: a random pick would miss it about half the time.
#[test]
fn a_peer_whose_push_was_dropped_gets_the_next_round() {
    for seed in 0..8 {
        let cfg = Config {
            queue_messages: 1,
            ..Config::default()
        };
        let (me, slow, fast) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let mut e = SyncEngine::new(me, cfg, seed);
        let mut r = Fake::default();
        e.peer_up(0, slow, &mut r).unwrap();
        e.peer_up(0, fast, &mut r).unwrap();
        // The slow peer's queue is full (its connection digest waits in it).
        e.set_peer_ready(slow, false);
        drain(&mut e);
        e.local_commit(10, &[real_change(1, 1)], &mut r).unwrap();
        assert_eq!(e.stats().dropped_pushes, 1, "seed {seed}");
        drain(&mut e);
        e.set_peer_ready(slow, true);
        drain(&mut e);
        let due = e.poll_timeout().unwrap();
        e.handle_timeout(due, &mut r).unwrap();
        let out = drain(&mut e);
        assert!(
            matches!(out.as_slice(), [(p, SyncMessage::ShortDigest { .. })] if *p == slow),
            "seed {seed}: the round went to {out:?}"
        );
    }
}

/// The pull requests `e` sent, by peer.
fn pulls(out: &[(NodeId, SyncMessage)]) -> Vec<NodeId> {
    out.iter()
        .filter(|(_, m)| matches!(m, SyncMessage::Clocks { pull: true, .. }))
        .map(|(p, _)| *p)
        .collect()
}

#[test]
fn a_pull_lost_on_the_way_gives_way_to_the_next_peer_that_offers_an_exchange() {
    let (me, a, b) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
    let cfg = Config::default();
    let (gap, timeout) = (cfg.pull_gap_ms, cfg.pull_timeout_ms);
    let mut e = SyncEngine::new(me, cfg, 5);
    let mut r = Fake::default();
    r.clocks.entry("app/x".into()).or_default().insert(me, 1);
    e.peer_up(0, a, &mut r).unwrap();
    e.peer_up(0, b, &mut r).unwrap();
    drain(&mut e);
    let differs = || SyncMessage::Digest { digest: [7; 32] };
    // A's digest differs: pull from A. That request (or its answer) is lost.
    e.handle(10, a, differs(), &mut r).unwrap();
    assert_eq!(pulls(&drain(&mut e)), vec![a]);
    // While the pull may still be answered, other offers wait (one bulk transfer at a time).
    e.handle(10 + gap - 1, b, differs(), &mut r).unwrap();
    assert!(pulls(&drain(&mut e)).is_empty());
    // No answer for `pull_gap_ms`: the next offer (long before `pull_timeout_ms`) is taken.
    let t = 10 + gap;
    assert!(t < 10 + timeout);
    e.handle(t, b, differs(), &mut r).unwrap();
    assert_eq!(pulls(&drain(&mut e)), vec![b]);
    // The same for an offer from the peer of the lost pull itself (it is up, and not
    // answering ours), here one that asks us to pull back (`reply`).
    let t = t + gap;
    let mut theirs = Clocks::new();
    theirs.entry("app/x".into()).or_default().insert(a, 3);
    e.handle(
        t,
        b,
        SyncMessage::Clocks {
            reply: true,
            pull: true,
            range: DocRange::all(),
            clocks: theirs,
            frontiers: Frontiers::new(),
            wants: Vec::new(),
        },
        &mut r,
    )
    .unwrap();
    assert_eq!(pulls(&drain(&mut e)), vec![b]);
    // An answered pull is not stale: the next page's answer is awaited again.
    e.handle(
        t + 1,
        b,
        SyncMessage::Changes {
            more: true,
            changes: Vec::new(),
        },
        &mut r,
    )
    .unwrap();
    assert_eq!(pulls(&drain(&mut e)), vec![b]);
    e.handle(t + 2, a, differs(), &mut r).unwrap();
    assert!(pulls(&drain(&mut e)).is_empty());
}
