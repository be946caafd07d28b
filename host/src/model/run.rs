//! A run's and a step's statuses, a call's outcome, log lines, and what a plugin's `describe`
//! reports.

use std::time::Duration;

text_enum!(
    /// A run's status.
    RunStatus {
        Queued => "queued",
        Running => "running",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

text_enum!(
    /// A step's status within one run. `cancelled`: the run was cancelled before
    /// the step finished.
    StepStatus {
        Waiting => "waiting",
        Pending => "pending",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Skipped => "skipped",
        Cancelled => "cancelled",
    }
);

impl StepStatus {
    /// A result was recorded: the step ran to a verdict (not `skipped`, which it never did).
    pub fn is_decided(self) -> bool {
        matches!(
            self,
            StepStatus::Passed | StepStatus::Failed | StepStatus::Errored | StepStatus::TimedOut
        )
    }
}

text_enum!(
    /// What one call of `run-step` came to. `Errored` is a plugin fault (trap, limit, bad
    /// output); the other three are the check's own answer.
    AttemptOutcome {
        Passed => "passed",
        Pending => "pending",
        Failed => "failed",
        Errored => "errored",
    }
);

text_enum!(
    LogLevel {
        Trace => "trace",
        Debug => "debug",
        Info => "info",
        Warn => "warn",
        Error => "error",
    }
);

/// One log line a plugin wrote (or the host wrote on its behalf, such as a denied request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// What `describe` told us about a plugin version.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub steps: Vec<StepInfo>,
    pub params_schema: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub name: String,
    pub description: String,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

impl RunStatus {
    /// Whether a run that ended so counts against its series' streak.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            RunStatus::Failed | RunStatus::TimedOut | RunStatus::Errored
        )
    }
}

/// How long to wait before calling a step again after an `errored` attempt,
/// instead of the poll interval, which is for `pending`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Retry {
    /// The wait after the run's `errors`-th errored attempt (counting from 1):
    /// `initial × factor^(errors − 1)`, at most `max`.
    pub fn delay(&self, errors: u32) -> Duration {
        let exponent = errors.saturating_sub(1).min(1024) as i32;
        let millis = self.initial.as_millis() as f64 * self.factor.powi(exponent);
        Duration::from_millis(millis.min(self.max.as_millis() as f64) as u64)
    }
}
