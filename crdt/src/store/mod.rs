//! The durable store: signed changes in SQLite, documents in Automerge, reads from a
//! materialized view.
//!
//! # Data flow
//! * **Local write** ([`Store::write`], [`Store::write_batch`]): authorize the local key against
//!   membership → make the Automerge change on the in-memory document (loaded lazily) → sign →
//!   one SQLite transaction inserts the change and updates the materialized `kv` rows → commit
//!   (fsync) → only then is the signed change returned, for the caller to announce. A batch of
//!   writes shares one transaction and so one fsync (group commit). Scalar puts at top-level
//!   keys skip Automerge (`local_fast`): the change is built from the heads and the view's
//!   `kv.ops`, byte for byte what Automerge would make, and a loaded document catches up later.
//! * **Remote changes** ([`Store::ingest`]): authenticate every change without Automerge
//!   (frame, hash, signature, actor = signer; see [`crate::signed`]) → membership changes first,
//!   evaluated by the deterministic rule in [`crate::membership`] → per document: authorize,
//!   check dependencies, seq contiguity, equivocation (a second change at a used seq is stored
//!   as evidence and the document re-judged by [`crate::equivocation`]) and `start_op` → parse
//!   with Automerge under
//!   `catch_unwind` → apply the whole batch at once (one at a time is quadratic) → one SQLite
//!   transaction. A *fast forward* (a chain on our heads of root-level scalar puts, each
//!   overwriting exactly the values visible at its key: `kv.ops`) skips
//!   Automerge: the view rows are the written scalars and a loaded document catches up later in
//!   one batch (see `fast_forward_rows`); so do changes of such puts that cross ours
//!   (concurrent writers: `ingest_cross`). Changes that may become valid later (unknown author, missing dependencies,
//!   seq gap) wait in a bounded pending set and are retried whenever something is applied.
//! * **Reads** ([`Store::get`], [`Store::keys`], [`Store::list_docs`]) are served from the `kv`
//!   table, so opening the store and reading a document costs the same for 10 or 100k changes.
//!   Automerge is loaded lazily (from a snapshot plus the changes after it) only for writes
//!   other than scalar puts, conflicts and history, and at most [`Store::set_max_loaded_docs`] documents stay loaded
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
//!
//! # Layout
//! One file per concept: `read` (reads from SQLite), `durability` (WAL, fsync, locking),
//! `cache` (documents in memory), `write` (local writes), `local_fast` (the writer's fast
//! path), `persist` (committing accepted
//! changes and the view), `members` (local membership edits), `ingest` (received changes),
//! `ingest_cross` (received crossing puts without Automerge), `carry` (voided changes noted,
//! own void writes carried forward), `compact` (applying compaction cuts, see
//! [`crate::compaction`]), `ingest_membership` (received membership changes),
//! `rebuild` (re-judging a document) and `scrub` (checking what is read back from disk, the
//! background scrub, quarantine); `backup` (an online copy of the store, its verification
//! from scratch, and a restore). The past: `history_at` (a document at given heads, diffs),
//! `revert` (planning a revert to heads or the undo of one change), `blame` (who set each
//! leaf), `export` (Automerge and JSON export, import) and `audit_export` (audit bundles and
//! the in-memory store they are verified in, see [`crate::audit`]).
//! This file holds the public types, the [`Store`] itself, shared helpers and opening a store.

mod audit_export;
pub mod backup;
mod blame;
mod cache;
mod carry;
mod compact;
mod durability;
mod export;
mod history_at;
mod ingest;
mod ingest_cross;
mod ingest_membership;
mod local_fast;
mod members;
mod persist;
mod read;
mod rebuild;
mod revert;
mod scrub;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use automerge::{ActorId, Automerge, Change};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::error::{RejectReason, StoreError};
use crate::identity::{hex, NodeId, SecretKey};
use crate::json::{self, PathSeg};
use crate::membership::{self, Member, MemberChange, Membership, Role};
use crate::schema::{self, SchemaProblem};
use crate::signed::{ClusterId, SignedChange, MEMBERSHIP_DOC};

pub use blame::{BlameLeaf, BlameSetter};
use cache::Loaded;
pub use carry::{CarriedForward, Voided};
pub use compact::CutApplied;
pub use export::{import_content, ImportError};
pub use history_at::{format_heads, parse_heads, DiffEntry, DiffKind, HistoryError};
use ingest::PendingSet;
pub use revert::{UndoPlan, UndoSkipped};
pub use scrub::{ScrubStatus, ScrubStep};

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
        /// Path of the value to set, from the document root (empty: the root itself).
        path: Vec<PathSeg>,
        /// The new JSON value.
        value: Value,
    },
    /// Delete the value at a path.
    Delete {
        /// Path of the value to delete (not empty: the root cannot be deleted).
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
    /// Author's name in the membership document; for the base of the document's winning
    /// compaction cut (where its verified history starts), `cut N by ADMIN (history before it
    /// folded)`.
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

/// Documents a store keeps in memory by default (see [`Store::set_max_loaded_docs`]).
pub const DEFAULT_MAX_LOADED_DOCS: usize = 128;

/// Most fast-forward changes held back from a loaded document before they are applied.
const MAX_DEFERRED: usize = 1024;

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
    /// Whether local scalar puts at top-level keys skip Automerge (see `local_fast`); off
    /// only in tests that compare both paths.
    local_fast_path: bool,
    /// Damaged rows found by reads and the background scrub's position (see `scrub`).
    scrub: scrub::Scrub,
    /// Changes that became void here, until the caller drains them (see `carry`).
    voided_notes: VecDeque<Voided>,
    /// Changes that became void here since opening, by reason.
    voided_counts: BTreeMap<&'static str, u64>,
    /// This node's void writes carried forward since opening.
    carried_total: u64,
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
            local_fast_path: true,
            scrub: scrub::Scrub::default(),
            voided_notes: VecDeque::new(),
            voided_counts: BTreeMap::new(),
            carried_total: 0,
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
        crate::membership::validate_member(&member).map_err(StoreError::Invalid)?;
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
        store.repair_at_open()?;
        store.finish_cuts_at_open()?;
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
            if let Err(reason) = scrub::check_row(&hash, &author, &bytes) {
                // Not used; quarantined by `repair_at_open` (the evaluation runs without it).
                self.note_suspect(MEMBERSHIP_DOC, &hash, &reason);
                continue;
            }
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
}
