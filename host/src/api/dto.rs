//! The JSON shapes of the API: what responses carry here, what requests carry in `requests`.
//! Times are RFC 3339 (UTC, milliseconds); durations are integer milliseconds with a `_ms`
//! suffix.

mod requests;

pub use requests::*;

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value as Json;
use utoipa::ToSchema;
use utoipa::openapi::schema::SchemaType;
use utoipa::openapi::{ObjectBuilder, Type};

use crate::grant::{Grant, Limits};
use crate::model::{
    AttemptOutcome, CheckInfo, DeliveryStatus, FireOutcome, LogLevel, NotifyEvent, Retry, Role,
    RunId, RunStatus, ShadowOutcome, ShadowPolicy, ShadowTally, StatusCounts, StepSide, StepStatus,
    TriggerSpec, rfc3339,
};
use crate::storage::{
    AttemptRecord, AuditRecord, ClusterHealth, FireRecord, NotificationRecord, PluginRecord,
    PluginVersionRecord, RunRecord, ScheduleRecord, ShadowPair, ShadowRecord, ShadowStep,
    StepRecord, StoredToken,
};

/// A string that is one of `values`: the schema of the model's text enums.
fn one_of(values: impl IntoIterator<Item = &'static str>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
}

/// Any JSON value, `null` included (utoipa's `Option<Value>` is a `oneOf` that `null` matches
/// twice).
fn any_json() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::AnyValue)
}

fn activation_mode() -> ObjectBuilder {
    one_of(["active", "shadow"])
}

pub(super) fn run_status() -> ObjectBuilder {
    one_of(RunStatus::ALL.iter().map(|status| status.as_str()))
}

fn step_status() -> ObjectBuilder {
    one_of(StepStatus::ALL.iter().map(|status| status.as_str()))
}

fn notify_event() -> ObjectBuilder {
    one_of(NotifyEvent::ALL.iter().map(|event| event.as_str()))
}

fn delivery_status() -> ObjectBuilder {
    one_of(DeliveryStatus::ALL.iter().map(|status| status.as_str()))
}

fn attempt_outcome() -> ObjectBuilder {
    one_of(AttemptOutcome::ALL.iter().map(|outcome| outcome.as_str()))
}

fn log_level() -> ObjectBuilder {
    one_of(LogLevel::ALL.iter().map(|level| level.as_str()))
}

fn fire_outcome() -> ObjectBuilder {
    one_of(FireOutcome::ALL.iter().map(|outcome| outcome.as_str()))
}

pub(super) fn role() -> ObjectBuilder {
    one_of(Role::ALL.iter().map(|role| role.as_str()))
}

fn limit_source() -> ObjectBuilder {
    one_of(["grant", "host", "policy"])
}

fn json_text(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or(Json::Null)
}

#[derive(Serialize, ToSchema)]
pub struct RunDto {
    pub id: String,
    pub plugin: String,
    pub plugin_version: String,
    #[schema(schema_with = run_status)]
    pub status: &'static str,
    pub message: Option<String>,
    pub params: Json,
    pub labels: BTreeMap<String, String>,
    pub poll_interval_ms: i64,
    pub max_errors: u32,
    pub error_count: u32,
    /// Outbound HTTP requests the run's step calls have made.
    pub http_requests: u32,
    /// Bytes of the run's recording so far (uncompressed); 0: it has none
    /// (`GET /v1/runs/{id}/recording`).
    pub recording_bytes: u64,
    /// The schedule whose fire started the run.
    pub schedule_id: Option<String>,
    /// The token that triggered it (`anonymous` without authentication); absent for a
    /// schedule's fire, which `schedule_id` names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The token that cancelled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
    /// For a run of a shadow version: the run it ran beside, which decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_of: Option<String>,
    /// The run's own backoff for errored attempts; `null`: the grant's, else the poll
    /// interval. When a step errored, `next_tick_at` is when it is called again.
    pub retry: Option<RetryDto>,
    /// Name of the step being worked on (the last step once the run passed).
    pub current_step: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    #[schema(format = DateTime)]
    pub deadline_at: String,
    #[schema(format = DateTime)]
    pub next_tick_at: Option<String>,
    /// The node holding the run's lease while a tick is in progress.
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepDto>>,
}

#[derive(Serialize, ToSchema)]
pub struct StepDto {
    pub name: String,
    #[schema(schema_with = step_status)]
    pub status: &'static str,
    pub attempts: u32,
    pub message: Option<String>,
    #[schema(schema_with = any_json)]
    pub output: Option<Json>,
    pub timeout_ms: Option<i64>,
    #[schema(format = DateTime)]
    pub first_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    pub last_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    pub passed_after_ms: Option<i64>,
}

impl RunDto {
    pub fn new(run: &RunRecord, with_steps: bool) -> RunDto {
        RunDto {
            id: run.id.to_string(),
            plugin: run.plugin_name.clone(),
            plugin_version: run.plugin_version.to_string(),
            status: run.status.as_str(),
            message: run.message.clone(),
            params: json_text(&run.params),
            labels: run.labels.clone(),
            poll_interval_ms: run.poll_interval_ms,
            max_errors: run.max_errors,
            error_count: run.error_count,
            http_requests: run.http_requests,
            recording_bytes: run.recording_bytes,
            schedule_id: run.schedule_id.clone(),
            created_by: run.created_by.clone(),
            cancelled_by: run.cancelled_by.clone(),
            shadow_of: run.shadow_of.as_ref().map(ToString::to_string),
            retry: run.retry.map(RetryDto::new),
            current_step: run
                .steps
                .get(run.current_step)
                .map(|step| step.name.clone())
                .or_else(|| run.current_step_name.clone()),
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
            deadline_at: rfc3339(run.deadline_at),
            next_tick_at: run.next_tick_at.map(rfc3339),
            node: run.lease_owner.clone(),
            steps: with_steps.then(|| run.steps.iter().map(StepDto::new).collect()),
        }
    }
}

impl StepDto {
    pub fn new(step: &StepRecord) -> StepDto {
        StepDto {
            name: step.name.clone(),
            status: step.status.as_str(),
            attempts: step.attempts,
            message: step.message.clone(),
            output: step.output.as_deref().map(json_text),
            timeout_ms: step.timeout_ms,
            first_attempt_at: step.first_attempt_at.map(rfc3339),
            last_attempt_at: step.last_attempt_at.map(rfc3339),
            finished_at: step.finished_at.map(rfc3339),
            passed_after_ms: step.passed_after_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RunListDto {
    pub runs: Vec<RunDto>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptDto {
    pub step: String,
    pub attempt: u32,
    #[schema(schema_with = attempt_outcome)]
    pub outcome: &'static str,
    pub message: Option<String>,
    /// The plugin's log lines (and the host's on its behalf), with `logs=true` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<LogLineDto>>,
    #[schema(format = DateTime)]
    pub started_at: String,
    pub duration_ms: i64,
    /// When the tick that made this call was due; absent for a step tried at once after the
    /// previous one passed.
    #[schema(format = DateTime)]
    pub due_at: Option<String>,
    /// `started_at - due_at`: how late the scheduler was.
    pub lag_ms: Option<i64>,
    /// The node that made the call.
    pub node: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LogLineDto {
    #[schema(schema_with = log_level)]
    pub level: &'static str,
    pub message: String,
}

impl AttemptDto {
    pub fn new(attempt: &AttemptRecord) -> AttemptDto {
        AttemptDto {
            step: attempt.step.clone(),
            attempt: attempt.attempt,
            outcome: attempt.outcome.as_str(),
            message: attempt.message.clone(),
            logs: attempt.logs.as_ref().map(|logs| {
                logs.iter()
                    .map(|line| LogLineDto {
                        level: line.level.as_str(),
                        message: line.message.clone(),
                    })
                    .collect()
            }),
            started_at: rfc3339(attempt.started_at),
            duration_ms: attempt.duration_ms,
            due_at: attempt.due_at.map(rfc3339),
            lag_ms: attempt.due_at.map(|due| (attempt.started_at - due).max(0)),
            node: attempt.node.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct StepInfoDto {
    pub name: String,
    pub description: String,
    pub timeout_ms: Option<u64>,
    pub max_attempts: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct PluginDto {
    pub name: String,
    pub active_version: String,
    pub description: String,
    pub plugin_reported_version: String,
    pub steps: Vec<StepInfoDto>,
    #[schema(schema_with = any_json)]
    pub params_schema: Option<Json>,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// The version that runs beside the active one without deciding anything
    /// (`GET /v1/plugins/{name}/shadow` compares them).
    pub shadow_version: Option<String>,
    #[schema(format = DateTime)]
    pub shadow_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<PluginVersionDto>>,
}

#[derive(Serialize, ToSchema)]
pub struct GrantDto {
    pub allowed_hosts: Vec<String>,
    pub sql_sources: Vec<String>,
    /// Subject patterns readable on the message sources among `sql_sources`.
    pub subjects: Vec<String>,
    /// Names only: a secret's value never leaves the host's memory.
    pub secrets: Vec<String>,
    pub poll_interval_ms: Option<u64>,
    /// `[steps.NAME] timeout_ms`: how long each named step may stay pending.
    pub steps: BTreeMap<String, StepGrantDto>,
    /// The backoff after an errored attempt, for runs without their own.
    pub retry: Option<RetryDto>,
    /// When a shadow version is promoted or dropped without anyone asking (the grant's,
    /// else the operator's `[policy] shadow`); `null`: only a person decides.
    pub shadow: Option<ShadowPolicyDto>,
    /// Every limit in force for the plugin's calls, by config key, with where it comes from:
    /// `grant` (set by the grant), `host` (the host's `[limits]` or default) or `policy`
    /// (lowered to the operator's ceiling).
    pub limits: BTreeMap<&'static str, LimitDto>,
}

#[derive(Serialize, ToSchema)]
pub struct RetryDto {
    pub initial_ms: u64,
    pub factor: f64,
    pub max_ms: u64,
}

impl RetryDto {
    fn new(retry: Retry) -> RetryDto {
        RetryDto {
            initial_ms: retry.initial.as_millis() as u64,
            factor: retry.factor,
            max_ms: retry.max.as_millis() as u64,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ShadowPolicyDto {
    pub promote_after_runs: u32,
    pub max_disagreement: f64,
    pub rollback_on_worse: bool,
}

impl ShadowPolicyDto {
    pub fn new(policy: ShadowPolicy) -> ShadowPolicyDto {
        ShadowPolicyDto {
            promote_after_runs: policy.promote_after_runs,
            max_disagreement: policy.max_disagreement,
            rollback_on_worse: policy.rollback_on_worse,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct StepGrantDto {
    pub timeout_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub struct LimitDto {
    pub value: u64,
    #[schema(schema_with = limit_source)]
    pub from: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct PluginVersionDto {
    pub version: String,
    pub active: bool,
    /// The plugin's shadow version: it runs beside the active one and decides nothing.
    pub shadow: bool,
    /// Stored, not active, and waiting for an admin: no admin has reviewed this code, and the
    /// plugin's grant reaches outside the sandbox, so only an admin may activate it.
    pub pending: bool,
    /// The step names its `describe` reports.
    pub steps: Vec<String>,
    /// What its `describe` reports, to compare with the active version before activating.
    pub description: String,
    #[schema(schema_with = any_json)]
    pub params_schema: Option<Json>,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The token (or `cli`, `plugins-dir`) that stored it; absent for versions stored before
    /// this was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
    /// The admin (or `plugins-dir`) who let it run under the plugin's grant, by uploading
    /// or activating it; absent while no one has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reviewed_by: Option<String>,
}

fn steps_of(info: &CheckInfo) -> Vec<StepInfoDto> {
    info.steps
        .iter()
        .map(|step| StepInfoDto {
            name: step.name.clone(),
            description: step.description.clone(),
            timeout_ms: step.timeout.map(|timeout| timeout.as_millis() as u64),
            max_attempts: step.max_attempts,
        })
        .collect()
}

impl PluginDto {
    pub fn new(plugin: &PluginRecord) -> PluginDto {
        PluginDto {
            name: plugin.name.to_string(),
            active_version: plugin.active_version.to_string(),
            description: plugin.check_info.description.clone(),
            plugin_reported_version: plugin.check_info.version.clone(),
            steps: steps_of(&plugin.check_info),
            params_schema: plugin.check_info.params_schema.as_deref().map(json_text),
            updated_at: rfc3339(plugin.updated_at),
            shadow_version: plugin
                .shadow
                .as_ref()
                .map(|shadow| shadow.version.to_string()),
            shadow_since: plugin.shadow.as_ref().map(|shadow| rfc3339(shadow.since)),
            grant: None,
            versions: None,
        }
    }

    /// Adds the grant, `effective` being the limits in force after the host's defaults and
    /// the policy's ceilings, and the versions; `review_needed` says whether new code waits
    /// for an admin.
    pub fn with_details(
        mut self,
        grant: &Grant,
        shadow_policy: Option<ShadowPolicy>,
        effective: &Limits,
        versions: &[PluginVersionRecord],
        review_needed: bool,
    ) -> PluginDto {
        let set_by_grant = grant.limits.keys();
        // Both lists hold every limit in the same order.
        let asked = Limits::default().with_overrides(&grant.limits).entries();
        let limits = effective
            .entries()
            .into_iter()
            .zip(asked)
            .map(|((key, value), (_, asked))| {
                let from = if !set_by_grant.contains(&key) {
                    "host"
                } else if asked == value {
                    "grant"
                } else {
                    "policy"
                };
                (key, LimitDto { value, from })
            })
            .collect();
        self.grant = Some(GrantDto {
            allowed_hosts: grant.allowed_hosts.clone(),
            sql_sources: grant.sql_sources.clone(),
            subjects: grant.subjects.clone(),
            secrets: grant.secrets.clone(),
            poll_interval_ms: grant
                .poll_interval
                .map(|interval| interval.as_millis() as u64),
            retry: grant.retry.map(RetryDto::new),
            shadow: shadow_policy.map(ShadowPolicyDto::new),
            steps: grant
                .step_timeouts
                .iter()
                .map(|(name, timeout)| {
                    let timeout_ms = timeout.as_millis() as u64;
                    (name.clone(), StepGrantDto { timeout_ms })
                })
                .collect(),
            limits,
        });
        self.versions = Some(
            versions
                .iter()
                .map(|version| {
                    let active = version.version.as_str() == self.active_version;
                    PluginVersionDto {
                        active,
                        shadow: self.shadow_version.as_deref() == Some(version.version.as_str()),
                        pending: !active && review_needed && version.reviewed_by.is_none(),
                        version: version.version.to_string(),
                        steps: version
                            .check_info
                            .steps
                            .iter()
                            .map(|step| step.name.clone())
                            .collect(),
                        description: version.check_info.description.clone(),
                        params_schema: version.check_info.params_schema.as_deref().map(json_text),
                        created_at: rfc3339(version.created_at),
                        uploaded_by: version.uploaded_by.clone(),
                        reviewed_by: version
                            .reviewed_by
                            .clone()
                            .filter(|reviewer| !reviewer.is_empty()),
                    }
                })
                .collect(),
        );
        self
    }
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleDto {
    pub id: String,
    pub plugin: String,
    pub params: Json,
    pub labels: BTreeMap<String, String>,
    pub trigger: TriggerDto,
    pub misfire_grace_ms: Option<i64>,
    pub coalesce: bool,
    pub max_concurrent_runs: u32,
    pub paused: bool,
    pub poll_interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    /// The next nominal fire time; null once the trigger is done.
    #[schema(format = DateTime)]
    pub next_fire_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// The token that created it; absent for schedules made before this was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_fires: Option<Vec<FireDto>>,
}

/// Exactly one of the three forms.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TriggerDto {
    /// A cron expression with seconds (`sec min hour day month weekday`) in an IANA zone.
    Cron { cron: String, timezone: String },
    /// Every `interval_ms`, each fire moved by up to `jitter_ms`, between the optional bounds.
    Interval {
        interval_ms: i64,
        jitter_ms: i64,
        #[schema(format = DateTime)]
        start_at: Option<String>,
        #[schema(format = DateTime)]
        end_at: Option<String>,
    },
    /// Once.
    At {
        #[schema(format = DateTime)]
        at: String,
    },
}

#[derive(Serialize, ToSchema)]
pub struct FireDto {
    #[schema(format = DateTime)]
    pub scheduled_at: String,
    /// `fired`, `missed` or `skipped`.
    #[schema(schema_with = fire_outcome)]
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub run_id: Option<String>,
    #[schema(format = DateTime)]
    pub recorded_at: String,
}

impl ScheduleDto {
    pub fn new(schedule: &ScheduleRecord, fires: Option<&[FireRecord]>) -> ScheduleDto {
        let trigger = match &schedule.trigger {
            TriggerSpec::Cron { expr, timezone } => TriggerDto::Cron {
                cron: expr.clone(),
                timezone: timezone.clone(),
            },
            TriggerSpec::Interval {
                interval_ms,
                jitter_ms,
                start_at,
                end_at,
            } => TriggerDto::Interval {
                interval_ms: *interval_ms,
                jitter_ms: *jitter_ms,
                start_at: start_at.map(rfc3339),
                end_at: end_at.map(rfc3339),
            },
            TriggerSpec::At { at } => TriggerDto::At { at: rfc3339(*at) },
        };
        ScheduleDto {
            id: schedule.id.clone(),
            plugin: schedule.plugin_name.clone(),
            params: json_text(&schedule.params),
            labels: schedule.labels.clone(),
            trigger,
            misfire_grace_ms: schedule.options.misfire_grace_ms,
            coalesce: schedule.options.coalesce,
            max_concurrent_runs: schedule.options.max_concurrent_runs,
            paused: schedule.options.paused,
            poll_interval_ms: schedule.poll_interval_ms,
            timeout_ms: schedule.timeout_ms,
            // A paused schedule has no next fire; resuming computes one from then.
            next_fire_at: schedule
                .next_fire_at
                .filter(|_| !schedule.options.paused)
                .map(rfc3339),
            created_at: rfc3339(schedule.created_at),
            updated_at: rfc3339(schedule.updated_at),
            created_by: schedule.created_by.clone(),
            recent_fires: fires.map(|fires| {
                fires
                    .iter()
                    .map(|fire| FireDto {
                        scheduled_at: rfc3339(fire.scheduled_at),
                        outcome: fire.outcome.as_str(),
                        reason: fire.reason.clone(),
                        run_id: fire.run_id.clone(),
                        recorded_at: rfc3339(fire.recorded_at),
                    })
                    .collect()
            }),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TokenDto {
    pub name: String,
    #[schema(schema_with = role)]
    pub role: &'static str,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The token (or `cli`) that created it.
    pub created_by: String,
    /// When it stops working; absent if never.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// When it was revoked; a revoked token is refused everywhere, and its name is never
    /// given to another.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
    /// The plugin name patterns it is confined to (`*` stands for any characters); absent
    /// for a token that may act on every plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<String>>,
}

impl TokenDto {
    pub fn new(token: &StoredToken) -> TokenDto {
        TokenDto {
            name: token.name.clone(),
            role: token.role.as_str(),
            created_at: rfc3339(token.created_at),
            created_by: token.created_by.clone(),
            expires_at: token.expires_at.map(rfc3339),
            revoked_at: token.revoked_at.map(rfc3339),
            plugins: token
                .plugins
                .as_ref()
                .map(|scope| scope.patterns().to_vec()),
        }
    }
}

/// Who the caller is, as the server sees its token.
#[derive(Serialize, ToSchema)]
pub struct CallerDto {
    /// The token's name; `anonymous` without authentication.
    pub name: String,
    #[schema(schema_with = role)]
    pub role: &'static str,
    /// The plugin name patterns the token is confined to; absent for every plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<String>>,
}

/// A token just created: the only answer that ever holds its secret.
#[derive(Serialize, ToSchema)]
pub struct NewTokenDto {
    #[serde(flatten)]
    pub token: TokenDto,
    /// The bearer token. It is shown once; only a salted hash is stored.
    pub secret: String,
}

impl NewTokenDto {
    pub fn new(token: &StoredToken, secret: String) -> NewTokenDto {
        NewTokenDto {
            token: TokenDto::new(token),
            secret,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditDto {
    pub id: i64,
    pub at: String,
    /// The token name, `anonymous` without authentication, `cli` or `plugins-dir`.
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub detail: BTreeMap<String, String>,
}

impl AuditDto {
    pub fn new(record: &AuditRecord) -> AuditDto {
        AuditDto {
            id: record.id,
            at: rfc3339(record.entry.at),
            actor: record.entry.actor.clone(),
            action: record.entry.action,
            target: record.entry.target.clone(),
            detail: record.entry.detail.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditListDto {
    pub entries: Vec<AuditDto>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptListDto {
    pub attempts: Vec<AttemptDto>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One notification of a run's end to one notifier.
#[derive(Serialize, ToSchema)]
pub struct NotificationDto {
    /// Sent as the `X-Stepwise-Delivery` header of every POST of this notification.
    pub id: String,
    /// The `[[notify]]` name in the operator's config.
    pub notifier: String,
    #[schema(schema_with = notify_event)]
    pub event: &'static str,
    #[schema(schema_with = delivery_status)]
    pub status: &'static str,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When the next POST is due while the status is `pending`.
    #[schema(format = DateTime)]
    pub next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    pub attempts: Vec<DeliveryAttemptDto>,
}

/// One POST of a notification.
#[derive(Serialize, ToSchema)]
pub struct DeliveryAttemptDto {
    pub attempt: u32,
    pub node: String,
    #[schema(format = DateTime)]
    pub started_at: String,
    pub duration_ms: i64,
    /// The receiver's status code; `null` when no answer came.
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

impl NotificationDto {
    pub fn new(record: &NotificationRecord) -> NotificationDto {
        NotificationDto {
            id: record.id.clone(),
            notifier: record.notifier.clone(),
            event: record.event.as_str(),
            status: record.status.as_str(),
            created_at: rfc3339(record.created_at),
            next_attempt_at: record.next_attempt_at.map(rfc3339),
            finished_at: record.finished_at.map(rfc3339),
            attempts: record
                .attempts
                .iter()
                .map(|attempt| DeliveryAttemptDto {
                    attempt: attempt.attempt,
                    node: attempt.node.clone(),
                    started_at: rfc3339(attempt.started_at),
                    duration_ms: attempt.duration_ms,
                    status_code: attempt.status_code,
                    error: attempt.error.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct NotificationListDto {
    pub notifications: Vec<NotificationDto>,
}

#[derive(Serialize, ToSchema)]
pub struct PluginListDto {
    pub plugins: Vec<PluginDto>,
}

#[derive(Serialize, ToSchema)]
pub struct ScheduleListDto {
    pub schedules: Vec<ScheduleDto>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TokenListDto {
    pub tokens: Vec<TokenDto>,
}

/// A secret the operator declared: where it may be sent and who may send it, never its value.
#[derive(Serialize, ToSchema)]
pub struct SecretDto {
    pub name: String,
    /// `scheme://host[:port]` origins the secret may be sent to.
    pub hosts: Vec<String>,
    /// The environment variable the value is read from, if it is read from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The file the value is read from, if it is read from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The header the host sets to the value in requests to `hosts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The header's whole value, `{}` standing for the secret's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The query parameter the host sets to the value in requests to `hosts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Plugins whose grant lists the secret.
    pub granted_to: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SecretListDto {
    pub secrets: Vec<SecretDto>,
}

/// The nodes sharing the database, for operators (`GET /v1/health`).
#[derive(Serialize, ToSchema)]
pub struct ClusterHealthDto {
    /// The node that answered.
    pub node: String,
    /// Every node that holds a lease now or made a call in the last minute.
    pub nodes: Vec<NodeHealthDto>,
    /// Runs waiting for their first tick.
    pub queued: i64,
    pub running: i64,
    /// Unfinished runs whose next tick is due now: the queue depth.
    pub due_now: i64,
    /// The lag of the ticks that started in the last minute.
    pub tick_lag_last_minute: LagDto,
}

#[derive(Serialize, ToSchema)]
pub struct NodeHealthDto {
    pub node: String,
    /// Runs whose lease it holds now.
    pub leases: i64,
    /// Step calls it made in the last minute.
    pub calls_last_minute: i64,
}

#[derive(Serialize, ToSchema)]
pub struct LagDto {
    pub ticks: usize,
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub max_ms: Option<i64>,
}

impl ClusterHealthDto {
    pub fn new(node: &str, health: ClusterHealth) -> ClusterHealthDto {
        let mut nodes: BTreeMap<String, NodeHealthDto> = BTreeMap::new();
        fn entry(nodes: &mut BTreeMap<String, NodeHealthDto>, name: String) -> &mut NodeHealthDto {
            nodes.entry(name.clone()).or_insert_with(|| NodeHealthDto {
                node: name,
                leases: 0,
                calls_last_minute: 0,
            })
        }
        for (name, leases) in health.leases {
            entry(&mut nodes, name).leases = leases;
        }
        for (name, calls) in health.calls {
            entry(&mut nodes, name).calls_last_minute = calls;
        }
        let mut lags = health.lags_ms;
        lags.sort_unstable();
        let at = |quantile: f64| {
            (!lags.is_empty()).then(|| lags[((lags.len() - 1) as f64 * quantile).round() as usize])
        };
        ClusterHealthDto {
            node: node.to_owned(),
            nodes: nodes.into_values().collect(),
            queued: health.queued,
            running: health.running,
            due_now: health.due,
            tick_lag_last_minute: LagDto {
                ticks: lags.len(),
                p50_ms: at(0.5),
                p99_ms: at(0.99),
                max_ms: lags.last().copied(),
            },
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct HealthDto {
    #[schema(schema_with = health_status)]
    pub status: &'static str,
}

fn health_status() -> ObjectBuilder {
    one_of(["ok"])
}

#[derive(Serialize, ToSchema)]
pub struct ReadinessDto {
    #[schema(schema_with = readiness_status)]
    pub status: &'static str,
    /// Whether the database answered.
    pub database: bool,
    /// Whether the plugins directory has been loaded.
    pub plugins_loaded: bool,
}

fn readiness_status() -> ObjectBuilder {
    one_of(["ready", "not_ready"])
}

/// `GET /v1/plugins/{name}/shadow`: the shadow version against the active one, over the runs
/// since the shadow began (or, when it has ended, until it ended).
#[derive(Serialize, ToSchema)]
pub struct ShadowDto {
    pub plugin: String,
    pub active_version: String,
    /// The shadow compared: the current one, else the one that ended last; `null` if the
    /// plugin never had one.
    pub shadow_version: Option<String>,
    /// `shadowing` while it runs, else how it ended: `promoted`, `dropped`, `replaced` or
    /// `stopped`; `none` without a shadow.
    #[schema(schema_with = shadow_state)]
    pub state: &'static str,
    #[schema(format = DateTime)]
    pub since: Option<String>,
    pub started_by: Option<String>,
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    /// Who ended it: a token's name, or `shadow` for its comparison.
    pub ended_by: Option<String>,
    /// When it is promoted or dropped without anyone asking; `null`: only a person decides.
    pub policy: Option<ShadowPolicyDto>,
    /// The share of the plugin's runs a shadow runs beside (`[policy] shadow_share`).
    pub share: f64,
    /// Primaries with a shadow run.
    pub pairs: u64,
    /// Pairs whose two runs both ended with a verdict (not cancelled): the ones compared.
    pub finished: u64,
    /// Finished pairs whose runs ended differently.
    pub disagreed: u64,
    pub disagreement_rate: f64,
    /// How the primaries of these pairs ended.
    pub primary: StatusCountsDto,
    /// How their shadow runs ended.
    pub shadow: StatusCountsDto,
    /// The latest pairs that disagree (at most 50), newest first.
    pub disagreements: Vec<DisagreementDto>,
    /// Per step of either version, in order.
    pub steps: Vec<ShadowStepDto>,
}

fn shadow_state() -> ObjectBuilder {
    one_of(
        ["none", "shadowing"]
            .into_iter()
            .chain(ShadowOutcome::ALL.iter().map(|outcome| outcome.as_str())),
    )
}

#[derive(Serialize, ToSchema)]
pub struct StatusCountsDto {
    pub passed: u64,
    pub failed: u64,
    pub errored: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    /// Queued or running.
    pub unfinished: u64,
}

impl StatusCountsDto {
    fn new(counts: &StatusCounts) -> StatusCountsDto {
        StatusCountsDto {
            passed: counts.passed,
            failed: counts.failed,
            errored: counts.errored,
            timed_out: counts.timed_out,
            cancelled: counts.cancelled,
            unfinished: counts.unfinished,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DisagreementDto {
    pub primary: PairRunDto,
    pub shadow: PairRunDto,
    #[schema(format = DateTime)]
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct PairRunDto {
    pub id: String,
    #[schema(schema_with = run_status)]
    pub status: &'static str,
    /// `/v1/runs/{id}`
    pub url: String,
}

impl PairRunDto {
    fn new(id: &RunId, status: RunStatus) -> PairRunDto {
        PairRunDto {
            id: id.to_string(),
            status: status.as_str(),
            url: format!("/v1/runs/{id}"),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ShadowStepDto {
    pub name: String,
    pub primary: StepSideDto,
    pub shadow: StepSideDto,
}

#[derive(Serialize, ToSchema)]
pub struct StepSideDto {
    /// Runs in which the step reached a verdict.
    pub decided: u64,
    pub passed: u64,
    /// Calls made over all these runs.
    pub attempts: u64,
    /// `passed_after_ms` of the runs where it passed (within 4 %), and its maximum.
    pub passed_after_ms_p50: Option<i64>,
    pub passed_after_ms_p95: Option<i64>,
    pub passed_after_ms_max: Option<i64>,
}

impl StepSideDto {
    fn new(side: &StepSide) -> StepSideDto {
        StepSideDto {
            decided: side.decided,
            passed: side.passed,
            attempts: side.attempts,
            passed_after_ms_p50: side.passed_after_ms(0.5),
            passed_after_ms_p95: side.passed_after_ms(0.95),
            passed_after_ms_max: side.max_passed_after_ms,
        }
    }
}

/// What the comparison is made of, read from the store.
pub struct ShadowParts<'a> {
    pub plugin: &'a PluginRecord,
    pub shadow: Option<&'a ShadowRecord>,
    pub policy: Option<ShadowPolicy>,
    pub share: f64,
    pub tally: ShadowTally,
    pub disagreements: &'a [ShadowPair],
    pub steps: &'a [ShadowStep],
}

impl ShadowDto {
    pub fn new(parts: ShadowParts<'_>) -> ShadowDto {
        let ShadowParts {
            plugin,
            shadow,
            policy,
            share,
            tally,
            disagreements,
            steps,
        } = parts;
        // Steps by position, then name: both versions' steps, each once.
        let mut sides: BTreeMap<(usize, String), (StepSide, StepSide)> = BTreeMap::new();
        for step in steps {
            let entry = sides.entry((step.position, step.name.clone())).or_default();
            let side = if step.shadow {
                &mut entry.1
            } else {
                &mut entry.0
            };
            side.add(step.status, step.attempts, step.passed_after_ms);
        }
        ShadowDto {
            plugin: plugin.name.to_string(),
            active_version: plugin.active_version.to_string(),
            shadow_version: shadow.map(|shadow| shadow.version.to_string()),
            state: match shadow {
                None => "none",
                Some(shadow) => shadow.outcome.map_or("shadowing", ShadowOutcome::as_str),
            },
            since: shadow.map(|shadow| rfc3339(shadow.started_at)),
            started_by: shadow.map(|shadow| shadow.started_by.clone()),
            ended_at: shadow.and_then(|shadow| shadow.ended_at).map(rfc3339),
            ended_by: shadow.and_then(|shadow| shadow.ended_by.clone()),
            policy: policy.map(ShadowPolicyDto::new),
            share,
            pairs: tally.pairs,
            finished: tally.finished,
            disagreed: tally.disagreements,
            disagreement_rate: tally.disagreement_rate(),
            primary: StatusCountsDto::new(&tally.primary),
            shadow: StatusCountsDto::new(&tally.shadow),
            disagreements: disagreements
                .iter()
                .map(|pair| DisagreementDto {
                    primary: PairRunDto::new(&pair.primary, pair.primary_status),
                    shadow: PairRunDto::new(&pair.shadow, pair.shadow_status),
                    created_at: rfc3339(pair.created_at),
                })
                .collect(),
            steps: sides
                .into_iter()
                .map(|((_, name), (primary, shadow))| ShadowStepDto {
                    name,
                    primary: StepSideDto::new(&primary),
                    shadow: StepSideDto::new(&shadow),
                })
                .collect(),
        }
    }
}
