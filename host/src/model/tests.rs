use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

#[test]
fn a_plugin_scope_allows_only_names_its_patterns_match() {
    let scope = PluginScope::parse(["team-a-*", "shared"]).expect("valid");
    for allowed in ["team-a-", "team-a-crm", "team-a-x-y", "shared"] {
        assert!(scope.allows(allowed), "{allowed}");
    }
    for refused in [
        "team-b-crm",
        "team-a",
        "shared-x",
        "xteam-a-crm",
        "crm-sync",
    ] {
        assert!(!scope.allows(refused), "{refused}");
    }
    let middle = PluginScope::parse(["a*b*c"]).expect("valid");
    assert!(middle.allows("abc") && middle.allows("a-b-b-c") && !middle.allows("a-b-c-d"));
    assert!(PluginScope::parse(["*"]).expect("valid").allows("anything"));
    for invalid in [vec![], vec![""], vec!["Team-A"], vec!["a/b"], vec!["a?"]] {
        assert!(PluginScope::parse(invalid.clone()).is_err(), "{invalid:?}");
    }
    // A long run of stars against a near miss stays fast (no exponential backtracking).
    let stars = PluginScope::parse(["*a*a*a*a*a*a*a*a*a*a*b"]).expect("valid");
    assert!(!stars.allows(&"a".repeat(60)));
}

#[test]
fn a_notifier_reports_failures_after_its_streak_and_recovery_once() {
    let notifier = Notifier {
        format: NotifyFormat::Json,
        on: vec![NotifyEvent::Failed, NotifyEvent::Recovered],
        after_consecutive: 2,
        ..notifier_for_filters()
    };
    let streak = |before, now| Streak { before, now };
    assert_eq!(notifier.event(RunStatus::Failed, streak(0, 1)), None);
    assert_eq!(
        notifier.event(RunStatus::Failed, streak(1, 2)),
        Some(NotifyEvent::Failed)
    );
    assert_eq!(
        notifier.event(RunStatus::Failed, streak(2, 3)),
        Some(NotifyEvent::Failed)
    );
    // Not in `on`.
    assert_eq!(notifier.event(RunStatus::TimedOut, streak(3, 4)), None);
    assert_eq!(
        notifier.event(RunStatus::Passed, streak(4, 0)),
        Some(NotifyEvent::Recovered)
    );
    // A pass after an unreported failure, or after a pass, is no news.
    assert_eq!(notifier.event(RunStatus::Passed, streak(1, 0)), None);
    assert_eq!(notifier.event(RunStatus::Passed, streak(0, 0)), None);
    assert_eq!(notifier.event(RunStatus::Cancelled, streak(5, 5)), None);
}

#[test]
fn a_notifier_watches_runs_its_filters_select() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    };
    let notifier = Notifier {
        plugins: vec!["crm".into()],
        labels: labels(&[("env", "prod")]),
        ..notifier_for_filters()
    };
    assert!(notifier.watches("crm", None, &labels(&[("env", "prod"), ("x", "1")])));
    assert!(!notifier.watches("crm", None, &labels(&[("env", "dev")])));
    assert!(!notifier.watches("other", None, &labels(&[("env", "prod")])));
    let scheduled = Notifier {
        schedules: vec!["s1".into()],
        ..notifier_for_filters()
    };
    assert!(scheduled.watches("crm", Some("s1"), &BTreeMap::new()));
    assert!(!scheduled.watches("crm", Some("s2"), &BTreeMap::new()));
    assert!(!scheduled.watches("crm", None, &BTreeMap::new()));
    // Series: labels are part of an unscheduled run's series, in a form no value can forge.
    assert_ne!(
        notify_series("p", None, &labels(&[("a", "1,\"b\"=\"2")])),
        notify_series("p", None, &labels(&[("a", "1"), ("b", "2")]))
    );
    assert_eq!(
        notify_series("p", Some("s1"), &labels(&[("a", "1")])),
        "schedule:s1"
    );
}

fn notifier_for_filters() -> Notifier {
    Notifier {
        name: "ops".into(),
        url: "http://127.0.0.1:1/".into(),
        format: NotifyFormat::Slack,
        on: vec![NotifyEvent::Failed],
        plugins: vec![],
        schedules: vec![],
        labels: BTreeMap::new(),
        after_consecutive: 1,
        retry: Retry {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(60),
        },
        timeout: Duration::from_secs(10),
        max_delivery: Duration::from_secs(3600),
        secret: None,
    }
}

#[test]
fn plugin_names_follow_the_spec() {
    assert!(PluginName::parse("event-pipeline").is_ok());
    assert!(PluginName::parse("a").is_ok());
    assert!(PluginName::parse("-a").is_err());
    assert!(PluginName::parse("Upper").is_err());
    assert!(PluginName::parse("").is_err());
    assert!(PluginName::parse(&"a".repeat(64)).is_err());
}

#[test]
fn status_text_round_trips() {
    for status in RunStatus::ALL {
        assert_eq!(RunStatus::parse(status.as_str()), Some(*status));
    }
    for status in StepStatus::ALL {
        assert_eq!(StepStatus::parse(status.as_str()), Some(*status));
    }
    assert!(!RunStatus::Running.is_terminal());
    assert!(RunStatus::TimedOut.is_terminal());
}
