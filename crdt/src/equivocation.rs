//! Equivocation: one key signing two different changes at the same (document, seq).
//!
//! Why it exists: a cloned key (a copied VM image, a node restored from a backup) lets two
//! machines write as one author. Both write seq `f` of a document, concurrently, and each
//! variant is well signed. If every node kept whichever variant reached it first, the two
//! halves of the cluster would hold different documents with *equal* version vectors and never
//! notice. The verdict must instead be a function of the set of changes alone.
//!
//! # The rule
//! * A **fork** of author `a` in document `D` at seq `f` is two distinct changes by `a` at
//!   `(D, f)` that are both *otherwise valid* (authorized by membership, every dependency
//!   valid). Two signatures over different changes at one seq are a proof no honest node can
//!   produce: an honest store never reuses a seq of a valid change.
//! * Once a fork is known, `a` is **flagged** in `D` and every change by `a` in `D` with seq
//!   ≥ `f` is void: both variants (no "first one wins", which would depend on arrival order)
//!   and whatever the key wrote after them. Changes below `f` stand. The key is reported by
//!   [`crate::Store::equivocators`]; its owner cannot write `D` with it any more (a local write
//!   is refused) and an admin should remove it and re-admit the machine with a new key.
//! * **Changes built on a void variant are void too** (the void-descendants rule of
//!   [`crate::membership`]): Automerge cannot apply a change without its dependencies, and
//!   applying them would resurrect the variant's effects. This hits only honest changes made
//!   *concurrently* with the fork by nodes that had received one variant; they are reported
//!   (`IngestReport::voided`, `Store::take_voided`) and their authors carry them forward (the
//!   carry-forward rule of [`crate::membership`]): the intended values are written again as a
//!   new change, which reuses the seq of the voided change. That is *not* a fork: a change void
//!   because of its dependencies is not "otherwise valid".
//!
//! # Evaluation (deterministic)
//! `evaluate` runs over every stored change of one document, in storage order (a change is
//! stored only after its dependencies, so that order is causal):
//! 1. `base`: valid unless void for a reason unrelated to equivocation (revocation, or a
//!    dependency void for such a reason).
//! 2. With no author flagged, compute validity; collect the forks among valid changes.
//! 3. Flag the **causally first** forks: a fork is first if two of its variants have no change
//!    in their causal past (themselves included) that another current fork would void (a
//!    change by that fork's author at or after its seq). This is what keeps an honest author's
//!    seq reuse (its old change was built on a variant, so it carries that variant's fork in
//!    its past) from being mistaken for a fork while the real one is undecided. If forks
//!    depend on each other in a cycle (only colluding equivocators can build one), all of
//!    them are flagged.
//! 4. Recompute validity with the flags and repeat until no fork remains among valid changes.
//!
//! Each round flags a new author or an earlier seq, so it terminates; every step is a function
//! of the set of changes, so every node holding the same changes computes the same flags, the
//! same valid set and therefore the same heads. A node may hold *extra* void changes (later
//! changes by a flagged key that it refused once the fork was known); they are all in the
//! scope of a flagged fork, so they cannot make another fork "first".

use std::collections::{BTreeMap, HashMap};

use crate::identity::NodeId;

/// One stored change of a document, as the evaluation sees it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub hash: [u8; 32],
    pub author: NodeId,
    pub seq: u64,
    pub deps: Vec<[u8; 32]>,
    /// Void for a reason that has nothing to do with equivocation (revocation).
    pub base_void: bool,
}

/// The verdict on one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Valid.
    Valid,
    /// Void for a reason unrelated to equivocation (or a dependency void for such a reason).
    Base,
    /// By a flagged author at or after its fork seq.
    Fork,
    /// Depends on a change void because of a fork.
    DependsOnFork,
}

impl Status {
    /// The `changes.status` column value.
    pub(crate) fn code(self) -> i64 {
        match self {
            Status::Valid => 0,
            Status::Base => 1,
            Status::DependsOnFork => 2,
            Status::Fork => 3,
        }
    }
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Per row, in the order given.
    pub status: Vec<Status>,
    /// Flagged authors and their fork seq.
    pub forks: BTreeMap<NodeId, u64>,
}

/// A small bitset over the current forks.
#[derive(Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn set(&mut self, i: usize) {
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn or(&mut self, o: &Bits) {
        if self.0.len() < o.0.len() {
            self.0.resize(o.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
    /// Whether no bit other than `i` is set.
    fn only(&self, i: usize) -> bool {
        self.0
            .iter()
            .enumerate()
            .all(|(w, bits)| bits & !(if w == i / 64 { 1 << (i % 64) } else { 0 }) == 0)
    }
}

/// Judge every change of one document (see the module docs). `rows` must be in storage order
/// (dependencies first); a dependency not found earlier in `rows` counts as void.
pub(crate) fn evaluate(rows: &[Row]) -> Verdict {
    let deps = dep_indices(rows);
    let mut base = vec![false; rows.len()];
    for i in 0..rows.len() {
        base[i] = !rows[i].base_void && deps[i].iter().all(|d| d.is_some_and(|j| base[j]));
    }
    let mut flagged: BTreeMap<NodeId, u64> = BTreeMap::new();
    loop {
        let mut valid = vec![false; rows.len()];
        for i in 0..rows.len() {
            let r = &rows[i];
            valid[i] = base[i]
                && flagged.get(&r.author).is_none_or(|f| r.seq < *f)
                && deps[i].iter().all(|d| d.is_some_and(|j| valid[j]));
        }
        let mut groups: BTreeMap<(NodeId, u64), Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate().filter(|(i, _)| valid[*i]) {
            groups.entry((r.author, r.seq)).or_default().push(i);
        }
        groups.retain(|_, v| v.len() >= 2);
        if groups.is_empty() {
            let status = (0..rows.len())
                .map(|i| {
                    let r = &rows[i];
                    if !base[i] {
                        Status::Base
                    } else if flagged.get(&r.author).is_some_and(|f| r.seq >= *f) {
                        Status::Fork
                    } else if !valid[i] {
                        Status::DependsOnFork
                    } else {
                        Status::Valid
                    }
                })
                .collect();
            return Verdict {
                status,
                forks: flagged,
            };
        }
        for (a, s) in first_forks(rows, &deps, &valid, &groups) {
            let f = flagged.entry(a).or_insert(s);
            *f = (*f).min(s);
        }
    }
}

/// Per row, the indices of its dependencies among the *earlier* rows (`None`: not found
/// before it, which counts as void).
pub(crate) fn dep_indices(rows: &[Row]) -> Vec<Vec<Option<usize>>> {
    let index: HashMap<[u8; 32], usize> =
        rows.iter().enumerate().map(|(i, r)| (r.hash, i)).collect();
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            r.deps
                .iter()
                .map(|d| index.get(d).copied().filter(|j| *j < i))
                .collect()
        })
        .collect()
}

/// Of the current `groups` of forks ((author, seq) → at least two valid variants), the ones to
/// flag now: the *causally first* (two of their variants have no change in their causal past,
/// themselves included, that another current fork would void), or all of them if none is
/// first (a cycle, which only colluding equivocators can build). `deps[i]` are the indices of
/// row `i`'s dependencies (earlier rows), `valid[i]` whether row `i` stands so far.
pub(crate) fn first_forks(
    rows: &[Row],
    deps: &[Vec<Option<usize>>],
    valid: &[bool],
    groups: &BTreeMap<(NodeId, u64), Vec<usize>>,
) -> Vec<(NodeId, u64)> {
    let forks: Vec<(NodeId, u64)> = groups.keys().copied().collect();
    // For each valid row: the forks whose scope holds something in its causal past.
    let mut by_author: HashMap<NodeId, Vec<(usize, u64)>> = HashMap::new();
    for (k, (a, s)) in forks.iter().enumerate() {
        by_author.entry(*a).or_default().push((k, *s));
    }
    let mut taint: Vec<Bits> = vec![Bits::default(); rows.len()];
    for i in (0..rows.len()).filter(|i| valid[*i]) {
        let mut t = Bits::default();
        for j in deps[i].iter().flatten() {
            t.or(&taint[*j]);
        }
        if let Some(list) = by_author.get(&rows[i].author) {
            for (k, s) in list {
                if rows[i].seq >= *s {
                    t.set(*k);
                }
            }
        }
        taint[i] = t;
    }
    let first: Vec<usize> = (0..forks.len())
        .filter(|k| {
            groups[&forks[*k]]
                .iter()
                .filter(|v| taint[**v].only(*k))
                .count()
                >= 2
        })
        .collect();
    let chosen: Vec<usize> = if first.is_empty() {
        (0..forks.len()).collect()
    } else {
        first
    };
    chosen.into_iter().map(|k| forks[k]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    fn row(h: u8, author: u8, seq: u64, deps: &[u8]) -> Row {
        Row {
            hash: [h; 32],
            author: id(author),
            seq,
            deps: deps.iter().map(|d| [*d; 32]).collect(),
            base_void: false,
        }
    }

    fn verdict(rows: &[Row]) -> Vec<(u8, Status)> {
        let v = evaluate(rows);
        rows.iter().map(|r| r.hash[0]).zip(v.status).collect()
    }

    #[test]
    fn no_fork_everything_valid() {
        let rows = [row(1, 1, 1, &[]), row(2, 2, 1, &[1]), row(3, 1, 2, &[2])];
        let v = evaluate(&rows);
        assert!(v.forks.is_empty());
        assert!(v.status.iter().all(|s| *s == Status::Valid));
    }

    #[test]
    fn both_variants_and_what_follows_are_void_in_any_order() {
        // a=1 writes 1 (seq 1); variants 2 and 3 at seq 2; 4 (seq 3) after 2; honest 5 on 3.
        let rows = vec![
            row(1, 1, 1, &[]),
            row(2, 1, 2, &[1]),
            row(3, 1, 2, &[1]),
            row(4, 1, 3, &[2]),
            row(5, 9, 1, &[3]),
            row(6, 9, 1, &[1]), // the honest author's reuse of seq 1
        ];
        let want = vec![
            (1, Status::Valid),
            (2, Status::Fork),
            (3, Status::Fork),
            (4, Status::Fork),
            (5, Status::DependsOnFork),
            (6, Status::Valid),
        ];
        assert_eq!(verdict(&rows), want);
        assert_eq!(evaluate(&rows).forks, [(id(1), 2)].into_iter().collect());
        // Another causal order of the same set.
        let order = [0, 2, 1, 5, 4, 3];
        let shuffled: Vec<Row> = order.iter().map(|i| rows[*i].clone()).collect();
        let mut got = verdict(&shuffled);
        got.sort_by_key(|x| x.0);
        assert_eq!(got, want);
    }

    #[test]
    fn a_change_void_by_revocation_is_no_fork_witness() {
        let mut bad = row(3, 1, 2, &[1]);
        bad.base_void = true;
        let rows = [row(1, 1, 1, &[]), row(2, 1, 2, &[1]), bad];
        let v = evaluate(&rows);
        assert!(v.forks.is_empty());
        assert_eq!(v.status, vec![Status::Valid, Status::Valid, Status::Base]);
    }

    #[test]
    fn colluding_cycle_flags_both() {
        // Forks of author 1 (2 vs 3) and author 2 (4 vs 5), each fork's second variant built
        // on the other's first: a cycle, so both are flagged.
        let rows = [
            row(2, 1, 1, &[]),
            row(4, 2, 1, &[]),
            row(3, 1, 1, &[4]),
            row(5, 2, 1, &[2]),
        ];
        let v = evaluate(&rows);
        assert_eq!(v.forks, [(id(1), 1), (id(2), 1)].into_iter().collect());
        assert!(v.status.iter().all(|s| *s == Status::Fork));
    }
}
