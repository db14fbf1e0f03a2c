//! A deterministic cluster simulator for the sync engine.
//!
//! Why it exists: convergence bugs show up only under particular interleavings of latency,
//! loss, partitions and crashes. Here one seed drives everything: N nodes, each a real
//! [`Store`] (SQLite file in a temp dir, fsync off, so every change is really verified) and a
//! [`SyncEngine`], connected by a simulated network. The same seed replays the same run
//! exactly; `LICHEN_SIM_SEED=<n>` replays one seed of a sweep.
//!
//! Data flow: a single event queue ordered by (time, seq) holds message deliveries, engine
//! timers and scripted actions (writes, partitions, crashes, membership changes). Processing an
//! event calls into one node's engine with that node's store wrapped in [`Checked`], which
//! records every `IngestReport`; the invariants are checked on each report right away. Messages
//! the engine emits are encoded to bytes (exercising the wire format), then dropped,
//! duplicated or delayed by the network model, and delivered only if the link is still up.
//! At quiescence, [`Sim::assert_converged`] compares heads and state on every honest node.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjType, ReadDoc, ROOT};
use lichen_crdt::header;
use lichen_crdt::sync::rng::SplitMix64;
use lichen_crdt::sync::{
    clocks_digest, store_frontiers, Clocks, Config, Event, Frontiers, Replica, SyncEngine,
    SyncMessage,
};
use lichen_crdt::{
    ClusterId, IngestReport, NodeId, Op, Outcome, PathSeg, SecretKey, SignedChange, Store,
    StoreError, MEMBERSHIP_DOC,
};
use serde_json::Value;

/// How a node behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runs the protocol honestly; must converge.
    Honest,
    /// Honest, but not a member at the start (an admin adds it during the run).
    Joiner,
    /// Holds a key that is not a member; its changes must never be applied.
    Forger,
    /// Holds a copy of another node's key and store; equivocates. Excluded from convergence.
    Clone,
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Each node links to this many random peers (plus a ring for connectivity); `None`: full mesh.
    pub degree: Option<usize>,
    /// One-way latency range in ms (uniform), so messages reorder.
    pub latency: (u64, u64),
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub dup: f64,
    /// Engine configuration.
    pub sync: Config,
    /// Check every ingest report (off for scale runs).
    pub check_every_step: bool,
    /// Only every `k`-th honest node is a member (writer); the others replicate without
    /// writing. `None`: every honest node is a member. (Scale runs keep the membership
    /// document small so that 10,000 stores fit in memory.)
    pub member_stride: Option<usize>,
    /// Stores live in SQLite `:memory:` databases instead of files (crash and restart are then
    /// unavailable). Lets scale runs exceed the open-file limit (3 descriptors per file store).
    pub in_memory: bool,
}

impl SimConfig {
    pub fn new(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            degree: None,
            latency: (5, 60),
            loss: 0.0,
            dup: 0.0,
            sync: Config::default(),
            check_every_step: true,
            member_stride: None,
            in_memory: false,
        }
    }

    pub fn lossy(mut self, loss: f64, dup: f64) -> SimConfig {
        self.loss = loss;
        self.dup = dup;
        self
    }

    pub fn degree(mut self, d: usize) -> SimConfig {
        self.degree = Some(d);
        self
    }
}

/// One simulated node.
pub struct Node {
    /// The node's own key: its transport identity (and, except for a clone, its signing key).
    pub key: SecretKey,
    /// The key its store signs with (a clone's is another node's key).
    pub sign_key: SecretKey,
    pub id: NodeId,
    pub path: PathBuf,
    pub store: Option<Store>,
    pub engine: Option<SyncEngine>,
    pub kind: Kind,
    timer: Option<u64>,
    restarts: u64,
    pub events: Vec<Event>,
    /// Messages and bytes this node put on the wire / received.
    pub sent: (u64, u64),
    pub received: (u64, u64),
}

impl Node {
    pub fn alive(&self) -> bool {
        self.engine.is_some()
    }

    /// Honest nodes and joiners must converge; forgers and clones are adversaries.
    pub fn honest(&self) -> bool {
        matches!(self.kind, Kind::Honest | Kind::Joiner)
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("node is running")
    }
}

/// A [`Replica`] that forwards to a real store and records every ingest report.
pub struct Checked<'a> {
    pub store: &'a mut Store,
    pub log: &'a mut Vec<IngestReport>,
}

impl Replica for Checked<'_> {
    fn clocks(&self) -> Result<Clocks, StoreError> {
        self.store.all_clocks()
    }
    fn changes_after(
        &self,
        doc: &str,
        author: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, StoreError> {
        self.store.changes_after(doc, author, after, limit)
    }
    fn get_change(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.store.get_change(hash)
    }
    fn get_any(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.store.get_stored(hash)
    }
    fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        let r = self.store.ingest(batch)?;
        self.log.push(r.clone());
        Ok(r)
    }
    fn frontiers(&self) -> Result<Frontiers, StoreError> {
        store_frontiers(self.store)
    }
    fn fork_evidence(&self, doc: &str, author: &NodeId) -> Result<Vec<SignedChange>, StoreError> {
        self.store.fork_evidence(doc, author)
    }
    fn wanted(&self, limit: usize) -> Result<Vec<[u8; 32]>, StoreError> {
        self.store.wanted_deps(limit)
    }
    fn holds_id(&self, id: &lichen_crdt::sync::ChangeId) -> Result<bool, StoreError> {
        Ok(self.store.find_by_prefix(id, false)?.is_some())
    }
    fn change_by_id(
        &self,
        id: &lichen_crdt::sync::ChangeId,
    ) -> Result<Option<SignedChange>, StoreError> {
        match self.store.find_by_prefix(id, true)? {
            Some(h) => self.store.get_change(&h),
            None => Ok(None),
        }
    }
}

/// The anti-entropy digest of a store (what its engine would send).
pub fn digest(s: &Store) -> [u8; 32] {
    clocks_digest(&s.all_clocks().unwrap(), &store_frontiers(s).unwrap())
}

type Action = Box<dyn FnOnce(&mut Sim)>;

enum Ev {
    Deliver {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
        at: u64,
    },
    Script(usize),
}

/// The simulator.
pub struct Sim {
    pub seed: u64,
    pub now: u64,
    rng: SplitMix64,
    pub cfg: SimConfig,
    pub cluster: ClusterId,
    pub nodes: Vec<Node>,
    adj: Vec<BTreeSet<usize>>,
    /// Partition group of each node: messages pass only within a group.
    groups: Vec<u64>,
    /// Only ring links (i, i+1 mod n) pass.
    ring_only: bool,
    /// Single links cut with [`Sim::cut`] (lower index first), restored by [`Sim::heal`].
    cut_links: std::collections::HashSet<(usize, usize)>,
    next_group: u64,
    index: HashMap<NodeId, usize>,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    script: Vec<Option<Action>>,
    _dir: tempfile::TempDir,
    /// Every change an honest node wrote or applied.
    pub accepted: BTreeSet<[u8; 32]>,
    /// Changes written by honest nodes (local writes).
    pub written: BTreeSet<[u8; 32]>,
    /// Keys whose changes no honest node may ever apply.
    pub forbidden_authors: BTreeSet<NodeId>,
    /// Changes no honest node may ever apply.
    pub forbidden_hashes: BTreeSet<[u8; 32]>,
    /// Whether a clone's writes go to `forbidden_hashes` (true by default). A clone online at
    /// the same time as the original is indistinguishable from it until both variants meet,
    /// so stories of concurrent equivocation turn this off and check the verdict at the end.
    pub clone_writes_forbidden: bool,
    /// Total messages and bytes put on the wire.
    pub wire: (u64, u64),
    /// Messages by kind.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Most (document, author) entries one `Clocks` message carried.
    pub max_clock_entries: usize,
    pub delivered: u64,
    /// Nodes left out of convergence checks for now (e.g. stalled on purpose).
    pub excluded: BTreeSet<usize>,
    /// Changes honest nodes noted as voided (see `Store::take_voided`).
    pub voided: Vec<lichen_crdt::Voided>,
    /// Void writes carried forward: (node, document, its void changes).
    pub carried: Vec<(usize, String, Vec<[u8; 32]>)>,
    counter: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix64::new(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// Sign a change for `cluster` (as the store signs its own).
pub fn sign(key: &SecretKey, cluster: &ClusterId, doc: &str, bytes: Vec<u8>) -> SignedChange {
    SignedChange::sign(key, cluster, doc, bytes).expect("well-formed change")
}

/// One membership change by `admin` adding every node of `ids` as a writer (building large
/// clusters with one change instead of thousands).
pub fn bulk_members(store: &Store, admin: &SecretKey, ids: &[NodeId], now: u64) -> SignedChange {
    let cluster = store.cluster_id();
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
    for (i, id) in ids.iter().enumerate() {
        if *id == admin.node_id() {
            continue;
        }
        let m = tx
            .put_object(&members, id.to_string(), ObjType::Map)
            .unwrap();
        tx.put(&m, "name", format!("n{i}")).unwrap();
        tx.put(&m, "role", "writer").unwrap();
        tx.put_object(&m, "addrs", ObjType::List).unwrap();
        tx.put_object(&m, "scopes", ObjType::List).unwrap();
        tx.put_object(&m, "cutoff", ObjType::Map).unwrap();
    }
    tx.commit_with(CommitOptions::default().with_time(now as i64));
    let change = am.get_last_local_change().expect("a change");
    sign(admin, &cluster, MEMBERSHIP_DOC, change.raw_bytes().to_vec())
}

impl Sim {
    /// Build a cluster: node 0 founds it (root admin), every other node is a writer. All
    /// honest stores start with the membership (as after joining); forgers are not members.
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        Sim::with_kinds(seed, cfg, &[])
    }

    /// Like [`Sim::new`], with some nodes of another kind (index, kind).
    pub fn with_kinds(seed: u64, cfg: SimConfig, kinds: &[(usize, Kind)]) -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = SplitMix64::new(seed);
        let n = cfg.nodes;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&mix(seed, i as u64).to_le_bytes());
            s[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let key = SecretKey::from_seed(s);
            let kind = kinds
                .iter()
                .find(|(k, _)| *k == i)
                .map(|(_, k)| *k)
                .unwrap_or(Kind::Honest);
            nodes.push(Node {
                id: key.node_id(),
                sign_key: key.clone(),
                key,
                path: dir.path().join(format!("node{i}.db")),
                store: None,
                engine: None,
                kind,
                timer: None,
                restarts: 0,
                events: Vec::new(),
                sent: (0, 0),
                received: (0, 0),
            });
        }
        let memory = std::path::Path::new(":memory:");
        let admin_path = if cfg.in_memory {
            memory
        } else {
            nodes[0].path.as_path()
        };
        let mut admin = Store::create(admin_path, &nodes[0].key, "n0", 0).expect("create");
        admin.set_no_sync().unwrap();
        let cluster = admin.cluster_id();
        let stride = cfg.member_stride.unwrap_or(1).max(1);
        let members: Vec<NodeId> = nodes
            .iter()
            .enumerate()
            .filter(|(i, x)| x.kind == Kind::Honest && i % stride == 0)
            .map(|(_, x)| x.id)
            .collect();
        let bulk = bulk_members(&admin, &nodes[0].key, &members, 1);
        let r = admin.ingest(vec![bulk.clone()]).unwrap();
        assert_eq!(r.applied_count(), 1, "bulk membership: {:?}", r.outcomes);
        let genesis = admin.get_change(&cluster).unwrap().unwrap();
        nodes[0].store = Some(admin);
        if cfg.in_memory {
            for node in nodes.iter_mut().skip(1) {
                let mut s = Store::join(memory, cluster).expect("join");
                s.set_no_sync().unwrap();
                if node.kind == Kind::Honest {
                    let r = s.ingest(vec![genesis.clone(), bulk.clone()]).unwrap();
                    assert_eq!(r.applied_count(), 2);
                }
                node.store = Some(s);
            }
        }
        // Members start as after joining and receiving the membership: one template store
        // verifies it once, then each member starts from a copy of that file (signature checks
        // dominate debug-mode run time).
        let template = dir.path().join("template.db");
        {
            let mut t = Store::join(&template, cluster).expect("join");
            t.set_no_sync().unwrap();
            let r = t.ingest(vec![genesis, bulk]).unwrap();
            assert_eq!(r.applied_count(), 2, "template: {:?}", r.outcomes);
        }
        let outsider = dir.path().join("outsider.db");
        drop(Store::join(&outsider, cluster).expect("join"));
        for node in nodes.iter_mut().skip(1).filter(|_| !cfg.in_memory) {
            let from = if node.kind == Kind::Honest {
                &template
            } else {
                &outsider
            };
            std::fs::copy(from, &node.path).expect("copy template store");
            let mut s = Store::open(&node.path, Some(cluster)).expect("open");
            s.set_no_sync().unwrap();
            node.store = Some(s);
        }
        // Topology: full mesh, or a ring plus random links up to the degree.
        let mut adj = vec![BTreeSet::new(); n];
        match cfg.degree {
            None => {
                for (a, set) in adj.iter_mut().enumerate() {
                    set.extend((0..n).filter(|b| *b != a));
                }
            }
            Some(d) => {
                for a in 0..n {
                    let b = (a + 1) % n;
                    if a != b {
                        adj[a].insert(b);
                        adj[b].insert(a);
                    }
                }
                for a in 0..n {
                    let mut tries = 0;
                    while adj[a].len() < d && tries < 4 * d {
                        tries += 1;
                        let b = rng.below(n as u64) as usize;
                        if b != a && adj[b].len() < d + d / 2 {
                            adj[a].insert(b);
                            adj[b].insert(a);
                        }
                    }
                }
            }
        }
        let mut sim = Sim {
            seed,
            now: 0,
            rng,
            cfg,
            cluster,
            nodes,
            adj,
            groups: vec![0; n],
            ring_only: false,
            cut_links: std::collections::HashSet::new(),
            next_group: 1,
            index: HashMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            script: Vec::new(),
            _dir: dir,
            accepted: BTreeSet::new(),
            written: BTreeSet::new(),
            forbidden_authors: BTreeSet::new(),
            forbidden_hashes: BTreeSet::new(),
            clone_writes_forbidden: true,
            wire: (0, 0),
            by_kind: BTreeMap::new(),
            max_clock_entries: 0,
            delivered: 0,
            excluded: BTreeSet::new(),
            voided: Vec::new(),
            carried: Vec::new(),
            counter: 0,
        };
        sim.index = sim
            .nodes
            .iter()
            .enumerate()
            .map(|(i, nd)| (nd.id, i))
            .collect();
        for i in 0..n {
            if sim.nodes[i].kind == Kind::Forger {
                sim.forbidden_authors.insert(sim.nodes[i].id);
            }
            sim.start_engine(i);
        }
        for i in 0..n {
            sim.refresh_links(i);
        }
        sim
    }

    fn start_engine(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let seed = mix(self.seed ^ 0x5eed, (i as u64) << 16 | node.restarts);
        node.engine = Some(SyncEngine::new(node.id, self.cfg.sync.clone(), seed));
        node.timer = None;
    }

    // ------------------------------------------------------------------ topology

    /// Whether a message from `a` to `b` can get through now.
    pub fn linked(&self, a: usize, b: usize) -> bool {
        let n = self.nodes.len();
        a != b
            && self.groups[a] == self.groups[b]
            && (!self.ring_only || (a + 1) % n == b || (b + 1) % n == a)
            && !self.cut_links.contains(&(a.min(b), a.max(b)))
            && self.adj[a].contains(&b)
            && self.nodes[a].alive()
            && self.nodes[b].alive()
    }

    /// Neighbours of `a` in the base topology.
    pub fn neighbours(&self, a: usize) -> Vec<usize> {
        self.adj[a].iter().copied().collect()
    }

    /// Tell node `a`'s engine which peers are up, per the current links.
    fn refresh_links(&mut self, a: usize) {
        if !self.nodes[a].alive() {
            return;
        }
        let now = self.now;
        let neigh: Vec<usize> = self.adj[a].iter().copied().collect();
        for b in neigh {
            let want = self.linked(a, b);
            let peer = self.nodes[b].id;
            let node = &mut self.nodes[a];
            let engine = node.engine.as_mut().expect("alive");
            let is_up = engine.peers_up().contains(&peer);
            if want && !is_up {
                let mut log = Vec::new();
                let mut rep = Checked {
                    store: node.store.as_mut().expect("alive"),
                    log: &mut log,
                };
                engine.peer_up(now, peer, &mut rep).expect("peer_up");
            } else if !want && is_up {
                engine.peer_down(now, peer);
            }
        }
        self.flush(a);
    }

    fn refresh_all(&mut self) {
        for a in 0..self.nodes.len() {
            self.refresh_links(a);
        }
    }

    /// Cut every link between the two sides (`side(i)` true or false); earlier cuts stay.
    pub fn split(&mut self, side: impl Fn(usize) -> bool) {
        let base = self.next_group;
        let mut map: HashMap<(u64, bool), u64> = HashMap::new();
        for i in 0..self.nodes.len() {
            let k = (self.groups[i], side(i));
            let next = map.len() as u64;
            self.groups[i] = base + *map.entry(k).or_insert(next);
        }
        self.next_group = base + map.len() as u64;
        self.refresh_all();
    }

    /// Cut every link of node `x`.
    pub fn isolate(&mut self, x: usize) {
        self.groups[x] = self.next_group;
        self.next_group += 1;
        self.refresh_all();
    }

    /// Cut the one link between `a` and `b` (both keep their other links).
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut_links.insert((a.min(b), a.max(b)));
        self.refresh_all();
    }

    /// Keep only the links between ring neighbours (i, i+1 mod n).
    pub fn ring(&mut self) {
        self.ring_only = true;
        self.refresh_all();
    }

    /// Restore every link.
    pub fn heal(&mut self) {
        self.groups.iter_mut().for_each(|g| *g = 0);
        self.ring_only = false;
        self.cut_links.clear();
        self.refresh_all();
    }

    /// Crash node `x`: its engine (all in-memory state) and store handle are dropped.
    pub fn crash(&mut self, x: usize) {
        self.nodes[x].engine = None;
        self.nodes[x].store = None;
        self.nodes[x].timer = None;
        for b in self.neighbours(x) {
            self.refresh_links(b);
        }
    }

    /// Restart node `x` from its own store file.
    pub fn restart(&mut self, x: usize) {
        let mut s = Store::open(&self.nodes[x].path, Some(self.cluster)).expect("reopen");
        s.set_no_sync().unwrap();
        self.nodes[x].store = Some(s);
        self.nodes[x].restarts += 1;
        self.start_engine(x);
        // As the agent does at start: a write voided before a crash is carried now.
        self.carry(x, true);
        self.refresh_links(x);
        for b in self.neighbours(x) {
            self.refresh_links(b);
        }
    }

    /// Restart every crashed node from its store.
    pub fn restart_crashed(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive() {
                self.restart(i);
            }
        }
    }

    /// Flow control: the transport from every neighbour to `x` is stuck (or unstuck).
    pub fn stall(&mut self, x: usize, stalled: bool) {
        let id = self.nodes[x].id;
        for b in self.neighbours(x) {
            if let Some(e) = self.nodes[b].engine.as_mut() {
                e.set_peer_ready(id, !stalled);
            }
            self.flush(b);
        }
    }

    // ------------------------------------------------------------------ actions

    /// Schedule `f` at time `t`.
    pub fn at(&mut self, t: u64, f: impl FnOnce(&mut Sim) + 'static) {
        self.script.push(Some(Box::new(f)));
        let idx = self.script.len() - 1;
        self.push(t, Ev::Script(idx));
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    /// Node `n` sets `key` of `doc` to a fresh value. Returns the change (if any).
    pub fn write(&mut self, n: usize, doc: &str, key: &str) -> Option<SignedChange> {
        self.counter += 1;
        let value = serde_json::json!({ "by": n, "n": self.counter });
        self.write_value(n, doc, key, value)
    }

    /// Node `n` sets `key` of `doc` to `value`.
    pub fn write_value(
        &mut self,
        n: usize,
        doc: &str,
        key: &str,
        value: Value,
    ) -> Option<SignedChange> {
        if !self.nodes[n].alive() {
            return None;
        }
        let now = self.now;
        let node = &mut self.nodes[n];
        let op = Op::Put {
            path: vec![PathSeg::Key(key.to_string())],
            value,
        };
        let change = node
            .store
            .as_mut()
            .unwrap()
            .write(&node.sign_key, doc, &op, now as i64)
            .unwrap_or_else(|e| panic!("seed {}: write by n{n} failed: {e}", self.seed))?;
        self.committed(n, vec![change.clone()]);
        Some(change)
    }

    /// Hand locally committed changes to node `n`'s engine.
    pub fn committed(&mut self, n: usize, changes: Vec<SignedChange>) {
        let now = self.now;
        if self.nodes[n].honest() {
            for c in &changes {
                let h = c.hash().unwrap();
                self.accepted.insert(h);
                self.written.insert(h);
            }
        } else if self.nodes[n].kind == Kind::Clone && self.clone_writes_forbidden {
            for c in &changes {
                self.forbidden_hashes.insert(c.hash().unwrap());
            }
        }
        let node = &mut self.nodes[n];
        let mut log = Vec::new();
        let mut rep = Checked {
            store: node.store.as_mut().unwrap(),
            log: &mut log,
        };
        node.engine
            .as_mut()
            .unwrap()
            .local_commit(now, &changes, &mut rep)
            .unwrap();
        self.flush(n);
    }

    /// What the agent does after its store voided changes: if one of them is this node's own
    /// (or `always`, at start), carry its void writes forward as a new change and push it.
    fn carry(&mut self, n: usize, always: bool) {
        if !self.nodes[n].alive() || !self.nodes[n].honest() {
            return;
        }
        let now = self.now;
        let node = &mut self.nodes[n];
        let me = node.sign_key.node_id();
        let store = node.store.as_mut().unwrap();
        let notes = store.take_voided();
        self.voided.extend(notes.iter().cloned());
        if !always && !notes.iter().any(|v| v.author == me) {
            return;
        }
        let carried = store
            .carry_forward(&node.sign_key, now as i64)
            .unwrap_or_else(|e| panic!("seed {}: n{n} carry-forward failed: {e}", self.seed));
        let mut changes = Vec::new();
        for c in carried {
            self.carried.push((n, c.doc.clone(), c.voided.clone()));
            changes.extend(c.change);
        }
        if !changes.is_empty() {
            self.committed(n, changes);
        }
    }

    /// Admin `admin` removes node `target` from the cluster.
    pub fn remove_member(&mut self, admin: usize, target: usize) -> SignedChange {
        let now = self.now;
        let id = self.nodes[target].id;
        let node = &mut self.nodes[admin];
        let c = node
            .store
            .as_mut()
            .unwrap()
            .remove_member(&node.sign_key, id, now as i64)
            .unwrap_or_else(|e| panic!("seed {}: remove failed: {e}", self.seed));
        self.committed(admin, vec![c.clone()]);
        c
    }

    /// Admin `admin` adds node `target` as a writer.
    pub fn add_member(&mut self, admin: usize, target: usize) -> SignedChange {
        let now = self.now;
        let id = self.nodes[target].id;
        let node = &mut self.nodes[admin];
        let c = node
            .store
            .as_mut()
            .unwrap()
            .add_member(
                &node.sign_key,
                id,
                &format!("n{target}"),
                lichen_crdt::Role::Writer,
                Vec::new(),
                Vec::new(),
                now as i64,
            )
            .unwrap_or_else(|e| panic!("seed {}: add failed: {e}", self.seed));
        self.committed(admin, vec![c.clone()]);
        c
    }

    /// Make node `x` a clone of node `of`: a copy of its store file and its signing key
    /// (as after copying a VM image). `of` is briefly restarted to copy a consistent file.
    pub fn clone_node(&mut self, x: usize, of: usize) {
        self.crash(x);
        self.crash(of);
        std::fs::copy(&self.nodes[of].path, &self.nodes[x].path).expect("copy store");
        for ext in ["-wal", "-shm"] {
            let p = format!("{}{ext}", self.nodes[x].path.display());
            let _ = std::fs::remove_file(p);
        }
        self.nodes[x].sign_key = self.nodes[of].sign_key.clone();
        self.restart(of);
        self.restart(x);
    }

    /// Deliver raw bytes from node `from` to node `to` one millisecond from now.
    pub fn inject_bytes(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        let t = self.now + 1;
        self.push(t, Ev::Deliver { from, to, bytes });
    }

    /// Inject raw changes from node `from` to node `to` (as if `from` pushed them).
    pub fn inject(&mut self, from: usize, to: usize, changes: Vec<SignedChange>) {
        let bytes = SyncMessage::Push { changes }.encode();
        let t = self.now + 1;
        self.push(t, Ev::Deliver { from, to, bytes });
    }

    // ------------------------------------------------------------------ running

    /// Process events up to and including time `t`.
    pub fn run_until(&mut self, t: u64) {
        while let Some(entry) = self.queue.first_entry() {
            let (when, _) = *entry.key();
            if when > t {
                break;
            }
            let ev = entry.remove();
            self.now = self.now.max(when);
            match ev {
                Ev::Deliver { from, to, bytes } => self.deliver(from, to, bytes),
                Ev::Timer { node, at } => {
                    if self.nodes[node].timer == Some(at) && self.nodes[node].alive() {
                        self.nodes[node].timer = None;
                        let now = self.now;
                        let mut log = Vec::new();
                        let nd = &mut self.nodes[node];
                        let mut rep = Checked {
                            store: nd.store.as_mut().unwrap(),
                            log: &mut log,
                        };
                        nd.engine
                            .as_mut()
                            .unwrap()
                            .handle_timeout(now, &mut rep)
                            .unwrap();
                        self.check(node, log);
                        self.carry(node, false);
                        self.flush(node);
                    }
                }
                Ev::Script(i) => {
                    if let Some(f) = self.script[i].take() {
                        f(self);
                    }
                }
            }
        }
        self.now = self.now.max(t);
    }

    fn deliver(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        if !self.linked(from, to) {
            return;
        }
        self.delivered += 1;
        let now = self.now;
        let peer = self.nodes[from].id;
        let mut log = Vec::new();
        let nd = &mut self.nodes[to];
        nd.received.0 += 1;
        nd.received.1 += bytes.len() as u64;
        let mut rep = Checked {
            store: nd.store.as_mut().unwrap(),
            log: &mut log,
        };
        nd.engine
            .as_mut()
            .unwrap()
            .handle_bytes(now, peer, &bytes, &mut rep)
            .unwrap_or_else(|e| panic!("seed {}: n{to} failed: {e}", self.seed));
        self.check(to, log);
        self.carry(to, false);
        self.flush(to);
    }

    /// Drain node `n`'s outputs: messages onto the network, events into its log, its timer.
    fn flush(&mut self, n: usize) {
        let Some(engine) = self.nodes[n].engine.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        while let Some((peer, msg)) = engine.poll_transmit() {
            out.push((peer, msg));
        }
        let mut events = Vec::new();
        while let Some(e) = engine.poll_event() {
            if self.cfg.check_every_step {
                events.push(e);
            }
        }
        self.nodes[n].events.extend(events);
        let engine = self.nodes[n].engine.as_ref().unwrap();
        let deadline = engine.poll_timeout();
        if let Some(d) = deadline {
            if self.nodes[n].timer != Some(d) {
                self.nodes[n].timer = Some(d);
                self.push(d, Ev::Timer { node: n, at: d });
            }
        }
        for (peer, msg) in out {
            let to = self.index_of(&peer);
            let bytes = msg.encode();
            let len = bytes.len() as u64;
            self.wire.0 += 1;
            self.wire.1 += len;
            if let SyncMessage::Clocks { clocks, .. } = &msg {
                let entries = clocks.values().map(|v| v.len()).sum::<usize>();
                self.max_clock_entries = self.max_clock_entries.max(entries);
            }
            let k = self.by_kind.entry(msg.kind()).or_default();
            k.0 += 1;
            k.1 += len;
            self.nodes[n].sent.0 += 1;
            self.nodes[n].sent.1 += len;
            if !self.linked(n, to) || self.rng.chance(self.cfg.loss) {
                continue;
            }
            let (lo, hi) = self.cfg.latency;
            let t = self.now + self.rng.range(lo, hi);
            if self.rng.chance(self.cfg.dup) {
                let t2 = self.now + self.rng.range(lo, hi);
                self.push(
                    t2,
                    Ev::Deliver {
                        from: n,
                        to,
                        bytes: bytes.clone(),
                    },
                );
            }
            self.push(t, Ev::Deliver { from: n, to, bytes });
        }
    }

    pub fn index_of(&self, id: &NodeId) -> usize {
        self.index[id]
    }

    // ------------------------------------------------------------------ invariants

    fn fail(&self, msg: String) -> ! {
        panic!("seed {}: invariant violated: {msg}", self.seed)
    }

    /// Check every ingest report of node `n` from the last step.
    fn check(&mut self, n: usize, log: Vec<IngestReport>) {
        if log.is_empty() || !self.cfg.check_every_step {
            if self.nodes[n].honest() {
                for r in &log {
                    self.accepted.extend(r.applied().copied());
                }
            }
            return;
        }
        let honest = self.nodes[n].honest();
        for r in log {
            let voided: HashSet<[u8; 32]> = r.voided.iter().copied().collect();
            for (doc, author, hash, o) in &r.outcomes {
                if *o != Outcome::Applied {
                    continue;
                }
                let Some(hash) = hash else {
                    self.fail(format!("n{n} applied a change without a hash"));
                };
                if honest && self.forbidden_authors.contains(author) {
                    self.fail(format!("honest n{n} applied a change by forger {author:?}"));
                }
                if honest && self.forbidden_hashes.contains(hash) {
                    self.fail(format!("honest n{n} applied an equivocating clone change"));
                }
                let store = self.nodes[n].store();
                match store.get_change(hash).unwrap() {
                    None if voided.contains(hash) => {}
                    None => self.fail(format!("n{n} reported {doc} applied but does not hold it")),
                    Some(c) if doc == MEMBERSHIP_DOC => {
                        let ok = Some(*author) == store.membership().root
                            || store.membership().get(author).is_some();
                        if !ok {
                            self.fail(format!(
                                "n{n} applied membership change by non-member {c:?}"
                            ));
                        }
                    }
                    Some(c) => {
                        let seq = header::parse(&c.bytes).unwrap().seq;
                        if let Err(e) = store.membership().authorize_write(author, doc, seq) {
                            self.fail(format!("n{n} holds unauthorized {c:?} seq {seq}: {e}"));
                        }
                    }
                }
                if honest {
                    self.accepted.insert(*hash);
                }
            }
        }
    }

    // ------------------------------------------------------------------ convergence

    fn honest_alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| {
                self.nodes[*i].honest() && self.nodes[*i].alive() && !self.excluded.contains(i)
            })
            .collect()
    }

    /// Whether every honest running node holds the same valid changes and knows the same
    /// forks (equal anti-entropy digests).
    pub fn converged(&self) -> bool {
        let h = self.honest_alive();
        let digests: BTreeSet<[u8; 32]> =
            h.iter().map(|i| digest(self.nodes[*i].store())).collect();
        digests.len() <= 1
    }

    /// Run (after `now`) until converged, checking every 100 ms, for at most `max_ms`.
    /// Returns the time it took.
    pub fn settle(&mut self, max_ms: u64) -> u64 {
        let start = self.now;
        while self.now < start + max_ms {
            let t = self.now + 100;
            self.run_until(t);
            if self.converged() {
                return self.now - start;
            }
        }
        self.fail(format!(
            "no convergence within {max_ms} ms: {}",
            self.describe_divergence()
        ))
    }

    fn describe_divergence(&self) -> String {
        let mut out = String::new();
        for i in self.honest_alive() {
            let c = self.nodes[i].store().all_clocks().unwrap();
            let summary: Vec<String> = c
                .iter()
                .map(|(d, v)| format!("{d}:{}", v.values().sum::<u64>()))
                .collect();
            out.push_str(&format!(
                "\n  n{i} pending={} {}",
                self.nodes[i].store().pending_len(),
                summary.join(" ")
            ));
        }
        out
    }

    /// The full quiescence check: identical heads and state of every document (membership
    /// included) on every honest running node; every accepted change present everywhere or
    /// void everywhere; no forbidden change held anywhere honest.
    pub fn assert_converged(&self) {
        let h = self.honest_alive();
        assert!(!h.is_empty());
        let mut docs: BTreeSet<String> = BTreeSet::new();
        docs.insert(MEMBERSHIP_DOC.to_string());
        for i in &h {
            docs.extend(self.nodes[*i].store().list_docs().unwrap());
        }
        let first = self.nodes[h[0]].store();
        for doc in &docs {
            let heads = first.heads(doc).unwrap();
            let state = first.get(doc, &[]).unwrap();
            for i in &h[1..] {
                let s = self.nodes[*i].store();
                if s.heads(doc).unwrap() != heads {
                    self.fail(format!("heads of {doc} differ between n{} and n{i}", h[0]));
                }
                // A document whose every change became void is empty: the same as absent.
                let empty = |v: Option<Value>| v.filter(|v| v != &serde_json::json!({}));
                if empty(s.get(doc, &[]).unwrap()) != empty(state.clone()) {
                    self.fail(format!("state of {doc} differs between n{} and n{i}", h[0]));
                }
            }
        }
        for hash in &self.accepted {
            let held = h
                .iter()
                .filter(|i| self.nodes[**i].store().get_change(hash).unwrap().is_some())
                .count();
            if held != 0 && held != h.len() {
                self.fail(format!(
                    "change {:02x?} held by {held} of {} honest nodes",
                    &hash[..4],
                    h.len()
                ));
            }
        }
        for hash in &self.forbidden_hashes {
            for i in &h {
                if self.nodes[*i].store().get_change(hash).unwrap().is_some() {
                    self.fail(format!("honest n{i} holds a clone's change"));
                }
            }
        }
        for i in &h {
            let s = self.nodes[*i].store();
            for a in &self.forbidden_authors {
                for (doc, vv) in s.all_clocks().unwrap() {
                    if vv.contains_key(a) {
                        self.fail(format!("honest n{i} holds {doc} changes by a forger"));
                    }
                }
            }
        }
    }

    /// Whether change `hash` is valid on every honest running node.
    pub fn everywhere(&self, hash: &[u8; 32]) -> bool {
        self.honest_alive()
            .iter()
            .all(|i| self.nodes[*i].store().get_change(hash).unwrap().is_some())
    }

    /// Whether change `hash` is valid on no honest running node.
    pub fn nowhere(&self, hash: &[u8; 32]) -> bool {
        self.honest_alive()
            .iter()
            .all(|i| self.nodes[*i].store().get_change(hash).unwrap().is_none())
    }

    /// Sum of a stat over all engines.
    pub fn total(&self, f: impl Fn(&lichen_crdt::sync::Stats) -> u64) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.engine.as_ref())
            .map(|e| f(e.stats()))
            .sum()
    }
}

/// Run `f` for every seed in `seeds` (or only `LICHEN_SIM_SEED`), printing the seed that fails.
pub fn sweep(name: &str, seeds: impl IntoIterator<Item = u64>, f: impl Fn(u64)) {
    let only = std::env::var("LICHEN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    // A wider sweep than the test's own: `LICHEN_SIM_SEEDS=0..400`.
    let range = std::env::var("LICHEN_SIM_SEEDS").ok().and_then(|s| {
        let (a, b) = s.split_once("..")?;
        Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?)
    });
    let seeds: Vec<u64> = match (only, range) {
        (Some(s), _) => vec![s],
        (None, Some(r)) => r.collect(),
        (None, None) => seeds.into_iter().collect(),
    };
    for seed in seeds {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed)));
        if let Err(e) = r {
            eprintln!("{name}: FAILED with seed {seed}; replay: LICHEN_SIM_SEED={seed} cargo test -p lichen-crdt --test simulation {name}");
            std::panic::resume_unwind(e);
        }
    }
}

/// A well-formed change by `key` on a fresh document `doc`, signed for `cluster`: what a
/// node holding `key` could produce on its own.
pub fn forged_change(key: &SecretKey, cluster: &ClusterId, doc: &str, value: &str) -> SignedChange {
    let mut am = Automerge::new();
    am.set_actor(ActorId::from(key.node_id().0.as_slice()));
    let mut tx = am.transaction();
    tx.put(ROOT, "evil", value).unwrap();
    tx.commit_with(
        CommitOptions::default()
            .with_time(0)
            .with_message(doc.to_string()),
    );
    let c = am.get_last_local_change().expect("a change");
    sign(key, cluster, doc, c.raw_bytes().to_vec())
}
