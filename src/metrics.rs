//! The Prometheus metrics `GET /metrics` renders: one recorder per process,
//! every metric named with its unit and described (`# HELP`), latencies as
//! histograms (which aggregate across instances; summaries do not), and
//! the counters of known outcomes present at 0 from the start, so a rate
//! over a fresh instance is 0, not missing.
//!
//! Every metric flowledger records is in [`CATALOG`]; a test checks the
//! code records no other name.

use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusHandle;

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (seconds), rendered as buckets.
    Histogram,
}

/// Every metric: name (unit last), kind, help text.
pub const CATALOG: &[(&str, Kind, &str)] = &[
    ("flowledger_build_info", Kind::Gauge, "Always 1; the labels name this build's version."),
    ("flowledger_append_duration_seconds", Kind::Histogram, "Time to append one commit to the event stream, until JetStream acknowledged it (or the append failed), by outcome."),
    ("flowledger_http_request_duration_seconds", Kind::Histogram, "Time to answer an HTTP request, by method, route and status."),
    ("flowledger_nats_commands_refused_total", Kind::Counter, "NATS commands refused before any decision because the caller was not authenticated or not allowed, by error code."),
    ("flowledger_jobs_ended_total", Kind::Counter, "Jobs this instance's handler ended, by workflow and outcome (completed, failed)."),
    ("flowledger_step_attempt_results_total", Kind::Counter, "Step attempts whose result this instance's handler knows, by workflow, step and status (succeeded, failed, timed_out)."),
    ("flowledger_handler_step_attempts_total", Kind::Counter, "Step attempts this instance's handler started, by step kind (solver, n8n)."),
    ("flowledger_handler_queue_seconds", Kind::Histogram, "Time a job waited for a dispatch slot before its steps started."),
    ("flowledger_handler_jobs", Kind::Gauge, "Jobs this instance's handler follows (in its partitions, not ended)."),
    ("flowledger_handler_partitions", Kind::Gauge, "Job partitions this instance holds a lease on (of 32)."),
    ("flowledger_handler_parked_jobs", Kind::Gauge, "Jobs the handler parked for an operator (an event it cannot fold)."),
    ("flowledger_handler_queued_jobs", Kind::Gauge, "Jobs waiting for a dispatch slot on this instance."),
    ("flowledger_approvals_pending", Kind::Gauge, "Approvals waiting for a decision, as the approvals read model shows them when /metrics is read (NaN while PostgreSQL does not answer)."),
    ("flowledger_callbacks_total", Kind::Counter, "Signed job callbacks by outcome (delivered, failed after every attempt)."),
    ("flowledger_callbacks_rejected_total", Kind::Counter, "Incoming n8n callbacks refused, by reason; none of them reaches the log."),
    ("flowledger_callbacks_throttled_total", Kind::Counter, "Incoming n8n callbacks refused for their source's rate limit."),
    ("flowledger_projection_events_applied_total", Kind::Counter, "Events a projection applied to its read model, by projection."),
    ("flowledger_projection_checkpoint_seq", Kind::Gauge, "The stream sequence a projection has applied up to, by projection."),
    ("flowledger_projection_lag_events", Kind::Gauge, "Stream messages a projection has not applied yet, by projection."),
    ("flowledger_projection_stopped", Kind::Gauge, "1 while a projection is stopped on an event it cannot apply, else 0, by projection."),
    ("flowledger_secret_reads_total", Kind::Counter, "Secret reads by decision (granted, denied, failed) and, when granted, source (vault, cache, last_known_good)."),
    ("flowledger_secret_last_known_good_total", Kind::Counter, "Secret reads served the last-known-good value because Vault could not be read."),
];

/// Histogram bucket bounds, seconds: 0.5 ms to 60 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process's one Prometheus recorder (installed on first use, with
/// every metric described and the known outcomes at 0).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = match metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(BUCKETS)
            {
                Ok(b) => b.build_recorder(),
                // only an empty bucket list is refused; BUCKETS is not empty
                Err(_) => metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // another recorder installed first (a library user's) keeps
            // working; ours then only renders what it records
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; \
                     /metrics shows only flowledger's own view"
                );
            }
            describe();
            handle
        })
        .clone()
}

/// Describes every metric of [`CATALOG`] and sets those with fixed labels.
fn describe() {
    for (name, kind, help) in CATALOG {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => {
                metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help)
            }
        }
    }
    metrics::gauge!("flowledger_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for outcome in ["delivered", "failed"] {
        metrics::counter!("flowledger_callbacks_total", "outcome" => outcome).absolute(0);
    }
    for kind in ["solver", "n8n"] {
        metrics::counter!("flowledger_handler_step_attempts_total", "kind" => kind).absolute(0);
    }
    for code in ["unauthenticated", "forbidden"] {
        metrics::counter!("flowledger_nats_commands_refused_total", "code" => code).absolute(0);
    }
    metrics::counter!("flowledger_callbacks_throttled_total").absolute(0);
    metrics::counter!("flowledger_secret_last_known_good_total").absolute(0);
    for decision in ["denied", "failed"] {
        metrics::counter!("flowledger_secret_reads_total", "decision" => decision).absolute(0);
    }
    for source in ["vault", "cache", "last_known_good"] {
        metrics::counter!("flowledger_secret_reads_total", "decision" => "granted", "source" => source)
            .absolute(0);
    }
}

/// Creates, at 0, the per-workflow counters of every workflow and step of
/// the registry (the handler's instance calls it at start and on a
/// registry reload; `absolute` only raises a counter, so one that counts
/// already keeps its value).
pub fn register_workflows(registry: &crate::commands::registry::Registry) {
    for key in registry.keys() {
        let Some(def) = registry.get(key) else {
            continue;
        };
        for outcome in ["completed", "failed"] {
            metrics::counter!("flowledger_jobs_ended_total", "workflow" => key.to_string(), "outcome" => outcome)
                .absolute(0);
        }
        for step in &def.steps {
            for status in ["succeeded", "failed", "timed_out"] {
                metrics::counter!("flowledger_step_attempt_results_total",
                    "workflow" => key.to_string(), "step" => step.name.clone(), "status" => status)
                .absolute(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `flowledger_*` name the sources record is in the catalog, and
    /// every name has its unit where it has one.
    #[test]
    fn every_recorded_metric_is_described() {
        let names: Vec<&str> = CATALOG.iter().map(|(n, _, _)| *n).collect();
        let mut sources = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("src is readable") {
                let p = e.expect("an entry").path();
                if p.is_dir() {
                    if !p.ends_with("bin") {
                        dirs.push(p);
                    }
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("metrics.rs") {
                    sources.push(std::fs::read_to_string(&p).expect("a source file"));
                }
            }
        }
        let mut recorded = std::collections::BTreeSet::new();
        for s in &sources {
            for macro_ in ["counter!(", "gauge!(", "histogram!("] {
                for (i, _) in s.match_indices(macro_) {
                    let rest = s[i + macro_.len()..].trim_start();
                    if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                        recorded.insert(name.to_string());
                    }
                }
            }
        }
        assert!(recorded.len() > 10, "found {recorded:?}");
        for r in &recorded {
            assert!(
                names.contains(&r.as_str()),
                "{r} is recorded but not in CATALOG"
            );
        }
        for (name, kind, help) in CATALOG {
            assert!(!help.is_empty());
            match kind {
                Kind::Counter => assert!(name.ends_with("_total"), "{name}"),
                Kind::Histogram => assert!(name.ends_with("_seconds"), "{name}"),
                Kind::Gauge => {}
            }
        }
    }
}
