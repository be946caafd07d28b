//! What a notification says (README, "Alerts"): `json` carries the run as `GET /v1/runs/{id}`
//! shows it (`payload.rs`); `slack` is an incoming-webhook message naming the plugin, the failing step, its
//! message and attempts, how long the verified steps took, and the run's link.

use serde_json::{Value as Json, json};

use super::payload::RunPayload;
use crate::model::{NotifyEvent, NotifyFormat, StepStatus};
use crate::storage::{RunRecord, ShadowRecord, StepRecord};

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
            "run": RunPayload::new(run),
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
                    ":red_circle: *{plugin}* {} at step `{}` after {} attempt{}:\n>{}",
                    event_words(event),
                    escape(&step.name),
                    step.attempts,
                    if step.attempts == 1 { "" } else { "s" },
                    escape(message.as_deref().unwrap_or("no message")),
                ),
                (_, None) => format!(
                    ":red_circle: *{plugin}* {}:\n>{}",
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

/// The body of a delivery about a shadow's decision: the shadow, the comparison it was
/// decided on, and its last run (as `GET /v1/runs/{id}` shows it).
pub fn shadow_body(
    format: NotifyFormat,
    event: NotifyEvent,
    shadow: &ShadowRecord,
    run: &RunRecord,
    public_url: Option<&str>,
) -> Json {
    let figures: Json = shadow
        .figures
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Json::Null);
    let url = public_url.map(|base| format!("{base}/plugins/{}", shadow.plugin_name));
    match format {
        NotifyFormat::Json => json!({
            "event": event.as_str(),
            "plugin": shadow.plugin_name,
            "version": shadow.version.as_str(),
            "figures": figures,
            "run": RunPayload::new(run),
            "url": url,
        }),
        NotifyFormat::Slack => {
            let mut text = format!(
                "{} *{}* {} `{}`",
                if event == NotifyEvent::ShadowPromoted {
                    ":large_green_circle:"
                } else {
                    ":large_orange_circle:"
                },
                escape(&shadow.plugin_name),
                event_words(event),
                &shadow.version.as_str()[..12],
            );
            if let (Some(finished), Some(disagreements)) = (
                figures["finished"].as_u64(),
                figures["disagreements"].as_u64(),
            ) {
                text.push_str(&format!(
                    ": {disagreements} of {finished} runs disagreed with the active version."
                ));
            }
            if let Some(url) = &url {
                text.push_str(&format!("\n<{url}|Plugin {}>", escape(&shadow.plugin_name)));
            }
            json!({"text": text})
        }
    }
}

/// The header that carries a signed notification's signature.
pub const SIGNATURE_HEADER: &str = "stepwise-signature";

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed by the secret>`, as Stripe
/// signs its webhooks: the receiver recomputes it over the raw body, and the time lets it
/// refuse a replayed notification.
pub fn signature(key: &str, unix_seconds: i64, body: &str) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{unix_seconds}.").as_bytes());
    mac.update(body.as_bytes());
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
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
        NotifyEvent::ShadowPromoted => "promoted its shadow version",
        NotifyEvent::ShadowDropped => "dropped its shadow version",
    }
}

/// Text from plugins and runners (a message, a step name, labels) on one line, inert:
/// Slack's `mrkdwn` reads `&`, `<` and `>` as markup (links, mentions), and a line break
/// would let a message forge a line of its own, such as a "recovered" one.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
