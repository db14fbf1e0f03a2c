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
//! are affected; the admin's cut-off covers everything the admin had seen.
//!
//! **Carry-forward: an honest write outlives the void change it was built on.** Such a write
//! was acknowledged to its writer, so it must not vanish. Every node notes each change that
//! turns void, with its reason (`revoked`, `depends_on_void`, `equivocation`; see
//! `Store::take_voided`); the agent logs and counts them. The **author** of a change that is
//! void only because of a void dependency (its own role and scopes still allow it) re-applies
//! its own operations (the puts and deletes its change made to the state it was built on) as a
//! new change on the valid state, signed by itself (`Store::carry_forward`). Nobody else
//! re-signs another key's operations; other nodes wait for the author's new change, which
//! reuses the seq of the void one (no fork: a change void because of its dependencies is not
//! "otherwise valid"). The outcome is deterministic: which changes are carried is a function of
//! the stored changes and the final membership, and the new change merges with concurrent
//! writes like any new change. The same holds for dependencies voided by equivocation (below).
//! Tests: the simulations `an_honest_write_on_a_revoked_write_is_carried_forward` and
//! `an_honest_write_on_an_equivocation_variant_is_carried_forward`.
//!
//! **Equivocation** (one key, two different changes at one seq) is judged by its own rule,
//! in `crate::equivocation`: both variants and the key's later changes in that document are
//! void, with the same void-descendants consequence as above. In the membership document (a
//! cloned *admin* key) the replay cannot hold both variants (Automerge refuses a second change
//! at a used (actor, seq)), so it sets the later one aside as *shadowed*; each shadowed change
//! is replayed in a world without the other changes at its slot, and if it stands there it is
//! "otherwise valid". The forks to flag are then chosen by the causally-first rule of
//! `crate::equivocation`, every change of the flagged key from the fork seq joins the void set
//! (reason `equivocation`, stored with status 3 as proof for peers) and the replay runs again.
//! A shadowed change that does not stand on its own (an honest author reusing the seq of its
//! own void change) is simply void. Test: `store_adversarial.rs`
//! (`a_cloned_admin_key_editing_membership_concurrently_is_void_whatever_the_order`) and the
//! simulation `cloned_admin_key_editing_membership_in_two_partitions_is_void_everywhere`.
//!
//! # Member entries
//! A change whose resulting member entry breaks these rules is void (reason
//! `invalid_member`), judged by every node on ingest like the rules above; the API checks the
//! same rules first ([`validate_member`]). Only the fields a change modifies are checked, so an
//! entry written before a rule existed stays usable.
//! * **name**: 1 to 64 bytes, no control characters, no leading or trailing white space;
//! * **addrs**: at most 16, each `host:port` (port 0-65535; host a DNS name, an IPv4 address
//!   or a bracketed IPv6 literal; at most 259 bytes), see [`validate_addr`];
//! * **scopes**: at most 64, each a document-name prefix: a valid document name with an
//!   optional trailing `/` (no `..` or `.` segment, no leading `/`, no empty segment, at most
//!   128 bytes), see [`validate_scope`].
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

use crate::equivocation;
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
    /// What the member may do (admin, writer, reader) or that it was removed for good.
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

/// Longest member name, in bytes.
pub const MAX_MEMBER_NAME: usize = 64;
/// Most advertised addresses per member.
pub const MAX_MEMBER_ADDRS: usize = 16;
/// Longest advertised address, in bytes (a 253-byte host name, `:` and a port).
pub const MAX_MEMBER_ADDR: usize = 259;
/// Most scopes per member.
pub const MAX_MEMBER_SCOPES: usize = 64;

/// Check a member name: 1 to [`MAX_MEMBER_NAME`] bytes, no control characters, no leading
/// or trailing white space.
///
/// These `validate_*` rules are part of the membership rule (see "Member entries" in the
/// module docs): every node applies them on ingest, so they are pure functions of the text,
/// independent of the platform, the resolver or the standard library's address parser.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_MEMBER_NAME {
        return Err(format!(
            "the name is {} bytes long (at most {MAX_MEMBER_NAME})",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the name contains a control character".into());
    }
    if name.trim() != name {
        return Err("the name starts or ends with white space".into());
    }
    Ok(())
}

/// Check an advertised address: `host:port` where port is a decimal number 0..=65535 (0:
/// what a node listening on an OS-chosen port advertises) and
/// host is a bracketed IPv6 literal (`[` hex digits, `:` and `.` `]`, up to 45 characters
/// inside) or a dotted name or IPv4 address: labels of 1 to 63 ASCII letters, digits, `-`
/// or `_`, at most 253 bytes in all.
pub fn validate_addr(addr: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("address `{}`: {why}", addr.escape_debug()));
    if addr.len() > MAX_MEMBER_ADDR {
        return Err(format!(
            "an address is {} bytes long (at most {MAX_MEMBER_ADDR})",
            addr.len()
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("expected host:port");
    };
    if port.is_empty()
        || port.len() > 5
        || !port.bytes().all(|b| b.is_ascii_digit())
        || !port.parse::<u32>().is_ok_and(|p| p <= 65535)
    {
        return bad("the port must be a number from 0 to 65535");
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return bad("an IPv6 address must be written [addr]:port");
        };
        let ok = (2..=45).contains(&inner.len())
            && inner.contains(':')
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return if ok {
            Ok(())
        } else {
            bad("not an IPv6 address")
        };
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return bad("the host must be a name or an IP address (IPv6 in brackets)");
    }
    Ok(())
}

/// Check a scope: a document-name prefix. With one optional trailing `/` removed, it must
/// be a valid document name ([`crate::valid_doc_name`]: 1 to 128 bytes of lowercase a-z,
/// 0-9, `.`, `_`, `-` in `/`-separated segments, no empty, `.` or `..` segment, no leading
/// `/` or `_`), and not the membership document.
pub fn validate_scope(scope: &str) -> Result<(), String> {
    let body = scope.strip_suffix('/').unwrap_or(scope);
    if body == MEMBERSHIP_DOC || !crate::signed::valid_doc_name(body) {
        return Err(format!(
            "scope `{}` is not a document-name prefix (lowercase a-z 0-9 . _ - in segments \
             separated by /, no empty, `.` or `..` segment, at most 128 bytes; e.g. `region/eu/`)",
            scope.chars().take(80).collect::<String>().escape_debug()
        ));
    }
    Ok(())
}

/// Check every field of a member entry (see the `validate_*` functions).
pub fn validate_member(m: &Member) -> Result<(), String> {
    validate_changed(None, m)
}

/// Check the fields of `now` that differ from `before` (all of them for a new entry): an
/// entry written before these rules existed may keep an old field while another one changes.
fn validate_changed(before: Option<&Member>, now: &Member) -> Result<(), String> {
    if before.is_none_or(|b| b.name != now.name) {
        validate_name(&now.name)?;
    }
    if before.is_none_or(|b| b.addrs != now.addrs) {
        if now.addrs.len() > MAX_MEMBER_ADDRS {
            return Err(format!(
                "{} addresses (at most {MAX_MEMBER_ADDRS})",
                now.addrs.len()
            ));
        }
        now.addrs.iter().try_for_each(|a| validate_addr(a))?;
    }
    if before.is_none_or(|b| b.scopes != now.scopes) {
        if now.scopes.len() > MAX_MEMBER_SCOPES {
            return Err(format!(
                "{} scopes (at most {MAX_MEMBER_SCOPES})",
                now.scopes.len()
            ));
        }
        now.scopes.iter().try_for_each(|s| validate_scope(s))?;
    }
    Ok(())
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
#[derive(Clone)]
pub(crate) struct Evaluation {
    pub state: Membership,
    pub doc: Automerge,
    /// Valid changes in replay order.
    pub valid: Vec<[u8; 32]>,
    /// Void changes with the reason.
    pub void: BTreeMap<[u8; 32], RejectReason>,
    /// Keys flagged for equivocation in the membership document, with their fork seq.
    pub forks: BTreeMap<NodeId, u64>,
    /// The replay that produced this, when nothing was void: new changes that sort after all
    /// of it extend it instead of replaying everything (see [`evaluate_extend`]).
    replayer: Option<Replayer>,
}

/// Evaluate the membership document from the full set of its changes (see module docs).
pub(crate) fn evaluate(cluster: &[u8; 32], changes: &[MemberChange]) -> Evaluation {
    let mut void: BTreeMap<[u8; 32], RejectReason> = BTreeMap::new();
    let mut forks: BTreeMap<NodeId, u64> = BTreeMap::new();
    loop {
        let run = replay(cluster, changes, &void);
        let newly = final_checks(&run, changes);
        if !newly.is_empty() {
            void.extend(newly);
            continue;
        }
        if !run.shadowed.is_empty() {
            match judge_forks(cluster, changes, &void, &run) {
                Ok(flagged) => {
                    for (a, f) in flagged {
                        let e = forks.entry(a).or_insert(f);
                        *e = (*e).min(f);
                    }
                    for c in changes {
                        if forks.get(&c.author).is_some_and(|f| c.seq >= *f) {
                            void.entry(c.hash).or_insert(RejectReason::Equivocation);
                        }
                    }
                }
                Err(not_forks) => void.extend(not_forks),
            }
            continue;
        }
        let valid = run.accepted.iter().map(|(h, _)| *h).collect();
        for (h, r) in run.rejected.clone() {
            void.entry(h).or_insert(r);
        }
        return Evaluation {
            state: run.state.clone(),
            doc: run.doc.clone(),
            valid,
            replayer: void.is_empty().then_some(run),
            void,
            forks,
        };
    }
}

/// Judge the *shadowed* changes of `run`: changes at an (author, seq) whose slot an accepted
/// change already holds (Automerge cannot hold both). A shadowed change is a fork witness if
/// it is *otherwise valid*: accepted by a replay without the other changes at its slot. The
/// forks to flag now are chosen by the rule of [`crate::equivocation`] (causally first); if
/// no shadowed change is otherwise valid, `Err` carries each one's own reason to be void (an
/// honest author reusing the seq of a change that turned out void is not equivocating).
#[allow(clippy::type_complexity)]
fn judge_forks(
    cluster: &[u8; 32],
    changes: &[MemberChange],
    void: &BTreeMap<[u8; 32], RejectReason>,
    run: &Replayer,
) -> Result<Vec<(NodeId, u64)>, Vec<([u8; 32], RejectReason)>> {
    let by_hash: HashMap<[u8; 32], &MemberChange> = changes.iter().map(|c| (c.hash, c)).collect();
    let mut otherwise: HashSet<[u8; 32]> = run.accepted.iter().map(|(h, _)| *h).collect();
    let mut slots: BTreeMap<(NodeId, u64), BTreeSet<[u8; 32]>> = BTreeMap::new();
    let mut not_forks = Vec::new();
    for (s, p) in &run.shadowed {
        let Some(c) = by_hash.get(s) else { continue };
        let mut world = void.clone();
        for other in changes
            .iter()
            .filter(|o| o.author == c.author && o.seq == c.seq && o.hash != *s)
        {
            world.insert(other.hash, RejectReason::Equivocation);
        }
        let w = replay(cluster, changes, &world);
        let late = final_checks(&w, changes);
        let accepted = w.accepted.iter().any(|(h, _)| h == s);
        match late.iter().find(|(h, _)| h == s) {
            None if accepted => {
                otherwise.insert(*s);
                let slot = slots.entry((c.author, c.seq)).or_default();
                slot.insert(*s);
                slot.insert(*p);
            }
            late_reason => {
                let reason = late_reason
                    .map(|(_, r)| r.clone())
                    .or_else(|| {
                        w.rejected
                            .iter()
                            .find(|(h, _)| h == s)
                            .map(|(_, r)| r.clone())
                    })
                    .unwrap_or(RejectReason::DependsOnVoid);
                not_forks.push((*s, reason));
            }
        }
    }
    if slots.is_empty() {
        return Err(not_forks);
    }
    let order = topo_order(changes);
    let rows: Vec<equivocation::Row> = order
        .iter()
        .map(|i| {
            let c = &changes[*i];
            equivocation::Row {
                hash: c.hash,
                author: c.author,
                seq: c.seq,
                deps: c.deps.clone(),
                base_void: !otherwise.contains(&c.hash),
            }
        })
        .collect();
    let position: HashMap<[u8; 32], usize> =
        rows.iter().enumerate().map(|(i, r)| (r.hash, i)).collect();
    let valid: Vec<bool> = rows.iter().map(|r| !r.base_void).collect();
    let groups: BTreeMap<(NodeId, u64), Vec<usize>> = slots
        .iter()
        .map(|(k, hs)| {
            (
                *k,
                hs.iter().filter_map(|h| position.get(h).copied()).collect(),
            )
        })
        .collect();
    let deps = equivocation::dep_indices(&rows);
    Ok(equivocation::first_forks(&rows, &deps, &valid, &groups))
}

/// Check every accepted change against the final state's cut-offs.
fn final_checks(run: &Replayer, changes: &[MemberChange]) -> Vec<([u8; 32], RejectReason)> {
    let by_hash: HashMap<[u8; 32], &MemberChange> = changes.iter().map(|c| (c.hash, c)).collect();
    let mut newly = Vec::new();
    for (hash, needed_admin) in &run.accepted {
        let Some(c) = by_hash.get(hash) else { continue };
        if let Err(reason) = final_check(&run.state, c, *needed_admin) {
            newly.push((*hash, reason));
        }
    }
    newly
}

/// Evaluate `all` (= the changes behind `prev` plus `new`) reusing `prev`'s replay when that is
/// exactly what a full evaluation would do: nothing was void, every new change sorts after all
/// previous ones in the replay order (its dependencies are all held, its key is larger), and
/// the extended replay accepts every new change and voids nothing. Otherwise, a full
/// evaluation. Either way the result equals `evaluate(cluster, all)`.
pub(crate) fn evaluate_extend(
    cluster: &[u8; 32],
    prev: &Evaluation,
    all: &[MemberChange],
    new: &[MemberChange],
) -> Evaluation {
    let Some(base) = prev.replayer.as_ref().filter(|_| prev.void.is_empty()) else {
        return evaluate(cluster, all);
    };
    let new_hashes: HashSet<[u8; 32]> = new.iter().map(|c| c.hash).collect();
    let sorts_after = new.iter().all(|c| {
        Some((c.start_op, c.author.0, c.hash)) > base.last_key
            && c.deps
                .iter()
                .all(|d| base.applied.contains(d) || new_hashes.contains(d))
    });
    if !sorts_after {
        return evaluate(cluster, all);
    }
    let mut run = base.clone();
    for i in topo_order(new) {
        run.step(cluster, &new[i]);
    }
    if !run.rejected.is_empty() || !run.shadowed.is_empty() || !final_checks(&run, all).is_empty() {
        return evaluate(cluster, all);
    }
    Evaluation {
        state: run.state.clone(),
        doc: run.doc.clone(),
        valid: run.accepted.iter().map(|(h, _)| *h).collect(),
        void: BTreeMap::new(),
        forks: BTreeMap::new(),
        replayer: Some(run),
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

/// A replay in progress (see the module docs): the running document and state.
#[derive(Clone)]
struct Replayer {
    state: Membership,
    doc: Automerge,
    tracker: Tracker,
    applied: HashSet<[u8; 32]>,
    applied_changes: Vec<Change>,
    accepted: Vec<([u8; 32], bool)>,
    rejected: Vec<([u8; 32], RejectReason)>,
    /// The accepted change at each (author, seq).
    slots: HashMap<(NodeId, u64), [u8; 32]>,
    /// Changes not taken because an accepted change holds their (author, seq): (change,
    /// holder). Judged by [`judge_forks`].
    shadowed: Vec<([u8; 32], [u8; 32])>,
    /// Position in the replay order of the next change (admin seniority).
    pos: usize,
    /// Sort key of the last change taken.
    last_key: Option<(u64, [u8; 32], [u8; 32])>,
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

/// Which members a change touches, found from its ops without reading the document: ops on
/// the `members` map name a member by key; ops inside a member's object (or its nested lists
/// and maps) belong to the member whose entry created that object. Anything else (ops on the
/// root, on unknown objects) asks for a full read. This keeps a replay linear in the number of
/// changes instead of reading every member after every change.
#[derive(Default, Clone)]
struct Tracker {
    members_map: Option<automerge::legacy::OpId>,
    owner: HashMap<automerge::legacy::OpId, NodeId>,
}

enum Touch {
    All,
    Members(BTreeSet<NodeId>),
}

impl Tracker {
    /// The members `change` touches; records the objects it creates in `self`.
    fn touch(&mut self, change: &Change) -> Touch {
        use automerge::legacy::{Key, ObjectId, OpId};
        let Some(expanded) = panic_safe(|| change.decode()) else {
            return Touch::All;
        };
        let start = change.start_op().get();
        let actor = change.actor_id().clone();
        let mut all = false;
        let mut ids = BTreeSet::new();
        for (i, op) in expanded.operations.iter().enumerate() {
            let opid = OpId(start + i as u64, actor.clone());
            let makes = matches!(op.action, automerge::legacy::OpType::Make(_));
            match &op.obj {
                ObjectId::Root => {
                    all = true;
                    if matches!(&op.key, Key::Map(k) if k.as_str() == "members") && makes {
                        self.members_map = Some(opid);
                    }
                }
                ObjectId::Id(o) if Some(o) == self.members_map.as_ref() => {
                    let Key::Map(k) = &op.key else {
                        all = true;
                        continue;
                    };
                    match k.parse::<NodeId>() {
                        Ok(id) => {
                            ids.insert(id);
                            if makes {
                                self.owner.insert(opid, id);
                            }
                        }
                        Err(_) => all = true,
                    }
                }
                ObjectId::Id(o) => match self.owner.get(o).copied() {
                    Some(id) => {
                        ids.insert(id);
                        if makes {
                            self.owner.insert(opid, id);
                        }
                    }
                    None => all = true,
                },
            }
        }
        if all {
            Touch::All
        } else {
            Touch::Members(ids)
        }
    }
}

fn panic_safe<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Read one member entry: `Ok(None)` if absent, `Err` if present but not a member record.
fn read_member(doc: &Automerge, id: &NodeId) -> Result<Option<Member>, ()> {
    let path = [
        json::PathSeg::Key("members".into()),
        json::PathSeg::Key(id.to_string()),
    ];
    match json::get_path(doc, &path) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => serde_json::from_value(v).map(Some).map_err(|_| ()),
        Err(_) => Err(()),
    }
}

fn replay(
    cluster: &[u8; 32],
    changes: &[MemberChange],
    void: &BTreeMap<[u8; 32], RejectReason>,
) -> Replayer {
    let mut r = Replayer {
        state: Membership::default(),
        doc: Automerge::new(),
        tracker: Tracker::default(),
        applied: HashSet::new(),
        applied_changes: Vec::new(),
        accepted: Vec::new(),
        rejected: Vec::new(),
        slots: HashMap::new(),
        shadowed: Vec::new(),
        pos: 0,
        last_key: None,
    };
    for i in topo_order(changes) {
        let c = &changes[i];
        if void.contains_key(&c.hash) {
            r.pos += 1;
            continue;
        }
        r.step(cluster, c);
    }
    r
}

impl Replayer {
    /// Take the next change in replay order.
    fn step(&mut self, cluster: &[u8; 32], c: &MemberChange) {
        let pos = self.pos;
        self.pos += 1;
        self.last_key = Some((c.start_op, c.author.0, c.hash));
        if !c.deps.iter().all(|d| self.applied.contains(d)) {
            self.rejected.push((c.hash, RejectReason::DependsOnVoid));
            return;
        }
        if let Some(holder) = self.slots.get(&(c.author, c.seq)) {
            self.shadowed.push((c.hash, *holder));
            return;
        }
        let is_genesis = c.deps.is_empty() && c.hash == *cluster;
        if self.state.root.is_none() && !is_genesis {
            self.rejected.push((c.hash, RejectReason::WrongCluster));
            return;
        }
        let mut scratch = self.tracker.clone();
        let touch = scratch.touch(&c.change);
        let doc = &mut self.doc;
        let verdict = match panic_safe(|| doc.apply_changes([c.change.clone()])) {
            Some(Ok(())) => judge(&self.doc, &self.state, c, is_genesis, &touch),
            Some(Err(e)) => Err(RejectReason::Automerge(e.to_string())),
            None => Err(RejectReason::AutomergePanic),
        };
        match verdict {
            Ok((needed_admin, root, after)) => {
                let state = &mut self.state;
                // Seniority: new admins get this position as their rank.
                if is_genesis {
                    state.admin_rank.insert(root, 0);
                }
                for (id, m) in &after {
                    match m {
                        Some(m) if m.role == Role::Admin => {
                            state.admin_rank.entry(*id).or_insert(pos + 1);
                        }
                        _ => {
                            state.admin_rank.remove(id);
                        }
                    }
                    match m {
                        Some(m) => state.members.insert(*id, m.clone()),
                        None => state.members.remove(id),
                    };
                }
                state.root = Some(root);
                self.tracker = scratch;
                self.applied.insert(c.hash);
                self.slots.insert((c.author, c.seq), c.hash);
                self.applied_changes.push(c.change.clone());
                self.accepted.push((c.hash, needed_admin));
            }
            Err(reason) => {
                // Undo: rebuild the document from the accepted changes (rare path).
                let mut doc = Automerge::new();
                let prior = self.applied_changes.clone();
                if !matches!(panic_safe(|| doc.apply_changes(prior)), Some(Ok(()))) {
                    tracing::error!("membership replay could not rebuild its document");
                }
                self.doc = doc;
                self.rejected.push((c.hash, reason));
            }
        }
    }
}

/// The member entries a change made, as (id, new entry or None) pairs.
type Transitions = Vec<(NodeId, Option<Member>)>;

/// Judge a change already applied to `doc` against the running `state`.
fn judge(
    doc: &Automerge,
    state: &Membership,
    c: &MemberChange,
    is_genesis: bool,
    touch: &Touch,
) -> Result<(bool, NodeId, Transitions), RejectReason> {
    let unreadable = || RejectReason::NotAuthorized("leaves membership unreadable".into());
    let (root, after): (NodeId, Transitions) = match touch {
        Touch::All => {
            let (root, members) = Membership::read(doc).ok_or_else(unreadable)?;
            let ids: BTreeSet<NodeId> = state
                .members
                .keys()
                .chain(members.keys())
                .copied()
                .collect();
            let after = ids
                .into_iter()
                .map(|id| (id, members.get(&id).cloned()))
                .collect();
            (root, after)
        }
        Touch::Members(ids) => {
            let root = state.root.ok_or_else(unreadable)?;
            let mut after = Vec::with_capacity(ids.len());
            for id in ids {
                after.push((*id, read_member(doc, id).map_err(|_| unreadable())?));
            }
            (root, after)
        }
    };
    let after: Transitions = after
        .into_iter()
        .filter(|(id, m)| state.members.get(id) != m.as_ref())
        .collect();
    let needed_admin = if is_genesis {
        genesis_check(&c.author, &root, &after)?
    } else {
        transition_check(state, &c.author, &root, &after)?
    };
    for (id, now) in &after {
        if let Some(now) = now {
            validate_changed(state.members.get(id), now)
                .map_err(|e| RejectReason::InvalidMember(format!("{}: {e}", id.short())))?;
        }
    }
    Ok((needed_admin, root, after))
}

fn genesis_check(
    author: &NodeId,
    root: &NodeId,
    after: &Transitions,
) -> Result<bool, RejectReason> {
    let mine = after
        .iter()
        .find(|(id, _)| id == author)
        .and_then(|(_, m)| m.as_ref());
    if root != author || mine.map(|m| m.role) != Some(Role::Admin) {
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
    after: &Transitions,
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
    let mut needed_admin = false;
    for (id, now) in after {
        let before = state.members.get(id);
        let now = now.as_ref();
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
