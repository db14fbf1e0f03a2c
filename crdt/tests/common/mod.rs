//! Shared helpers for the store tests: a small cluster of keys and stores in a tempdir.
#![allow(dead_code)]

use std::path::PathBuf;

use lichen_crdt::{
    parse_path, IngestReport, NodeId, Op, Outcome, Role, SecretKey, SignedChange, Store,
};
use serde_json::Value;

pub const T0: i64 = 1_700_000_000_000;

pub fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub admin: SecretKey,
    pub stores: Vec<Store>,
}

impl Cluster {
    /// A cluster founded by key 1, with `extra` more replicas joined (empty) and synced.
    pub fn new(replicas: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let admin = key(1);
        let root = Store::create(&dir.path().join("r0.db"), &admin, "root", T0).unwrap();
        let cluster = root.cluster_id();
        let mut stores = vec![root];
        for i in 1..replicas {
            let mut s = Store::join(&dir.path().join(format!("r{i}.db")), cluster).unwrap();
            s.set_fsync(false).unwrap();
            stores.push(s);
        }
        stores[0].set_fsync(false).unwrap();
        let mut c = Cluster { dir, admin, stores };
        c.sync_all();
        c
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn add(&mut self, who: &SecretKey, name: &str, role: Role, scopes: &[&str]) {
        let admin = self.admin.clone();
        self.stores[0]
            .add_member(
                &admin,
                who.node_id(),
                name,
                role,
                vec![],
                scopes.iter().map(|s| s.to_string()).collect(),
                T0,
            )
            .unwrap();
        self.sync_all();
    }

    /// Full anti-entropy between every pair (test helper, not the sync engine).
    pub fn sync_all(&mut self) {
        for _ in 0..3 {
            let all: Vec<SignedChange> = self.stores.iter().flat_map(all_changes).collect();
            for s in &mut self.stores {
                s.ingest(all.clone()).unwrap();
            }
        }
    }
}

/// Every valid change a store holds, membership first.
pub fn all_changes(s: &Store) -> Vec<SignedChange> {
    let clocks = s.all_clocks().unwrap();
    let mut docs: Vec<&String> = clocks.keys().collect();
    docs.sort_by_key(|d| (d.as_str() != lichen_crdt::MEMBERSHIP_DOC, d.to_string()));
    let mut out = Vec::new();
    for d in docs {
        for a in clocks[d].keys() {
            out.extend(s.changes_after(d, a, 0, usize::MAX >> 1).unwrap());
        }
    }
    out
}

pub fn put(s: &mut Store, k: &SecretKey, doc: &str, path: &str, v: Value) -> SignedChange {
    s.write(
        k,
        doc,
        &Op::Put {
            path: parse_path(path).unwrap(),
            value: v,
        },
        T0,
    )
    .unwrap()
    .expect("a change")
}

pub fn get(s: &Store, doc: &str, path: &str) -> Option<Value> {
    s.get(doc, &parse_path(path).unwrap()).unwrap()
}

/// The single outcome of ingesting one change.
pub fn outcome(r: &IngestReport) -> Outcome {
    r.outcomes.first().map(|o| o.3.clone()).expect("an outcome")
}

/// A snapshot of everything observable in a store, to prove a rejection changed nothing.
pub type Fingerprint = (Vec<(String, Vec<[u8; 32]>, Option<Value>)>, usize);

pub fn fingerprint(s: &Store) -> Fingerprint {
    let mut docs = s.list_docs().unwrap();
    docs.push(lichen_crdt::MEMBERSHIP_DOC.to_string());
    let v = docs
        .into_iter()
        .map(|d| {
            let h = s.heads(&d).unwrap();
            let g = s.get(&d, &[]).unwrap();
            (d, h, g)
        })
        .collect();
    (v, all_changes(s).len())
}

pub fn id(n: u8) -> NodeId {
    key(n).node_id()
}
