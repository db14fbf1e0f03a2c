//! Typed errors. Every rejection of a change names its reason ([`RejectReason`]), with a stable
//! label ([`RejectReason::label`]) used for metrics and logs.

use thiserror::Error;

/// Why a received or proposed change was not stored or applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The change is bigger than the size limit.
    #[error("change exceeds the size limit")]
    TooLarge,
    /// The bytes end before the chunk does.
    #[error("change bytes are truncated")]
    Truncated,
    /// The bytes are not a well-formed change chunk.
    #[error("malformed change: {0}")]
    Malformed(&'static str),
    /// The chunk's checksum does not match its content (a tampered byte).
    #[error("change hash does not match its content")]
    HashMismatch,
    /// The signature does not verify for this author, cluster, document and change hash.
    #[error("signature does not verify")]
    BadSignature,
    /// The Automerge actor of the change is not the key that signed it.
    #[error("change actor is not its signer")]
    ActorNotSigner,
    /// The author is not (yet) a member of the cluster.
    #[error("author is not a member")]
    NotAMember,
    /// The author's role does not allow this change.
    #[error("author's role does not allow this change: {0}")]
    NotAuthorized(String),
    /// The author may not write this document (outside its scopes).
    #[error("document is outside the author's scopes")]
    OutOfScope,
    /// The author was removed or demoted and the change is past the cut-off the removal recorded.
    #[error("author was revoked and this change is past the revocation cut-off")]
    Revoked,
    /// The change depends on a change that is void.
    #[error("change depends on a void change")]
    DependsOnVoid,
    /// The author's previous change (seq - 1) is not known.
    #[error("seq {seq} does not follow the author's last known seq {last}")]
    SeqGap {
        /// Sequence number of the offered change.
        seq: u64,
        /// Last sequence number held for this author and document.
        last: u64,
    },
    /// A different change already exists at this author and seq: the key is compromised or cloned.
    #[error("equivocation: another change exists at the same author and seq")]
    Equivocation,
    /// The change's seq or start_op is beyond what Automerge can hold (2^32).
    #[error("seq or start_op out of range")]
    InflatedStartOp,
    /// start_op does not match its causal past.
    #[error("start_op {got} does not match its causal past (expected {expected})")]
    BadStartOp {
        /// Claimed start_op.
        got: u64,
        /// Expected start_op.
        expected: u64,
    },
    /// Dependencies are not all known yet.
    #[error("{0} dependencies are missing")]
    MissingDeps(usize),
    /// Automerge refused the change after authentication.
    #[error("automerge refused the change: {0}")]
    Automerge(String),
    /// Automerge panicked on the change; the panic was contained.
    #[error("automerge panicked on the change")]
    AutomergePanic,
    /// The change is for the membership document of another cluster.
    #[error("change belongs to another cluster")]
    WrongCluster,
    /// The document name is invalid.
    #[error("invalid document name")]
    BadDocument,
    /// A membership change leaves a member entry that breaks the rules of
    /// [`crate::membership::validate_member`] (name, addresses, scopes).
    #[error("invalid member entry: {0}")]
    InvalidMember(String),
    /// The change is from before a compaction cut of its document (folded into the cut's
    /// base, or late for it and carried forward by its author): see [`crate::compaction`].
    #[error("change predates a cut of its document's history")]
    Compacted,
}

impl RejectReason {
    /// Every label [`RejectReason::label`] can return, sorted (for exporting each at zero).
    pub const LABELS: &'static [&'static str] = &[
        "actor_not_signer",
        "automerge_error",
        "automerge_panic",
        "bad_document",
        "bad_signature",
        "bad_start_op",
        "compacted",
        "depends_on_void",
        "equivocation",
        "hash_mismatch",
        "invalid_member",
        "malformed",
        "missing_deps",
        "not_a_member",
        "not_authorized",
        "out_of_scope",
        "revoked",
        "seq_gap",
        "too_large",
        "truncated",
        "wrong_cluster",
    ];

    /// A stable, low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Truncated => "truncated",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::HashMismatch => "hash_mismatch",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::ActorNotSigner => "actor_not_signer",
            RejectReason::NotAMember => "not_a_member",
            RejectReason::NotAuthorized(_) => "not_authorized",
            RejectReason::OutOfScope => "out_of_scope",
            RejectReason::Revoked => "revoked",
            RejectReason::DependsOnVoid => "depends_on_void",
            RejectReason::SeqGap { .. } => "seq_gap",
            RejectReason::Equivocation => "equivocation",
            RejectReason::InflatedStartOp | RejectReason::BadStartOp { .. } => "bad_start_op",
            RejectReason::MissingDeps(_) => "missing_deps",
            RejectReason::Compacted => "compacted",
            RejectReason::Automerge(_) => "automerge_error",
            RejectReason::AutomergePanic => "automerge_panic",
            RejectReason::WrongCluster => "wrong_cluster",
            RejectReason::BadDocument => "bad_document",
            RejectReason::InvalidMember(_) => "invalid_member",
        }
    }

    /// Whether the change may become acceptable once more history arrives (it is then held
    /// in the bounded pending set rather than dropped).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RejectReason::NotAMember | RejectReason::SeqGap { .. } | RejectReason::MissingDeps(_)
        )
    }
}

/// Errors about key files and node ids.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("key file {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The key file can be read by group or others.
    #[error("key file {path} has mode {mode:o}, readable by others: run `chmod 600 {path}`")]
    Permissions {
        /// Path of the key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold 64 hex digits.
    #[error("key file {0} is not a Lichen secret key (expected 64 hex digits)")]
    Malformed(String),
    /// A node id in text form is not 64 hex digits.
    #[error("`{0}` is not a node id (expected 64 hex digits)")]
    BadNodeId(String),
}

/// Errors from the store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The file system holding the database is full (SQLite's `SQLITE_FULL`): the
    /// transaction was rolled back, so nothing of it was stored and everything committed
    /// before is intact. Writes work again once there is space.
    #[error("the disk holding the database is full, so this was not stored (everything stored before is kept); free space there and retry")]
    DiskFull,
    /// A transaction could not be committed for another reason than a full disk; nothing of
    /// it was stored.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The file is not a Lichen database, or it is damaged.
    #[error("{path} is not a usable Lichen database: {reason}")]
    Corrupt {
        /// Database path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The database was written by a newer Lichen.
    #[error("{path} has schema version {found}, newer than this build supports ({supported}); upgrade lichen")]
    NewerSchema {
        /// Database path.
        path: String,
        /// Version found.
        found: i64,
        /// Latest version this build knows.
        supported: i64,
    },
    /// Another process holds the database (see [`crate::Store::hold_exclusive`]).
    #[error("{path} is in use by another process (is a lichen agent already running with this data directory?)")]
    InUse {
        /// Database path.
        path: String,
    },
    /// The database holds another cluster.
    #[error("{path} belongs to cluster {found}, not {expected}")]
    WrongCluster {
        /// Database path.
        path: String,
        /// Cluster id found.
        found: String,
        /// Cluster id expected.
        expected: String,
    },
    /// A proposed local change was refused.
    #[error("change refused: {0}")]
    Rejected(#[from] RejectReason),
    /// A JSON path or value problem.
    #[error("{0}")]
    Json(#[from] crate::json::JsonError),
    /// The local node may not do this.
    #[error("{0}")]
    Denied(String),
    /// The document does not exist.
    #[error("document `{0}` does not exist")]
    NoSuchDocument(String),
    /// Invalid input from the caller.
    #[error("{0}")]
    Invalid(String),
    /// Automerge failed on local data.
    #[error("automerge: {0}")]
    Automerge(String),
    /// A compaction cut record or its base was refused (see [`crate::compaction`]).
    #[error("cut: {0}")]
    Cut(#[from] crate::compaction::CutError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            StoreError::DiskFull
        } else {
            StoreError::Sqlite(e)
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::RejectReason::{self, *};

    /// One reason of each kind. The match below has no wildcard, so a new kind cannot be
    /// added without being listed here too.
    fn one_of_each() -> Vec<RejectReason> {
        let all = vec![
            TooLarge,
            Truncated,
            Malformed(""),
            HashMismatch,
            BadSignature,
            ActorNotSigner,
            NotAMember,
            NotAuthorized(String::new()),
            OutOfScope,
            Revoked,
            DependsOnVoid,
            SeqGap { seq: 2, last: 0 },
            Equivocation,
            InflatedStartOp,
            BadStartOp {
                got: 1,
                expected: 2,
            },
            MissingDeps(1),
            Automerge(String::new()),
            AutomergePanic,
            WrongCluster,
            BadDocument,
            InvalidMember(String::new()),
            Compacted,
        ];
        for r in &all {
            match r {
                TooLarge
                | Truncated
                | Malformed(_)
                | HashMismatch
                | BadSignature
                | ActorNotSigner
                | NotAMember
                | NotAuthorized(_)
                | OutOfScope
                | Revoked
                | DependsOnVoid
                | SeqGap { .. }
                | Equivocation
                | InflatedStartOp
                | BadStartOp { .. }
                | MissingDeps(_)
                | Automerge(_)
                | AutomergePanic
                | WrongCluster
                | BadDocument
                | InvalidMember(_)
                | Compacted => {}
            }
        }
        all
    }

    #[test]
    fn labels_lists_every_label_once_sorted() {
        let mut seen: Vec<&str> = one_of_each().iter().map(RejectReason::label).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, RejectReason::LABELS);
    }
}
