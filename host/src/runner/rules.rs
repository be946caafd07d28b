//! The rules of a tick, as pure functions of a run's state and the clock: when a run or a step
//! is out of time, and what a call's outcome means for the step and the run. The runner and
//! `stepwise dev` both follow them, so a check behaves the same on a laptop and on a server.
//! Times are Unix milliseconds; `dev` reads the same wall clock the server does.

use std::time::Duration;

use crate::model::{AttemptOutcome, Retry, RunStatus, StepStatus, UnixMillis};

/// A step's budget, from the first place that sets one: the run's own (`step_timeouts` of its
/// trigger), the grant's `[steps.NAME] timeout_ms`, the plugin's `describe`, the host's
/// default.
pub fn step_budget(
    run: Option<Duration>,
    grant: Option<Duration>,
    described: Option<Duration>,
    default: Duration,
) -> Duration {
    run.or(grant).or(described).unwrap_or(default)
}

/// What the rules read of a run between calls.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    pub created_at: UnixMillis,
    pub deadline_at: UnixMillis,
    pub poll_interval_ms: i64,
    pub max_errors: u32,
}

/// What the rules read of the step being called.
#[derive(Debug, Clone, Copy)]
pub struct StepClock<'a> {
    pub name: &'a str,
    /// Its budget; `None` for no limit.
    pub timeout_ms: Option<i64>,
    pub max_attempts: Option<u32>,
    /// When its first call started; `None` before it.
    pub first_attempt_at: Option<UnixMillis>,
}

/// How a run ends at its current step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub step: StepStatus,
    pub run: RunStatus,
    /// The run's message, which names the step.
    pub message: String,
    /// The step's own message, when it is not the run's (the plugin's words).
    pub step_message: Option<String>,
}

/// Before a call at `now`: the end of the run when its deadline has passed, or the step's
/// budget. The budget is judged at the time the tick was due (`due_at`, for the tick's first
/// call; later steps of a tick are judged at `now`), not when the host got to it: a poll that
/// fell due within the budget is made however late a busy or restarted host is, so the host's
/// lag never turns into the step's `timed_out`.
pub fn out_of_time(
    run: &RunClock,
    step: &StepClock<'_>,
    now: UnixMillis,
    due_at: Option<UnixMillis>,
) -> Option<Ending> {
    if now >= run.deadline_at {
        return Some(Ending {
            step: StepStatus::TimedOut,
            run: RunStatus::TimedOut,
            message: format!(
                "run deadline passed ({} ms after creation) while step {:?} was not done",
                run.deadline_at - run.created_at,
                step.name
            ),
            step_message: None,
        });
    }
    let (timeout_ms, first_attempt_at) = (step.timeout_ms?, step.first_attempt_at?);
    let judged_at = due_at.map_or(now, |due_at| due_at.min(now));
    (judged_at >= first_attempt_at + timeout_ms).then(|| Ending {
        step: StepStatus::TimedOut,
        run: RunStatus::TimedOut,
        message: format!(
            "step {:?} was still pending after its timeout of {timeout_ms} ms",
            step.name
        ),
        step_message: None,
    })
}

/// One call's result, as the rules need it.
#[derive(Debug, Clone, Copy)]
pub struct CallResult<'a> {
    pub outcome: AttemptOutcome,
    /// The plugin's message (empty without one).
    pub message: &'a str,
    /// The attempt's number for this step, from 1.
    pub attempt: u32,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
    /// The run's errored calls so far, this one included.
    pub errors: u32,
}

/// What a call's outcome means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The step passed: the next one is called at once, or the run passes after the last.
    Passed,
    /// The step stays pending with this message, and is called again at `next_tick_at`.
    Again {
        next_tick_at: UnixMillis,
        message: String,
    },
    Ends(Ending),
}

/// What a call's result means for its step and run. `retry` is the backoff after an errored
/// call (the run's, else the grant's); without one an errored call waits the poll interval, as
/// a pending one does.
pub fn decide(
    run: &RunClock,
    step: &StepClock<'_>,
    call: &CallResult<'_>,
    retry: Option<Retry>,
) -> Verdict {
    let message = call.message;
    match call.outcome {
        AttemptOutcome::Passed => Verdict::Passed,
        AttemptOutcome::Pending if step.max_attempts.is_some_and(|max| call.attempt >= max) => {
            Verdict::Ends(Ending {
                step: StepStatus::Failed,
                run: RunStatus::Failed,
                message: format!(
                    "step {:?} was still pending after {} attempts: {message}",
                    step.name, call.attempt
                ),
                step_message: None,
            })
        }
        AttemptOutcome::Pending => Verdict::Again {
            next_tick_at: next_tick_at(run, step, call, run.poll_interval_ms),
            message: message.to_owned(),
        },
        AttemptOutcome::Failed => Verdict::Ends(Ending {
            step: StepStatus::Failed,
            run: RunStatus::Failed,
            message: format!("step {:?} failed: {message}", step.name),
            step_message: Some(message.to_owned()),
        }),
        AttemptOutcome::Errored if call.errors >= run.max_errors => Verdict::Ends(Ending {
            step: StepStatus::Errored,
            run: RunStatus::Errored,
            message: format!(
                "step {:?} errored {} times (max_errors {}); last error: {message}",
                step.name, call.errors, run.max_errors
            ),
            step_message: Some(message.to_owned()),
        }),
        AttemptOutcome::Errored => {
            let wait_ms = retry.map_or(run.poll_interval_ms, |retry| {
                retry.delay(call.errors).as_millis() as i64
            });
            Verdict::Again {
                next_tick_at: next_tick_at(run, step, call, wait_ms),
                message: format!("errored: {message}"),
            }
        }
    }
}

/// `wait_ms` after the call ended, or sooner when the step's budget or the run's deadline
/// falls first: the tick then ends the run on time.
fn next_tick_at(run: &RunClock, step: &StepClock<'_>, call: &CallResult<'_>, wait_ms: i64) -> i64 {
    let first_attempt_at = step.first_attempt_at.unwrap_or(call.started_at);
    let mut next = (call.finished_at + wait_ms).min(run.deadline_at);
    if let Some(timeout_ms) = step.timeout_ms {
        next = next.min(first_attempt_at + timeout_ms);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: RunClock = RunClock {
        created_at: 0,
        deadline_at: 60_000,
        poll_interval_ms: 1_000,
        max_errors: 3,
    };

    fn step(timeout_ms: Option<i64>, max_attempts: Option<u32>) -> StepClock<'static> {
        StepClock {
            name: "ingest",
            timeout_ms,
            max_attempts,
            first_attempt_at: Some(10_000),
        }
    }

    fn call(outcome: AttemptOutcome, attempt: u32, errors: u32) -> CallResult<'static> {
        CallResult {
            outcome,
            message: "why",
            attempt,
            started_at: 12_000,
            finished_at: 12_100,
            errors,
        }
    }

    #[test]
    fn the_step_budget_comes_from_the_first_place_that_sets_one() {
        let s = Duration::from_secs;
        let cases = [
            ((Some(s(1)), Some(s(2)), Some(s(3))), s(1)),
            ((None, Some(s(2)), Some(s(3))), s(2)),
            ((None, None, Some(s(3))), s(3)),
            ((None, None, None), s(9)),
        ];
        for ((run, grant, described), expected) in cases {
            assert_eq!(step_budget(run, grant, described, s(9)), expected);
        }
    }

    #[test]
    fn out_of_time_judges_the_deadline_at_now_and_the_budget_at_the_due_time() {
        // (timeout, now, due_at) → ends?
        let cases = [
            (None, 59_999, None, None),
            (None, 60_000, None, Some(RunStatus::TimedOut)),
            (Some(5_000), 14_999, None, None),
            (Some(5_000), 15_000, None, Some(RunStatus::TimedOut)),
            // Due within the budget: called however late the host is.
            (Some(5_000), 20_000, Some(14_999), None),
            (Some(5_000), 20_000, Some(15_000), Some(RunStatus::TimedOut)),
            // A deadline is never excused by lag.
            (Some(5_000), 60_000, Some(11_000), Some(RunStatus::TimedOut)),
        ];
        for (timeout, now, due_at, expected) in cases {
            let ending = out_of_time(&RUN, &step(timeout, None), now, due_at);
            assert_eq!(
                ending.as_ref().map(|ending| ending.run),
                expected,
                "{timeout:?} {now} {due_at:?}: {ending:?}"
            );
        }
        let never_called = StepClock {
            first_attempt_at: None,
            ..step(Some(1), None)
        };
        assert_eq!(out_of_time(&RUN, &never_called, 50_000, None), None);
    }

    #[test]
    fn each_outcome_leads_where_the_table_says() {
        let backoff = Retry {
            initial: Duration::from_millis(200),
            factor: 2.0,
            max: Duration::from_secs(10),
        };
        use AttemptOutcome::*;
        // (call, step timeout, max_attempts, retry) → verdict
        type Case = (
            CallResult<'static>,
            Option<i64>,
            Option<u32>,
            Option<Retry>,
            Verdict,
        );
        let cases: Vec<Case> = vec![
            (call(Passed, 1, 0), None, None, None, Verdict::Passed),
            (
                call(Pending, 1, 0),
                None,
                None,
                None,
                Verdict::Again {
                    next_tick_at: 13_100,
                    message: "why".into(),
                },
            ),
            // The next tick falls at the step's budget when that comes first.
            (
                call(Pending, 1, 0),
                Some(2_500),
                None,
                None,
                Verdict::Again {
                    next_tick_at: 12_500,
                    message: "why".into(),
                },
            ),
            (
                call(Pending, 3, 0),
                None,
                Some(3),
                None,
                Verdict::Ends(Ending {
                    step: StepStatus::Failed,
                    run: RunStatus::Failed,
                    message: "step \"ingest\" was still pending after 3 attempts: why".into(),
                    step_message: None,
                }),
            ),
            (
                call(Failed, 1, 0),
                None,
                None,
                None,
                Verdict::Ends(Ending {
                    step: StepStatus::Failed,
                    run: RunStatus::Failed,
                    message: "step \"ingest\" failed: why".into(),
                    step_message: Some("why".into()),
                }),
            ),
            (
                call(Errored, 1, 2),
                None,
                None,
                None,
                Verdict::Again {
                    next_tick_at: 13_100,
                    message: "errored: why".into(),
                },
            ),
            // The second error waits initial × factor.
            (
                call(Errored, 2, 2),
                None,
                None,
                Some(backoff),
                Verdict::Again {
                    next_tick_at: 12_500,
                    message: "errored: why".into(),
                },
            ),
            (
                call(Errored, 3, 3),
                None,
                None,
                Some(backoff),
                Verdict::Ends(Ending {
                    step: StepStatus::Errored,
                    run: RunStatus::Errored,
                    message: "step \"ingest\" errored 3 times (max_errors 3); last error: why"
                        .into(),
                    step_message: Some("why".into()),
                }),
            ),
        ];
        for (result, timeout, max_attempts, retry, expected) in cases {
            assert_eq!(
                decide(&RUN, &step(timeout, max_attempts), &result, retry),
                expected,
                "{result:?} {timeout:?} {max_attempts:?}"
            );
        }
        // A first call's own start is the budget's start.
        let first = StepClock {
            first_attempt_at: None,
            ..step(Some(1_000), None)
        };
        assert_eq!(
            decide(&RUN, &first, &call(Pending, 1, 0), None),
            Verdict::Again {
                next_tick_at: 13_000,
                message: "why".into()
            }
        );
        // Never past the run's deadline.
        let late = CallResult {
            finished_at: 59_900,
            ..call(Pending, 1, 0)
        };
        assert_eq!(
            decide(&RUN, &step(None, None), &late, None),
            Verdict::Again {
                next_tick_at: 60_000,
                message: "why".into()
            }
        );
    }
}
