//! Shadow versions' automatic decisions (README, "Changing a plugin while the server runs"):
//! about once a second, each node compares every current shadow whose grant (or the operator's
//! `[policy]`) sets `shadow = {…}` with its primaries, and promotes or drops it when the
//! comparison says so. No lease is needed: the decision is a conditional update that only one
//! node's transaction makes (`Store::decide_shadow`), with its audit entry and notifications.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::model::{NotifyEvent, ShadowOutcome, ShadowPolicy, ShadowTally, now_millis};
use crate::storage::{self, AuditEntry, CurrentShadow, ShadowDecision, Store};

/// How often a node compares the current shadows.
const EVERY: Duration = Duration::from_secs(1);

/// The actor of the audit entries this job writes.
pub const ACTOR: &str = "shadow";

pub struct Shadows {
    store: Store,
    settings: Arc<Settings>,
}

impl Shadows {
    pub fn new(store: Store, settings: Arc<Settings>) -> Shadows {
        Shadows { store, settings }
    }

    /// Compares and decides until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.decide_all().await {
                tracing::warn!(%error, "comparing shadow versions failed; it is tried again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    async fn decide_all(&self) -> storage::Result<()> {
        for current in self.store.current_shadows().await? {
            let Some(policy) = self.settings.policy.shadow_of(&current.grant_toml) else {
                continue;
            };
            let tally = self.store.shadow_tally(&current.shadow).await?;
            let Some(outcome) = tally.decide(&policy) else {
                continue;
            };
            let decision = self.decision(&current, outcome, &tally, &policy);
            if self.store.decide_shadow(&current.shadow, &decision).await? {
                tracing::info!(
                    plugin = %current.shadow.plugin_name,
                    version = %current.shadow.version,
                    outcome = %outcome,
                    finished = tally.finished,
                    disagreements = tally.disagreements,
                    "shadow version decided by its comparison"
                );
            }
        }
        Ok(())
    }

    fn decision(
        &self,
        current: &CurrentShadow,
        outcome: ShadowOutcome,
        tally: &ShadowTally,
        policy: &ShadowPolicy,
    ) -> ShadowDecision {
        let shadow = &current.shadow;
        let (action, event) = match outcome {
            ShadowOutcome::Promoted => ("shadow.promoted", NotifyEvent::ShadowPromoted),
            _ => ("shadow.dropped", NotifyEvent::ShadowDropped),
        };
        let figures = json!({
            "pairs": tally.pairs,
            "finished": tally.finished,
            "disagreements": tally.disagreements,
            "disagreement_rate": tally.disagreement_rate(),
            "primary_failures": tally.primary_failures,
            "shadow_failures": tally.shadow_failures,
            "regressions": tally.regressions,
            "promote_after_runs": policy.promote_after_runs,
            "max_disagreement": policy.max_disagreement,
            "rollback_on_worse": policy.rollback_on_worse,
        });
        let mut audit = AuditEntry::new(ACTOR, action, &shadow.plugin_name, now_millis())
            .with("version", shadow.version.as_str());
        if let Some(fields) = figures.as_object() {
            for (key, value) in fields {
                audit = audit.with(key, value.to_string());
            }
        }
        let notify = self
            .settings
            .notifiers
            .iter()
            .filter(|notifier| {
                notifier.on.contains(&event)
                    && (notifier.plugins.is_empty()
                        || notifier.plugins.contains(&shadow.plugin_name))
            })
            .map(|notifier| (notifier.name.clone(), event))
            .collect();
        ShadowDecision {
            outcome,
            figures: figures.to_string(),
            notify,
            audit,
        }
    }
}
