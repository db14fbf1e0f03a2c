//! The durable store: signed changes in SQLite, documents in Automerge, reads from a
//! materialized view.
//!
//! # Data flow
//! * **Local write** ([`Store::write`], [`Store::write_batch`]): authorize the local key against
//!   membership → make the Automerge change on the in-memory document (loaded lazily) → sign →
//!   one SQLite transaction inserts the change and updates the materialized `kv` rows → commit
//!   (fsync) → only then is the signed change returned, for the caller to announce. A batch of
//!   writes shares one transaction and so one fsync (group commit).
//! * **Remote changes** ([`Store::ingest`]): authenticate every change without Automerge
//!   (frame, hash, signature, actor = signer; see [`crate::signed`]) → membership changes first,
//!   evaluated by the deterministic rule in [`crate::membership`] → per document: authorize,
//!   check dependencies, seq contiguity, equivocation (a second change at a used seq is stored
//!   as evidence and the document re-judged by [`crate::equivocation`]) and `start_op` → parse
//!   with Automerge under
//!   `catch_unwind` → apply the whole batch at once (one at a time is quadratic) → one SQLite
//!   transaction. A *fast forward* (a chain on our heads of root-level scalar puts) skips
//!   Automerge: the view rows are the written scalars and a loaded document catches up later in
//!   one batch (see `fast_forward_rows`). Changes that may become valid later (unknown author, missing dependencies,
//!   seq gap) wait in a bounded pending set and are retried whenever something is applied.
//! * **Reads** ([`Store::get`], [`Store::keys`], [`Store::list_docs`]) are served from the `kv`
//!   table, so opening the store and reading a document costs the same for 10 or 100k changes.
//!   Automerge is loaded lazily (from a snapshot plus the changes after it) only for writes,
//!   conflicts and history, and at most [`Store::set_max_loaded_docs`] documents stay loaded
//!   ([`Store::trim_cache`] drops the least recently used; everything in them is on disk).
//!
//! # Durability and fsync policy
//! SQLite runs in WAL mode. By default every commit uses `synchronous = FULL`: it is fsynced
//! before `commit` returns, so an acknowledged write survives both a process crash (`kill -9`)
//! and a power loss. Concurrent writers share fsyncs by batching into one transaction
//! ([`Store::write_batch`]); the agent's writer task does this for requests that arrive while
//! a commit is in flight.
//!
//! [`Store::set_fsync_policy`] can relax this for changes received from peers (the agent's
//! default, `fsync = "local"`): they are committed with `synchronous = NORMAL`, which in WAL
//! mode survives a process crash (the commit is in the WAL, in the OS page cache) and keeps
//! the database consistent on a power loss, where the last received changes may roll back.
//! Nothing is lost by that: their authors fsynced them before announcing them, and
//! anti-entropy fetches them again (a node's digest reflects what it really holds after a
//! restart). A follower's apply path then costs no fsync, which is most of its latency.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use automerge::{ActorId, Automerge, Change, ChangeHash, ROOT};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::equivocation;
use crate::error::{RejectReason, StoreError};
use crate::header::ChangeHeader;
use crate::identity::{hex, NodeId, SecretKey};
use crate::json::{self, PathSeg};
use crate::membership::{self, Member, MemberChange, Membership, Role};
use crate::owners::Owners;
use crate::schema::{self, SchemaProblem};
use crate::signed::{valid_doc_name, ClusterId, SignedChange, MEMBERSHIP_DOC};

type Clocks = BTreeMap<String, BTreeMap<NodeId, u64>>;

/// Most changes held in the pending set.
pub const MAX_PENDING: usize = 10_000;
/// Most bytes held in the pending set.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// A local edit of a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Set the value at a path (creating intermediate maps), with minimal CRDT operations.
    Put {
        /// Where.
        path: Vec<PathSeg>,
        /// The new JSON value.
        value: Value,
    },
    /// Delete the value at a path.
    Delete {
        /// Where.
        path: Vec<PathSeg>,
    },
    /// Make the whole document equal to a JSON object, with minimal CRDT operations.
    Replace {
        /// The new content (must be an object).
        value: Value,
    },
}

/// What happened to one change offered to [`Store::ingest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored and applied.
    Applied,
    /// Already held.
    Duplicate,
    /// Held in the pending set until its dependencies or its author's membership arrive.
    Pending(RejectReason),
    /// Refused; not stored, not applied.
    Rejected(RejectReason),
}

/// The result of ingesting a batch.
#[derive(Debug, Default, Clone)]
pub struct IngestReport {
    /// Per offered change (in offered order, then retried pending changes): doc, author, hash
    /// (if it could be computed), outcome.
    pub outcomes: Vec<(String, NodeId, Option<[u8; 32]>, Outcome)>,
    /// Changes that were valid before and became void because of membership changes.
    pub voided: Vec<[u8; 32]>,
    /// Changes that were void before and became valid again.
    pub revived: Vec<[u8; 32]>,
    /// Documents whose content changed.
    pub changed_docs: BTreeSet<String>,
    /// Whether the evaluated membership changed.
    pub membership_changed: bool,
}

impl IngestReport {
    /// Hashes of the changes applied by this call (for relaying).
    pub fn applied(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.outcomes.iter().filter_map(|(_, _, h, o)| match o {
            Outcome::Applied => h.as_ref(),
            _ => None,
        })
    }

    /// Number of changes applied.
    pub fn applied_count(&self) -> usize {
        self.applied().count()
    }

    /// The rejected changes with their reasons.
    pub fn rejected(&self) -> impl Iterator<Item = &RejectReason> {
        self.outcomes.iter().filter_map(|(_, _, _, o)| match o {
            Outcome::Rejected(r) => Some(r),
            _ => None,
        })
    }
}

/// One verified entry of a document's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    /// Change hash (hex).
    pub hash: String,
    /// Author node id.
    pub author: NodeId,
    /// Author's name in the membership document.
    pub author_name: String,
    /// Per-author sequence number.
    pub seq: u64,
    /// Time the author claims, in milliseconds since the epoch (informational).
    pub time_ms: i64,
    /// What the change did.
    pub edits: Vec<Edit>,
}

/// One effect of a change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Edit {
    /// Dotted path.
    pub path: String,
    /// `put`, `delete`, `insert`, `increment` or `splice`.
    pub action: &'static str,
    /// The value written, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

struct Loaded {
    am: Automerge,
    /// Owner (top-level key) of each object, built on first need: see [`crate::owners`].
    owners: Option<Owners>,
    /// Stored fast-forward changes not yet applied to `am` (see [`fast_forward_rows`]):
    /// applied in one batch when the document is next needed.
    deferred: Vec<Change>,
    /// When it was last needed (the store's use counter), for [`Store::trim_cache`].
    last_used: u64,
}

impl Loaded {
    fn new(am: Automerge) -> Loaded {
        Loaded {
            am,
            owners: None,
            deferred: Vec::new(),
            last_used: 0,
        }
    }
}

/// Documents a store keeps in memory by default (see [`Store::set_max_loaded_docs`]).
pub const DEFAULT_MAX_LOADED_DOCS: usize = 128;

/// Most fast-forward changes held back from a loaded document before they are applied.
const MAX_DEFERRED: usize = 1024;

/// Changes that may become valid later, already authenticated (their signatures are not
/// checked again on retry), bounded in count and bytes: the oldest are dropped first (peers
/// offer them again through anti-entropy).
struct PendingSet {
    queue: VecDeque<(SignedChange, ChangeHeader)>,
    hashes: HashSet<[u8; 32]>,
    bytes: usize,
}

impl PendingSet {
    fn insert(&mut self, c: SignedChange, h: ChangeHeader) {
        if !self.hashes.insert(h.hash) {
            return;
        }
        self.bytes += c.bytes.len();
        self.queue.push_back((c, h));
        while self.queue.len() > MAX_PENDING || self.bytes > MAX_PENDING_BYTES {
            if let Some((old, oh)) = self.queue.pop_front() {
                self.bytes -= old.bytes.len();
                self.hashes.remove(&oh.hash);
            }
        }
    }

    fn drain(&mut self) -> Vec<(SignedChange, ChangeHeader)> {
        self.hashes.clear();
        self.bytes = 0;
        self.queue.drain(..).collect()
    }
}

/// Which top-level keys of a document's materialized view need refreshing.
enum Touched {
    /// Whatever changed since these heads (remote batches; found with an Automerge diff).
    Since(Vec<ChangeHash>),
    /// These keys (local edits know what they touched).
    Keys(BTreeSet<String>),
    /// Every key.
    All,
    /// Rows computed without Automerge (a fast-forward batch) and the heads after it.
    FastForward {
        heads: Vec<[u8; 32]>,
        rows: BTreeMap<String, Option<String>>,
    },
}

impl Touched {
    fn of_op(op: &Op) -> Touched {
        let first = match op {
            Op::Put { path, .. } | Op::Delete { path } => path.first(),
            Op::Replace { .. } => None,
        };
        match first {
            Some(PathSeg::Key(k)) => Touched::Keys([k.clone()].into()),
            _ => Touched::All,
        }
    }

    fn merge(self, other: Touched) -> Touched {
        match (self, other) {
            (Touched::Keys(mut a), Touched::Keys(b)) => {
                a.extend(b);
                Touched::Keys(a)
            }
            _ => Touched::All,
        }
    }
}

/// Row data of a change accepted for insertion.
struct Accepted {
    signed: SignedChange,
    header: ChangeHeader,
    change: Change,
    max_op: u64,
}

/// The store. Single-threaded: the agent gives it to one task.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    cluster: ClusterId,
    membership: Membership,
    member_changes: Vec<MemberChange>,
    /// The last membership evaluation, extended by new changes when they come after it.
    member_eval: Option<membership::Evaluation>,
    member_valid: HashSet<[u8; 32]>,
    /// Documents held in memory (Automerge, with their whole history), rebuilt from disk
    /// when needed: everything in them is also on disk.
    loaded: HashMap<String, Loaded>,
    /// Use counter for `loaded` (least recently used first out), and the cap.
    use_tick: u64,
    max_loaded: usize,
    pending: PendingSet,
    /// Cached version vectors (None: recompute from disk on next use).
    clocks: std::cell::RefCell<Option<Clocks>>,
    /// Authors flagged for equivocation per document, with their fork seq (see
    /// [`crate::equivocation`]); mirrors the status-3 rows.
    forks: BTreeMap<(String, NodeId), u64>,
    /// Fsync policy: for this node's own writes, and for changes received from peers.
    fsync_local: bool,
    fsync_remote: bool,
    /// The `synchronous` setting the connection has now (true: FULL, false: NORMAL).
    sync_full: bool,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// `StoreError::InUse` when SQLite says another connection holds the file.
fn in_use(path: &Path, e: &rusqlite::Error) -> Option<StoreError> {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
    .then(|| StoreError::InUse {
        path: path.display().to_string(),
    })
}

pub(crate) fn panic_safe<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn hashes_to_blob(h: &[[u8; 32]]) -> Vec<u8> {
    h.iter().flatten().copied().collect()
}

fn blob_to_hashes(b: &[u8]) -> Vec<[u8; 32]> {
    b.chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect()
}

fn member_json(m: &Member) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

impl Store {
    fn open_conn(path: &Path, create: bool) -> Result<(Connection, bool), StoreError> {
        let exists = path.exists()
            && std::fs::metadata(path)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        if create && exists {
            return Err(StoreError::Invalid(format!(
                "{} already exists; refusing to overwrite it",
                path.display()
            )));
        }
        if !create && !exists {
            return Err(StoreError::Invalid(format!(
                "{} does not exist (create or join a cluster first)",
                path.display()
            )));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | if create {
                OpenFlags::SQLITE_OPEN_CREATE
            } else {
                OpenFlags::empty()
            };
        let mut conn = Connection::open_with_flags(path, flags)?;
        // A non-database file fails here ("file is not a database"); so does a database that
        // another process holds exclusively (a running agent).
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(|e| in_use(path, &e).unwrap_or_else(|| corrupt(path, e.to_string())))?;
        match schema::prepare(&mut conn, create) {
            Ok(()) => {}
            Err(SchemaProblem::NotLichen) => {
                return Err(corrupt(
                    path,
                    "not a Lichen database (wrong application id)",
                ))
            }
            Err(SchemaProblem::Newer(v)) => {
                return Err(StoreError::NewerSchema {
                    path: path.display().to_string(),
                    found: v,
                    supported: schema::SCHEMA_VERSION,
                })
            }
            Err(SchemaProblem::Sql(e)) => return Err(corrupt(path, e.to_string())),
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| corrupt(path, e.to_string()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok((conn, create))
    }

    fn empty(conn: Connection, path: &Path, cluster: ClusterId) -> Store {
        Store {
            conn,
            path: path.to_path_buf(),
            cluster,
            membership: Membership::default(),
            member_changes: Vec::new(),
            member_eval: None,
            member_valid: HashSet::new(),
            loaded: HashMap::new(),
            use_tick: 0,
            max_loaded: DEFAULT_MAX_LOADED_DOCS,
            clocks: std::cell::RefCell::new(None),
            forks: BTreeMap::new(),
            fsync_local: true,
            fsync_remote: true,
            sync_full: true,
            pending: PendingSet {
                queue: VecDeque::new(),
                hashes: HashSet::new(),
                bytes: 0,
            },
        }
    }

    /// Found a new cluster: `key` becomes its root admin. Returns the store; its cluster id is
    /// the hash of the genesis change.
    pub fn create(
        path: &Path,
        key: &SecretKey,
        name: &str,
        now_ms: i64,
    ) -> Result<Store, StoreError> {
        let me = key.node_id();
        let mut am = Automerge::new().with_actor(ActorId::from(me.0.as_slice()));
        let member = Member {
            name: name.to_string(),
            role: Role::Admin,
            addrs: Vec::new(),
            scopes: Vec::new(),
            cutoff: BTreeMap::new(),
        };
        let mut tx = am.transaction();
        let ops = json::put_path(
            &mut tx,
            &[PathSeg::Key("root".into())],
            &Value::String(me.to_string()),
        )
        .and_then(|_| {
            json::put_path(
                &mut tx,
                &[PathSeg::Key("members".into()), PathSeg::Key(me.to_string())],
                &member_json(&member),
            )
        });
        if let Err(e) = ops {
            return Err(StoreError::Automerge(e.to_string()));
        }
        tx.commit_with(automerge::transaction::CommitOptions::default().with_time(now_ms));
        let change = am
            .get_last_local_change()
            .ok_or_else(|| StoreError::Automerge("genesis produced no change".into()))?;
        let cluster = change.hash().0;
        let (conn, _) = Self::open_conn(path, true)?;
        let mut store = Store::empty(conn, path, cluster);
        store.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('cluster_id', ?1)",
            params![cluster.to_vec()],
        )?;
        let signed = SignedChange::sign_hashed(
            key,
            &cluster,
            MEMBERSHIP_DOC,
            &cluster,
            change.raw_bytes().to_vec(),
        );
        let report = store.ingest(vec![signed])?;
        if report.applied_count() != 1 {
            return Err(StoreError::Automerge(format!(
                "genesis was not accepted: {:?}",
                report.outcomes
            )));
        }
        Ok(store)
    }

    /// Create an empty store for a node joining cluster `cluster`; it fills in by sync.
    pub fn join(path: &Path, cluster: ClusterId) -> Result<Store, StoreError> {
        let (conn, _) = Self::open_conn(path, true)?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('cluster_id', ?1)",
            params![cluster.to_vec()],
        )?;
        Ok(Store::empty(conn, path, cluster))
    }

    /// Open an existing store. If `expected` is given, the store must belong to that cluster.
    pub fn open(path: &Path, expected: Option<ClusterId>) -> Result<Store, StoreError> {
        let (conn, _) = Self::open_conn(path, false)?;
        let cluster: Vec<u8> = conn
            .query_row("SELECT value FROM meta WHERE key = 'cluster_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| corrupt(path, e.to_string()))?
            .ok_or_else(|| corrupt(path, "no cluster id recorded"))?;
        let cluster: ClusterId = cluster
            .try_into()
            .map_err(|_| corrupt(path, "cluster id is not 32 bytes"))?;
        if let Some(exp) = expected {
            if exp != cluster {
                return Err(StoreError::WrongCluster {
                    path: path.display().to_string(),
                    found: hex(&cluster),
                    expected: hex(&exp),
                });
            }
        }
        let mut store = Store::empty(conn, path, cluster);
        store.load_forks()?;
        store.load_membership()?;
        Ok(store)
    }

    /// Read the flagged forks (through the small partial index on status 3).
    fn load_forks(&mut self) -> Result<(), StoreError> {
        self.forks = self
            .doc_author_seqs(
                "SELECT doc, author, MIN(seq) FROM changes WHERE status = 3 GROUP BY doc, author",
            )?
            .into_iter()
            .map(|(doc, id, seq)| ((doc, id), seq))
            .collect();
        Ok(())
    }

    /// Rows of a `SELECT doc, author, <seq>` query (rows with a malformed author skipped).
    fn doc_author_seqs(&self, sql: &str) -> Result<Vec<(String, NodeId, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (doc, author, seq) = row?;
            if let Some(id) = NodeId::from_slice(&author) {
                out.push((doc, id, seq as u64));
            }
        }
        Ok(out)
    }

    fn load_membership(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT hash, author, seq, start_op, deps, bytes FROM changes WHERE doc = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![MEMBERSHIP_DOC], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (hash, author, seq, start_op, deps, bytes) = row?;
            let path = self.path.clone();
            let change = panic_safe(|| Change::try_from(bytes.as_slice()))
                .and_then(|r| r.ok())
                .ok_or_else(|| corrupt(&path, "a stored membership change does not parse"))?;
            changes.push(MemberChange {
                hash: hash.try_into().map_err(|_| corrupt(&path, "bad hash"))?,
                author: NodeId::from_slice(&author).ok_or_else(|| corrupt(&path, "bad author"))?,
                seq: seq as u64,
                start_op: start_op as u64,
                deps: blob_to_hashes(&deps),
                change,
            });
        }
        drop(stmt);
        let eval = membership::evaluate(&self.cluster, &changes);
        self.member_valid = eval.valid.iter().copied().collect();
        self.membership = eval.state.clone();
        self.member_changes = changes;
        self.forks.retain(|(d, _), _| d != MEMBERSHIP_DOC);
        for (a, f) in &eval.forks {
            self.forks.insert((MEMBERSHIP_DOC.to_string(), *a), *f);
        }
        self.member_eval = Some(eval);
        Ok(())
    }

    /// The cluster id (hash of the genesis change).
    pub fn cluster_id(&self) -> ClusterId {
        self.cluster
    }

    /// The evaluated membership.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of changes waiting in the pending set.
    pub fn pending_len(&self) -> usize {
        self.pending.queue.len()
    }

    // ------------------------------------------------------------------ reads

    /// Names of all documents (not including the membership document).
    pub fn list_docs(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT doc FROM docs WHERE doc != ?1 ORDER BY doc")?;
        let rows = stmt.query_map(params![MEMBERSHIP_DOC], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a document exists.
    pub fn has_doc(&self, doc: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM docs WHERE doc = ?1")?
            .exists(params![doc])?)
    }

    /// The value at `path` in `doc` (the whole document for an empty path), from the
    /// materialized view. `None` if the document or path does not exist.
    pub fn get(&self, doc: &str, path: &[PathSeg]) -> Result<Option<Value>, StoreError> {
        if !self.has_doc(doc)? {
            return Ok(None);
        }
        let Some((first, rest)) = path.split_first() else {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT key, value FROM kv WHERE doc = ?1 ORDER BY key")?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut map = serde_json::Map::new();
            for row in rows {
                let (k, v) = row?;
                map.insert(
                    k,
                    serde_json::from_str(&v).map_err(|e| corrupt(&self.path, e.to_string()))?,
                );
            }
            return Ok(Some(Value::Object(map)));
        };
        let key = match first {
            PathSeg::Key(k) => k.clone(),
            PathSeg::Index(_) => return Ok(None),
        };
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE doc = ?1 AND key = ?2")?
            .query_row(params![doc, key], |r| r.get(0))
            .optional()?;
        let Some(text) = text else { return Ok(None) };
        let mut value: Value =
            serde_json::from_str(&text).map_err(|e| corrupt(&self.path, e.to_string()))?;
        for seg in rest {
            let next = match (seg, value) {
                (PathSeg::Key(k), Value::Object(mut m)) => m.remove(k),
                (PathSeg::Key(k), Value::Array(mut a)) => match k.parse::<usize>() {
                    Ok(i) if i < a.len() => Some(a.swap_remove(i)),
                    _ => None,
                },
                (PathSeg::Index(i), Value::Array(mut a)) if *i < a.len() => Some(a.swap_remove(*i)),
                _ => None,
            };
            match next {
                Some(v) => value = v,
                None => return Ok(None),
            }
        }
        Ok(Some(value))
    }

    /// Keys of the object (or indices of the list) at `path`.
    pub fn keys(&self, doc: &str, path: &[PathSeg]) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self.get(doc, path)?.map(|v| match v {
            Value::Object(m) => m.keys().cloned().collect(),
            Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
            _ => Vec::new(),
        }))
    }

    /// Check that the materialized view of `doc` equals its Automerge document: `Ok(None)` if
    /// it does, otherwise both values (view, document). A consistency check for tests and
    /// operators; it loads the document.
    pub fn check_view(&mut self, doc: &str) -> Result<Option<(Value, Value)>, StoreError> {
        let view = self
            .get(doc, &[])?
            .unwrap_or(Value::Object(Default::default()));
        let truth = if self.has_doc(doc)? {
            json::to_json(&self.loaded_doc(doc)?.am, &ROOT)?
        } else {
            Value::Object(Default::default())
        };
        Ok((view != truth).then_some((view, truth)))
    }

    /// All concurrent values at `path` (winner first): more than one means a conflict.
    pub fn conflicts(&mut self, doc: &str, path: &[PathSeg]) -> Result<Vec<Value>, StoreError> {
        if !self.has_doc(doc)? {
            return Err(StoreError::NoSuchDocument(doc.to_string()));
        }
        let am = &self.loaded_doc(doc)?.am;
        Ok(json::conflicts_at(am, path)?)
    }

    /// Current heads of a document (sorted).
    pub fn heads(&self, doc: &str) -> Result<Vec<[u8; 32]>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT heads FROM docs WHERE doc = ?1")?
            .query_row(params![doc], |r| r.get(0))
            .optional()?;
        Ok(blob.map(|b| blob_to_hashes(&b)).unwrap_or_default())
    }

    /// Number of valid changes in a document.
    pub fn change_count(&self, doc: &str) -> Result<u64, StoreError> {
        let n: Option<i64> = self
            .conn
            .prepare_cached("SELECT n_changes FROM docs WHERE doc = ?1")?
            .query_row(params![doc], |r| r.get(0))
            .optional()?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Per-author highest valid seq of a document: its version vector.
    pub fn clock(&self, doc: &str) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        self.with_clocks(|c| c.get(doc).cloned().unwrap_or_default())
    }

    /// Version vectors of every document, including the membership document.
    pub fn all_clocks(&self) -> Result<BTreeMap<String, BTreeMap<NodeId, u64>>, StoreError> {
        self.with_clocks(|c| c.clone())
    }

    /// Run `f` on the cached version vectors, computing them from disk if needed.
    fn with_clocks<T>(&self, f: impl FnOnce(&Clocks) -> T) -> Result<T, StoreError> {
        if let Some(c) = self.clocks.borrow().as_ref() {
            return Ok(f(c));
        }
        let mut out: Clocks = BTreeMap::new();
        for (d, id, seq) in self.doc_author_seqs(
            "SELECT doc, author, MAX(seq) FROM changes WHERE status = 0 GROUP BY doc, author",
        )? {
            out.entry(d).or_default().insert(id, seq);
        }
        let r = f(&out);
        *self.clocks.borrow_mut() = Some(out);
        Ok(r)
    }

    /// Record newly stored valid changes in the cached version vectors.
    fn note_valid(&self, accepted: &[&Accepted]) {
        if let Some(c) = self.clocks.borrow_mut().as_mut() {
            for a in accepted {
                let e = c
                    .entry(a.signed.doc.clone())
                    .or_default()
                    .entry(a.signed.author)
                    .or_insert(0);
                *e = (*e).max(a.header.seq);
            }
        }
    }

    /// Let the write-ahead log grow to `pages` pages (of 4 KiB) before a commit copies it
    /// back into the database file (SQLite's `wal_autocheckpoint`; SQLite's default is 1000).
    ///
    /// The commit that crosses the mark pays for the checkpoint: every page changed since
    /// the last one is written back and the database file is fsynced. A bigger mark makes
    /// that rarer and cheaper per commit (a page rewritten by many commits is copied once)
    /// but each one longer, and the log file bigger on disk (~4 KiB per page; it keeps its
    /// largest size). Between 100 and 1,000,000.
    pub fn set_wal_autocheckpoint(&mut self, pages: u32) -> Result<(), StoreError> {
        if !(100..=1_000_000).contains(&pages) {
            return Err(StoreError::Invalid(format!(
                "the WAL checkpoint mark must be between 100 and 1000000 pages, not {pages}"
            )));
        }
        self.conn
            .pragma_update(None, "wal_autocheckpoint", i64::from(pages))?;
        Ok(())
    }

    /// Copy the whole write-ahead log into the database file, so that the next commit
    /// starts the log again from its beginning (SQLite's `wal_checkpoint(RESTART)`); the
    /// database file is fsynced. Takes as long as a checkpoint inside a commit would
    /// (milliseconds): call it when idle, so that writes do not pay for it. The log file
    /// keeps its size: overwriting it in place is cheaper to fsync than growing it again
    /// (truncating it made the next burst of writes ~0.2 ms slower each on ext4).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(StoreError::CommitFailed(
                "the write-ahead log is in use; checkpoint not done".into(),
            ));
        }
        Ok(())
    }

    /// Keep at most `max` documents in memory after each [`Store::trim_cache`] (at least 1).
    /// A document in memory holds its whole Automerge history (~20 KiB for a small
    /// configuration document, much more for one with a long history); one that is needed
    /// again is rebuilt from its snapshot and the changes after it. Default
    /// [`DEFAULT_MAX_LOADED_DOCS`].
    pub fn set_max_loaded_docs(&mut self, max: usize) {
        self.max_loaded = max.max(1);
    }

    /// How many documents are in memory now.
    pub fn loaded_docs(&self) -> usize {
        self.loaded.len()
    }

    /// Once more than the cap ([`Store::set_max_loaded_docs`]) are in memory, drop the least
    /// recently used documents down to 7/8 of it (so that the sort is not paid on every call
    /// while documents are cycled through); returns how many were dropped. Nothing is lost: a
    /// document in memory is derived from what is on disk. Call between operations (the agent
    /// does after each batch of commands and messages), not in the middle of one.
    pub fn trim_cache(&mut self) -> usize {
        if self.loaded.len() <= self.max_loaded {
            return 0;
        }
        let keep = self.max_loaded - self.max_loaded / 8;
        let excess = self.loaded.len() - keep;
        let mut by_age: Vec<(u64, String)> = self
            .loaded
            .iter()
            .map(|(d, l)| (l.last_used, d.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, doc) in by_age.into_iter().take(excess) {
            self.loaded.remove(&doc);
        }
        excess
    }

    /// Hold the database for this connection until the store is dropped (SQLite's
    /// `locking_mode = EXCLUSIVE`, taken at once with an empty write transaction).
    ///
    /// A long-running owner (the agent) calls this after opening: every later transaction
    /// skips SQLite's per-transaction file locking (about 20 `fcntl` calls per received
    /// change in WAL mode), and a second process that opens the same file is refused with
    /// [`StoreError::InUse`] instead of sharing it. The OS releases the lock when the process
    /// dies, so a `kill -9` leaves nothing to clean up.
    pub fn hold_exclusive(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA locking_mode = EXCLUSIVE", [], |r| {
                r.get::<_, String>(0)
            })?;
        let taken = self
            .conn
            .execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(|e| in_use(&self.path, &e).unwrap_or_else(|| StoreError::from(e)));
        if taken.is_err() {
            // Leave the connection as it was: shared, per-transaction locks.
            let _ = self
                .conn
                .query_row("PRAGMA locking_mode = NORMAL", [], |r| {
                    r.get::<_, String>(0)
                });
        }
        taken
    }

    /// Turn fsync off (`false`) or on (`true`, the default) for every commit. Off trades
    /// power-loss durability for speed: a committed transaction still survives a process
    /// crash (`kill -9`), but the last ones may be lost on a power loss (the database stays
    /// consistent: WAL with `synchronous = NORMAL`).
    pub fn set_fsync(&mut self, on: bool) -> Result<(), StoreError> {
        self.set_fsync_policy(on, on)
    }

    /// Fsync this node's own writes (`local`) and changes received from peers (`remote`)
    /// separately. With `local = true, remote = false` every acknowledged write of this node
    /// survives a power loss, while received changes survive a process crash and, after a
    /// power loss, the last of them are fetched again from the peers that hold them (their
    /// authors fsynced them before announcing them).
    pub fn set_fsync_policy(&mut self, local: bool, remote: bool) -> Result<(), StoreError> {
        self.fsync_local = local;
        self.fsync_remote = remote;
        // Force the next `sync_for` to set the pragma.
        self.sync_full = !local;
        self.sync_for(true)
    }

    /// Never sync at all (`synchronous = OFF`): commits survive a process crash, but a power
    /// loss may corrupt the database. For simulations and for benchmarks that measure the CPU
    /// cost of a commit; an agent uses [`Store::set_fsync_policy`].
    pub fn set_no_sync(&mut self) -> Result<(), StoreError> {
        self.set_fsync_policy(false, false)?;
        self.conn.pragma_update(None, "synchronous", "OFF")?;
        Ok(())
    }

    /// Set `synchronous` for the commits that follow: this node's own writes (`local`) or
    /// received changes.
    fn sync_for(&mut self, local: bool) -> Result<(), StoreError> {
        let full = if local {
            self.fsync_local
        } else {
            self.fsync_remote
        };
        if full != self.sync_full {
            self.conn
                .pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
            self.sync_full = full;
        }
        Ok(())
    }

    /// Valid changes of `author` in `doc` with seq > `after`, in seq order, at most `limit`.
    pub fn changes_after(
        &self,
        doc: &str,
        author: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, StoreError> {
        self.signed_rows(
            "SELECT sig, bytes FROM changes WHERE doc = ?1 AND author = ?2 AND seq > ?3 AND status = 0
             ORDER BY seq LIMIT ?4",
            doc,
            author,
            params![doc, author.0.to_vec(), after as i64, limit as i64],
        )
    }

    /// Changes of one (doc, author) from a `SELECT sig, bytes …` query.
    fn signed_rows(
        &self,
        sql: &str,
        doc: &str,
        author: &NodeId,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (sig, bytes) = row?;
            out.push(SignedChange {
                doc: doc.to_string(),
                author: *author,
                sig: sig
                    .try_into()
                    .map_err(|_| corrupt(&self.path, "bad signature length"))?,
                bytes,
            });
        }
        Ok(out)
    }

    /// A stored valid change by hash.
    pub fn get_change(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.get_with(hash, true)
    }

    /// A stored change by hash, valid or void.
    pub fn get_stored(&self, hash: &[u8; 32]) -> Result<Option<SignedChange>, StoreError> {
        self.get_with(hash, false)
    }

    fn get_with(&self, hash: &[u8; 32], valid: bool) -> Result<Option<SignedChange>, StoreError> {
        let sql = if valid {
            "SELECT doc, author, sig, bytes FROM changes WHERE hash = ?1 AND status = 0"
        } else {
            "SELECT doc, author, sig, bytes FROM changes WHERE hash = ?1"
        };
        let row = self
            .conn
            .prepare_cached(sql)?
            .query_row(params![hash.to_vec()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .optional()?;
        let Some((doc, author, sig, bytes)) = row else {
            return Ok(None);
        };
        Ok(Some(SignedChange {
            doc,
            author: NodeId::from_slice(&author).ok_or_else(|| corrupt(&self.path, "bad author"))?,
            sig: sig
                .try_into()
                .map_err(|_| corrupt(&self.path, "bad signature length"))?,
            bytes,
        }))
    }

    /// Keys flagged for equivocation (two different changes at the same doc, author and seq;
    /// see [`crate::equivocation`]), sorted.
    pub fn equivocators(&self) -> Result<Vec<NodeId>, StoreError> {
        let mut out: BTreeSet<NodeId> = self.forks.keys().map(|(_, a)| *a).collect();
        // Evidence kept by schema 1 (and for the membership document).
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT author FROM evidence")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        for r in rows {
            out.extend(NodeId::from_slice(&r?));
        }
        Ok(out.into_iter().collect())
    }

    /// Flagged forks: (document, author) → the seq from which the author's changes are void.
    pub fn forks(&self) -> &BTreeMap<(String, NodeId), u64> {
        &self.forks
    }

    /// Proof of a flagged fork: up to two stored variants of `author` at its fork seq in `doc`
    /// (what sync sends a peer that does not know the fork yet).
    pub fn fork_evidence(
        &self,
        doc: &str,
        author: &NodeId,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let Some(seq) = self.forks.get(&(doc.to_string(), *author)) else {
            return Ok(Vec::new());
        };
        self.signed_rows(
            "SELECT sig, bytes FROM changes WHERE doc = ?1 AND author = ?2 AND seq = ?3 AND status = 3
             ORDER BY hash LIMIT 2",
            doc,
            author,
            params![doc, author.0.to_vec(), *seq as i64],
        )
    }

    /// Current heads of every document (membership included), by name.
    pub fn all_heads(&self) -> Result<BTreeMap<String, Vec<[u8; 32]>>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT doc, heads FROM docs")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (doc, heads) = row?;
            let mut h = blob_to_hashes(&heads);
            h.sort();
            out.insert(doc, h);
        }
        Ok(out)
    }

    /// The hash of a stored change (only valid ones if `valid`) whose hash starts with
    /// `prefix` (through the hash index).
    pub fn find_by_prefix(
        &self,
        prefix: &[u8],
        valid: bool,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        let n = prefix.len().min(32);
        lo[..n].copy_from_slice(&prefix[..n]);
        hi[..n].copy_from_slice(&prefix[..n]);
        let sql = if valid {
            "SELECT hash FROM changes WHERE hash BETWEEN ?1 AND ?2 AND status = 0 LIMIT 1"
        } else {
            "SELECT hash FROM changes WHERE hash BETWEEN ?1 AND ?2 LIMIT 1"
        };
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached(sql)?
            .query_row(params![lo.to_vec(), hi.to_vec()], |r| r.get(0))
            .optional()?;
        Ok(h.and_then(|h| h.try_into().ok()))
    }

    /// Dependencies that the newest 1,024 changes waiting in the pending set lack (neither
    /// stored nor pending themselves), at most `limit`: what to ask a peer for by hash.
    pub fn wanted_deps(&self, limit: usize) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut out = BTreeSet::new();
        // The newest waiting changes only: this runs for every pull.
        for (_, h) in self.pending.queue.iter().rev().take(1024) {
            for d in &h.deps {
                if out.len() >= limit {
                    return Ok(out.into_iter().collect());
                }
                if !self.pending.hashes.contains(d) && !out.contains(d) && !self.has_change(d)? {
                    out.insert(*d);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Verified history of a document, optionally only the edits under `path`, newest last,
    /// at most `limit` entries (the newest ones).
    pub fn history(
        &mut self,
        doc: &str,
        path: &[PathSeg],
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        if !self.has_doc(doc)? {
            return Err(StoreError::NoSuchDocument(doc.to_string()));
        }
        type Row = (Vec<u8>, Vec<u8>, i64, i64, Vec<u8>);
        let rows: Vec<Row> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT hash, author, seq, time, deps FROM changes WHERE doc = ?1 AND status = 0 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let prefix = json::format_path(path);
        let names = self.membership.clone();
        let am = &self.loaded_doc(doc)?.am;
        let mut out = Vec::new();
        for (hash, author, seq, time, deps) in rows {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            let Some(author) = NodeId::from_slice(&author) else {
                continue;
            };
            let before: Vec<ChangeHash> =
                blob_to_hashes(&deps).into_iter().map(ChangeHash).collect();
            let patches = panic_safe(|| am.diff(&before, &[ChangeHash(hash)])).unwrap_or_default();
            let edits: Vec<Edit> = patches
                .into_iter()
                .filter_map(|p| patch_to_edit(am, p))
                .filter(|e| {
                    prefix.is_empty()
                        || e.path == prefix
                        || e.path.starts_with(&format!("{prefix}."))
                        || prefix.starts_with(&format!("{}.", e.path))
                })
                .collect();
            if !path.is_empty() && edits.is_empty() {
                continue;
            }
            out.push(HistoryEntry {
                hash: hex(&hash),
                author,
                author_name: names.name_of(&author),
                seq: seq as u64,
                time_ms: time,
                edits,
            });
        }
        let skip = out.len().saturating_sub(limit);
        Ok(out.split_off(skip))
    }

    // ------------------------------------------------------------------ local writes

    /// Make one local edit signed by `key`. Returns the committed signed change, or `None` if
    /// the edit changed nothing. The change is durable when this returns.
    pub fn write(
        &mut self,
        key: &SecretKey,
        doc: &str,
        op: &Op,
        now_ms: i64,
    ) -> Result<Option<SignedChange>, StoreError> {
        self.write_batch(key, &[(doc.to_string(), op.clone())], now_ms)
            .pop()
            .unwrap_or_else(|| Err(StoreError::Invalid("empty batch".into())))
    }

    /// Make several local edits in one SQLite transaction (one fsync): group commit.
    /// Each edit gets its own result; a failed edit does not affect the others.
    pub fn write_batch(
        &mut self,
        key: &SecretKey,
        ops: &[(String, Op)],
        now_ms: i64,
    ) -> Vec<Result<Option<SignedChange>, StoreError>> {
        let me = key.node_id();
        let mut results: Vec<Result<Option<SignedChange>, StoreError>> =
            (0..ops.len()).map(|_| Ok(None)).collect();
        let mut made: Vec<(Vec<usize>, Accepted)> = Vec::new();
        let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
        // Writes to the same document share one change (one signature, one Automerge
        // commit, one change for every peer to verify and apply), in request order.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (doc, _)) in ops.iter().enumerate() {
            match groups.iter_mut().find(|(d, _)| *d == doc.as_str()) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((doc.as_str(), vec![i])),
            }
        }
        for (doc, idx) in groups {
            let group: Vec<&Op> = idx.iter().map(|&i| &ops[i].1).collect();
            let attempt = self.make_local_change(key, &me, doc, &group, now_ms);
            type Made = Result<Option<(Accepted, Vec<bool>)>, StoreError>;
            let outcomes: Vec<(Vec<usize>, Made)> = match attempt {
                Ok(acc) => vec![(idx, Ok(acc))],
                // One of them failed: redo them one by one so that each caller gets
                // its own answer.
                Err(_) if idx.len() > 1 => idx
                    .iter()
                    .map(|&i| {
                        let r = self.make_local_change(key, &me, doc, &[&ops[i].1], now_ms);
                        (vec![i], r)
                    })
                    .collect(),
                Err(e) => vec![(idx, Err(e))],
            };
            for (idx, r) in outcomes {
                match r {
                    Ok(Some((acc, changed))) => {
                        for (&i, &c) in idx.iter().zip(&changed) {
                            if c {
                                results[i] = Ok(Some(acc.signed.clone()));
                                let t = match touched.remove(doc) {
                                    Some(prev) => prev.merge(Touched::of_op(&ops[i].1)),
                                    None => Touched::of_op(&ops[i].1),
                                };
                                touched.insert(doc.to_string(), t);
                            }
                        }
                        made.push((idx, acc));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        let mut e = Some(e);
                        for &i in &idx {
                            results[i] =
                                Err(e.take().unwrap_or_else(|| StoreError::Invalid(msg.clone())));
                        }
                    }
                }
            }
        }
        if made.is_empty() {
            return results;
        }
        let accepted: Vec<&Accepted> = made.iter().map(|(_, a)| a).collect();
        if let Err(e) = self
            .sync_for(true)
            .and_then(|()| self.persist(&accepted, &touched))
        {
            // Nothing was committed: forget the in-memory documents that ran ahead of disk.
            for doc in touched.keys() {
                self.loaded.remove(doc);
            }
            let msg = e.to_string();
            for (idx, _) in &made {
                for &i in idx {
                    results[i] = Err(match e {
                        StoreError::DiskFull => StoreError::DiskFull,
                        _ => StoreError::CommitFailed(msg.clone()),
                    });
                }
            }
        }
        results
    }

    fn make_local_change(
        &mut self,
        key: &SecretKey,
        me: &NodeId,
        doc: &str,
        ops: &[&Op],
        now_ms: i64,
    ) -> Result<Option<(Accepted, Vec<bool>)>, StoreError> {
        if !valid_doc_name(doc) || doc == MEMBERSHIP_DOC {
            return Err(StoreError::Invalid(format!(
                "`{doc}` is not a valid document name (lowercase a-z 0-9 . _ - separated by /)"
            )));
        }
        if let Some(f) = self.forks.get(&(doc.to_string(), *me)) {
            return Err(StoreError::Denied(format!(
                "this key signed two different changes at seq {f} of `{doc}` (a cloned key?), so \
                 its changes there from seq {f} on are void everywhere; remove this member and \
                 join again with a new key"
            )));
        }
        let next_seq = self.last_seq(doc, me)? + 1;
        self.membership
            .authorize_write(me, doc, next_seq)
            .map_err(|r| StoreError::Denied(format!("this node may not write `{doc}`: {r}")))?;
        let cluster = self.cluster;
        let loaded = self.loaded_doc_or_new(doc)?;
        loaded.am.set_actor(ActorId::from(me.0.as_slice()));
        let mut tx = loaded.am.transaction();
        let mut changed = Vec::with_capacity(ops.len());
        for op in ops {
            let res = match op {
                Op::Put { path, value } => json::put_path(&mut tx, path, value),
                Op::Delete { path } => json::delete_path(&mut tx, path),
                Op::Replace { value } => json::reconcile_root(&mut tx, value),
            };
            match res {
                Ok(c) => changed.push(c),
                Err(e) => {
                    tx.rollback();
                    return Err(e.into());
                }
            }
        }
        if !changed.iter().any(|c| *c) {
            tx.rollback();
            return Ok(None);
        }
        tx.commit_with(automerge::transaction::CommitOptions::default().with_time(now_ms));
        let change = loaded
            .am
            .get_last_local_change()
            .ok_or_else(|| StoreError::Automerge("no change after commit".into()))?;
        let header = crate::header::parse(change.raw_bytes())
            .map_err(|e| StoreError::Automerge(format!("own change does not parse: {e}")))?;
        let signed = SignedChange::sign_hashed(
            key,
            &cluster,
            doc,
            &header.hash,
            change.raw_bytes().to_vec(),
        );
        if let Some(owners) = loaded.owners.as_mut() {
            // Remember the objects this change creates (the keys are known from `op`).
            let _ = owners.touched([&change]);
        }
        let max_op = header.start_op - 1 + change.len() as u64;
        Ok(Some((
            Accepted {
                signed,
                header,
                change,
                max_op,
            },
            changed,
        )))
    }

    /// Add a member (admin only). The change is durable when this returns.
    #[allow(clippy::too_many_arguments)]
    pub fn add_member(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        name: &str,
        role: Role,
        addrs: Vec<String>,
        scopes: Vec<String>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        if role == Role::Removed {
            return Err(StoreError::Invalid("use remove to remove a member".into()));
        }
        if let Some(m) = self.membership.get(&id) {
            if m.role == Role::Removed {
                return Err(StoreError::Denied(format!(
                    "{id} was removed for good; a removed key cannot come back: generate a new key on that node"
                )));
            }
            return Err(StoreError::Invalid(format!(
                "{id} is already a member ({})",
                m.role.as_str()
            )));
        }
        let m = Member {
            name: name.to_string(),
            role,
            addrs,
            scopes,
            cutoff: BTreeMap::new(),
        };
        self.member_edit(key, &id, Some(m), now_ms)
    }

    fn member_record(&self, id: &NodeId) -> Result<Member, StoreError> {
        self.membership
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::Invalid(format!("{id} is not a member")))
    }

    /// Change a member's role (admin only). A demotion records the cut-off (see
    /// [`crate::membership`]).
    pub fn set_role(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        role: Role,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let mut m = self.member_record(&id)?;
        if role < m.role {
            m.cutoff = self.cutoff_for(&id)?;
        }
        m.role = role;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Change a member's scopes (admin only). Narrowing records the cut-off.
    pub fn set_scopes(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        scopes: Vec<String>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let mut m = self.member_record(&id)?;
        m.cutoff = self.cutoff_for(&id)?;
        m.scopes = scopes;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Remove a member for good (admin only), recording the revocation cut-off: the member's
    /// changes this node holds stay valid; any others it made are void everywhere.
    pub fn remove_member(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let mut m = self.member_record(&id)?;
        m.cutoff = self.cutoff_for(&id)?;
        m.role = Role::Removed;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Set this node's own advertised addresses (any member).
    pub fn set_own_addrs(
        &mut self,
        key: &SecretKey,
        addrs: Vec<String>,
        now_ms: i64,
    ) -> Result<Option<SignedChange>, StoreError> {
        let me = key.node_id();
        let mut m = self
            .membership
            .get(&me)
            .cloned()
            .ok_or_else(|| StoreError::Denied("this node is not a member yet".into()))?;
        if m.addrs == addrs {
            return Ok(None);
        }
        m.addrs = addrs;
        self.member_edit(key, &me, Some(m), now_ms).map(Some)
    }

    fn cutoff_for(&self, id: &NodeId) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT doc, MAX(seq) FROM changes WHERE author = ?1 AND status = 0 GROUP BY doc",
        )?;
        let rows = stmt.query_map(params![id.0.to_vec()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (d, s) = row?;
            out.insert(d, s as u64);
        }
        Ok(out)
    }

    fn member_edit(
        &mut self,
        key: &SecretKey,
        id: &NodeId,
        m: Option<Member>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let me = key.node_id();
        if self.membership.root.is_none() {
            return Err(StoreError::Denied(
                "membership has not been received yet: wait for sync with a member".into(),
            ));
        }
        if let Some(f) = self.forks.get(&(MEMBERSHIP_DOC.to_string(), me)) {
            return Err(StoreError::Denied(format!(
                "this key signed two different membership changes at seq {f} (a cloned key?), \
                 so its membership changes from seq {f} on are void everywhere; another admin \
                 must remove it, then join this machine again with a new key"
            )));
        }
        let mut am = self.membership_doc()?;
        am.set_actor(ActorId::from(me.0.as_slice()));
        let mut tx = am.transaction();
        let path = [PathSeg::Key("members".into()), PathSeg::Key(id.to_string())];
        let res = match &m {
            Some(m) => json::put_path(&mut tx, &path, &member_json(m)),
            None => json::delete_path(&mut tx, &path),
        };
        match res {
            Ok(true) => {}
            Ok(false) => {
                tx.rollback();
                return Err(StoreError::Invalid("nothing to change".into()));
            }
            Err(e) => {
                tx.rollback();
                return Err(e.into());
            }
        }
        tx.commit_with(automerge::transaction::CommitOptions::default().with_time(now_ms));
        let change = am
            .get_last_local_change()
            .ok_or_else(|| StoreError::Automerge("no change after commit".into()))?;
        let hash = change.hash().0;
        let signed = SignedChange::sign_hashed(
            key,
            &self.cluster,
            MEMBERSHIP_DOC,
            &hash,
            change.raw_bytes().to_vec(),
        );
        // The same rule that judges remote changes judges our own: check before storing.
        let mut candidate = self.member_changes.clone();
        let mine = MemberChange {
            hash,
            author: me,
            seq: change.seq(),
            start_op: change.start_op().get(),
            deps: change.deps().iter().map(|d| d.0).collect(),
            change: change.clone(),
        };
        candidate.push(mine.clone());
        let eval = self.evaluate_with(&candidate, &[mine]);
        if let Some(reason) = eval.void.get(&hash) {
            return Err(StoreError::Denied(format!(
                "membership change refused: {reason}"
            )));
        }
        // Our own membership change: committed with the local fsync policy.
        self.sync_for(true)?;
        let report = self.ingest_inner(vec![signed.clone()])?;
        match report.outcomes.first().map(|o| &o.3) {
            Some(Outcome::Applied) => Ok(signed),
            other => Err(StoreError::Denied(format!(
                "membership change not applied: {other:?}"
            ))),
        }
    }

    /// Evaluate membership over `all` (the held changes plus `new`), extending the cached
    /// evaluation when possible.
    fn evaluate_with(&self, all: &[MemberChange], new: &[MemberChange]) -> membership::Evaluation {
        match &self.member_eval {
            Some(prev) => membership::evaluate_extend(&self.cluster, prev, all, new),
            None => membership::evaluate(&self.cluster, all),
        }
    }

    fn membership_doc(&self) -> Result<Automerge, StoreError> {
        if let Some(e) = &self.member_eval {
            return Ok(e.doc.clone());
        }
        let mut am = Automerge::new();
        let changes: Vec<Change> = membership::topo_order(&self.member_changes)
            .into_iter()
            .map(|i| &self.member_changes[i])
            .filter(|c| self.member_valid.contains(&c.hash))
            .map(|c| c.change.clone())
            .collect();
        am.apply_changes(changes)
            .map_err(|e| StoreError::Automerge(e.to_string()))?;
        Ok(am)
    }

    // ------------------------------------------------------------------ documents in memory

    /// Highest seq of a valid change by `author` in `doc` (0 if none), from the cached
    /// version vectors (every write and ingest asks, so this must not be a query).
    fn last_seq(&self, doc: &str, author: &NodeId) -> Result<u64, StoreError> {
        self.with_clocks(|c| c.get(doc).and_then(|m| m.get(author)).copied().unwrap_or(0))
    }

    fn loaded_doc_or_new(&mut self, doc: &str) -> Result<&mut Loaded, StoreError> {
        if !self.loaded.contains_key(doc) {
            let am = if self.has_doc(doc)? {
                self.load_from_disk(doc)?
            } else {
                Automerge::new()
            };
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        let flushed = match self.loaded.get_mut(doc) {
            Some(l) if !l.deferred.is_empty() => {
                let changes = std::mem::take(&mut l.deferred);
                matches!(panic_safe(|| l.am.apply_changes(changes)), Some(Ok(())))
            }
            _ => true,
        };
        if !flushed {
            // Never expected (the changes passed every check); reload from disk instead.
            tracing::warn!(
                doc,
                "deferred changes did not apply in memory; reloading the document"
            );
            let am = self.load_from_disk(doc)?;
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        self.use_tick += 1;
        let tick = self.use_tick;
        let l = self
            .loaded
            .get_mut(doc)
            .ok_or_else(|| StoreError::NoSuchDocument(doc.to_string()))?;
        l.last_used = tick;
        Ok(l)
    }

    fn loaded_doc(&mut self, doc: &str) -> Result<&mut Loaded, StoreError> {
        self.loaded_doc_or_new(doc)
    }

    /// Load a document from its snapshot plus the valid changes after it.
    fn load_from_disk(&self, doc: &str) -> Result<Automerge, StoreError> {
        let (snapshot, upto): (Option<Vec<u8>>, i64) = self
            .conn
            .prepare_cached("SELECT snapshot, snapshot_upto FROM docs WHERE doc = ?1")?
            .query_row(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((None, 0));
        let (mut am, upto) = match snapshot
            .and_then(|s| panic_safe(|| Automerge::load(&s)))
            .and_then(|r| r.ok())
        {
            Some(am) => (am, upto),
            None => (Automerge::new(), 0),
        };
        let changes = self.valid_changes_after(doc, upto)?;
        let path = self.path.clone();
        panic_safe(|| am.apply_changes(changes))
            .ok_or_else(|| corrupt(&path, format!("document {doc} panicked on load")))?
            .map_err(|e| corrupt(&path, format!("document {doc}: {e}")))?;
        Ok(am)
    }

    fn valid_changes_after(&self, doc: &str, after_id: i64) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT bytes FROM changes WHERE doc = ?1 AND id > ?2 AND status = 0 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![doc, after_id], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for r in rows {
            let bytes = r?;
            let c = panic_safe(|| Change::try_from(bytes.as_slice()))
                .and_then(|r| r.ok())
                .ok_or_else(|| {
                    corrupt(
                        &self.path,
                        format!("a stored change of {doc} does not parse"),
                    )
                })?;
            out.push(c);
        }
        Ok(out)
    }

    /// Save Automerge snapshots of loaded documents that have many changes since their last
    /// snapshot, so later lazy loads are fast. Call when idle.
    pub fn maintenance(&mut self) -> Result<usize, StoreError> {
        let mut saved = 0;
        let docs: Vec<String> = self.loaded.keys().cloned().collect();
        for doc in docs {
            let (n, upto): (i64, i64) = self
                .conn
                .prepare_cached(
                    "SELECT (SELECT COUNT(*) FROM changes WHERE doc = ?1 AND id > d.snapshot_upto), d.snapshot_upto
                     FROM docs d WHERE d.doc = ?1",
                )?
                .query_row(params![doc], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .unwrap_or((0, 0));
            if n < 1000 {
                continue;
            }
            let _ = upto;
            let max_id: i64 = self.conn.query_row(
                "SELECT COALESCE(MAX(id), 0) FROM changes WHERE doc = ?1",
                params![doc],
                |r| r.get(0),
            )?;
            if !self.loaded.contains_key(&doc) {
                continue;
            }
            // Apply deferred changes first: the snapshot must hold everything up to max_id.
            let bytes = self.loaded_doc(&doc)?.am.save();
            self.conn.execute(
                "UPDATE docs SET snapshot = ?2, snapshot_upto = ?3 WHERE doc = ?1",
                params![doc, bytes, max_id],
            )?;
            saved += 1;
        }
        Ok(saved)
    }

    // ------------------------------------------------------------------ persistence

    /// Insert accepted changes and refresh the materialized view of the touched documents in
    /// one transaction. `touched` maps each document to its heads before these changes.
    fn persist(
        &mut self,
        accepted: &[&Accepted],
        touched: &BTreeMap<String, Touched>,
    ) -> Result<(), StoreError> {
        // Compute the view updates before opening the transaction.
        type ViewUpdate = (String, Vec<u8>, BTreeMap<String, Option<String>>);
        let mut updates: Vec<ViewUpdate> = Vec::new();
        for (doc, t) in touched {
            if let Touched::FastForward { heads, rows } = t {
                updates.push((doc.clone(), hashes_to_blob(heads), rows.clone()));
                continue;
            }
            let Some(l) = self.loaded.get(doc) else {
                continue;
            };
            let after = l.am.get_heads();
            let keys = match t {
                Touched::Since(before) => touched_keys(&l.am, before, &after),
                Touched::Keys(k) => k.clone(),
                Touched::FastForward { .. } => BTreeSet::new(),
                Touched::All => {
                    let mut k: BTreeSet<String> = self
                        .conn
                        .prepare_cached("SELECT key FROM kv WHERE doc = ?1")?
                        .query_map(params![doc], |r| r.get::<_, String>(0))?
                        .collect::<Result<_, _>>()?;
                    if let Value::Object(m) = json::to_json(&l.am, &ROOT)? {
                        k.extend(m.keys().cloned());
                    }
                    k
                }
            };
            let mut rows = BTreeMap::new();
            for k in keys {
                let v = json::get_path(&l.am, &[PathSeg::Key(k.clone())])?;
                rows.insert(k, v.map(|v| v.to_string()));
            }
            let heads: Vec<[u8; 32]> = after.iter().map(|h| h.0).collect();
            updates.push((doc.clone(), hashes_to_blob(&heads), rows));
        }
        let tx = self.conn.transaction()?;
        {
            insert_changes(&tx, accepted.iter().copied(), 0)?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO kv (doc, key, value) VALUES (?1, ?2, ?3)",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM kv WHERE doc = ?1 AND key = ?2")?;
            let mut docs = tx.prepare_cached(
                "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads, n_changes = n_changes + excluded.n_changes",
            )?;
            for (doc, heads, rows) in &updates {
                for (k, v) in rows {
                    match v {
                        Some(v) => put.execute(params![doc, k, v])?,
                        None => del.execute(params![doc, k])?,
                    };
                }
                let n = accepted.iter().filter(|a| &a.signed.doc == doc).count() as i64;
                docs.execute(params![doc, heads, n])?;
            }
        }
        tx.commit()?;
        self.note_valid(accepted);
        Ok(())
    }

    // ------------------------------------------------------------------ remote changes

    /// Verify and apply a batch of received changes (see module docs). Returns a per-change
    /// report; `Err` only for local failures (disk), in which case nothing was stored.
    pub fn ingest(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        self.sync_for(false)?;
        self.ingest_inner(batch)
    }

    fn ingest_inner(&mut self, batch: Vec<SignedChange>) -> Result<IngestReport, StoreError> {
        let mut report = IngestReport::default();
        let mut progress = self.ingest_round(batch, Vec::new(), &mut report, true)?;
        while progress && !self.pending.queue.is_empty() {
            let retry = self.pending.drain();
            progress = self.ingest_round(Vec::new(), retry, &mut report, false)?;
        }
        Ok(report)
    }

    fn ingest_round(
        &mut self,
        batch: Vec<SignedChange>,
        preauthed: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        record: bool,
    ) -> Result<bool, StoreError> {
        let cluster = self.cluster;
        // 1. Authenticate without Automerge (in parallel for big batches); changes retried
        //    from the pending set were authenticated when they arrived.
        let mut authed = authenticate_all(&batch, &cluster);
        let mut batch = batch;
        for (c, h) in preauthed {
            batch.push(c);
            authed.push(Ok(h));
        }
        let mut members: Vec<(SignedChange, ChangeHeader)> = Vec::new();
        let mut others: Vec<(SignedChange, ChangeHeader)> = Vec::new();
        let mut seen = HashSet::new();
        let mut outcome =
            |report: &mut IngestReport, c: &SignedChange, h: Option<[u8; 32]>, o: Outcome| {
                // Pending changes retried silently do not repeat their outcome.
                if record || !matches!(o, Outcome::Pending(_)) {
                    report.outcomes.push((c.doc.clone(), c.author, h, o));
                }
            };
        for (c, r) in batch.into_iter().zip(authed) {
            match r {
                Err(reason) => {
                    let h = c.hash();
                    outcome(report, &c, h, Outcome::Rejected(reason));
                }
                Ok(h) => {
                    if !seen.insert(h.hash) || self.has_change(&h.hash)? {
                        outcome(report, &c, Some(h.hash), Outcome::Duplicate);
                    } else if c.doc == MEMBERSHIP_DOC {
                        members.push((c, h));
                    } else {
                        others.push((c, h));
                    }
                }
            }
        }
        let mut progress = false;
        // 2. Membership first.
        if !members.is_empty() {
            progress |= self.ingest_membership(members, report, &mut outcome)?;
        }
        // 3. Config documents, grouped per document.
        let mut by_doc: BTreeMap<String, Vec<(SignedChange, ChangeHeader)>> = BTreeMap::new();
        for (c, h) in others {
            by_doc.entry(c.doc.clone()).or_default().push((c, h));
        }
        for (doc, changes) in by_doc {
            progress |= self.ingest_doc(&doc, changes, report, &mut outcome)?;
        }
        Ok(progress)
    }

    /// Whether a valid change with this hash is stored (an index probe; reads no bytes).
    pub fn has_valid_change(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM changes WHERE hash = ?1 AND status = 0")?
            .exists(params![hash.to_vec()])?)
    }

    fn has_change(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM changes WHERE hash = ?1")?
            .exists(params![hash.to_vec()])?)
    }

    /// Status and max_op of a stored change: `Some((valid, max_op))`.
    fn dep_info(&self, hash: &[u8; 32]) -> Result<Option<(bool, u64)>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT status, max_op FROM changes WHERE hash = ?1")?
            .query_row(params![hash.to_vec()], |r| {
                Ok((r.get::<_, i64>(0)? == 0, r.get::<_, i64>(1)? as u64))
            })
            .optional()?)
    }

    /// The hash of the stored valid change at (doc, author, seq), if any.
    fn hash_at(
        &self,
        doc: &str,
        author: &NodeId,
        seq: u64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT hash FROM changes WHERE doc = ?1 AND author = ?2 AND seq = ?3 AND status = 0",
            )?
            .query_row(params![doc, author.0.to_vec(), seq as i64], |r| r.get(0))
            .optional()?;
        Ok(h.and_then(|h| h.try_into().ok()))
    }

    /// Structural checks shared by all documents: deps, seq, equivocation, start_op, parse.
    /// `batch_info` holds (valid, max_op) of changes accepted earlier in this batch,
    /// `batch_seq` the last seq per author accepted in this batch and `batch_at` their hashes
    /// by (author, seq). Returns the parsed change, its max_op, and whether it is a *variant*:
    /// a second change at a seq where its author already has a valid change (equivocation
    /// evidence, see [`crate::equivocation`]).
    #[allow(clippy::too_many_arguments)]
    fn check_structure(
        &self,
        c: &SignedChange,
        h: &ChangeHeader,
        batch_info: &HashMap<[u8; 32], u64>,
        batch_seq: &HashMap<NodeId, u64>,
        batch_at: &HashMap<(NodeId, u64), [u8; 32]>,
    ) -> Result<Result<(Change, u64, bool), RejectReason>, StoreError> {
        // Dependencies.
        let mut max_dep_op = 0u64;
        let mut missing = 0usize;
        for d in &h.deps {
            if let Some(m) = batch_info.get(d) {
                max_dep_op = max_dep_op.max(*m);
                continue;
            }
            match self.dep_info(d)? {
                Some((true, m)) => max_dep_op = max_dep_op.max(m),
                Some((false, _)) => return Ok(Err(RejectReason::DependsOnVoid)),
                None => missing += 1,
            }
        }
        // Seq and equivocation.
        let last = match batch_seq.get(&c.author) {
            Some(s) => *s,
            None => self.last_seq(&c.doc, &c.author)?,
        };
        // A key flagged for equivocation in this document writes nothing more there.
        if !self.forks.is_empty()
            && self
                .forks
                .get(&(c.doc.clone(), c.author))
                .is_some_and(|f| h.seq >= *f)
        {
            return Ok(Err(RejectReason::Equivocation));
        }
        let mut variant = false;
        if h.seq <= last {
            let other = match batch_at.get(&(c.author, h.seq)) {
                Some(o) => Some(*o),
                None => self.hash_at(&c.doc, &c.author, h.seq)?,
            };
            match other {
                Some(o) if o != h.hash => variant = true,
                _ => return Ok(Err(RejectReason::Equivocation)),
            }
        }
        if missing > 0 {
            return Ok(Err(RejectReason::MissingDeps(missing)));
        }
        if !variant && h.seq > last + 1 {
            return Ok(Err(RejectReason::SeqGap { seq: h.seq, last }));
        }
        let expected = max_dep_op + 1;
        if h.start_op != expected {
            return Ok(Err(RejectReason::BadStartOp {
                got: h.start_op,
                expected,
            }));
        }
        // Only now, authenticated and structurally sound, does Automerge parse the bytes.
        let parsed = panic_safe(|| Change::try_from(c.bytes.as_slice()));
        let change = match parsed {
            None => return Ok(Err(RejectReason::AutomergePanic)),
            Some(Err(e)) => return Ok(Err(RejectReason::Automerge(e.to_string()))),
            Some(Ok(ch)) => ch,
        };
        if change.hash().0 != h.hash
            || change.seq() != h.seq
            || change.start_op().get() != h.start_op
        {
            return Ok(Err(RejectReason::Malformed(
                "automerge reads a different header",
            )));
        }
        let max_op = h.start_op - 1 + change.len() as u64;
        Ok(Ok((change, max_op, variant)))
    }

    fn ingest_membership(
        &mut self,
        changes: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        // Order within the batch by dependencies (parents first), then check structure.
        let ordered = order_by_deps(changes);
        let mut batch_info = HashMap::new();
        let mut batch_seq = HashMap::new();
        let mut batch_at = HashMap::new();
        let mut variant_slots: HashSet<(NodeId, u64)> = HashSet::new();
        let mut candidates: Vec<(SignedChange, ChangeHeader, Change, u64)> = Vec::new();
        for (c, h) in ordered {
            if self.membership.root.is_none() && h.deps.is_empty() && h.hash != self.cluster {
                outcome(
                    report,
                    &c,
                    Some(h.hash),
                    Outcome::Rejected(RejectReason::WrongCluster),
                );
                continue;
            }
            match self.check_structure(&c, &h, &batch_info, &batch_seq, &batch_at)? {
                Ok((_, _, true)) if !variant_slots.insert((c.author, h.seq)) => {
                    // One variant per (author, seq) per batch: judging a variant costs a
                    // replay of the membership document, so a flood of variants must not
                    // multiply it. A fork needs only two; a valid variant dropped here comes
                    // back with the next anti-entropy exchange (the heads differ).
                    outcome(
                        report,
                        &c,
                        Some(h.hash),
                        Outcome::Rejected(RejectReason::Equivocation),
                    );
                }
                Ok((change, max_op, variant)) => {
                    // A variant (a second change at a used seq: a cloned admin key?) is judged
                    // with the rest by the membership evaluation, which applies the fork rule
                    // of `crate::equivocation` to the membership document too.
                    batch_info.insert(h.hash, max_op);
                    if !variant {
                        batch_seq.insert(c.author, h.seq);
                        batch_at.insert((c.author, h.seq), h.hash);
                    }
                    candidates.push((c, h, change, max_op));
                }
                Err(r) if r.is_transient() => {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                }
                Err(r) => outcome(report, &c, Some(h.hash), Outcome::Rejected(r)),
            }
        }
        if candidates.is_empty() {
            return Ok(false);
        }
        let mut all = self.member_changes.clone();
        let mut new = Vec::with_capacity(candidates.len());
        for (c, h, change, _) in &candidates {
            new.push(MemberChange {
                hash: h.hash,
                author: c.author,
                seq: h.seq,
                start_op: h.start_op,
                deps: h.deps.clone(),
                change: change.clone(),
            });
        }
        all.extend(new.iter().cloned());
        let eval = self.evaluate_with(&all, &new);
        let new_valid: HashSet<[u8; 32]> = eval.valid.iter().copied().collect();
        // New changes: valid ones are stored; equivocation variants are stored void (status
        // 3: the proof sync ships to peers); other void ones rejected (not stored). A void
        // change whose author is not (yet) a member waits in the pending set.
        let mut accepted = Vec::new();
        let mut variants = Vec::new();
        for (c, h, change, max_op) in candidates {
            let reason = eval.void.get(&h.hash).cloned();
            let valid = new_valid.contains(&h.hash);
            if valid || reason == Some(RejectReason::Equivocation) {
                let a = Accepted {
                    signed: c,
                    header: h,
                    change,
                    max_op,
                };
                if valid { &mut accepted } else { &mut variants }.push(a);
            } else {
                let reason = reason.unwrap_or(RejectReason::NotAMember);
                all.retain(|m| m.hash != h.hash);
                if reason == RejectReason::NotAMember {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(reason));
                    self.pending.insert(c, h);
                } else {
                    outcome(report, &c, Some(h.hash), Outcome::Rejected(reason));
                }
            }
        }
        // Stored changes whose status changes: (hash, new status code, was valid).
        let flips: Vec<([u8; 32], i64, bool)> = self
            .member_changes
            .iter()
            .filter_map(|m| {
                let was = member_status(&self.member_valid, self.member_eval.as_ref(), &m.hash);
                let now = member_status(&new_valid, Some(&eval), &m.hash);
                (was != now).then_some((m.hash, now, was == 0))
            })
            .collect();
        let changed_members: BTreeSet<NodeId> = eval
            .state
            .members
            .iter()
            .filter(|(id, m)| self.membership.members.get(id) != Some(m))
            .map(|(id, _)| *id)
            .chain(
                self.membership
                    .members
                    .keys()
                    .filter(|id| !eval.state.members.contains_key(id))
                    .copied(),
            )
            .collect();
        // Persist: new membership changes, status flips, and the membership view.
        let tx = self.conn.transaction()?;
        {
            insert_changes(&tx, accepted.iter(), 0)?;
            insert_changes(&tx, variants.iter(), 3)?;
            let mut flip = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (h, status, _) in &flips {
                flip.execute(params![h.to_vec(), status])?;
            }
            let heads: Vec<[u8; 32]> = eval.doc.get_heads().iter().map(|h| h.0).collect();
            tx.execute(
                "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads, n_changes = excluded.n_changes",
                params![MEMBERSHIP_DOC, hashes_to_blob(&heads), eval.valid.len() as i64],
            )?;
            tx.execute("DELETE FROM kv WHERE doc = ?1", params![MEMBERSHIP_DOC])?;
            if let Ok(Value::Object(root)) = json::to_json(&eval.doc, &ROOT) {
                let mut put =
                    tx.prepare_cached("INSERT INTO kv (doc, key, value) VALUES (?1, ?2, ?3)")?;
                for (k, v) in root {
                    put.execute(params![MEMBERSHIP_DOC, k, v.to_string()])?;
                }
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        for a in &accepted {
            outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
        }
        if !variants.is_empty() {
            tracing::warn!(
                count = variants.len(),
                "equivocation in the membership document: a key signed two different changes \
                 at one seq; both variants and the key's later membership changes are void"
            );
        }
        for a in &variants {
            outcome(
                report,
                &a.signed,
                Some(a.header.hash),
                Outcome::Rejected(RejectReason::Equivocation),
            );
        }
        for (h, status, was_valid) in &flips {
            match (*was_valid, *status == 0) {
                (false, true) => report.revived.push(*h),
                (true, false) => report.voided.push(*h),
                _ => {}
            }
        }
        self.forks.retain(|(d, _), _| d != MEMBERSHIP_DOC);
        for (a, f) in &eval.forks {
            self.forks.insert((MEMBERSHIP_DOC.to_string(), *a), *f);
        }
        let changed = self.membership != eval.state;
        self.member_changes = all;
        self.member_valid = new_valid;
        self.membership = eval.state.clone();
        self.member_eval = Some(eval);
        if changed {
            report.membership_changed = true;
            report.changed_docs.insert(MEMBERSHIP_DOC.to_string());
            self.reevaluate_authors(&changed_members, report)?;
        }
        Ok(!accepted.is_empty() || !variants.is_empty() || changed)
    }

    /// After membership changed: re-judge stored changes by `authors` in every document;
    /// rebuild documents in which any change flipped between valid and void.
    fn reevaluate_authors(
        &mut self,
        authors: &BTreeSet<NodeId>,
        report: &mut IngestReport,
    ) -> Result<(), StoreError> {
        // (doc, hash, valid now as far as membership goes, was valid)
        let mut flips: Vec<(String, [u8; 32], bool, bool)> = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT doc, hash, seq, status FROM changes WHERE author = ?1 AND doc != ?2 ORDER BY id",
            )?;
            for a in authors {
                let rows = stmt.query_map(params![a.0.to_vec(), MEMBERSHIP_DOC], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
                for row in rows {
                    let (doc, hash, seq, status) = row?;
                    let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                        continue;
                    };
                    let mut ok = self.membership.authorize_write(a, &doc, seq as u64).is_ok();
                    // A void change whose seq was reused by a valid one stays void.
                    if ok && status == 1 {
                        ok = self.hash_at(&doc, a, seq as u64)?.is_none();
                    }
                    // Statuses 2 and 3 (equivocation) are not about membership: `rebuild`
                    // decides them again; here they count as "not revoked".
                    if ok != (status != 1) {
                        flips.push((doc, hash, ok, status == 0));
                    }
                }
            }
        }
        if flips.is_empty() {
            return Ok(());
        }
        let docs: BTreeSet<String> = flips.iter().map(|f| f.0.clone()).collect();
        let tx = self.conn.transaction()?;
        {
            let mut up = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (_, h, ok, _) in &flips {
                up.execute(params![h.to_vec(), if *ok { 0 } else { 1 }])?;
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        let mut revived = Vec::new();
        for (_, h, ok, was_valid) in &flips {
            if *ok {
                revived.push(*h);
            } else if *was_valid {
                report.voided.push(*h);
            }
        }
        for doc in docs {
            let (voided, again) = self.rebuild(&doc)?;
            // A revived change the equivocation rule voids again was never valid.
            revived.retain(|h| !voided.contains(h));
            report.voided.extend(
                voided
                    .into_iter()
                    .filter(|h| !flips.iter().any(|f| f.1 == *h)),
            );
            revived.extend(again);
            report.changed_docs.insert(doc);
        }
        report.revived.extend(revived);
        Ok(())
    }

    /// Re-judge a document from all its stored changes and rebuild it from the valid ones:
    /// changes whose dependencies are void become void, and the equivocation rule
    /// ([`crate::equivocation`]) decides statuses 2 and 3 afresh. Returns the hashes that
    /// became void and those that became valid again.
    #[allow(clippy::type_complexity)]
    fn rebuild(&mut self, doc: &str) -> Result<(Vec<[u8; 32]>, Vec<[u8; 32]>), StoreError> {
        self.loaded.remove(doc);
        type Row = (Vec<u8>, Vec<u8>, i64, i64, Vec<u8>, Vec<u8>);
        let rows: Vec<Row> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT hash, author, seq, status, deps, bytes FROM changes WHERE doc = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![doc], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut judged = Vec::with_capacity(rows.len());
        let mut old_status = Vec::with_capacity(rows.len());
        for (hash, author, seq, status, deps, _) in &rows {
            let (Ok(hash), Some(author)) = (
                <[u8; 32]>::try_from(hash.as_slice()),
                NodeId::from_slice(author),
            ) else {
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of {doc} is malformed"),
                ));
            };
            judged.push(equivocation::Row {
                hash,
                author,
                seq: *seq as u64,
                deps: blob_to_hashes(deps),
                base_void: *status == 1,
            });
            old_status.push(*status);
        }
        let verdict = equivocation::evaluate(&judged);
        let mut voided = Vec::new();
        let mut revived = Vec::new();
        let mut updates: Vec<([u8; 32], i64)> = Vec::new();
        let mut valid_count = 0usize;
        let mut changes = Vec::new();
        for (i, (_, _, _, _, _, bytes)) in rows.iter().enumerate() {
            let st = verdict.status[i];
            let (hash, was) = (judged[i].hash, old_status[i]);
            if st.code() != was {
                updates.push((hash, st.code()));
                match (was == 0, st == equivocation::Status::Valid) {
                    (true, false) => voided.push(hash),
                    (false, true) => revived.push(hash),
                    _ => {}
                }
            }
            if st != equivocation::Status::Valid {
                continue;
            }
            let Some(Ok(c)) = panic_safe(|| Change::try_from(bytes.as_slice())) else {
                return Err(corrupt(
                    &self.path,
                    format!("a stored change of {doc} does not parse"),
                ));
            };
            valid_count += 1;
            changes.push(c);
        }
        let mut am = Automerge::new();
        let path = self.path.clone();
        panic_safe(|| am.apply_changes(changes))
            .ok_or_else(|| corrupt(&path, format!("document {doc} panicked on rebuild")))?
            .map_err(|e| corrupt(&path, format!("document {doc}: {e}")))?;
        let heads: Vec<[u8; 32]> = am.get_heads().iter().map(|h| h.0).collect();
        let root = json::to_json(&am, &ROOT)?;
        let tx = self.conn.transaction()?;
        {
            let mut up = tx.prepare_cached("UPDATE changes SET status = ?2 WHERE hash = ?1")?;
            for (h, st) in &updates {
                up.execute(params![h.to_vec(), st])?;
            }
            tx.execute("DELETE FROM kv WHERE doc = ?1", params![doc])?;
            if let Value::Object(m) = root {
                let mut put =
                    tx.prepare_cached("INSERT INTO kv (doc, key, value) VALUES (?1, ?2, ?3)")?;
                for (k, v) in m {
                    put.execute(params![doc, k, v.to_string()])?;
                }
            }
            if valid_count == 0 {
                // A document none of whose changes stand does not exist.
                tx.execute("DELETE FROM docs WHERE doc = ?1", params![doc])?;
            } else {
                tx.execute(
                    "INSERT INTO docs (doc, heads, n_changes) VALUES (?1, ?2, ?3)
                     ON CONFLICT (doc) DO UPDATE SET heads = excluded.heads,
                        n_changes = excluded.n_changes, snapshot = NULL, snapshot_upto = 0",
                    params![doc, hashes_to_blob(&heads), valid_count as i64],
                )?;
            }
        }
        tx.commit()?;
        *self.clocks.borrow_mut() = None;
        if valid_count > 0 {
            self.loaded.insert(doc.to_string(), Loaded::new(am));
        }
        self.forks.retain(|(d, _), _| d != doc);
        for (author, seq) in verdict.forks {
            self.forks.insert((doc.to_string(), author), seq);
        }
        Ok((voided, revived))
    }

    fn ingest_doc(
        &mut self,
        doc: &str,
        changes: Vec<(SignedChange, ChangeHeader)>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        let ordered = order_by_deps(changes);
        let mut batch_info: HashMap<[u8; 32], u64> = HashMap::new();
        let mut batch_seq: HashMap<NodeId, u64> = HashMap::new();
        let mut batch_at: HashMap<(NodeId, u64), [u8; 32]> = HashMap::new();
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut variants: Vec<Accepted> = Vec::new();
        for (c, h) in ordered {
            if let Err(r) = self.membership.authorize_write(&c.author, doc, h.seq) {
                if r.is_transient() {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                } else {
                    outcome(report, &c, Some(h.hash), Outcome::Rejected(r));
                }
                continue;
            }
            match self.check_structure(&c, &h, &batch_info, &batch_seq, &batch_at)? {
                Ok((change, max_op, true)) => variants.push(Accepted {
                    signed: c,
                    header: h,
                    change,
                    max_op,
                }),
                Ok((change, max_op, false)) => {
                    batch_info.insert(h.hash, max_op);
                    batch_seq.insert(c.author, h.seq);
                    batch_at.insert((c.author, h.seq), h.hash);
                    accepted.push(Accepted {
                        signed: c,
                        header: h,
                        change,
                        max_op,
                    });
                }
                Err(r) if r.is_transient() => {
                    outcome(report, &c, Some(h.hash), Outcome::Pending(r));
                    self.pending.insert(c, h);
                }
                Err(r) => outcome(report, &c, Some(h.hash), Outcome::Rejected(r)),
            }
        }
        if accepted.is_empty() {
            return self.ingest_variants(doc, variants, report, outcome);
        }
        // Fast forward: a chain on top of our heads made only of root-level scalar puts needs
        // no Automerge to know the new view; it is applied to the in-memory document later,
        // in one batch, if and when that is needed (hot keys make single applies costly).
        if let Some(rows) = fast_forward_rows(&self.heads(doc)?, &accepted) {
            let heads = vec![accepted[accepted.len() - 1].header.hash];
            let mut flush = false;
            if let Some(l) = self.loaded.get_mut(doc) {
                l.deferred.extend(accepted.iter().map(|a| a.change.clone()));
                flush = l.deferred.len() >= MAX_DEFERRED;
            }
            let mut touched = BTreeMap::new();
            touched.insert(doc.to_string(), Touched::FastForward { heads, rows });
            let refs: Vec<&Accepted> = accepted.iter().collect();
            if let Err(e) = self.persist(&refs, &touched) {
                self.loaded.remove(doc);
                return Err(e);
            }
            if flush {
                self.loaded_doc(doc)?;
            }
            for a in &accepted {
                outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
            }
            report.changed_docs.insert(doc.to_string());
            self.ingest_variants(doc, variants, report, outcome)?;
            return Ok(true);
        }
        // Apply the whole batch to the in-memory document, containing any panic.
        let before = self.loaded_doc_or_new(doc)?.am.get_heads();
        let all: Vec<Change> = accepted.iter().map(|a| a.change.clone()).collect();
        let ok = {
            let l = self.loaded_doc_or_new(doc)?;
            matches!(panic_safe(|| l.am.apply_changes(all)), Some(Ok(())))
        };
        if !ok {
            // Find the culprits one by one on a fresh copy (rare path).
            self.loaded.remove(doc);
            let mut good = Vec::new();
            let mut bad: HashSet<[u8; 32]> = HashSet::new();
            for a in accepted {
                if a.header.deps.iter().any(|d| bad.contains(d)) {
                    outcome(
                        report,
                        &a.signed,
                        Some(a.header.hash),
                        Outcome::Rejected(RejectReason::DependsOnVoid),
                    );
                    bad.insert(a.header.hash);
                    continue;
                }
                let l = self.loaded_doc_or_new(doc)?;
                let mut trial = l.am.clone();
                match panic_safe(|| trial.apply_changes([a.change.clone()])) {
                    Some(Ok(())) => {
                        l.am = trial;
                        good.push(a);
                    }
                    Some(Err(e)) => {
                        outcome(
                            report,
                            &a.signed,
                            Some(a.header.hash),
                            Outcome::Rejected(RejectReason::Automerge(e.to_string())),
                        );
                        bad.insert(a.header.hash);
                    }
                    None => {
                        tracing::warn!(doc, author = %a.signed.author, "automerge panicked on an authenticated change; rejected");
                        outcome(
                            report,
                            &a.signed,
                            Some(a.header.hash),
                            Outcome::Rejected(RejectReason::AutomergePanic),
                        );
                        bad.insert(a.header.hash);
                    }
                }
            }
            accepted = good;
            if accepted.is_empty() {
                return self.ingest_variants(doc, variants, report, outcome);
            }
        }
        // The keys these changes touched, from their ops (Automerge's diff is the slow path).
        let keys = {
            let l = self.loaded_doc_or_new(doc)?;
            let am = &l.am;
            let owners = l.owners.get_or_insert_with(|| Owners::of_doc(am));
            owners.touched(accepted.iter().map(|a| &a.change))
        };
        let mut touched = BTreeMap::new();
        touched.insert(
            doc.to_string(),
            match keys {
                Some(k) => Touched::Keys(k),
                None => Touched::Since(before),
            },
        );
        let refs: Vec<&Accepted> = accepted.iter().collect();
        if let Err(e) = self.persist(&refs, &touched) {
            self.loaded.remove(doc);
            return Err(e);
        }
        for a in &accepted {
            outcome(report, &a.signed, Some(a.header.hash), Outcome::Applied);
        }
        report.changed_docs.insert(doc.to_string());
        self.ingest_variants(doc, variants, report, outcome)?;
        Ok(true)
    }

    /// Store equivocation variants (see [`crate::equivocation`]) and re-judge the document:
    /// the fork rule voids both variants and what depends on them, whatever order they came
    /// in. A variant is reported `Applied` only if it ends up valid (an honest author's reuse
    /// of a seq whose first change turned out void), else `Rejected(Equivocation)`.
    fn ingest_variants(
        &mut self,
        doc: &str,
        variants: Vec<Accepted>,
        report: &mut IngestReport,
        outcome: &mut impl FnMut(&mut IngestReport, &SignedChange, Option<[u8; 32]>, Outcome),
    ) -> Result<bool, StoreError> {
        if variants.is_empty() {
            return Ok(false);
        }
        tracing::warn!(
            doc,
            count = variants.len(),
            "equivocation: a key signed two different changes at one seq; keeping both as evidence"
        );
        let tx = self.conn.transaction()?;
        insert_changes(&tx, variants.iter(), 3)?;
        tx.commit()?;
        let (voided, revived) = self.rebuild(doc)?;
        report.voided.extend(voided);
        report.revived.extend(revived.iter().copied());
        report.changed_docs.insert(doc.to_string());
        for v in &variants {
            let o = if revived.contains(&v.header.hash) {
                Outcome::Applied
            } else {
                Outcome::Rejected(RejectReason::Equivocation)
            };
            outcome(report, &v.signed, Some(v.header.hash), o);
        }
        Ok(true)
    }
}

/// The `changes.status` code of a membership change under an evaluation: 0 valid, 3 void as
/// an equivocation (a fork variant or later by a flagged key), 1 void for another reason.
fn member_status(
    valid: &HashSet<[u8; 32]>,
    eval: Option<&membership::Evaluation>,
    hash: &[u8; 32],
) -> i64 {
    if valid.contains(hash) {
        0
    } else if eval.and_then(|e| e.void.get(hash)) == Some(&RejectReason::Equivocation) {
        3
    } else {
        1
    }
}

/// Insert accepted changes with `status` (0: valid); the caller owns the transaction.
fn insert_changes<'a>(
    tx: &rusqlite::Transaction<'_>,
    accepted: impl Iterator<Item = &'a Accepted>,
    status: i64,
) -> Result<(), StoreError> {
    let mut ins = tx.prepare_cached(
        "INSERT INTO changes (hash, doc, author, seq, start_op, max_op, time, deps, sig, bytes, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for a in accepted {
        ins.execute(params![
            a.header.hash.to_vec(),
            a.signed.doc,
            a.signed.author.0.to_vec(),
            a.header.seq as i64,
            a.header.start_op as i64,
            a.max_op as i64,
            a.header.time,
            hashes_to_blob(&a.header.deps),
            a.signed.sig.to_vec(),
            a.signed.bytes,
            status,
        ])?;
    }
    Ok(())
}

/// Authenticate every change; big batches use all cores (signature checks dominate).
fn authenticate_all(
    batch: &[SignedChange],
    cluster: &ClusterId,
) -> Vec<Result<ChangeHeader, RejectReason>> {
    // Small batches first: `available_parallelism` reads cgroup files (about ten system calls),
    // which would cost more than checking one pushed change.
    if batch.len() < 64 {
        return batch.iter().map(|c| c.authenticate(cluster)).collect();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if threads < 2 {
        return batch.iter().map(|c| c.authenticate(cluster)).collect();
    }
    let chunk = batch.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|c| c.authenticate(cluster))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Order changes so that a change comes after those of its dependencies present in the batch
/// (stable otherwise).
fn order_by_deps(changes: Vec<(SignedChange, ChangeHeader)>) -> Vec<(SignedChange, ChangeHeader)> {
    let in_batch: HashSet<[u8; 32]> = changes.iter().map(|(_, h)| h.hash).collect();
    let mut done: HashSet<[u8; 32]> = HashSet::new();
    let mut rest = changes;
    let mut out = Vec::with_capacity(rest.len());
    loop {
        let before = rest.len();
        let mut next = Vec::new();
        for (c, h) in rest {
            if h.deps
                .iter()
                .all(|d| !in_batch.contains(d) || done.contains(d))
            {
                done.insert(h.hash);
                out.push((c, h));
            } else {
                next.push((c, h));
            }
        }
        rest = next;
        if rest.is_empty() || rest.len() == before {
            out.extend(rest);
            return out;
        }
    }
}

/// The view rows after `accepted` if it is a fast forward: a chain (each change depends on
/// exactly the previous one, the first on exactly `heads`) whose ops are all puts of scalars
/// at keys of the root map. Then each op has a higher counter than every op the document holds
/// (its `start_op` was checked against its causal past, which is the whole document), so it is
/// the visible value at its key whatever its `pred` says, and the row is that scalar. Deletes,
/// increments, nested objects and concurrent changes take the Automerge path.
fn fast_forward_rows(
    heads: &[[u8; 32]],
    accepted: &[Accepted],
) -> Option<BTreeMap<String, Option<String>>> {
    use automerge::legacy::{Key, ObjectId, OpType};
    let mut prev: BTreeSet<[u8; 32]> = heads.iter().copied().collect();
    let mut rows = BTreeMap::new();
    for a in accepted {
        let deps: BTreeSet<[u8; 32]> = a.header.deps.iter().copied().collect();
        if deps != prev || deps.len() != a.header.deps.len() {
            return None;
        }
        let expanded = panic_safe(|| a.change.decode())?;
        for op in &expanded.operations {
            match (&op.obj, &op.key, &op.action, op.insert) {
                (ObjectId::Root, Key::Map(k), OpType::Put(v), false) => {
                    let v = json::scalar_to_json(v).to_string();
                    rows.insert(k.to_string(), Some(v));
                }
                _ => return None,
            }
        }
        prev = [a.header.hash].into();
    }
    Some(rows)
}

/// Top-level keys touched between two sets of heads.
fn touched_keys(am: &Automerge, before: &[ChangeHash], after: &[ChangeHash]) -> BTreeSet<String> {
    let patches = panic_safe(|| am.diff(before, after)).unwrap_or_default();
    let mut keys = BTreeSet::new();
    for p in patches {
        let key = match p.path.first() {
            Some((_, automerge::Prop::Map(k))) => Some(k.clone()),
            Some(_) => None,
            None => match &p.action {
                automerge::PatchAction::PutMap { key, .. } => Some(key.clone()),
                automerge::PatchAction::DeleteMap { key } => Some(key.clone()),
                automerge::PatchAction::Increment {
                    prop: automerge::Prop::Map(k),
                    ..
                } => Some(k.clone()),
                automerge::PatchAction::Conflict {
                    prop: automerge::Prop::Map(k),
                } => Some(k.clone()),
                _ => None,
            },
        };
        if let Some(k) = key {
            keys.insert(k);
        }
    }
    keys
}

fn patch_to_edit(am: &Automerge, p: automerge::Patch) -> Option<Edit> {
    use automerge::{PatchAction, Prop};
    let mut segs: Vec<PathSeg> = p
        .path
        .iter()
        .map(|(_, prop)| match prop {
            Prop::Map(k) => PathSeg::Key(k.clone()),
            Prop::Seq(i) => PathSeg::Index(*i),
        })
        .collect();
    let (action, value) = match p.action {
        PatchAction::PutMap { key, value, .. } => {
            segs.push(PathSeg::Key(key));
            ("put", Some(value_json(am, &value.0, &value.1)))
        }
        PatchAction::PutSeq { index, value, .. } => {
            segs.push(PathSeg::Index(index));
            ("put", Some(value_json(am, &value.0, &value.1)))
        }
        PatchAction::Insert { index, values, .. } => {
            segs.push(PathSeg::Index(index));
            let vals: Vec<Value> = values
                .iter()
                .map(|(v, id, _)| value_json(am, v, id))
                .collect();
            ("insert", Some(Value::Array(vals)))
        }
        PatchAction::DeleteMap { key } => {
            segs.push(PathSeg::Key(key));
            ("delete", None)
        }
        PatchAction::DeleteSeq { index, .. } => {
            segs.push(PathSeg::Index(index));
            ("delete", None)
        }
        PatchAction::Increment { prop, value } => {
            segs.push(match prop {
                Prop::Map(k) => PathSeg::Key(k),
                Prop::Seq(i) => PathSeg::Index(i),
            });
            ("increment", Some(Value::from(value)))
        }
        PatchAction::SpliceText { index, value, .. } => {
            segs.push(PathSeg::Index(index));
            ("splice", Some(Value::String(value.make_string())))
        }
        _ => return None,
    };
    Some(Edit {
        path: json::format_path(&segs),
        action,
        value,
    })
}

fn value_json(am: &Automerge, v: &automerge::Value<'_>, id: &automerge::ObjId) -> Value {
    match v {
        automerge::Value::Object(_) => json::to_json(am, id).unwrap_or(Value::Null),
        automerge::Value::Scalar(s) => json::scalar_to_json(s),
    }
}
