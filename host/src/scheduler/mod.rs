//! Decides *when*: claims due runs through leases (never more than the free concurrency
//! permits), hands each to the runner on its own task, and sleeps until the next due tick, a
//! wake-up from the API, or the backstop interval. It claims [`LOOKAHEAD`] ahead of the due
//! time, so that the claim's round trip, and this loop's own wake-up on a busy machine, are
//! over before the tick is due; the runner waits for the due time before it calls. On
//! shutdown it stops claiming, lets the ticks in flight finish, and releases this node's
//! leases. Knows nothing about wasm.

pub mod planning;
pub mod schedules;
pub mod trigger;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::model::now_millis;
use crate::runner::Runner;
use crate::storage::Store;

/// How long before its due time a tick is claimed. Under load (twenty hostile plugins beside
/// well-behaved runs), most ticks that started more than 5 ms late did so because this loop
/// woke late or the claim waited for the database's writer, not because the call did: a
/// claim made this much ahead hides both. The lease covers the wait; a permit is held no
/// longer than this before its tick's time.
pub const LOOKAHEAD: Duration = Duration::from_millis(20);

/// Wakes the scheduler when new work arrives, so a fresh run does not wait for the backstop.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// A tick's share of `max_concurrent_ticks`, held while it calls its plugin and given back
/// before the tick's last write is committed; then the loop claims the next runs. Held until
/// the commit, a permit spent part of its time waiting for the writer while runs were due
/// (`steps`: 22,555–36,519 steps/s with it given back against 16,611–34,144 held; ahead in
/// each of seven side-by-side rounds).
struct CallsPermit {
    permit: Option<OwnedSemaphorePermit>,
    wakeup: Wakeup,
}

impl Drop for CallsPermit {
    fn drop(&mut self) {
        // Given back before the wake-up, so that the woken loop finds it free.
        drop(self.permit.take());
        self.wakeup.wake();
    }
}

pub struct Scheduler {
    store: Store,
    runner: Arc<Runner>,
    settings: Arc<Settings>,
    node_id: String,
    wakeup: Wakeup,
}

impl Scheduler {
    pub fn new(
        store: Store,
        runner: Runner,
        settings: Arc<Settings>,
        node_id: String,
        wakeup: Wakeup,
    ) -> Scheduler {
        Scheduler {
            store,
            runner: Arc::new(runner),
            settings,
            node_id,
            wakeup,
        }
    }

    /// Claims and runs ticks until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent_ticks));
        let mut ticks = JoinSet::new();
        let lease_ms = self.settings.lease.as_millis() as i64;
        let lookahead = LOOKAHEAD.as_millis() as i64;
        loop {
            while let Some(finished) = ticks.try_join_next() {
                if let Err(error) = finished {
                    tracing::error!(%error, "a tick task panicked");
                }
            }
            let free = permits.available_permits();
            if free > 0 {
                let horizon = now_millis() + lookahead;
                match self
                    .store
                    .claim_due_runs(&self.node_id, horizon, lease_ms, free)
                    .await
                {
                    Ok(claims) => {
                        let claimed_all = claims.len() == free;
                        for claim in claims {
                            let Ok(permit) = permits.clone().try_acquire_owned() else {
                                break;
                            };
                            let runner = self.runner.clone();
                            let wakeup = self.wakeup.clone();
                            let calls = CallsPermit {
                                permit: Some(permit),
                                wakeup: wakeup.clone(),
                            };
                            ticks.spawn(async move {
                                if let Err(error) = runner.tick(claim.clone(), calls).await {
                                    // Our side failed, not the plugin: the run is not charged,
                                    // and the tick is tried again when the lease expires.
                                    tracing::warn!(run_id = %claim.id, %error, "tick failed; will retry");
                                }
                                // Its write may have made a run due sooner than this loop
                                // planned to look.
                                wakeup.wake();
                            });
                        }
                        if claimed_all {
                            continue;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming due runs failed; retrying"),
                }
            }
            let now = now_millis();
            let wait = match self.store.next_due_after(now + lookahead).await {
                Ok(Some(due)) => Duration::from_millis((due - lookahead - now).max(0) as u64),
                _ => self.settings.scheduler_backstop,
            }
            .min(self.settings.scheduler_backstop);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wakeup.0.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(
            in_flight = ticks.len(),
            "scheduler stopping; letting ticks in flight finish"
        );
        while ticks.join_next().await.is_some() {}
        match self.store.release_leases(&self.node_id).await {
            Ok(released) => tracing::info!(released, "scheduler stopped"),
            Err(error) => tracing::warn!(%error, "releasing leases at shutdown failed"),
        }
    }
}
