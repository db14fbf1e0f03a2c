//! The agent's memory allocator: jemalloc, so that memory freed after a big request goes back
//! to the system instead of staying in the process.
//!
//! Why: a write of 5,000 keys (the most one write may hold, `api::MAX_WRITE_NODES`) takes
//! ~12 MiB of heap while the node task builds and commits it. With glibc's malloc that
//! memory stayed in the agent's resident set after it was freed (glibc only gives back the
//! top of its heap, and the freed blocks were interleaved with live ones), so every big write
//! left the agent ~12 MiB larger for good. jemalloc returns freed pages (`madvise`) after
//! its dirty-page decay time (10 s by default); [`start_background_purge`] starts the one
//! jemalloc thread that does it on time even when the agent then sits idle (without it,
//! decay only advances when the allocator is next used). `agent/tests/api_edges.rs` checks
//! that the anonymous resident memory returns near its level before the write.
//!
//! `tikv-jemallocator` is the maintained Rust binding (used by TiKV, rustc, Polkadot); the
//! `unsafe` of the allocator and of `mallctl` is inside it and `tikv-jemalloc-ctl`. SQLite
//! keeps its own allocations in the C library's malloc; it holds little (its page cache
//! is bounded).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Starts jemalloc's background purging thread (one, whatever the number of CPUs). Called
/// once by `lichen run` before the runtime starts; client commands exit too soon to need
/// it. A failure only means freed memory is returned later, on the next allocations.
pub(crate) fn start_background_purge() {
    let result = tikv_jemalloc_ctl::max_background_threads::write(1)
        .and_then(|()| tikv_jemalloc_ctl::background_thread::write(true));
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not start the allocator's background purge; freed memory is returned later");
    }
}
