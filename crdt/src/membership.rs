//! The signed membership document and the rule that decides which changes are authorized.
//!
//! Membership is an Automerge document (`_members`) like any other, with this layout:
//!
//! ```text
//! { "root": "<node id of the founding admin>",
//!   "members": { "<node id>": { "name": "eu-1", "role": "admin|writer|reader|removed",
//!                               "addrs": ["10.0.0.1:7946"], "scopes": ["region/eu/"],
//!                               "cutoff": { "<doc>": <seq>, ... } } } }
//! ```
//!
//! Its first change (the *genesis*) is made by the founding admin, has no dependencies, and
//! its hash is the cluster id, so a node configured with a cluster id accepts that cluster's
//! history only.
//!
//! # Who may change what
//! * Admins add members, change roles, names, addresses and scopes, and remove members.
//! * Any active member may change its own `addrs` (and nothing else about itself).
//! * The root (founding admin) cannot be demoted or removed: its key is the cluster's anchor.
//! * **Seniority:** an admin may demote or remove another admin only if it became admin
//!   *earlier* (its rank in the deterministic replay order below is lower). This breaks the
//!   cycle of two admins removing each other concurrently: the senior one wins.
//! * `removed` is terminal: a removed key never comes back (re-admit the machine with a new key).
//!
//! # Revocation rule (cut-off recorded with the removal)
//! When an admin removes or demotes member X (or narrows its scopes), the same change records in
//! `members/X/cutoff` X's highest sequence number per document *that the admin holds*. Then:
//!
//! * a change by X in document D with seq ≤ cutoff\[D\] is judged as authorized (the admin saw it
//!   and let it stand);
//! * a change by X with seq > cutoff\[D\] is judged against X's **current** role and scopes:
//!   after a removal it is **void everywhere**, whatever order changes arrive in.
//!
//! This closes the backdating hole: a removed key that keeps writing on a fork that never saw
//! its removal produces changes above the cut-off, and every node that learns of the removal
//! voids them. Because the cut-off is data inside the signed membership document and validity is
//! a function of (change, final membership state), the verdict depends only on the *set* of
//! changes, never on arrival order.
//!
//! **Honest changes on top of a void change are void too.** Automerge cannot apply a change
//! without its dependencies, and applying them would resurrect the void change's effects. So a
//! void change voids its causal descendants in the same document. Only changes made *concurrently*
//! with a removal, by nodes that had already received the removed key's post-cut-off writes,
//! are affected; the admin's cut-off covers everything the admin had seen. Nodes report the
//! voided changes (with reason `depends_on_void`) so an operator or the agent can re-apply the
//! intended values as new changes.
//!
//! # Evaluating the membership document deterministically
//! Membership changes are replayed in a deterministic topological order: Kahn's algorithm,
//! breaking ties by (start_op, actor, hash). Each change is applied to a fork of the running
//! document and accepted only if the transition it causes is allowed for its author in the
//! running state (rules above). Then every accepted change is checked against the *final* state's
//! cut-offs; if any is now void, it joins the void set and the replay runs again. The void set
//! only grows, so this terminates, and since each step is a function of the change set, every
//! node computes the same members, the same roles, and the same void set.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::{Automerge, Change, ROOT};
use serde::{Deserialize, Serialize};

use crate::error::RejectReason;
use crate::identity::NodeId;
use crate::json;
use crate::signed::MEMBERSHIP_DOC;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Removed for good; its changes past its cut-off are void.
    Removed,
    /// May read (replicate) documents in its scopes.
    Reader,
    /// May write documents in its scopes.
    Writer,
    /// May write every document and change membership.
    Admin,
}

impl Role {
    /// Lowercase name as stored and shown.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Removed => "removed",
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "writer" => Ok(Role::Writer),
            "reader" => Ok(Role::Reader),
            "removed" => Ok(Role::Removed),
            other => Err(format!(
                "unknown role `{other}` (expected admin, writer or reader)"
            )),
        }
    }
}

/// One member as recorded in the membership document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Role.
    pub role: Role,
    /// Advertised addresses (`host:port`).
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Document prefixes this member may write (empty: all).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Per-document sequence numbers accepted at revocation/demotion time.
    #[serde(default)]
    pub cutoff: BTreeMap<String, u64>,
}

impl Member {
    /// Whether `doc` is inside this member's scopes.
    pub fn in_scope(&self, doc: &str) -> bool {
        self.scopes.is_empty()
            || self.scopes.iter().any(|s| {
                doc.starts_with(s.as_str()) || s.strip_suffix('/').is_some_and(|p| p == doc)
            })
    }
}

#[derive(Deserialize)]
struct RawState {
    root: NodeId,
    #[serde(default)]
    members: BTreeMap<NodeId, Member>,
}

/// The evaluated membership: members, roles and seniority.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// The founding admin.
    pub root: Option<NodeId>,
    /// Members by node id (including removed ones).
    pub members: BTreeMap<NodeId, Member>,
    /// Admin seniority: replay position at which each admin became admin (root: 0).
    pub(crate) admin_rank: BTreeMap<NodeId, usize>,
}

impl Membership {
    /// The member record of `id`.
    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    /// Whether `id` is a member that is not removed.
    pub fn is_active(&self, id: &NodeId) -> bool {
        self.members
            .get(id)
            .is_some_and(|m| m.role != Role::Removed)
    }

    /// Display name of a node, or its short id.
    pub fn name_of(&self, id: &NodeId) -> String {
        match self.members.get(id) {
            Some(m) if !m.name.is_empty() => m.name.clone(),
            _ => id.short(),
        }
    }

    /// Decide whether a change by `author` with `seq` in config document `doc` is authorized.
    pub fn authorize_write(
        &self,
        author: &NodeId,
        doc: &str,
        seq: u64,
    ) -> Result<(), RejectReason> {
        let Some(m) = self.members.get(author) else {
            return Err(RejectReason::NotAMember);
        };
        if m.cutoff.get(doc).is_some_and(|c| seq <= *c) {
            return Ok(());
        }
        let revoked = !m.cutoff.is_empty() || m.role == Role::Removed;
        match m.role {
            Role::Admin => Ok(()),
            Role::Writer if m.in_scope(doc) => Ok(()),
            Role::Writer if revoked => Err(RejectReason::Revoked),
            Role::Writer => Err(RejectReason::OutOfScope),
            _ if revoked => Err(RejectReason::Revoked),
            _ => Err(RejectReason::NotAuthorized(format!(
                "{} is a {}",
                author.short(),
                m.role.as_str()
            ))),
        }
    }

    /// Read the membership state from a document. `None` if it does not parse as membership.
    pub(crate) fn read(doc: &Automerge) -> Option<(NodeId, BTreeMap<NodeId, Member>)> {
        let value = json::to_json(doc, &ROOT).ok()?;
        let raw: RawState = serde_json::from_value(value).ok()?;
        Some((raw.root, raw.members))
    }
}

/// A membership change ready for evaluation (authenticated and parsed).
#[derive(Clone)]
pub(crate) struct MemberChange {
    pub hash: [u8; 32],
    pub author: NodeId,
    pub seq: u64,
    pub start_op: u64,
    pub deps: Vec<[u8; 32]>,
    pub change: Change,
}

/// The outcome of evaluating all known membership changes.
pub(crate) struct Evaluation {
    pub state: Membership,
    pub doc: Automerge,
    /// Valid changes in replay order.
    pub valid: Vec<[u8; 32]>,
    /// Void changes with the reason.
    pub void: BTreeMap<[u8; 32], RejectReason>,
}

/// Evaluate the membership document from the full set of its changes (see module docs).
pub(crate) fn evaluate(cluster: &[u8; 32], changes: &[MemberChange]) -> Evaluation {
    let mut void: BTreeMap<[u8; 32], RejectReason> = BTreeMap::new();
    loop {
        let run = replay(cluster, changes, &void);
        // Check every accepted change against the final state's cut-offs.
        let mut newly = Vec::new();
        for (hash, needed_admin) in &run.accepted {
            let c = changes
                .iter()
                .find(|c| &c.hash == hash)
                .expect("accepted change exists");
            if let Err(reason) = final_check(&run.state, c, *needed_admin) {
                newly.push((*hash, reason));
            }
        }
        if newly.is_empty() {
            let valid = run.accepted.iter().map(|(h, _)| *h).collect();
            for (h, r) in run.rejected {
                void.entry(h).or_insert(r);
            }
            return Evaluation {
                state: run.state,
                doc: run.doc,
                valid,
                void,
            };
        }
        for (h, r) in newly {
            void.insert(h, r);
        }
    }
}

fn final_check(
    state: &Membership,
    c: &MemberChange,
    needed_admin: bool,
) -> Result<(), RejectReason> {
    if Some(c.author) == state.root {
        return Ok(());
    }
    let Some(m) = state.members.get(&c.author) else {
        return Err(RejectReason::NotAMember);
    };
    if m.cutoff
        .get(MEMBERSHIP_DOC)
        .is_some_and(|cut| c.seq <= *cut)
    {
        return Ok(());
    }
    let ok = if needed_admin {
        m.role == Role::Admin
    } else {
        m.role != Role::Removed
    };
    if ok {
        Ok(())
    } else {
        Err(RejectReason::Revoked)
    }
}

struct Replay {
    state: Membership,
    doc: Automerge,
    accepted: Vec<([u8; 32], bool)>,
    rejected: Vec<([u8; 32], RejectReason)>,
}

/// Deterministic topological order: Kahn's algorithm, ties by (start_op, actor, hash).
pub(crate) fn topo_order(changes: &[MemberChange]) -> Vec<usize> {
    let index: HashMap<[u8; 32], usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash, i))
        .collect();
    let mut indegree = vec![0usize; changes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, c) in changes.iter().enumerate() {
        for d in &c.deps {
            if let Some(&j) = index.get(d) {
                indegree[i] += 1;
                children[j].push(i);
            }
        }
    }
    let key = |i: usize| {
        let c = &changes[i];
        std::cmp::Reverse((c.start_op, c.author.0, c.hash))
    };
    type Key = std::cmp::Reverse<(u64, [u8; 32], [u8; 32])>;
    let mut heap: BinaryHeap<(Key, usize)> = (0..changes.len())
        .filter(|&i| indegree[i] == 0)
        .map(|i| (key(i), i))
        .collect();
    let mut order = Vec::with_capacity(changes.len());
    while let Some((_, i)) = heap.pop() {
        order.push(i);
        for &k in &children[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                heap.push((key(k), k));
            }
        }
    }
    order
}

fn replay(
    cluster: &[u8; 32],
    changes: &[MemberChange],
    void: &BTreeMap<[u8; 32], RejectReason>,
) -> Replay {
    let mut doc = Automerge::new();
    let mut state = Membership::default();
    let mut applied: HashSet<[u8; 32]> = HashSet::new();
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    for (pos, i) in topo_order(changes).into_iter().enumerate() {
        let c = &changes[i];
        if void.contains_key(&c.hash) {
            continue;
        }
        if !c.deps.iter().all(|d| applied.contains(d)) {
            rejected.push((c.hash, RejectReason::DependsOnVoid));
            continue;
        }
        let is_genesis = c.deps.is_empty() && c.hash == *cluster;
        if state.root.is_none() && !is_genesis {
            rejected.push((c.hash, RejectReason::WrongCluster));
            continue;
        }
        let mut fork = doc.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| fork.apply_changes([c.change.clone()])));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                rejected.push((c.hash, RejectReason::Automerge(e.to_string())));
                continue;
            }
            Err(_) => {
                rejected.push((c.hash, RejectReason::AutomergePanic));
                continue;
            }
        }
        let Some((root, after)) = Membership::read(&fork) else {
            rejected.push((
                c.hash,
                RejectReason::NotAuthorized("leaves membership unreadable".into()),
            ));
            continue;
        };
        let verdict = if is_genesis {
            genesis_check(&c.author, &root, &after)
        } else {
            transition_check(&state, &c.author, &root, &after)
        };
        match verdict {
            Ok(needed_admin) => {
                // Update seniority: new admins get this position as their rank.
                let mut ranks = state.admin_rank.clone();
                if is_genesis {
                    ranks.insert(root, 0);
                }
                for (id, m) in &after {
                    if m.role == Role::Admin {
                        ranks.entry(*id).or_insert(pos + 1);
                    } else {
                        ranks.remove(id);
                    }
                }
                state = Membership {
                    root: Some(root),
                    members: after,
                    admin_rank: ranks,
                };
                doc = fork;
                applied.insert(c.hash);
                accepted.push((c.hash, needed_admin));
            }
            Err(reason) => rejected.push((c.hash, reason)),
        }
    }
    Replay {
        state,
        doc,
        accepted,
        rejected,
    }
}

fn genesis_check(
    author: &NodeId,
    root: &NodeId,
    after: &BTreeMap<NodeId, Member>,
) -> Result<bool, RejectReason> {
    if root != author || after.get(author).map(|m| m.role) != Some(Role::Admin) {
        return Err(RejectReason::NotAuthorized(
            "genesis must make its author the root admin".into(),
        ));
    }
    Ok(true)
}

/// Is the transition `state → after` allowed for `author`? Returns whether it needed admin rights.
fn transition_check(
    state: &Membership,
    author: &NodeId,
    root: &NodeId,
    after: &BTreeMap<NodeId, Member>,
) -> Result<bool, RejectReason> {
    if Some(*root) != state.root {
        return Err(RejectReason::NotAuthorized("the root cannot change".into()));
    }
    let Some(me) = state.members.get(author) else {
        return Err(RejectReason::NotAMember);
    };
    if me.role == Role::Removed {
        return Err(RejectReason::Revoked);
    }
    let is_admin = me.role == Role::Admin;
    let my_rank = state.admin_rank.get(author).copied().unwrap_or(usize::MAX);
    let ids: BTreeSet<&NodeId> = state.members.keys().chain(after.keys()).collect();
    let mut needed_admin = false;
    for id in ids {
        let before = state.members.get(id);
        let now = after.get(id);
        if before == now {
            continue;
        }
        let (Some(now), before) = (now, before) else {
            return Err(RejectReason::NotAuthorized(format!(
                "member {} cannot be deleted (set role removed)",
                id.short()
            )));
        };
        // Self-service: any active member may change its own addresses.
        if id == author {
            if let Some(b) = before {
                let only_addrs = Member {
                    addrs: now.addrs.clone(),
                    ..b.clone()
                };
                if only_addrs == *now {
                    continue;
                }
            }
        }
        needed_admin = true;
        if !is_admin {
            return Err(RejectReason::NotAuthorized(format!(
                "{} is not an admin",
                author.short()
            )));
        }
        if id == root && now.role != Role::Admin {
            return Err(RejectReason::NotAuthorized(
                "the root cannot be demoted or removed".into(),
            ));
        }
        if let Some(b) = before {
            if b.role == Role::Removed {
                return Err(RejectReason::NotAuthorized(format!(
                    "{} was removed for good",
                    id.short()
                )));
            }
            if b.role == Role::Admin && id != author {
                let their_rank = state.admin_rank.get(id).copied().unwrap_or(usize::MAX);
                if their_rank <= my_rank {
                    return Err(RejectReason::NotAuthorized(format!(
                        "admin {} is senior to {}",
                        id.short(),
                        author.short()
                    )));
                }
            }
        }
    }
    Ok(needed_admin)
}
