//! What a notification says (SPEC §11): `json` carries the run exactly as `GET /v1/runs/{id}`
//! shows it; `slack` is an incoming-webhook message naming the plugin, the failing step, its
//! message and attempts, how long the verified steps took, and the run's link.

use serde_json::{Value as Json, json};

use crate::api::RunDto;
use crate::model::{NotifyEvent, NotifyFormat, StepStatus};
use crate::storage::{RunRecord, StepRecord};

/// The body of one delivery.
pub fn body(
    format: NotifyFormat,
    event: NotifyEvent,
    run: &RunRecord,
    public_url: Option<&str>,
) -> Json {
    let failed = failed_step(run, event);
    let url = public_url.map(|base| format!("{base}/runs/{}", run.id));
    let message = failed
        .and_then(|step| step.message.clone())
        .or_else(|| run.message.clone());
    let verified: Vec<&StepRecord> = run
        .steps
        .iter()
        .filter(|step| step.status == StepStatus::Passed)
        .collect();
    match format {
        NotifyFormat::Json => json!({
            "event": event.as_str(),
            "run": RunDto::new(run, true),
            "failed_step": failed.map(|step| step.name.as_str()),
            "message": message,
            "attempts": failed.map(|step| step.attempts),
            "verified_steps": verified
                .iter()
                .map(|step| json!({"name": step.name, "passed_after_ms": step.passed_after_ms}))
                .collect::<Vec<_>>(),
            "url": url,
        }),
        NotifyFormat::Slack => {
            let plugin = escape(&run.plugin_name);
            let mut text = match (event, failed) {
                (NotifyEvent::Recovered, _) => {
                    format!(":large_green_circle: *{plugin}* recovered: the run passed.")
                }
                (_, Some(step)) => format!(
                    ":red_circle: *{plugin}* {} at step `{}` after {} attempt{}: {}",
                    event_words(event),
                    escape(&step.name),
                    step.attempts,
                    if step.attempts == 1 { "" } else { "s" },
                    escape(message.as_deref().unwrap_or("no message")),
                ),
                (_, None) => format!(
                    ":red_circle: *{plugin}* {}: {}",
                    event_words(event),
                    escape(message.as_deref().unwrap_or("no message"))
                ),
            };
            if !verified.is_empty() {
                let steps: Vec<String> = verified
                    .iter()
                    .map(|step| {
                        let after = step.passed_after_ms.unwrap_or(0) as f64 / 1000.0;
                        format!("{} in {after:.1} s", escape(&step.name))
                    })
                    .collect();
                text.push_str(&format!("\nVerified: {}.", steps.join(", ")));
            }
            if !run.labels.is_empty() {
                let labels: Vec<String> = run
                    .labels
                    .iter()
                    .map(|(key, value)| format!("{}={}", escape(key), escape(value)))
                    .collect();
                text.push_str(&format!("\nLabels: {}", labels.join(", ")));
            }
            match &url {
                Some(url) => text.push_str(&format!("\n<{url}|Run {}>", run.id)),
                None => text.push_str(&format!("\nRun {}", run.id)),
            }
            json!({"text": text})
        }
    }
}

/// The step that ended a failing run (for `recovered`, none).
fn failed_step(run: &RunRecord, event: NotifyEvent) -> Option<&StepRecord> {
    if event == NotifyEvent::Recovered {
        return None;
    }
    run.steps.iter().find(|step| {
        matches!(
            step.status,
            StepStatus::Failed | StepStatus::Errored | StepStatus::TimedOut
        )
    })
}

fn event_words(event: NotifyEvent) -> &'static str {
    match event {
        NotifyEvent::Failed => "failed",
        NotifyEvent::TimedOut => "timed out",
        NotifyEvent::Errored => "errored",
        NotifyEvent::Recovered => "recovered",
    }
}

/// Slack's `mrkdwn` reads `&`, `<` and `>` as markup: a plugin's message must not make links.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
