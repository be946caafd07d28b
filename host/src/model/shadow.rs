//! Shadow versions (README, "Changing a plugin while the server runs"): how a shadow's runs
//! compare with the primaries they ran beside, and when that comparison promotes or drops it.

use std::collections::BTreeMap;

use super::{RunStatus, StepStatus, latency_bucket, percentile};

text_enum!(
    /// How a shadow ended: `promoted` (it became the active version, by its comparison or
    /// by someone activating it), `dropped` (its comparison found it worse), `replaced` (another
    /// version became the shadow) or `stopped` (someone stopped it).
    ShadowOutcome {
        Promoted => "promoted",
        Dropped => "dropped",
        Replaced => "replaced",
        Stopped => "stopped",
    }
);

/// When a shadow is promoted or dropped without anyone asking: a grant's or the policy's
/// `shadow = { promote_after_runs, max_disagreement, rollback_on_worse }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowPolicy {
    /// Finished pairs needed before a promotion.
    pub promote_after_runs: u32,
    /// The share of finished pairs that may disagree (0 to 1); also the share by which the
    /// shadow may fail more often than the primary before it is dropped.
    pub max_disagreement: f64,
    /// Drop a shadow that fails more often than the primary beyond the bound.
    pub rollback_on_worse: bool,
}

/// Runs by how they ended, on one side of the comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub passed: u64,
    pub failed: u64,
    pub errored: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    /// Queued or running.
    pub unfinished: u64,
}

impl StatusCounts {
    fn add(&mut self, status: RunStatus, count: u64) {
        let slot = match status {
            RunStatus::Passed => &mut self.passed,
            RunStatus::Failed => &mut self.failed,
            RunStatus::Errored => &mut self.errored,
            RunStatus::TimedOut => &mut self.timed_out,
            RunStatus::Cancelled => &mut self.cancelled,
            RunStatus::Queued | RunStatus::Running => &mut self.unfinished,
        };
        *slot += count;
    }
}

/// A shadow's runs against their primaries. A pair is *finished* when both runs ended with a
/// verdict (neither is unfinished nor cancelled); only finished pairs are compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowTally {
    pub primary: StatusCounts,
    pub shadow: StatusCounts,
    pub pairs: u64,
    pub finished: u64,
    /// Finished pairs whose two runs ended differently.
    pub disagreements: u64,
    /// Failures (failed, errored, timed out) among finished pairs, of each side.
    pub primary_failures: u64,
    pub shadow_failures: u64,
    /// Finished pairs where the primary passed and the shadow failed.
    pub regressions: u64,
}

impl ShadowTally {
    /// The tally of `(primary's status, shadow's status, pairs that ended so)`.
    pub fn of_pairs(pairs: impl IntoIterator<Item = (RunStatus, RunStatus, u64)>) -> ShadowTally {
        let mut tally = ShadowTally::default();
        for (primary, shadow, count) in pairs {
            tally.primary.add(primary, count);
            tally.shadow.add(shadow, count);
            tally.pairs += count;
            let decided =
                |status: RunStatus| status.is_terminal() && status != RunStatus::Cancelled;
            if decided(primary) && decided(shadow) {
                tally.finished += count;
                if primary != shadow {
                    tally.disagreements += count;
                }
                if primary.is_failure() {
                    tally.primary_failures += count;
                }
                if shadow.is_failure() {
                    tally.shadow_failures += count;
                    if primary == RunStatus::Passed {
                        tally.regressions += count;
                    }
                }
            }
        }
        tally
    }

    /// Disagreements per finished pair (0 before any).
    pub fn disagreement_rate(&self) -> f64 {
        if self.finished == 0 {
            0.0
        } else {
            self.disagreements as f64 / self.finished as f64
        }
    }

    /// What `policy` makes of this tally, if anything yet.
    ///
    /// A shadow is dropped as soon as its regressions (it failed where the primary passed)
    /// exceed the bound over `promote_after_runs` pairs (or over the finished pairs, once
    /// there are more): even if every later pair agreed, it could not come back within the
    /// bound by then. So a broken build is dropped after a few runs, not after all of them;
    /// runs it fixes elsewhere do not make up for the runs it breaks. It is promoted once
    /// `promote_after_runs` pairs finished and at most `max_disagreement` of them disagree.
    /// A shadow that disagrees only by passing where the primary fails is neither: a person
    /// decides.
    pub fn decide(&self, policy: &ShadowPolicy) -> Option<ShadowOutcome> {
        let horizon = self.finished.max(u64::from(policy.promote_after_runs));
        if policy.rollback_on_worse
            && self.regressions as f64 > policy.max_disagreement * horizon as f64
        {
            return Some(ShadowOutcome::Dropped);
        }
        let enough = self.finished >= u64::from(policy.promote_after_runs.max(1));
        (enough && self.disagreements as f64 <= policy.max_disagreement * self.finished as f64)
            .then_some(ShadowOutcome::Promoted)
    }
}

/// One step's figures on one side of the comparison: how often it passed, the calls it
/// took, and when it passed (`passed_after_ms`, in the status pages' 4 % buckets).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepSide {
    /// Runs in which the step reached a verdict.
    pub decided: u64,
    pub passed: u64,
    /// Calls made, over every run that called it.
    pub attempts: u64,
    pub max_passed_after_ms: Option<i64>,
    passed_after: BTreeMap<i64, i64>,
}

impl StepSide {
    pub fn add(&mut self, status: StepStatus, attempts: u32, passed_after_ms: Option<i64>) {
        self.attempts += u64::from(attempts);
        if status.is_decided() {
            self.decided += 1;
        }
        if status == StepStatus::Passed {
            self.passed += 1;
            if let Some(ms) = passed_after_ms {
                *self.passed_after.entry(latency_bucket(ms)).or_insert(0) += 1;
                self.max_passed_after_ms = self.max_passed_after_ms.max(Some(ms));
            }
        }
    }

    /// `passed_after_ms` at `quantile` (0 to 1) of the runs where the step passed.
    pub fn passed_after_ms(&self, quantile: f64) -> Option<i64> {
        percentile(&self.passed_after, quantile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStatus::*;

    const POLICY: ShadowPolicy = ShadowPolicy {
        promote_after_runs: 50,
        max_disagreement: 0.02,
        rollback_on_worse: true,
    };

    #[test]
    fn only_pairs_that_both_ended_with_a_verdict_are_compared() {
        let tally = ShadowTally::of_pairs([
            (Passed, Passed, 3),
            (Passed, Failed, 1),
            (Failed, TimedOut, 1),
            (Cancelled, Cancelled, 2),
            (Passed, Running, 4),
        ]);
        assert_eq!(tally.pairs, 11);
        assert_eq!(tally.finished, 5);
        assert_eq!(tally.disagreements, 2);
        assert_eq!((tally.primary_failures, tally.shadow_failures), (1, 2));
        assert_eq!(tally.regressions, 1);
        assert_eq!(tally.primary.passed, 8);
        assert_eq!(tally.shadow.unfinished, 4);
        assert_eq!(tally.shadow.cancelled, 2);
        assert!((tally.disagreement_rate() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn an_agreeing_shadow_is_promoted_once_enough_pairs_finished() {
        assert_eq!(
            ShadowTally::of_pairs([(Passed, Passed, 49)]).decide(&POLICY),
            None
        );
        assert_eq!(
            ShadowTally::of_pairs([(Passed, Passed, 50)]).decide(&POLICY),
            Some(ShadowOutcome::Promoted)
        );
        // One disagreement in 50 is within 2 %; both failing is agreement.
        let tally = ShadowTally::of_pairs([(Passed, Passed, 48), (Failed, Failed, 1)]);
        assert_eq!(tally.decide(&POLICY), None);
        let tally = ShadowTally::of_pairs([
            (Passed, Passed, 48),
            (Failed, Failed, 1),
            (Passed, Failed, 1),
        ]);
        assert_eq!(tally.decide(&POLICY), Some(ShadowOutcome::Promoted));
    }

    #[test]
    fn a_worse_shadow_is_dropped_as_soon_as_it_cannot_come_back() {
        // 2 % of 50 is one extra failure: the second one drops it, long before 50 runs.
        let one = ShadowTally::of_pairs([(Passed, Passed, 3), (Passed, Failed, 1)]);
        assert_eq!(one.decide(&POLICY), None);
        let two = ShadowTally::of_pairs([(Passed, Passed, 3), (Passed, Errored, 2)]);
        assert_eq!(two.decide(&POLICY), Some(ShadowOutcome::Dropped));
        // Failing where the primary fails too is not worse, and fixing some runs does not
        // make up for breaking others.
        let same = ShadowTally::of_pairs([(Failed, Failed, 10)]);
        assert_eq!(same.decide(&POLICY), None);
        let mixed = ShadowTally::of_pairs([(Passed, Failed, 2), (Failed, Passed, 2)]);
        assert_eq!(mixed.decide(&POLICY), Some(ShadowOutcome::Dropped));
        let keep = ShadowPolicy {
            rollback_on_worse: false,
            ..POLICY
        };
        assert_eq!(two.decide(&keep), None);
    }

    #[test]
    fn a_step_side_counts_verdicts_calls_and_when_it_passed() {
        let mut side = StepSide::default();
        side.add(StepStatus::Passed, 2, Some(1000));
        side.add(StepStatus::Passed, 1, Some(3000));
        side.add(StepStatus::Failed, 4, None);
        side.add(StepStatus::Skipped, 0, None);
        assert_eq!((side.decided, side.passed, side.attempts), (3, 2, 7));
        assert_eq!(side.max_passed_after_ms, Some(3000));
        let median = side.passed_after_ms(0.5).expect("passed twice");
        assert!((980..=1020).contains(&median), "{median}");
    }

    #[test]
    fn a_shadow_that_passes_where_the_primary_fails_waits_for_a_person() {
        let better = ShadowTally::of_pairs([(Passed, Passed, 40), (Failed, Passed, 10)]);
        assert_eq!(better.decide(&POLICY), None);
    }
}
