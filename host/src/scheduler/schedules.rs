//! Firing schedules: claims schedules whose next fire is due (the same lease mechanism as
//! runs), decides what becomes of every fire time that has come, with APScheduler's rules, and
//! records each fire, starting its run, in one transaction keyed by schedule and time.
//!
//! For each claimed schedule, the fire times from its stored next fire up to now are listed
//! (several after downtime). With `coalesce`, all but the latest are `missed` ("coalesced").
//! Each remaining fire later than `misfire_grace_ms` is `missed`; one that would exceed
//! `max_concurrent_runs` is `skipped`; the others start a run. Unlike APScheduler, which drops
//! late fires with a log line, every missed and skipped fire is recorded with its reason.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Wakeup;
use super::planning::{RunOptions, plan_run};
use super::trigger::Trigger;
use crate::config::Settings;
use crate::model::{FireOutcome, UnixMillis, now_millis};
use crate::storage::{self, ClaimedSchedule, FireWrite, NewFire, ScheduleOptions, Store};

/// Fire times listed per schedule and pass; a longer backlog is skipped over in one row.
const MAX_FIRES_PER_PASS: usize = 1_000;
/// Schedules claimed per pass.
const CLAIM_BATCH: usize = 32;

/// What to do with one fire time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub scheduled_at: UnixMillis,
    pub outcome: FireOutcome,
    pub reason: Option<String>,
}

/// The decisions for every fire time that has come, and where the schedule goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirePlan {
    pub decisions: Vec<Decision>,
    /// The next nominal fire time after `now`; `None` once the trigger is done.
    pub next_fire_at: Option<UnixMillis>,
}

/// Decides the fate of every fire time of a schedule up to `now`, starting at its stored
/// `next_fire_at` (due at `next_due_at`, jitter included), given how many of its runs are
/// unfinished. Pure: the caller supplies the clock.
pub fn plan_fires(
    trigger: &Trigger,
    options: &ScheduleOptions,
    next_fire_at: UnixMillis,
    next_due_at: UnixMillis,
    now: UnixMillis,
    mut unfinished: u32,
) -> FirePlan {
    let mut times = vec![next_fire_at];
    let mut passed_over = 0u64;
    let mut next = trigger.next_after(next_fire_at);
    while let Some(time) = next.filter(|time| *time <= now) {
        if times.len() < MAX_FIRES_PER_PASS {
            times.push(time);
        } else {
            passed_over += 1;
        }
        next = trigger.next_after(time);
    }
    let mut decisions = Vec::new();
    let keep_from = if options.coalesce { times.len() - 1 } else { 0 };
    let latest = times[times.len() - 1];
    for &time in &times[..keep_from] {
        decisions.push(Decision {
            scheduled_at: time,
            outcome: FireOutcome::Missed,
            reason: Some(format!(
                "coalesced into the fire scheduled at {}",
                rfc3339(latest)
            )),
        });
    }
    for &time in &times[keep_from..] {
        let due = if time == next_fire_at {
            next_due_at
        } else {
            time
        };
        let late = now - due;
        let decision = match options.misfire_grace_ms {
            Some(grace) if late > grace => Decision {
                scheduled_at: time,
                outcome: FireOutcome::Missed,
                reason: Some(format!(
                    "{late} ms late, beyond misfire_grace_ms of {grace} ms"
                )),
            },
            _ if unfinished >= options.max_concurrent_runs => Decision {
                scheduled_at: time,
                outcome: FireOutcome::Skipped,
                reason: Some(format!(
                    "{unfinished} runs of this schedule unfinished (max_concurrent_runs {})",
                    options.max_concurrent_runs
                )),
            },
            _ => {
                unfinished += 1;
                Decision {
                    scheduled_at: time,
                    outcome: FireOutcome::Fired,
                    reason: None,
                }
            }
        };
        decisions.push(decision);
    }
    if passed_over > 0
        && let Some(last) = decisions.last_mut()
    {
        let note = format!("{passed_over} more fire times before it were passed over unrecorded");
        last.reason = Some(match last.reason.take() {
            Some(reason) => format!("{reason}; {note}"),
            None => note,
        });
    }
    FirePlan {
        decisions,
        next_fire_at: next,
    }
}

/// A fire time as people read it in a reason: RFC 3339, UTC, milliseconds.
fn rfc3339(millis: UnixMillis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// The due time of a fire: its nominal time plus a random delay of up to the trigger's jitter.
pub fn due_time(trigger: &Trigger, fire_at: UnixMillis) -> UnixMillis {
    let jitter = trigger.jitter_ms();
    if jitter == 0 {
        fire_at
    } else {
        fire_at + fastrand::i64(0..=jitter)
    }
}

/// Wakes the schedule firer when a schedule is created or changed.
#[derive(Clone, Default)]
pub struct ScheduleWakeup(Arc<Notify>);

impl ScheduleWakeup {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// The loop that fires due schedules on this node.
pub struct Firer {
    store: Store,
    settings: Arc<Settings>,
    node_id: String,
    runs: Wakeup,
    wakeup: ScheduleWakeup,
}

impl Firer {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        node_id: String,
        runs: Wakeup,
        wakeup: ScheduleWakeup,
    ) -> Firer {
        Firer {
            store,
            settings,
            node_id,
            runs,
            wakeup,
        }
    }

    /// Fires due schedules until `shutdown`, sleeping until the next due one, a wake-up, or the
    /// scheduler backstop.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let now = now_millis();
            if let Err(error) = self.fire_due(now).await {
                tracing::warn!(%error, "firing schedules failed; retrying");
            }
            let now = now_millis();
            let wait = match self.store.next_schedule_due_after(now).await {
                Ok(Some(due)) => Duration::from_millis((due - now).max(0) as u64),
                _ => self.settings.scheduler_backstop,
            }
            .min(self.settings.scheduler_backstop);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wakeup.0.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass at time `now`: fires every schedule due by then. Returns the runs started.
    pub async fn fire_due(&self, now: UnixMillis) -> storage::Result<usize> {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let mut started = 0;
        loop {
            let claims = self
                .store
                .claim_due_schedules(&self.node_id, now, lease_ms, CLAIM_BATCH)
                .await?;
            let claimed = claims.len();
            for claim in claims {
                match self.fire(&claim, now).await {
                    Ok(runs) => started += runs,
                    Err(error) => {
                        tracing::warn!(schedule = %claim.id, %error, "firing a schedule failed; retrying after its lease")
                    }
                }
            }
            if claimed < CLAIM_BATCH {
                break;
            }
        }
        if started > 0 {
            self.runs.wake();
        }
        Ok(started)
    }

    async fn fire(&self, claim: &ClaimedSchedule, now: UnixMillis) -> storage::Result<usize> {
        let Some(schedule) = self.store.find_schedule(&claim.id).await? else {
            return Ok(0);
        };
        let (Some(next_fire_at), Some(next_due_at)) = (schedule.next_fire_at, schedule.next_due_at)
        else {
            return Ok(0);
        };
        let trigger = match Trigger::new(&schedule.trigger, schedule.created_at) {
            Ok(trigger) => trigger,
            Err(invalid) => {
                return Err(storage::Error::Corrupt(format!(
                    "schedule {} has an invalid trigger: {}",
                    schedule.id, invalid.message
                )));
            }
        };
        let unfinished = self.store.count_unfinished_runs(&schedule.id).await?;
        let plan = plan_fires(
            &trigger,
            &schedule.options,
            next_fire_at,
            next_due_at,
            now,
            unfinished,
        );
        let plugin = self.store.find_plugin(&schedule.plugin_name).await?;
        let params: Json = serde_json::from_str(&schedule.params).unwrap_or(Json::Null);
        let mut fires = Vec::with_capacity(plan.decisions.len());
        for decision in plan.decisions {
            let mut fire = NewFire {
                scheduled_at: decision.scheduled_at,
                outcome: decision.outcome,
                reason: decision.reason,
                run: None,
            };
            if decision.outcome == FireOutcome::Fired {
                let options = RunOptions {
                    step_timeouts: Default::default(),
                    retry: None,
                    poll_interval: schedule
                        .poll_interval_ms
                        .map(|ms| Duration::from_millis(ms as u64)),
                    timeout: schedule
                        .timeout_ms
                        .map(|ms| Duration::from_millis(ms as u64)),
                    labels: schedule.labels.clone(),
                    idempotency_key: None,
                    idempotency_fingerprint: None,
                    schedule_id: Some(schedule.id.clone()),
                    created_by: None,
                };
                let planned = match &plugin {
                    Some(plugin) => plan_run(plugin, &params, options, &self.settings, now)
                        .await
                        .map_err(|error| error.to_string()),
                    None => Err(format!(
                        "plugin {:?} no longer exists",
                        schedule.plugin_name
                    )),
                };
                match planned {
                    Ok(run) => fire.run = Some(run),
                    Err(reason) => {
                        fire.outcome = FireOutcome::Skipped;
                        fire.reason = Some(reason);
                    }
                }
            }
            fires.push(fire);
        }
        let write = FireWrite {
            schedule_id: schedule.id.clone(),
            lease_token: claim.lease_token,
            now,
            fires,
            next_fire_at: plan.next_fire_at,
            next_due_at: plan.next_fire_at.map(|fire_at| due_time(&trigger, fire_at)),
        };
        self.store.record_fires(&write).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TriggerSpec;

    fn every_second() -> Trigger {
        let spec = TriggerSpec::Interval {
            interval_ms: 1_000,
            jitter_ms: 0,
            start_at: Some(0),
            end_at: None,
        };
        Trigger::new(&spec, 0).expect("valid")
    }

    fn options(grace: Option<i64>, coalesce: bool, max_concurrent_runs: u32) -> ScheduleOptions {
        ScheduleOptions {
            misfire_grace_ms: grace,
            coalesce,
            max_concurrent_runs,
            paused: false,
        }
    }

    fn outcomes(plan: &FirePlan) -> Vec<(UnixMillis, FireOutcome)> {
        plan.decisions
            .iter()
            .map(|decision| (decision.scheduled_at, decision.outcome))
            .collect()
    }

    #[test]
    fn an_on_time_fire_starts_a_run_and_moves_on() {
        let plan = plan_fires(
            &every_second(),
            &options(Some(1_000), true, 1),
            5_000,
            5_000,
            5_020,
            0,
        );
        assert_eq!(outcomes(&plan), [(5_000, FireOutcome::Fired)]);
        assert_eq!(plan.next_fire_at, Some(6_000));
    }

    #[test]
    fn a_fire_later_than_the_grace_is_missed_with_its_reason() {
        let plan = plan_fires(
            &every_second(),
            &options(Some(100), true, 1),
            5_000,
            5_000,
            5_400,
            0,
        );
        assert_eq!(outcomes(&plan), [(5_000, FireOutcome::Missed)]);
        let reason = plan.decisions[0].reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("400 ms late, beyond misfire_grace_ms of 100 ms"),
            "{reason}"
        );
    }

    #[test]
    fn after_downtime_coalesce_keeps_only_the_latest_fire() {
        // Down from 5 s to 9.5 s: fires at 5, 6, 7, 8, 9 s have come.
        let plan = plan_fires(
            &every_second(),
            &options(Some(1_000), true, 1),
            5_000,
            5_000,
            9_500,
            0,
        );
        assert_eq!(
            outcomes(&plan),
            [
                (5_000, FireOutcome::Missed),
                (6_000, FireOutcome::Missed),
                (7_000, FireOutcome::Missed),
                (8_000, FireOutcome::Missed),
                (9_000, FireOutcome::Fired),
            ]
        );
        assert!(
            plan.decisions[0]
                .reason
                .as_deref()
                .unwrap_or_default()
                .contains("coalesced")
        );
        assert_eq!(plan.next_fire_at, Some(10_000));
    }

    #[test]
    fn after_downtime_without_coalesce_each_fire_is_judged_by_the_grace() {
        let plan = plan_fires(
            &every_second(),
            &options(Some(1_000), false, 10),
            5_000,
            5_000,
            7_500,
            0,
        );
        assert_eq!(
            outcomes(&plan),
            [
                (5_000, FireOutcome::Missed), // 2.5 s late
                (6_000, FireOutcome::Missed), // 1.5 s late
                (7_000, FireOutcome::Fired),  // 0.5 s late
            ]
        );
        let no_grace = plan_fires(
            &every_second(),
            &options(None, false, 10),
            5_000,
            5_000,
            7_500,
            0,
        );
        assert!(
            no_grace
                .decisions
                .iter()
                .all(|d| d.outcome == FireOutcome::Fired)
        );
    }

    #[test]
    fn a_fire_beyond_max_concurrent_runs_is_skipped() {
        let plan = plan_fires(
            &every_second(),
            &options(None, false, 2),
            5_000,
            5_000,
            7_000,
            1,
        );
        assert_eq!(
            outcomes(&plan),
            [
                (5_000, FireOutcome::Fired),
                (6_000, FireOutcome::Skipped),
                (7_000, FireOutcome::Skipped),
            ]
        );
        assert!(
            plan.decisions[1]
                .reason
                .as_deref()
                .unwrap_or_default()
                .contains("2 runs of this schedule unfinished (max_concurrent_runs 2)")
        );
    }

    #[test]
    fn a_one_shot_trigger_fires_once() {
        let once = Trigger::new(&TriggerSpec::At { at: 5_000 }, 0).expect("valid");
        let plan = plan_fires(&once, &options(None, true, 1), 5_000, 5_000, 8_000, 0);
        assert_eq!(outcomes(&plan), [(5_000, FireOutcome::Fired)]);
        assert_eq!(plan.next_fire_at, None);
    }

    #[test]
    fn jitter_delays_within_its_bound() {
        let spec = TriggerSpec::Interval {
            interval_ms: 1_000,
            jitter_ms: 250,
            start_at: Some(0),
            end_at: None,
        };
        let trigger = Trigger::new(&spec, 0).expect("valid");
        let delays: Vec<i64> = (0..1_000)
            .map(|_| due_time(&trigger, 5_000) - 5_000)
            .collect();
        assert!(
            delays.iter().all(|delay| (0..=250).contains(delay)),
            "{delays:?}"
        );
        assert!(
            delays.iter().any(|delay| *delay > 0),
            "jitter never applied"
        );
        // The jitter moves when a fire is due, never which nominal time it stands for.
        let plan = plan_fires(
            &trigger,
            &options(Some(1_000), true, 1),
            5_000,
            5_200,
            5_210,
            0,
        );
        assert_eq!(outcomes(&plan), [(5_000, FireOutcome::Fired)]);
        assert_eq!(plan.next_fire_at, Some(6_000));
    }
}
