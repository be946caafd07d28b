//! Grants as their manifests say them: `<name>.toml` beside a plugin in the plugins
//! directory, the `grant` part of an upload, or the same keys as JSON from the API. Each is
//! read by serde with unknown keys refused, and every number checked against its range.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::{AllowedHost, Grant, LimitOverrides, Retry};
use crate::model::{ShadowPolicy, in_range};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// One call's wall clock.
    call_timeout_ms: Option<u64>,
    /// The old name of `call_timeout_ms`, read with a deprecation warning.
    step_timeout_ms: Option<u64>,
    memory_mib: Option<u64>,
    output_bytes: Option<usize>,
    http_response_bytes: Option<usize>,
    http_timeout_ms: Option<u64>,
    sql_rows: Option<usize>,
    sql_timeout_ms: Option<u64>,
    sql_result_bytes: Option<usize>,
    max_errors: Option<u32>,
    table_elements: Option<usize>,
    instances: Option<usize>,
    http_requests_per_run: Option<u32>,
    http_concurrent_requests: Option<usize>,
}

impl LimitsFile {
    /// `call_timeout_ms`, or its deprecated alias `step_timeout_ms` (not both).
    fn call_timeout(&self, prefix: &str) -> anyhow::Result<Option<Duration>> {
        let call = in_range(prefix, "call_timeout_ms", self.call_timeout_ms)?;
        let alias = in_range(prefix, "step_timeout_ms", self.step_timeout_ms)?;
        anyhow::ensure!(
            call.is_none() || alias.is_none(),
            "{prefix}step_timeout_ms is the deprecated name of {prefix}call_timeout_ms: set only call_timeout_ms"
        );
        if alias.is_some() {
            warn_step_timeout_ms_once(prefix);
        }
        Ok(call.or(alias).map(Duration::from_millis))
    }

    /// The limits this table sets, each checked against its range; `prefix` is where the
    /// table sits (`limits.`, `policy.max_limits.`), for the message.
    pub fn overrides(&self, prefix: &str) -> anyhow::Result<LimitOverrides> {
        Ok(LimitOverrides {
            call_timeout: self.call_timeout(prefix)?,
            memory_bytes: in_range(prefix, "memory_mib", self.memory_mib)?.map(|mib| mib << 20),
            output_bytes: in_range(prefix, "output_bytes", self.output_bytes)?,
            http_response_bytes: in_range(prefix, "http_response_bytes", self.http_response_bytes)?,
            http_timeout: in_range(prefix, "http_timeout_ms", self.http_timeout_ms)?
                .map(Duration::from_millis),
            sql_rows: in_range(prefix, "sql_rows", self.sql_rows)?,
            sql_timeout: in_range(prefix, "sql_timeout_ms", self.sql_timeout_ms)?
                .map(Duration::from_millis),
            sql_result_bytes: in_range(prefix, "sql_result_bytes", self.sql_result_bytes)?,
            max_errors: in_range(prefix, "max_errors", self.max_errors)?,
            table_elements: in_range(prefix, "table_elements", self.table_elements)?,
            instances: in_range(prefix, "instances", self.instances)?,
            http_requests_per_run: in_range(
                prefix,
                "http_requests_per_run",
                self.http_requests_per_run,
            )?,
            http_concurrent_requests: in_range(
                prefix,
                "http_concurrent_requests",
                self.http_concurrent_requests,
            )?,
        })
    }
}

/// Grants are read at every tick: the warning is for the operator, once per process and place.
fn warn_step_timeout_ms_once(prefix: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !warned.iter().any(|place| place == prefix) {
        warned.push(prefix.to_owned());
        tracing::warn!(
            "{prefix}step_timeout_ms is deprecated: it limits one call, and is now called \
             {prefix}call_timeout_ms; how long a step may stay pending is [steps.NAME] timeout_ms"
        );
    }
}

/// `[steps.NAME]` of a grant: the step's budget, over what the plugin's `describe` says.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct StepGrantFile {
    /// How long the step may stay pending, from its first attempt (1 to 604800000).
    timeout_ms: Option<u64>,
}

/// `retry = {initial_ms, factor, max_ms}` in a grant, or `"retry"` on a run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// The wait after the first errored attempt (1 to 3600000).
    initial_ms: u64,
    /// Each further errored attempt waits this many times longer (1 to 100; default 2).
    factor: Option<f64>,
    /// The longest wait (from initial_ms to 3600000; default 60000, or initial_ms if larger).
    max_ms: Option<u64>,
}

impl RetryFile {
    pub fn policy(&self, prefix: &str) -> anyhow::Result<Retry> {
        anyhow::ensure!(
            (1..=3_600_000).contains(&self.initial_ms),
            "{prefix}initial_ms = {} is out of range: it must be from 1 to 3600000",
            self.initial_ms
        );
        let factor = self.factor.unwrap_or(2.0);
        anyhow::ensure!(
            (1.0..=100.0).contains(&factor),
            "{prefix}factor = {factor} is out of range: it must be from 1 to 100"
        );
        let max_ms = self.max_ms.unwrap_or(60_000.max(self.initial_ms));
        anyhow::ensure!(
            (self.initial_ms..=3_600_000).contains(&max_ms),
            "{prefix}max_ms = {max_ms} is out of range: it must be from initial_ms ({}) to 3600000",
            self.initial_ms
        );
        Ok(Retry {
            initial: Duration::from_millis(self.initial_ms),
            factor,
            max: Duration::from_millis(max_ms),
        })
    }
}

/// `shadow = {promote_after_runs, max_disagreement, rollback_on_worse}` in a grant, or in the
/// operator's `[policy]` for plugins whose grant sets none: when a shadow version is promoted
/// or dropped without anyone asking.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowFile {
    /// Finished pairs of runs needed before a promotion (1 to 100000; default 50).
    promote_after_runs: Option<u32>,
    /// The share of finished pairs that may disagree, and by which the shadow may fail more
    /// often than the active version (0 to 1; default 0.02).
    max_disagreement: Option<f64>,
    /// Drop a shadow that fails more often than the active version beyond the bound (default
    /// true).
    rollback_on_worse: Option<bool>,
}

impl ShadowFile {
    pub fn policy(&self, prefix: &str) -> anyhow::Result<ShadowPolicy> {
        let promote_after_runs = self.promote_after_runs.unwrap_or(50);
        anyhow::ensure!(
            (1..=100_000).contains(&promote_after_runs),
            "{prefix}promote_after_runs = {promote_after_runs} is out of range: it must be from 1 to 100000"
        );
        let max_disagreement = self.max_disagreement.unwrap_or(0.02);
        anyhow::ensure!(
            (0.0..=1.0).contains(&max_disagreement),
            "{prefix}max_disagreement = {max_disagreement} is out of range: it must be from 0 to 1"
        );
        Ok(ShadowPolicy {
            promote_after_runs,
            max_disagreement,
            rollback_on_worse: self.rollback_on_worse.unwrap_or(true),
        })
    }
}

/// A run's `"retry"` object from the API, checked as a grant's `retry` is.
pub fn parse_retry_json(value: &serde_json::Value) -> anyhow::Result<Retry> {
    let retry: RetryFile = serde_json::from_value(value.clone())
        .map_err(|error| anyhow::anyhow!("retry is invalid: {error}"))?;
    retry.policy("retry.")
}

/// A plugin manifest (`<name>.toml` beside `<name>.wasm`): the plugin's grant, also its JSON
/// form in the API.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Grant)]
pub struct ManifestFile {
    /// `host:port` patterns the plugin may call over HTTP (`*.` for subdomains).
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Names of `[sources.*]` in the host's config.
    #[serde(default)]
    sql_sources: Vec<String>,
    /// Subject patterns the plugin may read on its message sources (`events.>`).
    #[serde(default)]
    subjects: Vec<String>,
    /// Names of `[secrets.*]` in the host's config.
    #[serde(default)]
    secrets: Vec<String>,
    /// The plugin's default poll interval (50 to 3600000).
    poll_interval_ms: Option<u64>,
    /// Limits of the plugin's calls; each within the host's `[policy.max_limits]`.
    #[serde(default)]
    #[schema(inline)]
    limits: LimitsFile,
    /// Per step, by name: its budget. A name the plugin does not have is kept for a later
    /// version that may have it.
    #[serde(default)]
    #[schema(inline)]
    steps: BTreeMap<String, StepGrantFile>,
    /// The backoff after an errored attempt, for runs that set none of their own.
    retry: Option<RetryFile>,
    /// When a shadow version is promoted or dropped by its comparison with the active one;
    /// unset: the operator's `[policy] shadow`, else only a person decides.
    shadow: Option<ShadowFile>,
    /// Which runs keep a recording of their capability calls: `off`, `failures` or `all`;
    /// unset: the operator's `[policy] record`.
    record: Option<super::RecordMode>,
}

/// [`parse_grant`] of a grant the database holds (it passed `parse_grant` when stored),
/// remembered by its text: every trigger and every tick reads its plugin's grant, grants
/// change rarely, and parsing TOML costs more than the rest of planning a run.
pub fn parse_stored_grant(text: &str) -> anyhow::Result<Grant> {
    static PARSED: crate::memo::ByText<Grant> = crate::memo::ByText::new();
    PARSED.get_or_derive(text, parse_grant)
}

/// Parses a manifest's TOML text into a [`Grant`], checking every `allowed_hosts` entry.
pub fn parse_grant(text: &str) -> anyhow::Result<Grant> {
    let manifest: ManifestFile = toml::from_str(text).context("parsing plugin manifest")?;
    for host in &manifest.allowed_hosts {
        AllowedHost::parse(host).map_err(anyhow::Error::msg)?;
    }
    // Each bus checks its own pattern syntax when it reads; a pattern of none has a blank.
    for subject in &manifest.subjects {
        anyhow::ensure!(
            !subject.is_empty()
                && subject.len() <= 1024
                && !subject.chars().any(|c| c.is_whitespace() || c.is_control()),
            "subjects: {subject:?} is not a subject pattern (1 to 1024 characters, no blanks)"
        );
    }
    Ok(Grant {
        poll_interval: in_range("", "poll_interval_ms", manifest.poll_interval_ms)?
            .map(Duration::from_millis),
        limits: manifest.limits.overrides("limits.")?,
        retry: manifest
            .retry
            .as_ref()
            .map(|retry| retry.policy("retry."))
            .transpose()?,
        shadow: manifest
            .shadow
            .as_ref()
            .map(|shadow| shadow.policy("shadow."))
            .transpose()?,
        step_timeouts: manifest
            .steps
            .iter()
            .filter_map(|(name, step)| {
                let prefix = format!("steps.{name}.");
                in_range(&prefix, "timeout_ms", step.timeout_ms)
                    .map(|ms| ms.map(|ms| (name.clone(), Duration::from_millis(ms))))
                    .transpose()
            })
            .collect::<anyhow::Result<_>>()?,
        record: manifest.record,
        allowed_hosts: manifest.allowed_hosts,
        sql_sources: manifest.sql_sources,
        subjects: manifest.subjects,
        secrets: manifest.secrets,
    })
}

/// Turns a grant sent as JSON (the manifest's keys) into manifest TOML, the form grants are
/// kept in.
pub fn grant_toml_from_json(grant: &serde_json::Value) -> anyhow::Result<String> {
    anyhow::ensure!(grant.is_object(), "the grant must be a JSON object");
    check_names(grant)?;
    // `null` means "not set", as for every optional field of the API.
    let grant = without_nulls(grant.clone());
    // Checked as JSON first, so that a mistake is reported in the form it was sent in.
    let manifest: ManifestFile =
        serde_path_to_error::deserialize(grant.clone()).map_err(|error| {
            anyhow::anyhow!(
                "the grant is invalid at {}: {}",
                error.path(),
                error.inner()
            )
        })?;
    drop(manifest);
    toml::to_string(&grant).context("the grant cannot be written as a manifest")
}

/// A `null` leaves a field unset, but a `null` under a name the grant does not have is still
/// an unknown field. Each null that stops the check as the wrong type (a known field) is taken
/// out and the check runs again, until it passes or names an unknown field; any other mistake
/// is reported by the check of the grant without its nulls.
fn check_names(grant: &serde_json::Value) -> anyhow::Result<()> {
    let mut probe = grant.clone();
    loop {
        let Err(error) = serde_path_to_error::deserialize::<_, ManifestFile>(probe.clone()) else {
            return Ok(());
        };
        if error.inner().to_string().starts_with("unknown field") {
            anyhow::bail!(
                "the grant is invalid at {}: {}",
                error.path(),
                error.inner()
            );
        }
        if !remove_null(&mut probe, error.path()) {
            return Ok(());
        }
    }
}

/// Removes the `null` at `path`; false if there is none.
fn remove_null(value: &mut serde_json::Value, path: &serde_path_to_error::Path) -> bool {
    let keys: Vec<String> = path
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    if keys.len() != path.iter().count() {
        return false;
    }
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut object = value;
    for key in parents {
        match object.get_mut(key) {
            Some(inner) => object = inner,
            None => return false,
        }
    }
    match object.as_object_mut() {
        Some(map) if map.get(last).is_some_and(serde_json::Value::is_null) => {
            map.remove(last);
            true
        }
        _ => false,
    }
}

fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(object) => serde_json::Value::Object(
            object
                .into_iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(key, value)| (key, without_nulls(value)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_leaves_a_known_field_unset_but_never_hides_an_unknown_one() {
        let known = serde_json::json!({"allowed_hosts": null, "limits": {"memory_mib": null}});
        assert_eq!(
            grant_toml_from_json(&known).expect("known fields").trim(),
            "[limits]"
        );
        for unknown in [
            serde_json::json!({"": null}),
            serde_json::json!({"allowed_hosts": null, "zzz": null}),
            serde_json::json!({"limits": {"memory_mib": null, "bogus": null}}),
        ] {
            let error = grant_toml_from_json(&unknown).expect_err("an unknown field");
            assert!(format!("{error:#}").contains("unknown field"), "{error:#}");
        }
    }

    #[test]
    fn manifest_parses_into_a_grant() {
        let grant = parse_grant(
            r#"
            allowed_hosts = ["127.0.0.1:9000"]
            sql_sources = ["warehouse"]
            poll_interval_ms = 250
            [limits]
            memory_mib = 16
            "#,
        )
        .expect("valid manifest");
        assert_eq!(grant.allowed_hosts, ["127.0.0.1:9000"]);
        assert_eq!(grant.poll_interval, Some(Duration::from_millis(250)));
        assert_eq!(grant.limits.memory_bytes, Some(16 << 20));
    }

    #[test]
    fn json_grant_becomes_the_same_manifest() {
        let json =
            serde_json::json!({"allowed_hosts": ["127.0.0.1:9000"], "limits": {"memory_mib": 16}});
        let toml = grant_toml_from_json(&json).expect("convertible");
        let grant = parse_grant(&toml).expect("valid manifest");
        assert_eq!(grant.allowed_hosts, ["127.0.0.1:9000"]);
        assert_eq!(grant.limits.memory_bytes, Some(16 << 20));
        assert!(grant_toml_from_json(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn manifest_rejects_unknown_keys_and_bad_hosts() {
        assert!(parse_grant("alowed_hosts = []").is_err());
        assert!(parse_grant(r#"allowed_hosts = ["example.com"]"#).is_err());
        assert_eq!(parse_grant("").expect("empty manifest"), Grant::default());
    }
}
