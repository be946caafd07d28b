//! Retention (README, "Retention"): a background job that one node at a time runs (a lease
//! on the `retention` row of `jobs`), every `interval_ms`. It deletes attempt logs first, then
//! finished runs with their steps, then what outlives runs (schedule fires, the status pages'
//! daily aggregates after `rollups_days`), then plugin versions nothing needs, each in transactions of
//! at most `BATCH` rows that take their turn between claims and tick writes, and on SQLite
//! gives the freed pages back to the file system.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::model::{RetentionPolicy, UnixMillis, now_millis};
use crate::storage::{self, Aged, Pruned, Store};

/// Most rows one deleting transaction touches. Up to 1,000 would do; a tenth of that keeps
/// each transaction well under a millisecond (a 250-row delete took 0.2–1.9 ms), so a tick
/// that waits behind one in SQLite's writer queue is barely late (soak bench).
pub const BATCH: usize = 100;

const JOB: &str = "retention";

/// How long the change log behind live events keeps a change (or `attempts_days`, if
/// shorter): a stream that reconnects with an older `Last-Event-ID` is told to reset.
const EVENTS_KEPT: Duration = Duration::from_secs(3600);

/// Runs picked per round of deletion.
const RUNS_PER_ROUND: usize = 200;

/// The job uses at most one part in `SHARE` of the time: after each batch it waits
/// `SHARE - 1` times as long as the batch took, as PostgreSQL's autovacuum waits by its cost
/// delay. On SQLite the batches take the writer's turn, and their pages make the WAL
/// checkpoints in tick commits more frequent; spread out, a sweep leaves tick lag as it is
/// (soak bench). A backlog still goes at thousands of rows a second.
const SHARE: u32 = 20;

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub attempts: Pruned,
    /// Finished runs, with their steps, labels, notifications and remaining attempts.
    pub runs: Pruned,
    pub fires: Pruned,
    pub streaks: Pruned,
    /// Changes behind live events, kept an hour.
    pub events: Pruned,
    pub plugin_versions: Pruned,
    /// The status pages' daily aggregates and ended incidents.
    pub rollups: Pruned,
    /// SQLite pages given back to the file system.
    pub pages_reclaimed: u64,
}

impl Swept {
    pub fn rows(&self) -> u64 {
        self.parts().iter().map(|part| part.rows).sum()
    }

    /// Rows deleted by the largest single transaction of the sweep.
    pub fn largest_transaction(&self) -> u64 {
        self.parts()
            .iter()
            .map(|part| part.largest_transaction)
            .max()
            .unwrap_or(0)
    }

    fn parts(&self) -> [Pruned; 7] {
        [
            self.rollups,
            self.attempts,
            self.runs,
            self.fires,
            self.streaks,
            self.events,
            self.plugin_versions,
        ]
    }
}

/// The retention job of one node.
pub struct Retention {
    store: Store,
    policy: RetentionPolicy,
    node: String,
    lease: Duration,
}

/// The lease a sweep renews as it goes, and its pace, when it runs as the job.
struct Held<'a> {
    store: &'a Store,
    token: i64,
    lease: Duration,
    renewed: Instant,
    /// When the batch now ending began.
    working_since: Instant,
}

impl Held<'_> {
    /// Waits out the pause the last batch earned, then renews the lease once a third of it
    /// has passed; false if another node took it.
    async fn keep(&mut self) -> storage::Result<bool> {
        let worked = self.working_since.elapsed();
        tokio::time::sleep((worked * (SHARE - 1)).min(self.lease / 4)).await;
        self.working_since = Instant::now();
        if self.renewed.elapsed() < self.lease / 3 {
            return Ok(true);
        }
        self.renewed = Instant::now();
        self.store
            .renew_job(JOB, self.token, self.lease.as_millis() as i64)
            .await
    }
}

impl Retention {
    pub fn new(store: Store, policy: RetentionPolicy, node: String, lease: Duration) -> Retention {
        Retention {
            store,
            policy,
            node,
            lease,
        }
    }

    /// Sweeps whenever the job is due and this node gets its lease, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // Nodes look more often than the job is due, so a dead node's turn is taken soon.
        let look_every = self.policy.interval.min(Duration::from_secs(60));
        loop {
            if let Err(error) = self.sweep_if_due().await {
                tracing::warn!(%error, "retention sweep failed; it is tried again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(look_every) => {}
            }
        }
    }

    async fn sweep_if_due(&self) -> storage::Result<()> {
        let now = now_millis();
        let lease_ms = self.lease.as_millis() as i64;
        let Some(token) = self.store.claim_job(JOB, &self.node, now, lease_ms).await? else {
            return Ok(());
        };
        let started = Instant::now();
        let mut held = Held {
            store: &self.store,
            token,
            lease: self.lease,
            renewed: Instant::now(),
            working_since: Instant::now(),
        };
        let swept = sweep_with(&self.store, &self.policy, now, BATCH, Some(&mut held)).await;
        let next_due_at = now_millis() + self.policy.interval.as_millis() as i64;
        self.store.finish_job(JOB, token, next_due_at).await?;
        let swept = swept?;
        if swept.rows() > 0 {
            tracing::info!(
                attempts = swept.attempts.rows,
                run_rows = swept.runs.rows,
                fires = swept.fires.rows,
                plugin_version_rows = swept.plugin_versions.rows,
                pages_reclaimed = swept.pages_reclaimed,
                largest_transaction = swept.largest_transaction(),
                took_ms = started.elapsed().as_millis() as u64,
                "retention sweep"
            );
        }
        Ok(())
    }
}

/// One sweep as of `now`, in transactions of at most `batch` rows.
pub async fn sweep(
    store: &Store,
    policy: &RetentionPolicy,
    now: UnixMillis,
    batch: usize,
) -> storage::Result<Swept> {
    sweep_with(store, policy, now, batch, None).await
}

async fn sweep_with(
    store: &Store,
    policy: &RetentionPolicy,
    now: UnixMillis,
    batch: usize,
    mut held: Option<&mut Held<'_>>,
) -> storage::Result<Swept> {
    let before = |age: Duration| now - age.as_millis() as i64;
    let mut swept = Swept::default();
    // Attempt logs first, then whole runs, then what outlives runs.
    let (done, pruned) = drain_aged(
        store,
        Aged::Attempts,
        before(policy.attempts),
        batch,
        &mut held,
    )
    .await?;
    swept.attempts = pruned;
    if !done {
        return Ok(swept);
    }
    let cap = policy.keep_last_per_schedule;
    for by_count in [false, true] {
        if by_count && cap == 0 {
            continue;
        }
        loop {
            let ids = if by_count {
                store.runs_beyond_schedule_keep(cap, RUNS_PER_ROUND).await?
            } else {
                store
                    .runs_finished_before(before(policy.finished_runs), RUNS_PER_ROUND)
                    .await?
            };
            if ids.is_empty() {
                break;
            }
            let pruned = store.delete_runs(&ids, batch).await?;
            swept.runs.merge(pruned);
            if !still_ours(&mut held).await? {
                return Ok(swept);
            }
            if pruned.rows == 0 {
                break;
            }
        }
    }
    for what in [
        Aged::ScheduleFires,
        Aged::NotifyStreaks,
        Aged::Events,
        Aged::RollupDays,
        Aged::RollupSteps,
        Aged::RollupLatency,
        Aged::Incidents,
    ] {
        let age = match what {
            // No longer than the attempts the changes were about.
            Aged::Events => EVENTS_KEPT.min(policy.attempts),
            Aged::RollupDays | Aged::RollupSteps | Aged::RollupLatency | Aged::Incidents => {
                policy.rollups
            }
            _ => policy.finished_runs,
        };
        let (done, pruned) = drain_aged(store, what, before(age), batch, &mut held).await?;
        match what {
            Aged::ScheduleFires => swept.fires = pruned,
            Aged::NotifyStreaks => swept.streaks = pruned,
            Aged::Events => swept.events = pruned,
            _ => swept.rollups.merge(pruned),
        }
        if !done {
            return Ok(swept);
        }
    }
    loop {
        let pruned = store
            .delete_unused_plugin_versions(before(policy.plugin_versions), batch)
            .await?;
        swept.plugin_versions.merge(pruned);
        if !still_ours(&mut held).await? {
            return Ok(swept);
        }
        if pruned.rows == 0 {
            break;
        }
    }
    if swept.rows() > 0 {
        swept.pages_reclaimed = reclaim_space(store, &mut held).await?;
    }
    Ok(swept)
}

/// Gives the file's free pages back to the file system once they are more than a quarter of
/// it (SQLite; PostgreSQL's autovacuum does this itself), a step at a time. Fewer free pages
/// are left for the next inserts to reuse: moving pages back and forth on every sweep would
/// only write and checkpoint in the writer's turn, which ticks wait for. Returns the pages
/// given back.
async fn reclaim_space(store: &Store, held: &mut Option<&mut Held<'_>>) -> storage::Result<u64> {
    let Some((first, pages)) = store.free_pages().await? else {
        return Ok(0);
    };
    if first * 4 < pages {
        return Ok(0);
    }
    let mut free = first;
    while free > 0 && still_ours(held).await? {
        store.vacuum_step().await?;
        let (left, _) = store.free_pages().await?.unwrap_or_default();
        if left >= free {
            // Not in incremental mode after all (a file from elsewhere): nothing to gain.
            break;
        }
        free = left;
    }
    Ok(first - free)
}

/// Deletes `what` older than `before` a batch at a time until a batch comes back short.
/// Returns false as its first value if the job's lease was lost on the way.
async fn drain_aged(
    store: &Store,
    what: Aged,
    before: UnixMillis,
    batch: usize,
    held: &mut Option<&mut Held<'_>>,
) -> storage::Result<(bool, Pruned)> {
    let mut pruned = Pruned::default();
    loop {
        let deleted = store.delete_aged(what, before, batch).await?;
        pruned.merge(Pruned {
            rows: deleted,
            largest_transaction: deleted,
        });
        if !still_ours(held).await? {
            return Ok((false, pruned));
        }
        if deleted < batch as u64 {
            return Ok((true, pruned));
        }
    }
}

/// Between two batches: whether this node still holds the job (always, outside the job).
async fn still_ours(held: &mut Option<&mut Held<'_>>) -> storage::Result<bool> {
    match held {
        Some(held) => held.keep().await,
        None => Ok(true),
    }
}
