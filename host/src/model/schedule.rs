//! When a schedule fires, and what became of each fire time.

use super::UnixMillis;

/// When a schedule fires: a cron expression in a time zone, a fixed interval, or
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerSpec {
    Cron {
        expr: String,
        timezone: String,
    },
    Interval {
        interval_ms: i64,
        /// Each fire is delayed by a random 0..=jitter_ms.
        jitter_ms: i64,
        start_at: Option<UnixMillis>,
        end_at: Option<UnixMillis>,
    },
    At {
        at: UnixMillis,
    },
}

/// What became of one scheduled fire time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireOutcome {
    /// A run was started.
    Fired,
    /// Too late (beyond `misfire_grace_ms`), or folded into a later fire by `coalesce`.
    Missed,
    /// On time, but not started (`max_concurrent_runs` reached, params no longer valid).
    Skipped,
}

impl FireOutcome {
    pub const ALL: [FireOutcome; 3] = [
        FireOutcome::Fired,
        FireOutcome::Missed,
        FireOutcome::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FireOutcome::Fired => "fired",
            FireOutcome::Missed => "missed",
            FireOutcome::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<FireOutcome> {
        match text {
            "fired" => Some(FireOutcome::Fired),
            "missed" => Some(FireOutcome::Missed),
            "skipped" => Some(FireOutcome::Skipped),
            _ => None,
        }
    }
}
