//! How long finished work is kept.

use std::time::Duration;

/// `[retention]`: how long finished work is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// A finished run (with its steps, labels and notifications) older than this is deleted.
    pub finished_runs: Duration,
    /// A schedule keeps at most this many finished runs, even younger ones; 0: no cap.
    pub keep_last_per_schedule: u32,
    /// Attempt rows (with their logs) older than this are deleted, the run's too.
    pub attempts: Duration,
    /// A plugin version no run uses and not active is deleted once this old.
    pub plugin_versions: Duration,
    /// The status pages' daily aggregates older than this are deleted; they outlive runs.
    pub rollups: Duration,
    /// How often a node looks for work (one node at a time does it).
    pub interval: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        const DAY: u64 = 24 * 3600;
        RetentionPolicy {
            finished_runs: Duration::from_secs(30 * DAY),
            keep_last_per_schedule: 100,
            attempts: Duration::from_secs(7 * DAY),
            plugin_versions: Duration::from_secs(90 * DAY),
            rollups: Duration::from_secs(400 * DAY),
            interval: Duration::from_secs(300),
        }
    }
}
