//! `GET /metrics` (README, "Metrics"), Prometheus text format. What this process observed (step
//! attempts, calls, tick lag, propagation latency, violations, API requests) is counted here
//! since it started; what the database knows (runs by status, schedules' last success, leases)
//! is counted there at each scrape, so it survives restarts and agrees across nodes. Labels
//! are plugin, step, schedule, route and limit names, all bounded by the registry, the router
//! or the config; never a run id or a label value.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `passed_after` from 10 ms to an hour: the propagation latency this product measures.
const PASSED_AFTER_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];
const TICK_LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const CALL_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Which limit an `errored` attempt's message reports, by the phrase it starts with (the
/// messages of the runtime and the capabilities); longer phrases first.
const LIMIT_PHRASES: &[(&str, &str)] = &[
    ("sql time limit of", "sql_timeout_ms"),
    ("sql row limit of", "sql_rows"),
    ("sql result size limit of", "sql_result_bytes"),
    ("kv time limit of", "sql_timeout_ms"),
    ("kv result size limit of", "sql_result_bytes"),
    ("kv command limit of", "kv_commands"),
    ("http request limit of", "http_requests_per_run"),
    ("http limit of", "http_concurrent_requests"),
    ("http timeout of", "http_timeout_ms"),
    ("http response size limit of", "http_response_bytes"),
    ("memory limit of plugin_memory_mib", "plugin_memory_mib"),
    ("memory limit of", "memory_mib"),
    ("wasi resource limit of", "wasi_resources"),
    ("table limit of", "table_elements"),
    ("output size limit of", "output_bytes"),
    ("copy limit of", "output_bytes"),
    ("message size limit of", "output_bytes"),
    ("time limit of", "call_timeout_ms"),
];

/// The limit key of a sandbox violation's message, if it is one.
pub fn violated_limit(message: &str) -> Option<&'static str> {
    LIMIT_PHRASES
        .iter()
        .find(|(phrase, _)| message.starts_with(phrase))
        .map(|(_, limit)| *limit)
}

#[derive(Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed when written).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        if let Some(index) = self.bounds.iter().position(|bound| seconds <= *bound) {
            self.counts[index] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let separator = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Distinct `(plugin, step)` label pairs this process keeps series for. Step names come from
/// plugins, and every version may bring new ones: past this many, a new pair's figures go
/// under `step="_other"` of its plugin, so the scrape and the process's memory stay bounded
/// however many names plugins ever used.
pub const MAX_STEP_SERIES: usize = 1_000;
/// The step label that stands for every step past [`MAX_STEP_SERIES`].
pub const OTHER_STEPS: &str = "_other";

#[derive(Default)]
struct Observed {
    /// The `(plugin, step)` pairs that have series of their own.
    step_series: std::collections::BTreeSet<(String, String)>,
    attempts: BTreeMap<(String, String, &'static str), u64>,
    violations: BTreeMap<(String, &'static str), u64>,
    passed_after: BTreeMap<(String, String), Histogram>,
    calls: BTreeMap<String, Histogram>,
    tick_lag: Option<Histogram>,
    /// By route, then status: a request finds its counter without allocating.
    requests: BTreeMap<String, BTreeMap<u16, u64>>,
    notifications: BTreeMap<(String, &'static str), u64>,
}

/// What this process observed, shared by the runner (which records) and the API (which
/// records requests and writes everything out).
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<Observed>>);

/// What the database counts, read at each scrape.
#[derive(Debug, Default)]
pub struct Stored {
    /// `(plugin, status, runs)` for every status.
    pub runs: Vec<(String, String, i64)>,
    /// `(schedule id, unix millis)` of each schedule's last passed run.
    pub schedule_successes: Vec<(String, i64)>,
    /// Runs this node holds a lease on.
    pub leases_held: i64,
    /// Each message source's tap, by source name (this process: each node keeps its own).
    pub taps: Vec<TapFigures>,
}

/// What a message source's tap holds, and what its window dropped.
#[derive(Debug, Default)]
pub struct TapFigures {
    pub source: String,
    pub messages: u64,
    pub bytes: u64,
    pub dropped: u64,
}

impl Observed {
    /// The `(plugin, step)` labels for a step's figures, within [`MAX_STEP_SERIES`].
    fn step_labels(&mut self, plugin: &str, step: &str) -> (String, String) {
        let key = (plugin.to_owned(), step.to_owned());
        if self.step_series.contains(&key) {
            return key;
        }
        if self.step_series.len() < MAX_STEP_SERIES {
            self.step_series.insert(key.clone());
            return key;
        }
        (plugin.to_owned(), OTHER_STEPS.to_owned())
    }
}

impl Metrics {
    fn observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// One step call: its outcome, how long it took, and the limit it broke, if any.
    pub fn record_call(
        &self,
        plugin: &str,
        step: &str,
        outcome: &'static str,
        duration: Duration,
        message: Option<&str>,
    ) {
        let mut observed = self.observed();
        let (plugin_label, step_label) = observed.step_labels(plugin, step);
        *observed
            .attempts
            .entry((plugin_label, step_label, outcome))
            .or_default() += 1;
        observed
            .calls
            .entry(plugin.to_owned())
            .or_insert_with(|| Histogram::new(CALL_BUCKETS))
            .observe(duration.as_secs_f64());
        if outcome == "errored"
            && let Some(limit) = message.and_then(violated_limit)
        {
            *observed
                .violations
                .entry((plugin.to_owned(), limit))
                .or_default() += 1;
        }
    }

    pub fn record_passed_after(&self, plugin: &str, step: &str, passed_after_ms: i64) {
        let mut observed = self.observed();
        let labels = observed.step_labels(plugin, step);
        observed
            .passed_after
            .entry(labels)
            .or_insert_with(|| Histogram::new(PASSED_AFTER_BUCKETS))
            .observe(passed_after_ms.max(0) as f64 / 1000.0);
    }

    pub fn record_tick_lag(&self, lag_ms: i64) {
        self.observed()
            .tick_lag
            .get_or_insert_with(|| Histogram::new(TICK_LAG_BUCKETS))
            .observe(lag_ms.max(0) as f64 / 1000.0);
    }

    /// A delivery attempt recorded: `delivered`, `retried` or `failed` (given up).
    pub fn record_notification(&self, notifier: &str, result: &'static str) {
        *self
            .observed()
            .notifications
            .entry((notifier.to_owned(), result))
            .or_default() += 1;
    }

    /// An API request, by its route template (`/v1/runs/{id}`), never its path.
    pub fn record_request(&self, route: &str, status: u16) {
        let mut observed = self.observed();
        let statuses = match observed.requests.get_mut(route) {
            Some(statuses) => statuses,
            None => observed.requests.entry(route.to_owned()).or_default(),
        };
        *statuses.entry(status).or_default() += 1;
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self, stored: &Stored) -> String {
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "stepwise_runs_total",
            "counter",
            "Finished runs by plugin and final status (from the database: every node agrees, restarts keep it).",
        );
        // Only final statuses: a counter never goes down, and a queued run's count would.
        let finished = |status: &str| !matches!(status, "queued" | "running");
        for (plugin, status, count) in stored.runs.iter().filter(|(_, status, _)| finished(status))
        {
            let _ = writeln!(
                out,
                "stepwise_runs_total{{plugin=\"{}\",status=\"{}\"}} {count}",
                escape(plugin),
                escape(status)
            );
        }
        header(
            &mut out,
            "stepwise_runs_active",
            "gauge",
            "Runs queued or running (from the database).",
        );
        for status in ["queued", "running"] {
            let active: i64 = stored
                .runs
                .iter()
                .filter(|(_, run_status, _)| run_status == status)
                .map(|(.., count)| count)
                .sum();
            let _ = writeln!(out, "stepwise_runs_active{{status=\"{status}\"}} {active}");
        }
        header(
            &mut out,
            "stepwise_schedule_last_success_timestamp_seconds",
            "gauge",
            "When each schedule's last passed run finished (from the database).",
        );
        for (schedule, millis) in &stored.schedule_successes {
            let _ = writeln!(
                out,
                "stepwise_schedule_last_success_timestamp_seconds{{schedule=\"{}\"}} {}",
                escape(schedule),
                *millis as f64 / 1000.0
            );
        }
        header(
            &mut out,
            "stepwise_leases_held",
            "gauge",
            "Runs this node holds a lease on.",
        );
        let _ = writeln!(out, "stepwise_leases_held {}", stored.leases_held);
        for (name, help, kind, figure) in [
            (
                "stepwise_tap_messages",
                "Messages a message source's tap holds in its window (this process).",
                "gauge",
                (|tap: &TapFigures| tap.messages) as fn(&TapFigures) -> u64,
            ),
            (
                "stepwise_tap_bytes",
                "Bytes a message source's tap holds in its window (this process).",
                "gauge",
                |tap| tap.bytes,
            ),
            (
                "stepwise_tap_dropped_total",
                "Messages a tap's window dropped, past its age or bytes (this process).",
                "counter",
                |tap| tap.dropped,
            ),
        ] {
            header(&mut out, name, kind, help);
            for tap in &stored.taps {
                let _ = writeln!(
                    out,
                    "{name}{{source=\"{}\"}} {}",
                    escape(&tap.source),
                    figure(tap)
                );
            }
        }

        let observed = self.observed();
        header(
            &mut out,
            "stepwise_step_attempts_total",
            "counter",
            "Step calls by outcome (this process, since it started).",
        );
        for ((plugin, step, outcome), count) in &observed.attempts {
            let _ = writeln!(
                out,
                "stepwise_step_attempts_total{{plugin=\"{}\",step=\"{}\",outcome=\"{outcome}\"}} {count}",
                escape(plugin),
                escape(step)
            );
        }
        header(
            &mut out,
            "stepwise_step_passed_after_seconds",
            "histogram",
            "Time from a run's start until a step passed: the propagation latency (this process).",
        );
        for ((plugin, step), histogram) in &observed.passed_after {
            let labels = format!("plugin=\"{}\",step=\"{}\"", escape(plugin), escape(step));
            histogram.write(&mut out, "stepwise_step_passed_after_seconds", &labels);
        }
        header(
            &mut out,
            "stepwise_tick_lag_seconds",
            "histogram",
            "How late ticks start after they are due (this process).",
        );
        observed
            .tick_lag
            .clone()
            .unwrap_or_else(|| Histogram::new(TICK_LAG_BUCKETS))
            .write(&mut out, "stepwise_tick_lag_seconds", "");
        header(
            &mut out,
            "stepwise_plugin_call_seconds",
            "histogram",
            "Duration of step calls (this process).",
        );
        for (plugin, histogram) in &observed.calls {
            let labels = format!("plugin=\"{}\"", escape(plugin));
            histogram.write(&mut out, "stepwise_plugin_call_seconds", &labels);
        }
        header(
            &mut out,
            "stepwise_sandbox_violations_total",
            "counter",
            "Attempts ended errored by a sandbox limit, by limit key (this process).",
        );
        for ((plugin, limit), count) in &observed.violations {
            let _ = writeln!(
                out,
                "stepwise_sandbox_violations_total{{plugin=\"{}\",limit=\"{limit}\"}} {count}",
                escape(plugin)
            );
        }
        header(
            &mut out,
            "stepwise_http_requests_total",
            "counter",
            "API requests by route template and status (this process).",
        );
        for (route, statuses) in &observed.requests {
            for (status, count) in statuses {
                let _ = writeln!(
                    out,
                    "stepwise_http_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                    escape(route)
                );
            }
        }
        header(
            &mut out,
            "stepwise_notifications_total",
            "counter",
            "Notification delivery attempts by notifier and result: delivered, retried or failed (this process).",
        );
        for ((notifier, result), count) in &observed.notifications {
            let _ = writeln!(
                out,
                "stepwise_notifications_total{{notifier=\"{}\",result=\"{result}\"}} {count}",
                escape(notifier)
            );
        }
        out
    }
}

/// A label value as the text format needs it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_series_are_bounded() {
        let metrics = Metrics::default();
        for step in 0..MAX_STEP_SERIES + 50 {
            let step = format!("step-{step}");
            metrics.record_call("p", &step, "passed", Duration::from_millis(1), None);
            metrics.record_passed_after("p", &step, 10);
        }
        // A pair seen before the cap keeps its own series.
        metrics.record_call("p", "step-0", "passed", Duration::from_millis(1), None);
        let observed = metrics.observed();
        assert_eq!(observed.step_series.len(), MAX_STEP_SERIES);
        assert_eq!(observed.attempts.len(), MAX_STEP_SERIES + 1);
        assert_eq!(
            observed.attempts[&("p".to_owned(), OTHER_STEPS.to_owned(), "passed")],
            50
        );
        assert_eq!(
            observed.attempts[&("p".to_owned(), "step-0".to_owned(), "passed")],
            2
        );
        assert_eq!(observed.passed_after.len(), MAX_STEP_SERIES + 1);
    }

    #[test]
    fn every_limit_message_names_its_key() {
        for (message, key) in [
            (
                "memory limit of 32 MiB exceeded (all memories and tables of the call together)",
                "memory_mib",
            ),
            ("time limit of 500 ms exceeded", "call_timeout_ms"),
            ("sql time limit of 100 ms exceeded", "sql_timeout_ms"),
            (
                "sql result size limit of 10 bytes exceeded",
                "sql_result_bytes",
            ),
            (
                "http limit of 8 requests in flight at once exceeded",
                "http_concurrent_requests",
            ),
            (
                "http request limit of 5 per run exceeded",
                "http_requests_per_run",
            ),
            (
                "http response size limit of 10 bytes exceeded",
                "http_response_bytes",
            ),
            (
                "output size limit of 10 bytes exceeded (20 bytes)",
                "output_bytes",
            ),
            (
                "copy limit of 1048576 bytes exceeded: the plugin handed the host more",
                "output_bytes",
            ),
            (
                "memory limit of plugin_memory_mib = 256 MiB exceeded: the host's memory",
                "plugin_memory_mib",
            ),
            ("wasi resource limit of 1000 exceeded", "wasi_resources"),
        ] {
            assert_eq!(violated_limit(message), Some(key), "{message}");
        }
        assert_eq!(violated_limit("plugin trapped: unreachable"), None);
    }

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let metrics = Metrics::default();
        metrics.record_passed_after("p\"q", "s", 20);
        metrics.record_passed_after("p\"q", "s", 7_200_000);
        let text = metrics.render(&Stored::default());
        assert!(
            text.contains(
                r#"stepwise_step_passed_after_seconds_bucket{plugin="p\"q",step="s",le="0.01"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stepwise_step_passed_after_seconds_bucket{plugin="p\"q",step="s",le="0.025"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stepwise_step_passed_after_seconds_bucket{plugin="p\"q",step="s",le="3600"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stepwise_step_passed_after_seconds_bucket{plugin="p\"q",step="s",le="+Inf"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("stepwise_tick_lag_seconds_count 0"), "{text}");
    }
}
