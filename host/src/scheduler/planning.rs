//! Turning a trigger (an API request or a schedule's fire) into a queued run: the plugin's
//! active version and steps, params checked against its schema, poll interval and deadline
//! from the request, the grant and the defaults; and, while the plugin has a shadow version,
//! the shadow run that goes in beside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use crate::config::Settings;
use crate::grant::parse_stored_grant;
use crate::memo::ByText;
use crate::model::{CheckInfo, Retry, RunId, UnixMillis};
use crate::storage::{NewRun, NewStep, PluginRecord, ShadowVersion};

/// What the trigger asked for beyond the plugin and its params.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub poll_interval: Option<Duration>,
    pub timeout: Option<Duration>,
    /// Budgets of named steps for this run, over the grant's and the plugin's.
    pub step_timeouts: BTreeMap<String, Duration>,
    /// The run's own backoff for errored attempts, over the grant's.
    pub retry: Option<Retry>,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// sha256 of the request the key came with.
    pub idempotency_fingerprint: Option<String>,
    pub schedule_id: Option<String>,
    /// The token that triggered it; `None` for a schedule's fire.
    pub created_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The params do not match the plugin's schema; `field` is e.g. `params.amount_cents`.
    InvalidParams { field: String, message: String },
    /// Checking the params against the plugin's schema took longer than
    /// [`PARAMS_CHECK_BUDGET`].
    ParamsTooCostly { message: String },
    /// The plugin itself is unusable as stored (its grant or schema is invalid).
    PluginBroken { code: &'static str, message: String },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::InvalidParams { message, .. }
            | PlanError::ParamsTooCostly { message }
            | PlanError::PluginBroken { message, .. } => f.write_str(message),
        }
    }
}

/// How long checking a trigger's params against its plugin's schema may take. Patterns run in
/// linear time (`params_schema`), but a large schema over a MiB of params still takes a while;
/// a trigger that needs longer is refused rather than holding the host's threads.
pub const PARAMS_CHECK_BUDGET: Duration = Duration::from_secs(1);

/// The schema's length times the params' length (in bytes of JSON) up to which the check runs
/// on the calling task: the work grows with both, and up to 1 KiB of either it is done within
/// microseconds, less than the hand-off to a blocking thread costs (about 80 µs measured on a
/// test build). Every trigger of a plugin with a small schema and small params stays inline.
const INLINE_CHECK_WORK: usize = 1 << 20;

/// The validator of a params schema, remembered by the schema's text: every trigger checks
/// its params, and compiling a schema costs more than checking against it.
fn compiled_schema(schema: &str) -> Result<Arc<jsonschema::Validator>, PlanError> {
    static COMPILED: ByText<Arc<jsonschema::Validator>> = ByText::new();
    COMPILED.get_or_derive(schema, |schema| {
        crate::params_schema::compile(schema)
            .map(Arc::new)
            .map_err(|message| PlanError::PluginBroken {
                code: "invalid_params_schema",
                message: format!("the plugin's {message}"),
            })
    })
}

/// The run to enqueue for `plugin` with `params` (a JSON object).
pub async fn plan_run(
    plugin: &PluginRecord,
    params: &Json,
    options: RunOptions,
    settings: &Settings,
    now: UnixMillis,
) -> Result<NewRun, PlanError> {
    let params_text = params.to_string();
    if let Some(schema) = &plugin.check_info.params_schema {
        check_params(schema, params, params_text.len()).await?;
    }
    let grant =
        parse_stored_grant(&plugin.grant_toml).map_err(|error| PlanError::PluginBroken {
            code: "invalid_grant",
            message: format!("the plugin's grant is invalid: {error:#}"),
        })?;
    let poll_interval = options
        .poll_interval
        .or(grant.poll_interval)
        .unwrap_or(settings.default_poll_interval);
    let timeout = options.timeout.unwrap_or(settings.default_run_timeout);
    if let Some(unknown) = options.step_timeouts.keys().find(|name| {
        !plugin
            .check_info
            .steps
            .iter()
            .any(|step| step.name == **name)
    }) {
        let steps: Vec<&str> = plugin
            .check_info
            .steps
            .iter()
            .map(|step| step.name.as_str())
            .collect();
        return Err(PlanError::InvalidParams {
            field: format!("step_timeouts.{unknown}"),
            message: format!(
                "plugin {} has no step {unknown:?}; its steps: {}",
                plugin.name,
                steps.join(", ")
            ),
        });
    }
    let step_timeout = |name: &str, described: Option<Duration>| {
        crate::runner::rules::step_budget(
            options.step_timeouts.get(name).copied(),
            grant.step_timeouts.get(name).copied(),
            described,
            settings.default_step_timeout,
        )
    };
    let steps_of = |info: &CheckInfo| -> Vec<NewStep> {
        info.steps
            .iter()
            .map(|step| NewStep {
                name: step.name.clone(),
                timeout_ms: Some(step_timeout(&step.name, step.timeout).as_millis() as i64),
                max_attempts: step.max_attempts,
            })
            .collect()
    };
    let steps = steps_of(&plugin.check_info);
    let shadow_steps = plugin
        .shadow
        .as_ref()
        .map(|shadow| steps_of(&shadow.check_info));
    let (_, limits) = settings.policy.confine(grant, &settings.limits);
    let mut run = NewRun {
        id: RunId::generate(),
        plugin_name: plugin.name.clone(),
        plugin_version: plugin.active_version.clone(),
        params: params_text,
        labels: options.labels,
        poll_interval_ms: poll_interval.as_millis() as i64,
        max_errors: limits.max_errors,
        deadline_at: now + timeout.as_millis() as i64,
        created_at: now,
        idempotency_key: options.idempotency_key,
        idempotency_fingerprint: options.idempotency_fingerprint,
        schedule_id: options.schedule_id,
        created_by: options.created_by,
        retry: options.retry,
        steps,
        shadow: None,
        shadow_of: None,
    };
    if let (Some(shadow), Some(shadow_steps)) = (&plugin.shadow, shadow_steps)
        && settings
            .policy
            .shadow_share
            .is_none_or(|share| fastrand::f64() < share)
        && shadow_takes(shadow, plugin, params, run.params.len()).await
    {
        run.shadow = Some(Box::new(NewRun {
            id: RunId::generate(),
            plugin_version: shadow.version.clone(),
            steps: shadow_steps,
            // A shadow answers to no key and belongs to no schedule: it must not take a
            // primary's place in either.
            idempotency_key: None,
            idempotency_fingerprint: None,
            schedule_id: None,
            shadow_of: Some(run.id.clone()),
            ..run.clone()
        }));
    }
    Ok(run)
}

/// Whether the shadow version accepts the params its primary was triggered with: a shadow
/// whose schema refuses them has no run beside this one.
async fn shadow_takes(
    shadow: &ShadowVersion,
    plugin: &PluginRecord,
    params: &Json,
    params_bytes: usize,
) -> bool {
    match &shadow.check_info.params_schema {
        None => true,
        Some(schema) if Some(schema) == plugin.check_info.params_schema.as_ref() => true,
        Some(schema) => check_params(schema, params, params_bytes).await.is_ok(),
    }
}

/// Checks `params` (`params_bytes` long as JSON) against the plugin's JSON Schema; the first
/// violation names its field. Beyond a small amount of work ([`INLINE_CHECK_WORK`]) the check
/// runs on a blocking thread, never on the async workers that serve requests, and is given up
/// after [`PARAMS_CHECK_BUDGET`] (the thread finishes it in the background; no pattern makes
/// that take long).
pub async fn check_params(
    schema: &str,
    params: &Json,
    params_bytes: usize,
) -> Result<(), PlanError> {
    if schema.len().saturating_mul(params_bytes) <= INLINE_CHECK_WORK {
        return check_params_now(schema, params);
    }
    let (schema, params) = (schema.to_owned(), params.clone());
    let check = tokio::task::spawn_blocking(move || check_params_now(&schema, &params));
    match tokio::time::timeout(PARAMS_CHECK_BUDGET, check).await {
        Ok(Ok(checked)) => checked,
        Ok(Err(failed)) => Err(PlanError::PluginBroken {
            code: "invalid_params_schema",
            message: format!("checking params against the plugin's schema failed: {failed}"),
        }),
        Err(_elapsed) => Err(PlanError::ParamsTooCostly {
            message: format!(
                "checking params against the plugin's schema took longer than {} ms; send \
                 smaller params",
                PARAMS_CHECK_BUDGET.as_millis()
            ),
        }),
    }
}

fn check_params_now(schema: &str, params: &Json) -> Result<(), PlanError> {
    let validator = compiled_schema(schema)?;
    if let Some(error) = validator.iter_errors(params).next() {
        let pointer = error.instance_path.to_string();
        let field = if pointer.is_empty() {
            "params".to_owned()
        } else {
            format!("params{}", pointer.replace('/', "."))
        };
        return Err(PlanError::InvalidParams {
            field,
            message: format!("params do not match the plugin's schema: {error}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_that_take_too_long_to_check_are_refused_and_the_caller_goes_on() {
        // Each of many names against many patterns: linear, and still several times the
        // budget (seconds on a test build).
        let patterns: Vec<Json> = (0..100)
            .map(|i| serde_json::json!({"pattern": format!("^a+{i}?")}))
            .collect();
        let schema = serde_json::json!({"type": "array", "items": {"allOf": patterns}}).to_string();
        let params = Json::Array(vec![Json::String("a".repeat(30)); 8_000]);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let started = std::time::Instant::now();
        let checked = runtime.block_on(check_params(&schema, &params, params.to_string().len()));
        let elapsed = started.elapsed();
        // The check goes on in the background until it is done; nothing waits for it.
        runtime.shutdown_background();
        match checked {
            Err(PlanError::ParamsTooCostly { message }) => {
                assert!(message.contains("longer than 1000 ms"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(elapsed < PARAMS_CHECK_BUDGET * 2, "{elapsed:?}");
    }
}
