//! The API's response bodies as types, shared by the server (which serialises them) and the
//! CLI's client (which deserialises them): a field renamed on one side is a compile error on
//! the other, not a silent `null` in `lichen status`.
//!
//! Data flow: the node task builds these from the store and the sync engine → the handlers in
//! [`crate::api`] send them as JSON → [`crate::client`] reads them back → `main` prints them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /v1/docs/{doc}/{path…}`: a value and the document heads it was read at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ValueView {
    /// The document.
    pub(crate) doc: String,
    /// The path inside it, dotted (`limits.rate`; `""` for the whole document).
    pub(crate) path: String,
    /// The value.
    pub(crate) value: Value,
    /// The document heads (comma-separated hashes): the `ETag`.
    pub(crate) heads: String,
}

/// `PUT` and `DELETE` on a document: the change made (none when nothing changed) and the
/// document heads after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct WriteView {
    /// The signed change's hash, or null when the write changed nothing.
    pub(crate) hash: Option<String>,
    /// Whether a change was made.
    pub(crate) changed: bool,
    /// The document heads after the write (the `ETag`).
    #[serde(default)]
    pub(crate) heads: String,
}

/// One document's value under a prefix (`GET /v1/docs?prefix=P&values`), and one event of a
/// prefix watch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct DocValue {
    /// The whole document.
    pub(crate) value: Value,
    /// Its heads.
    pub(crate) heads: String,
}

/// One edit of a change in a history entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct EditView {
    /// Dotted path.
    pub(crate) path: String,
    /// `put`, `delete`, `insert`, `increment` or `splice`.
    pub(crate) action: String,
    /// The value written, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<Value>,
}

/// `?history`: one verified change, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct HistoryView {
    /// Change hash (hex).
    pub(crate) hash: String,
    /// Author node id.
    pub(crate) author: String,
    /// Author's name in the membership document.
    pub(crate) author_name: String,
    /// Per-author sequence number.
    pub(crate) seq: u64,
    /// Time the author claims (ms since the epoch).
    pub(crate) time_ms: i64,
    /// What the change did.
    pub(crate) edits: Vec<EditView>,
}

impl From<lichen_crdt::HistoryEntry> for HistoryView {
    fn from(h: lichen_crdt::HistoryEntry) -> HistoryView {
        HistoryView {
            hash: h.hash,
            author: h.author.to_string(),
            author_name: h.author_name,
            seq: h.seq,
            time_ms: h.time_ms,
            edits: h
                .edits
                .into_iter()
                .map(|e| EditView {
                    path: e.path,
                    action: e.action.to_string(),
                    value: e.value,
                })
                .collect(),
        }
    }
}

/// `GET /v1/members`: one member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct MemberView {
    /// Node id.
    pub(crate) id: String,
    /// Name.
    pub(crate) name: String,
    /// `admin`, `writer`, `reader` or `removed`.
    pub(crate) role: String,
    /// Where it listens.
    pub(crate) addrs: Vec<String>,
    /// Document prefixes it may write (empty: all).
    pub(crate) scopes: Vec<String>,
    /// Whether it founded the cluster.
    pub(crate) root: bool,
}

/// A membership change made: its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct HashView {
    /// The signed change's hash.
    pub(crate) hash: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct HealthView {
    /// `ok`.
    pub(crate) status: String,
}

/// This node, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct NodeView {
    /// Node id.
    pub(crate) id: String,
    /// Name.
    pub(crate) name: String,
    /// Role, or `not a member`.
    pub(crate) role: String,
    /// An admin removed it.
    pub(crate) revoked: bool,
    /// QUIC listen address.
    pub(crate) listen: String,
}

/// A peer, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PeerView {
    /// Node id.
    pub(crate) id: String,
    /// Name.
    pub(crate) name: String,
    /// Whether a connection is up.
    pub(crate) connected: bool,
    /// Its address on that connection.
    pub(crate) addr: Option<String>,
    /// Round-trip time.
    pub(crate) rtt_ms: Option<f64>,
    /// Since the last catch-up with it.
    pub(crate) last_sync_ms_ago: Option<u64>,
}

/// A document, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct DocStatusView {
    /// Name.
    pub(crate) doc: String,
    /// Heads (hashes).
    pub(crate) heads: Vec<String>,
    /// Valid changes.
    pub(crate) changes: u64,
}

/// The sync engine's counters, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct SyncStatsView {
    /// Messages sent.
    pub(crate) messages_sent: u64,
    /// Messages received.
    pub(crate) messages_received: u64,
    /// Bytes sent.
    pub(crate) bytes_sent: u64,
    /// Bytes received.
    pub(crate) bytes_received: u64,
    /// Changes applied.
    pub(crate) applied: u64,
    /// Changes rejected.
    pub(crate) rejected: u64,
    /// Pushes dropped (full queues).
    pub(crate) dropped_pushes: u64,
}

/// Damage found on disk, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct StorageView {
    /// Documents held in memory now (at most `max_loaded_docs` after each step).
    #[serde(default)]
    pub(crate) loaded_docs: u64,
    /// Changes found damaged since start.
    pub(crate) corrupt_found: u64,
    /// Ever.
    pub(crate) corrupt_ever: u64,
    /// Waiting for a peer's good copy.
    pub(crate) quarantined: u64,
    /// Healed.
    pub(crate) healed: u64,
    /// Snapshots dropped.
    pub(crate) snapshots_dropped: u64,
    /// Changes checked by the scrub since start.
    pub(crate) scrubbed: u64,
    /// Full scrub passes.
    pub(crate) scrub_passes: u64,
    /// Quarantined change hashes by document.
    pub(crate) quarantined_changes: BTreeMap<String, Vec<String>>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct StatusView {
    /// This node.
    pub(crate) node: NodeView,
    /// Cluster id.
    pub(crate) cluster: String,
    /// What another node passes to `lichen run --join`.
    pub(crate) join_token: Option<String>,
    /// Members this node syncs with.
    pub(crate) peers: Vec<PeerView>,
    /// Documents (with the membership document).
    pub(crate) docs: Vec<DocStatusView>,
    /// Received changes waiting for dependencies.
    pub(crate) pending_changes: u64,
    /// Writes held until the first catch-up after a start (null: not holding).
    pub(crate) writes_held: Option<u64>,
    /// Changed settings that apply only at the next start (from a SIGHUP reload).
    #[serde(default)]
    pub(crate) restart_pending: Vec<String>,
    /// Since the last catch-up with any connected peer.
    pub(crate) sync_lag_ms: u64,
    /// Refused changes by reason.
    pub(crate) rejected: BTreeMap<String, u64>,
    /// Changes not stored by reason.
    pub(crate) store_errors: BTreeMap<String, u64>,
    /// Sync counters.
    pub(crate) sync: SyncStatsView,
    /// Damage on disk.
    pub(crate) storage: StorageView,
    /// Changes voided since start, by reason.
    pub(crate) voided: BTreeMap<String, u64>,
    /// Own writes written again after they became void.
    pub(crate) carried_forward: u64,
    /// Keys flagged for equivocation.
    pub(crate) equivocators: Vec<String>,
    /// Every file binding's state, ordered by file (filled by the API from the render
    /// manager's board, not by the node task).
    #[serde(default)]
    pub(crate) bindings: Vec<BindingView>,
}

/// The outcome of a file binding's last check or reload command, in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct CommandOutcomeView {
    /// Whether it succeeded.
    pub(crate) ok: bool,
    /// Its exit code (0 on success; absent when it did not run or was killed).
    pub(crate) exit_code: Option<i32>,
    /// The failure, if any.
    pub(crate) error: Option<String>,
    /// When it finished, in milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
}

/// One file binding's state, in the status (kept by `render::Board`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub(crate) struct BindingView {
    /// The bound file.
    pub(crate) file: String,
    /// `doc`, `doc:path` or `template PATH`.
    pub(crate) source: String,
    /// `render`, `sync` (document bindings) or `template`.
    pub(crate) kind: String,
    /// The documents the last render read (a template's reads; the document otherwise).
    pub(crate) docs: Vec<String>,
    /// `LICHEN_HEADS` of the last render that reached the file (see `render::provenance`).
    pub(crate) heads: Option<String>,
    /// When the file was last found or made up to date, ms since the Unix epoch.
    pub(crate) rendered_at_ms: Option<u64>,
    /// Template evaluations (template bindings) or document reads (document bindings).
    pub(crate) renders: u64,
    /// Times the file was replaced.
    pub(crate) writes: u64,
    /// The last check command, if one ran.
    pub(crate) check: Option<CommandOutcomeView>,
    /// The last reload command, if one ran.
    pub(crate) reload: Option<CommandOutcomeView>,
    /// What holds the file back (a template error, a failed check or write), if anything.
    pub(crate) error: Option<String>,
    /// A new configuration of this binding that was not loaded (its template does not
    /// compile): the previous one keeps running.
    pub(crate) config_error: Option<String>,
    /// What the binding waits for (a document this node does not hold yet), if anything.
    pub(crate) waiting: Option<String>,
}

/// One Server-Sent Event of a watch (`event: value`, `id:` = the heads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct WatchEvent {
    /// The document.
    pub(crate) doc: String,
    /// Its heads after the change (`""` when the path holds nothing).
    pub(crate) heads: String,
    /// The watched path.
    pub(crate) path: String,
    /// The value (null when the path holds nothing).
    pub(crate) value: Value,
}

/// `POST /v1/members`: a member to add.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AddMemberRequest {
    /// Its node id.
    pub(crate) id: String,
    /// Its name (default: the id's short form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// Its role (default `writer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<String>,
    /// Where it listens.
    #[serde(default)]
    pub(crate) addrs: Vec<String>,
    /// Document prefixes it may write (empty: all).
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
}

/// `PATCH /v1/members/{id}`: the fields to change (absent: unchanged).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchMemberRequest {
    /// The new role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<String>,
    /// The new scopes (empty: every document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) scopes: Option<Vec<String>>,
}
