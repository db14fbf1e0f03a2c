//! File bindings: documents rendered into the files applications already read, and (in `sync`
//! mode) local edits of those files turned into signed changes.
//!
//! # Data flow
//!
//! ```text
//!  config [[bind]] ──► binding.rs (validate) ──► manager.rs (one task per binding)
//!
//!  node task ── Notice{doc} ──┐                       ┌── render: format.rs serialize
//!                             ├─► task.rs (debounce) ─┤      ──► write.rs (stage, fsync,
//!  watch.rs (parent dir) ─────┘                       │           check, rename, fsync dir)
//!                                                     │      ──► command.rs (reload, jitter)
//!                                                     └── ingest (sync mode): read file
//!                                                            ──► format.rs parse ──► ingest.rs
//!                                                            (validate, 3-way merge, Op)
//!                                                            ──► node task (sign, commit, push)
//! ```
//!
//! Template bindings take the same path with the document read and the serialization
//! replaced by a template render ([`template`], on a blocking thread, reading documents and
//! the membership through the node task); they are one-way, and re-render only when a
//! document the last render read changes.
//!
//! * [`binding`]: the `[[bind]]` config table and its validated form.
//! * [`template`]: minijinja templates: data functions, filters, limits, read tracking, errors
//!   with file:line:column.
//! * [`provenance`]: `LICHEN_DOC`/`LICHEN_FILE`/`LICHEN_HEADS` for commands, the header line.
//! * [`status`]: every binding's last render, commands and errors, for `lichen status`.
//! * [`dryrun`]: `lichen render` (dry run with diffs, one-off template renders) over the API.
//! * [`format`]: JSON/TOML/YAML ⇄ JSON values, deterministic output, errors with positions.
//! * [`write`]: the atomic, checked replacement of a file.
//! * [`command`]: check and reload commands with a timeout.
//! * [`ingest`]: file edits → document writes (validation, three-way merge, `Op`).
//! * [`watch`]: directory watching that survives rename-based saves.
//! * [`last`]: what each file last held, kept in the data directory across restarts.
//! * [`owner`]: user/group names → ids without libc.
//! * [`task`]: the per-binding state machine (echo suppression, retries, start-up rules).
//! * [`manager`]: start, reload (SIGHUP), stop.
//!
//! # Merge semantics (sync mode, concurrent edits)
//!
//! Each node ingests its own file edits as signed changes of the document; the store
//! reconciles every edit with minimal CRDT operations (per map key, nested maps in place,
//! lists by common prefix and suffix). When the same file is edited on two nodes while they
//! cannot reach each other, the two changes are concurrent and merge when the partition
//! heals:
//!
//! * keys edited on one side only all survive (both sides' edits are in the result);
//! * the same key set to different values on both sides resolves deterministically — every
//!   node picks the same winner (Automerge's rule: the change with the greater
//!   `(counter, actor)` op id wins) — and the losing value stays visible as a conflict:
//!   `lichen conflicts DOC PATH` lists all concurrent values, winner first;
//! * a key deleted on one side and edited on the other keeps the edit;
//! * then every node renders the merged document, so the files end byte-identical.
//!
//! A local edit is merged three-way into the *current* document (see [`ingest`]), so saving a
//! file that predates a peer's not-yet-rendered change does not revert that change.
//!
//! # Edits made while the agent is stopped
//!
//! Each `sync` task records the file content it last wrote or accepted ([`last`], under
//! `<data_dir>/bindings/`). At start-up, in `sync` mode, a file that differs from that record
//! was edited while the agent was down: it is ingested like a live edit (three-way merge with
//! the record as the base, a signed change, the user's bytes kept unless the merge adds
//! something). A file equal to the record gets the current document rendered as usual. In
//! `render` mode, and when there is no record yet (first start with this binding), the
//! document wins: a file that differs from it is rewritten.
//!
//! # What is not done
//!
//! A reload pending when the agent is killed with SIGKILL is lost (SIGTERM runs it).

mod binding;
mod command;
pub(crate) mod dryrun;
mod format;
mod ingest;
mod last;
mod manager;
mod owner;
mod provenance;
mod status;
mod task;
mod template;
mod watch;
mod write;

pub(crate) use binding::{Binding, BindingFile};
pub(crate) use manager::Manager;
pub(crate) use status::{print_bindings, Board};
pub(crate) use template::REASONS as TEMPLATE_REASONS;
