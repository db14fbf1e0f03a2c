//! Command-line interface (clap). Parsing only: validation happens in
//! [`crate::config::Config::resolve`] and in the agent.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Lichen: configuration and membership for edge and multi-region fleets, without consensus.
#[derive(Debug, Parser)]
#[command(name = "lichen", version, about, long_about = None)]
pub(crate) struct Cli {
    /// The local agent's API: `host:port` (default 127.0.0.1:7421) or `unix:PATH`. When not
    /// given, the CLI uses the data directory's socket (api.sock) if it can connect to it.
    #[arg(long, global = true, env = "LICHEN_API")]
    pub api: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// TOML config file (for `run`/`init`; other commands read `data_dir` from it).
    #[arg(long, short = 'c', global = true, env = "LICHEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (key, database, API token and socket).
    #[arg(long, global = true, env = "LICHEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// File holding the API token (default: api.token in the data directory; or set
    /// LICHEN_TOKEN to the token itself).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the agent (the default when no command is given).
    Run(RunArgs),
    /// Prepare a data directory: create the node key (and, with --join, the store); print the node id.
    Init(RunArgs),
    /// Generate a key file and print its node id.
    Keygen {
        /// Where to write the key (mode 0600).
        #[arg(long, default_value = "node.key")]
        out: PathBuf,
    },
    /// Set the value at PATH in DOC (VALUE is JSON: 4, true, "text", {"a": 1}).
    Put {
        doc: String,
        path: String,
        value: String,
        /// Write only if the document's heads are still these (as `get --json` prints them);
        /// else fail with exit code 7 and print the current heads.
        #[arg(long, value_name = "HEADS")]
        if_match: Option<String>,
    },
    /// Print a document, or the value at PATH; with --prefix (or a DOC ending in `/`), every
    /// document under that prefix.
    Get {
        #[arg(required_unless_present = "prefix")]
        doc: Option<String>,
        path: Option<String>,
        /// Print a string without JSON quotes (other values as JSON).
        #[arg(long, conflicts_with = "prefix")]
        raw: bool,
        /// Every document whose name starts with this prefix.
        #[arg(long, conflicts_with = "doc")]
        prefix: Option<String>,
        /// The value as it was at HEADS (as `get --json`, `status`, `history` and watch
        /// events print them).
        #[arg(long, conflicts_with_all = ["prefix", "raw"])]
        at: Option<String>,
    },
    /// Delete the value at PATH in DOC; with --all and no PATH, every value of DOC.
    Del {
        doc: String,
        path: Option<String>,
        /// Delete the whole document (every value, one signed change).
        #[arg(long, conflicts_with = "path")]
        all: bool,
        /// Delete only if the document's heads are still these (see `put --if-match`).
        #[arg(long, value_name = "HEADS")]
        if_match: Option<String>,
    },
    /// List documents, or the keys of DOC (at PATH).
    Ls {
        doc: Option<String>,
        path: Option<String>,
    },
    /// Stream the value of DOC (at PATH) as it changes; with --prefix (or a DOC ending in
    /// `/`), every document under that prefix.
    Watch {
        #[arg(required_unless_present = "prefix")]
        doc: Option<String>,
        path: Option<String>,
        /// Every document whose name starts with this prefix (each event names it).
        #[arg(long, conflicts_with = "doc")]
        prefix: Option<String>,
        /// Resume from a known state (the heads printed with each event).
        #[arg(long)]
        since: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Who changed what in DOC (at PATH), verified, oldest first.
    History {
        doc: String,
        path: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Concurrent values at PATH in DOC (winner first).
    Conflicts { doc: String, path: String },
    /// What changed in DOC (at PATH) from HEADS to HEADS (default: now): added, removed and
    /// changed paths with their old and new values.
    Diff {
        doc: String,
        path: Option<String>,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Put DOC (or the subtree at PATH) back to its state at --to HEADS, or undo one change
    /// (--undo HASH): one new change signed by this node; prints its hash.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["to", "undo"])))]
    Revert {
        doc: String,
        path: Option<String>,
        /// The heads to go back to.
        #[arg(long)]
        to: Option<String>,
        /// The change to undo (its hash or a prefix, as `history` prints it).
        #[arg(long, conflicts_with = "path")]
        undo: Option<String>,
        /// With --undo: put back values a later change has overwritten too.
        #[arg(long, requires = "undo")]
        force: bool,
    },
    /// For every leaf of DOC (at PATH): its value and the change that set it (hash, author,
    /// time, whether the author is still a member); conflicts list every value.
    Blame { doc: String, path: Option<String> },
    /// Audit bundles: a document's signed history with its membership chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write DOC as an Automerge document (loads in @automerge/automerge) or as JSON.
    Export {
        doc: String,
        #[arg(long, default_value = "automerge")]
        format: String,
        /// Output file (default: standard output).
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Make DOC equal to FILE (a JSON object or an Automerge document), as one new change
    /// signed by this node.
    Import { doc: String, file: PathBuf },
    /// Cluster membership.
    Members {
        #[command(subcommand)]
        command: MembersCommand,
    },
    /// Peers and connection state, document heads, sync lag, rejected changes, changes not stored.
    Status,
    /// Run CMD with DOC's values as environment variables; restart or signal it when they change.
    #[command(
        after_help = "Variables: the keys' path joined by `_`, upper-cased, other characters as `_`, \
under --prefix (`limits.rate` -> APP_LIMITS_RATE); strings as they are, numbers and booleans as \
JSON text, arrays as JSON. CMD also gets LICHEN_DOC and LICHEN_HEADS. SIGTERM, SIGINT and SIGHUP \
are forwarded; the exit code is CMD's."
    )]
    Exec(crate::exec::Options),
    /// Show what file bindings would write (--dry-run, with a diff), or render a template once
    /// to stdout (--template T [--doc D]); writes and reloads nothing.
    Render(crate::render::dryrun::Options),
    /// Copy this node's store while it runs (`-o FILE`), or check a copy (`backup verify FILE`).
    Backup(crate::backup::BackupArgs),
    /// Build a new data directory from a backup (a new key unless --with-key).
    Restore(crate::backup::RestoreArgs),
    /// Start three agents on loopback and show writes, a partition, and convergence.
    Demo {
        /// Keep the agents' directories (printed) instead of deleting them.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum AuditCommand {
    /// Write an audit bundle of DOC (every change with its signature, and the membership
    /// chain that authorizes them) to FILE.
    Export {
        doc: String,
        /// Start the audited history after these heads (the bundle still holds its past).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, short = 'o')]
        out: PathBuf,
    },
    /// Verify a bundle offline (no agent, no data directory) against the cluster id; prints
    /// the verified history, or the offending change and the reason.
    Verify {
        file: PathBuf,
        /// The cluster id (`lichen status` prints it).
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MembersCommand {
    /// List members.
    Ls,
    /// Add a member (admin only).
    Add {
        id: String,
        #[arg(long, default_value = "writer")]
        role: String,
        #[arg(long)]
        name: Option<String>,
        /// Document prefix this member may write (repeatable; none = all documents).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Address where the member listens (repeatable).
        #[arg(long = "addr")]
        addrs: Vec<String>,
    },
    /// Remove a member for good (admin only).
    Remove { id: String },
    /// Change a member's role (admin only).
    Role { id: String, role: String },
    /// Change a member's role and/or scopes (admin only).
    Set {
        id: String,
        #[arg(long)]
        role: Option<String>,
        /// Document prefix this member may write (repeatable; replaces the current scopes).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Let the member write every document (clears its scopes).
        #[arg(long, conflicts_with = "scopes")]
        all_docs: bool,
    },
}

#[derive(Debug, Args, Default, Clone)]
pub(crate) struct RunArgs {
    /// This node's name.
    #[arg(long)]
    pub name: Option<String>,
    /// QUIC listen address for peers.
    #[arg(long, env = "LICHEN_LISTEN")]
    pub listen: Option<String>,
    /// Address other nodes should dial (repeatable).
    #[arg(long)]
    pub advertise: Vec<String>,
    /// Join an existing cluster: the token printed by `lichen run` or `lichen status` on a member.
    #[arg(long)]
    pub join: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// On a data directory restored with its key (`lichen restore --with-key`), write even
    /// before reaching a peer. RISK: this node may sign changes with sequence numbers its key
    /// already used elsewhere after the backup was taken; other nodes will then flag the key
    /// for equivocation and void its writes from there on.
    #[arg(long)]
    pub allow_isolated_writes: bool,
}
