//! `lichen demo`: three agents on loopback, a write seen everywhere, a partition, writes on
//! both sides, healing, and the converged result.
pub fn run(_keep: bool) -> anyhow::Result<()> {
    anyhow::bail!("the demo is being written; see README")
}
