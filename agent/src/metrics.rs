//! Metrics: counters, gauges and one latency histogram, rendered in the Prometheus text format
//! at `/metrics`. Lock-free atomics for counters on hot paths; labelled counters (rejections by
//! reason, render failures) in a small mutex-protected map.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use lichen_crdt::RejectReason;

/// Latency buckets in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Reasons a peer's change or message is refused: the store's ([`RejectReason::LABELS`]) and
/// the sync engine's (`former_member`: a message from a removed member, refused until it
/// has the proof of its removal).
const REJECTED_REASONS: &[&str] = &{
    const N: usize = RejectReason::LABELS.len();
    let mut all = [""; N + 1];
    let mut i = 0;
    while i < N {
        all[i] = RejectReason::LABELS[i];
        i += 1;
    }
    all[N] = "former_member";
    all
};

/// The labelled counter families, with their help text and every reason known up front:
/// those are exported at 0 from the start, so a dashboard or an alert sees the series
/// before the first event (`rate()` and `increase()` need a sample before it).
const FAMILIES: [(&str, &str, &[&str]); 7] = [
    (
        "lichen_changes_rejected_total",
        "Changes received from peers and refused, by reason",
        REJECTED_REASONS,
    ),
    (
        "lichen_store_errors_total",
        "Changes not stored because the disk was full or the database failed, by reason",
        &["database", "disk_full"],
    ),
    (
        "lichen_ingest_errors_total",
        "Edits of bound files that were not applied, by reason",
        &[
            "check",
            "denied",
            "empty",
            "encoding",
            "root",
            "syntax",
            "too_large",
            "write",
        ],
    ),
    (
        "lichen_render_errors_total",
        "Failed writes, checks and reloads of bound files, by reason",
        &["check", "reload", "write"],
    ),
    (
        "lichen_template_errors_total",
        "Template renders that failed (the file kept its content), by reason",
        crate::render::TEMPLATE_REASONS,
    ),
    (
        "lichen_changes_voided_total",
        "Stored changes that became void on this node, by reason (a revoked author, a void dependency, an equivocation)",
        &["depends_on_void", "equivocation", "late_for_cut", "revoked"],
    ),
    (
        "lichen_api_refused_total",
        "API requests refused before any work, by reason (a Host header that is not loopback, no token, a wrong token, a read-only token on a write)",
        &["foreign_host", "no_token", "read_only", "wrong_token"],
    ),
];

/// One labelled counter family: HELP, TYPE, then one `reason` series per value.
fn render_family(out: &mut String, name: &str, help: &str, values: &BTreeMap<&str, u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (label, v) in values {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", escape_label(label));
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A histogram of durations.
#[derive(Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let c = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {c}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {c}");
    }
}

/// All agent metrics.
#[derive(Default)]
pub(crate) struct Metrics {
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    pub wal_checkpoints: AtomicU64,
    pub wal_checkpoint_pending: AtomicU64,
    pub changes_sent: AtomicU64,
    pub changes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub send_dropped: AtomicU64,
    /// Dial attempts where a peer's DNS name did not resolve (copied from the transport).
    pub peer_resolve_failures: AtomicU64,
    pub connections: AtomicU64,
    pub sync_lag_ms: AtomicU64,
    pub writes_held: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
    pub render_writes: AtomicU64,
    pub render_reloads: AtomicU64,
    pub ingests: AtomicU64,
    pub api_connections: AtomicU64,
    pub api_refused: AtomicU64,
    pub api_accept_errors: AtomicU64,
    pub corrupt_changes: AtomicU64,
    pub quarantined_changes: AtomicU64,
    pub healed_changes: AtomicU64,
    pub snapshots_dropped: AtomicU64,
    pub scrubbed_changes: AtomicU64,
    pub carried_forward: AtomicU64,
    /// Template evaluations of template bindings.
    pub template_renders: AtomicU64,
    pub write_latency: Histogram,
    pub apply_latency: Histogram,
    labelled: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Metrics {
    /// Add to a labelled counter, e.g. `("lichen_changes_rejected_total", "bad_signature")`.
    pub(crate) fn inc_labelled(&self, name: &'static str, label: &str, by: u64) {
        if let Ok(mut m) = self.labelled.lock() {
            *m.entry((name, label.to_string())).or_insert(0) += by;
        }
    }

    /// Current values of a labelled counter family (reasons counted at least once).
    pub(crate) fn labelled(&self, name: &str) -> BTreeMap<String, u64> {
        self.labelled
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|((_, l), v)| (l.clone(), *v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64, &str); 29] = [
            (
                "lichen_template_renders_total",
                "Template evaluations by template bindings",
                &self.template_renders,
                "counter",
            ),
            (
                "lichen_writes_total",
                "Local writes committed",
                &self.writes,
                "counter",
            ),
            (
                "lichen_write_errors_total",
                "Local writes refused or failed",
                &self.write_errors,
                "counter",
            ),
            (
                "lichen_wal_checkpoints_total",
                "Write-ahead log checkpoints done while idle",
                &self.wal_checkpoints,
                "counter",
            ),
            (
                "lichen_wal_checkpoint_pending",
                "1 while commits since the last idle checkpoint wait for one",
                &self.wal_checkpoint_pending,
                "gauge",
            ),
            (
                "lichen_changes_sent_total",
                "Changes pushed to peers",
                &self.changes_sent,
                "counter",
            ),
            (
                "lichen_changes_received_total",
                "Changes received and applied",
                &self.changes_received,
                "counter",
            ),
            (
                "lichen_sync_messages_sent_total",
                "Sync messages sent",
                &self.messages_sent,
                "counter",
            ),
            (
                "lichen_sync_messages_received_total",
                "Sync messages received",
                &self.messages_received,
                "counter",
            ),
            (
                "lichen_sync_bytes_sent_total",
                "Sync bytes sent",
                &self.bytes_sent,
                "counter",
            ),
            (
                "lichen_sync_bytes_received_total",
                "Sync bytes received",
                &self.bytes_received,
                "counter",
            ),
            (
                "lichen_send_dropped_total",
                "Messages dropped because a peer queue was full",
                &self.send_dropped,
                "counter",
            ),
            (
                "lichen_peer_resolve_failures_total",
                "Dial attempts where a peer's DNS name could not be resolved (retried with backoff)",
                &self.peer_resolve_failures,
                "counter",
            ),
            (
                "lichen_connections",
                "Live peer connections",
                &self.connections,
                "gauge",
            ),
            (
                "lichen_writes_held",
                "Own writes waiting for the first catch-up with a peer since start",
                &self.writes_held,
                "gauge",
            ),
            (
                "lichen_config_reloads_total",
                "Successful config reloads",
                &self.config_reloads,
                "counter",
            ),
            (
                "lichen_config_reload_errors_total",
                "Config reloads refused",
                &self.config_reload_errors,
                "counter",
            ),
            (
                "lichen_render_writes_total",
                "Bound files rewritten from their document",
                &self.render_writes,
                "counter",
            ),
            (
                "lichen_render_reloads_total",
                "Reload commands that succeeded",
                &self.render_reloads,
                "counter",
            ),
            (
                "lichen_ingests_total",
                "Local file edits applied to their document",
                &self.ingests,
                "counter",
            ),
            (
                "lichen_api_connections",
                "Open connections to the local API",
                &self.api_connections,
                "gauge",
            ),
            (
                "lichen_api_connections_refused_total",
                "API connections refused because api_max_connections were open",
                &self.api_refused,
                "counter",
            ),
            (
                "lichen_api_accept_errors_total",
                "API connections that could not be accepted (e.g. out of file descriptors)",
                &self.api_accept_errors,
                "counter",
            ),
            (
                "lichen_corrupt_changes_total",
                "Stored changes found damaged on disk (and quarantined) since start",
                &self.corrupt_changes,
                "counter",
            ),
            (
                "lichen_quarantined_changes",
                "Quarantined changes (damaged, or depending on one) waiting for a peer's good copy",
                &self.quarantined_changes,
                "gauge",
            ),
            (
                "lichen_healed_changes",
                "Quarantined changes held again from a peer's good copy (ever)",
                &self.healed_changes,
                "gauge",
            ),
            (
                "lichen_snapshots_dropped_total",
                "Document snapshots dropped as damaged since start",
                &self.snapshots_dropped,
                "counter",
            ),
            (
                "lichen_scrubbed_changes_total",
                "Stored changes checked by the background scrub since start",
                &self.scrubbed_changes,
                "counter",
            ),
            (
                "lichen_writes_carried_forward_total",
                "Own writes that became void because they were built on a void change, written again as new changes",
                &self.carried_forward,
                "counter",
            ),
        ];
        for (name, help, v, kind) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lichen_sync_lag_seconds Time since this node was last caught up with a peer\n# TYPE lichen_sync_lag_seconds gauge\nlichen_sync_lag_seconds {}",
            self.sync_lag_ms.load(Relaxed) as f64 / 1000.0
        );
        self.write_latency.render(
            "lichen_write_latency_seconds",
            "Local write latency (commit incl. fsync)",
            &mut out,
        );
        self.apply_latency.render(
            "lichen_apply_latency_seconds",
            "Time to verify and apply a received message",
            &mut out,
        );
        if let Ok(m) = self.labelled.lock() {
            for (name, help, known) in FAMILIES {
                let counted = m.iter().filter(|((n, _), _)| *n == name);
                let mut values: BTreeMap<&str, u64> = known.iter().map(|r| (*r, 0)).collect();
                for ((_, label), v) in counted {
                    values.insert(label, *v);
                }
                render_family(&mut out, name, help, &values);
            }
            // Families counted somewhere but not listed in FAMILIES (still valid output).
            let mut others: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for ((name, label), v) in m.iter() {
                if !FAMILIES.iter().any(|(n, _, _)| n == name) {
                    others.entry(name).or_default().insert(label, *v);
                }
            }
            for (name, values) in others {
                render_family(&mut out, name, "Events by reason", &values);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reasons_are_exported_at_zero_and_labels_are_escaped() {
        let m = Metrics::default();
        let text = m.render();
        assert!(
            text.contains("# HELP lichen_ingest_errors_total "),
            "{text}"
        );
        assert!(text.contains("lichen_ingest_errors_total{reason=\"syntax\"} 0"));
        assert!(text.contains("lichen_changes_rejected_total{reason=\"bad_signature\"} 0"));
        m.inc_labelled("lichen_ingest_errors_total", "syntax", 2);
        m.inc_labelled("lichen_other_total", "a\"b\\c\nd", 1);
        let text = m.render();
        assert!(text.contains("lichen_ingest_errors_total{reason=\"syntax\"} 2"));
        assert!(
            text.contains("lichen_other_total{reason=\"a\\\"b\\\\c\\nd\"} 1"),
            "{text}"
        );
        // The status view lists only what was counted.
        assert_eq!(m.labelled("lichen_ingest_errors_total").len(), 1);
    }
}
