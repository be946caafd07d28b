//! The status pages' daily aggregates (README, "Status pages"): a background job that one node
//! at a time runs (a lease on the `rollups` row of `jobs`) folds the runs that finished into
//! the days of every page's time zone, about once a second, so a page never reads raw runs
//! beyond its last 24 hours. `stepwise status rebuild` recomputes them from the stored runs.

use std::time::Duration;

use anyhow::Context;
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;

use crate::model::now_millis;
use crate::storage::{self, FOLD_BATCH, Store};

const JOB: &str = "rollups";

/// How often a node looks for finished runs to fold.
const EVERY: Duration = Duration::from_secs(1);

/// The rollup job of one node.
pub struct Rollups {
    store: Store,
    zones: Vec<Tz>,
    node: String,
    lease: Duration,
}

impl Rollups {
    pub fn new(store: Store, zones: Vec<Tz>, node: String, lease: Duration) -> Rollups {
        Rollups {
            store,
            zones,
            node,
            lease,
        }
    }

    /// Folds whenever this node gets the job's lease, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.fold_if_ours().await {
                tracing::warn!(%error, "folding finished runs into the status rollups failed; it is tried again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    async fn fold_if_ours(&self) -> storage::Result<()> {
        if !self.store.rollups_pending().await? {
            return Ok(());
        }
        let lease_ms = self.lease.as_millis() as i64;
        let Some(token) = self
            .store
            .claim_job(JOB, &self.node, now_millis(), lease_ms)
            .await?
        else {
            return Ok(());
        };
        let folded = async {
            loop {
                let folded = self
                    .store
                    .fold_finished_runs(&self.zones, FOLD_BATCH)
                    .await?;
                if folded < FOLD_BATCH {
                    return Ok(());
                }
                if !self.store.renew_job(JOB, token, lease_ms).await? {
                    return Ok(());
                }
            }
        }
        .await;
        self.store.finish_job(JOB, token, now_millis()).await?;
        folded
    }
}

/// Recomputes the aggregates from the stored runs (`stepwise status rebuild`), holding the
/// job's lease so that no node folds meanwhile; waits for a node that holds it.
pub async fn rebuild(store: &Store, zones: &[Tz], lease: Duration) -> anyhow::Result<u64> {
    let node = format!("rebuild-{}", std::process::id());
    let lease_ms = lease.as_millis() as i64;
    let deadline = tokio::time::Instant::now() + lease * 2 + Duration::from_secs(5);
    let token = loop {
        if let Some(token) = store.claim_job(JOB, &node, now_millis(), lease_ms).await? {
            break token;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "another node keeps the rollups job's lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let counted = store
        .rebuild_rollups(zones)
        .await
        .context("rebuilding the status rollups");
    store.finish_job(JOB, token, now_millis()).await?;
    counted
}
