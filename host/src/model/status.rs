//! Status pages (README, "Status pages"): what the operator configures, the daily aggregates
//! the host keeps for them, and the figures a page shows, computed from those aggregates alone.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate, TimeZone};
pub use chrono_tz::Tz;

use super::{RunStatus, UnixMillis};

/// `[[status_page]]`: one page, set by the operator only.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusPage {
    /// The page's address: `/status/{slug}`.
    pub slug: String,
    pub title: String,
    pub description: Option<String>,
    pub checks: CheckSelection,
    /// Readable without a token; otherwise a viewer token is needed.
    pub public: bool,
    /// Days begin at midnight here.
    pub time_zone: Tz,
    /// How many days of history the page shows, today included.
    pub days: u32,
    /// Show failure messages (off by default: a message may name hosts or values).
    pub show_messages: bool,
}

/// Which checks a page shows: each schedule picked by id or by its labels is one check, and
/// each plugin named is one check covering all of its runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckSelection {
    pub schedules: Vec<String>,
    pub plugins: Vec<String>,
    /// Schedules whose labels include all of these.
    pub labels: BTreeMap<String, String>,
}

/// The runs one check of a page covers: a plugin's, or one schedule's of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckKey {
    pub plugin: String,
    /// `None`: every run of the plugin, scheduled or not.
    pub schedule: Option<String>,
}

impl CheckKey {
    /// What badges name the check by: the schedule's id, or the plugin's name.
    pub fn id(&self) -> &str {
        self.schedule.as_deref().unwrap_or(&self.plugin)
    }
}

/// The calendar day `at` falls on in `zone`, and the first millisecond of that day.
pub fn day_of(at: UnixMillis, zone: Tz) -> (NaiveDate, UnixMillis) {
    let local = zone
        .timestamp_millis_opt(at)
        .single()
        .map(|time| time.date_naive())
        .unwrap_or_default();
    (local, day_start(local, zone))
}

/// The first millisecond of `day` in `zone` (where midnight is skipped by a clock change, the
/// first instant that exists).
pub fn day_start(day: NaiveDate, zone: Tz) -> UnixMillis {
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    (0..=3)
        .find_map(|hour| {
            zone.from_local_datetime(&(midnight + chrono::Duration::hours(hour)))
                .earliest()
        })
        .map(|time| time.timestamp_millis())
        .unwrap_or_else(|| midnight.and_utc().timestamp_millis())
}

/// `YYYY-MM-DD`, as rollups store days.
pub fn day_text(day: NaiveDate) -> String {
    format!("{:04}-{:02}-{:02}", day.year(), day.month(), day.day())
}

/// Latency histogram buckets are `RATIO` wide: a percentile read from them is within 2 % of
/// the true value (the bucket's middle is reported).
const RATIO: f64 = 1.04;

/// The histogram bucket of a `passed_after_ms`.
pub fn latency_bucket(ms: i64) -> i64 {
    ((ms.max(0) as f64 + 1.0).ln() / RATIO.ln()).floor() as i64
}

/// The middle of a bucket, in milliseconds.
fn bucket_middle(bucket: i64) -> i64 {
    let low = RATIO.powf(bucket as f64) - 1.0;
    let high = RATIO.powf(bucket as f64 + 1.0) - 1.0;
    ((low * high).sqrt()).round().max(0.0) as i64
}

/// The `quantile` (0..=1) of a histogram of bucket → count.
pub fn percentile(histogram: &BTreeMap<i64, i64>, quantile: f64) -> Option<i64> {
    let total: i64 = histogram.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((quantile * total as f64).ceil() as i64).clamp(1, total);
    let mut seen = 0;
    for (bucket, count) in histogram {
        seen += count;
        if seen >= rank {
            return Some(bucket_middle(*bucket));
        }
    }
    None
}

/// How the finished runs of one check came out, on one day or over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub passed: i64,
    pub failed: i64,
    pub errored: i64,
    pub timed_out: i64,
    pub cancelled: i64,
}

impl Outcomes {
    pub fn add(&mut self, status: RunStatus, runs: i64) {
        match status {
            RunStatus::Passed => self.passed += runs,
            RunStatus::Failed => self.failed += runs,
            RunStatus::Errored => self.errored += runs,
            RunStatus::TimedOut => self.timed_out += runs,
            RunStatus::Cancelled => self.cancelled += runs,
            RunStatus::Queued | RunStatus::Running => {}
        }
    }

    pub fn merge(&mut self, other: &Outcomes) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.errored += other.errored;
        self.timed_out += other.timed_out;
        self.cancelled += other.cancelled;
    }

    /// Runs that reached a verdict: cancelled ones say nothing about the pipeline.
    pub fn decided(&self) -> i64 {
        self.passed + self.failed + self.errored + self.timed_out
    }

    /// The share of decided runs that passed; `None` without any.
    pub fn uptime(&self) -> Option<f64> {
        let decided = self.decided();
        (decided > 0).then(|| self.passed as f64 / decided as f64)
    }

    /// The worst verdict among these runs: failed, then timed out, then errored, then passed.
    pub fn worst(&self) -> Option<RunStatus> {
        [
            (self.failed, RunStatus::Failed),
            (self.timed_out, RunStatus::TimedOut),
            (self.errored, RunStatus::Errored),
            (self.passed, RunStatus::Passed),
            (self.cancelled, RunStatus::Cancelled),
        ]
        .into_iter()
        .find(|(runs, _)| *runs > 0)
        .map(|(_, status)| status)
    }
}

/// One check's runs on one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayRollup {
    pub day: NaiveDate,
    pub outcomes: Outcomes,
    /// The run that finished last that day.
    pub last_finished_at: UnixMillis,
    pub last_status: RunStatus,
}

/// One step of one check over a window of days.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepRollup {
    pub position: usize,
    pub name: String,
    pub passed: i64,
    /// Runs that ended on this step without passing it.
    pub ended_run: i64,
    pub attempts: i64,
    /// `passed_after_ms` by [`latency_bucket`].
    pub latency: BTreeMap<i64, i64>,
}

/// Consecutive failed runs of one plugin and schedule, until a run passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    pub started_at: UnixMillis,
    /// `None` while no run has passed since.
    pub ended_at: Option<UnixMillis>,
    pub last_failed_at: UnixMillis,
    pub runs: i64,
    pub failing_step: Option<String>,
    pub status: RunStatus,
    pub message: Option<String>,
}

/// One finished run as rollups see it.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub plugin: String,
    pub schedule: Option<String>,
    pub created_at: UnixMillis,
    pub finished_at: UnixMillis,
    pub status: RunStatus,
    pub message: Option<String>,
    pub steps: Vec<FinishedStep>,
}

#[derive(Debug, Clone)]
pub struct FinishedStep {
    pub position: usize,
    pub name: String,
    pub status: super::StepStatus,
    pub attempts: i64,
    pub passed_after_ms: Option<i64>,
}

impl FinishedRun {
    /// The step the run ended on without passing it.
    pub fn failing_step(&self) -> Option<&FinishedStep> {
        self.steps
            .iter()
            .find(|step| step.status.is_decided() && step.status != super::StepStatus::Passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_begins_at_local_midnight() {
        let berlin: Tz = "Europe/Berlin".parse().expect("zone");
        // 2026-12-01T23:30:00Z is already 2 December in Berlin (UTC+1).
        let at = 1_796_167_800_000;
        let (day, start) = day_of(at, berlin);
        assert_eq!(day_text(day), "2026-12-02");
        assert_eq!(start, 1_796_166_000_000, "2026-12-01T23:00:00Z");
        let (day, start) = day_of(at, Tz::UTC);
        assert_eq!(day_text(day), "2026-12-01");
        assert_eq!(start, 1_796_083_200_000);
        // São Paulo skipped midnight on 2018-11-04: the day begins at 01:00.
        let sao_paulo: Tz = "America/Sao_Paulo".parse().expect("zone");
        let day = NaiveDate::from_ymd_opt(2018, 11, 4).expect("date");
        assert_eq!(day_start(day, sao_paulo), 1_541_300_400_000);
    }

    #[test]
    fn percentiles_from_the_histogram_are_within_two_percent() {
        let samples: Vec<i64> = (1..=1000).map(|n| n * 37).collect();
        let mut histogram = BTreeMap::new();
        for sample in &samples {
            *histogram.entry(latency_bucket(*sample)).or_insert(0) += 1;
        }
        for (quantile, exact) in [(0.5, samples[499]), (0.95, samples[949])] {
            let read = percentile(&histogram, quantile).expect("samples") as f64;
            let error = (read - exact as f64).abs() / exact as f64;
            assert!(error <= 0.02, "{quantile}: {read} against {exact}");
        }
        assert_eq!(percentile(&BTreeMap::new(), 0.5), None);
        let zero = BTreeMap::from([(latency_bucket(0), 3)]);
        assert_eq!(percentile(&zero, 0.5), Some(0));
    }

    #[test]
    fn uptime_leaves_cancelled_runs_out_and_the_worst_verdict_wins() {
        let mut outcomes = Outcomes::default();
        outcomes.add(RunStatus::Passed, 3);
        outcomes.add(RunStatus::Cancelled, 5);
        assert_eq!(outcomes.uptime(), Some(1.0));
        assert_eq!(outcomes.worst(), Some(RunStatus::Passed));
        outcomes.add(RunStatus::Errored, 1);
        assert_eq!(outcomes.uptime(), Some(0.75));
        assert_eq!(outcomes.worst(), Some(RunStatus::Errored));
        outcomes.add(RunStatus::Failed, 1);
        assert_eq!(outcomes.worst(), Some(RunStatus::Failed));
        assert_eq!(Outcomes::default().uptime(), None);
    }
}
