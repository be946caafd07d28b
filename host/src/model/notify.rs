//! The operator's notifiers, the events they are told about, and the series a run's
//! streak is counted in.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Retry, RunStatus};

text_enum!(
    /// What a notifier is told about: a run of a watched series that failed or recovered,
    /// or a shadow version that its comparison promoted or dropped.
    NotifyEvent {
        Failed => "failed",
        TimedOut => "timed_out",
        Errored => "errored",
        Recovered => "recovered",
        ShadowPromoted => "shadow_promoted",
        ShadowDropped => "shadow_dropped",
    }
);

text_enum!(
    /// The body a notifier posts: `json` (the run as the API shows it) or a Slack
    /// incoming-webhook message.
    NotifyFormat {
        Json => "json",
        Slack => "slack",
    }
);

text_enum!(
    /// Where one notification's delivery stands.
    DeliveryStatus {
        Pending => "pending",
        Delivered => "delivered",
        Failed => "failed",
    }
);

/// An operator's `[[notify]]`: where to post, about which runs, and when. Only the
/// operator's config creates one; no API call or plugin can name a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Notifier {
    pub name: String,
    pub url: String,
    pub format: NotifyFormat,
    pub on: Vec<NotifyEvent>,
    /// Empty: every plugin.
    pub plugins: Vec<String>,
    /// Schedule ids; empty: runs of any schedule, and runs without one.
    pub schedules: Vec<String>,
    /// Each must be among the run's labels.
    pub labels: BTreeMap<String, String>,
    /// Failing runs in a row of one series before a failure is sent.
    pub after_consecutive: u32,
    /// Gaps between delivery attempts (jittered by the deliverer).
    pub retry: Retry,
    /// One POST's wall clock.
    pub timeout: Duration,
    /// How long after the run finished a delivery is still tried; then it is `failed`.
    pub max_delivery: Duration,
    /// The `[secrets.NAME]` whose value signs each POST (`stepwise-signature`).
    pub secret: Option<String>,
}

/// A series' failing runs in a row before and after the run that just finished (a passed run
/// resets it to 0; a cancelled one leaves it alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub before: u32,
    pub now: u32,
}

impl Notifier {
    /// Whether this notifier's filters select a run of `plugin`, started by `schedule`, with
    /// `labels`.
    pub fn watches(
        &self,
        plugin: &str,
        schedule: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.plugins.is_empty() || self.plugins.iter().any(|name| name == plugin))
            && (self.schedules.is_empty()
                || schedule.is_some_and(|id| self.schedules.iter().any(|wanted| wanted == id)))
            && self
                .labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// What to tell about a run of a watched series that ended with `status`, leaving `streak`:
    /// a failure once `after_consecutive` runs in a row failed, `recovered` for the first pass
    /// after a streak that was reported.
    pub fn event(&self, status: RunStatus, streak: Streak) -> Option<NotifyEvent> {
        let event = match status {
            RunStatus::Failed => NotifyEvent::Failed,
            RunStatus::TimedOut => NotifyEvent::TimedOut,
            RunStatus::Errored => NotifyEvent::Errored,
            RunStatus::Passed if streak.before >= self.after_consecutive => NotifyEvent::Recovered,
            _ => return None,
        };
        let reported = event == NotifyEvent::Recovered || streak.now >= self.after_consecutive;
        (reported && self.on.contains(&event)).then_some(event)
    }
}

/// The series a run belongs to for `recovered` and `after_consecutive`: its schedule, or for a
/// run without one its plugin and labels.
pub fn notify_series(
    plugin: &str,
    schedule: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> String {
    match schedule {
        Some(id) => format!("schedule:{id}"),
        None => {
            let labels: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key:?}={value:?}"))
                .collect();
            format!("plugin:{plugin}:{}", labels.join(","))
        }
    }
}
