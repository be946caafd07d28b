//! The durable state: plugins and their versions, runs, steps, attempts and schedules. `Store`
//! is one concrete type with narrow methods named after intent, over SQLite (embedded, one node)
//! or PostgreSQL (several nodes). The SQL is one text for both backends, in a file per
//! aggregate (`runs`, `plugins`, `schedules`, `leases`, `access`, `outbox`, `events`,
//! `retention`, `rollups`; `store.rs` holds the `Store` itself); `backend.rs` holds where they differ. Only this module knows SQL; every transaction begins
//! and ends inside one method.

mod access;
mod backend;
mod events;
mod group_commit;
mod leases;
mod outbox;
mod plugins;
mod retention;
mod rollups;
mod runs;
mod schedules;
mod shadows;
mod sqlite_reader;
mod sqlite_writer;
mod statement;
mod store;

use std::collections::BTreeMap;

use crate::model::{
    AttemptOutcome, CheckInfo, FireOutcome, LogLine, PluginName, PluginVersion, Retry, RunId,
    RunStatus, StepStatus, TriggerSpec, UnixMillis,
};

pub use access::{AUDIT_ACTIONS, AuditEntry, AuditRecord, StoredToken};
pub use backend::{Backend, Changes};
pub use events::EventRecord;
pub use outbox::{
    ClaimedNotification, DeliveryAttempt, DeliveryNext, NotificationRecord, NotifyWrite,
};
pub use retention::{Aged, Pruned};
pub use rollups::FOLD_BATCH;
pub use shadows::{CurrentShadow, ShadowDecision, ShadowPair, ShadowRecord, ShadowStep};
pub use store::Store;

/// What a node changed that other nodes sharing the database should react to at once rather
/// than at their next backstop poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New runs are due.
    RunsQueued,
    RunCancelled(RunId),
    /// A plugin version became active: worth compiling before its first run arrives.
    PluginActivated(PluginVersion),
    SchedulesChanged,
    /// Events were numbered: live event streams have something to read.
    EventsVisible,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("the storage writer stopped")]
    WriterStopped,
    #[error("not found")]
    NotFound,
    #[error("conflict on {constraint}")]
    Conflict { constraint: String },
    /// The version may not become active: no admin has reviewed it, and the plugin's grant
    /// lets it reach outside its sandbox.
    #[error("the version has not been reviewed")]
    Unreviewed,
    /// Another node (or a cancellation) took the run over; our write was not applied.
    #[error("the lease on run {0} was lost")]
    LeaseLost(RunId),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// From the SQLite writer thread's own connection (rusqlite).
    #[error("sqlite: {0}")]
    Sqlite(String),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the unique key `constraint` (`table.column`) was taken by another row, as
    /// either driver reports it.
    pub(super) fn is_unique_violation_of(&self, constraint: &str) -> bool {
        match self {
            Error::Database(error) => error
                .as_database_error()
                .is_some_and(|database_error| database_error.is_unique_violation()),
            Error::Conflict { constraint: taken } => taken == constraint,
            _ => false,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Error {
        match error.sqlite_error() {
            Some(code)
                if code.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || code.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                // "UNIQUE constraint failed: runs.idempotency_key" names it last.
                let message = error.to_string();
                let constraint = message.rsplit(": ").next().unwrap_or_default().to_owned();
                Error::Conflict { constraint }
            }
            _ => Error::Sqlite(error.to_string()),
        }
    }
}

/// The state of the nodes sharing the database, as the dashboard shows it.
#[derive(Debug, Clone, Default)]
pub struct ClusterHealth {
    /// `(node, runs)` whose lease the node holds now.
    pub leases: Vec<(String, i64)>,
    /// `(node, calls)` in the last minute.
    pub calls: Vec<(String, i64)>,
    pub queued: i64,
    pub running: i64,
    /// Unfinished runs whose next tick is due now.
    pub due: i64,
    /// The lag of every tick that started in the last minute, in milliseconds.
    pub lags_ms: Vec<i64>,
}

/// A plugin name with its active version and grant.
#[derive(Debug, Clone)]
pub struct PluginRecord {
    pub name: PluginName,
    pub active_version: PluginVersion,
    /// The manifest text; `grant::parse_grant` turns it into a `Grant`.
    pub grant_toml: String,
    pub check_info: CheckInfo,
    pub updated_at: UnixMillis,
    /// The version that runs beside the active one, if any.
    pub shadow: Option<ShadowVersion>,
}

/// A plugin's current shadow, as a trigger needs it.
#[derive(Debug, Clone)]
pub struct ShadowVersion {
    pub version: PluginVersion,
    pub check_info: CheckInfo,
    pub since: UnixMillis,
}

/// One stored version of a plugin.
#[derive(Debug, Clone)]
pub struct PluginVersionRecord {
    pub version: PluginVersion,
    pub check_info: CheckInfo,
    pub created_at: UnixMillis,
    /// Who stored it; `None` for versions stored before this was recorded.
    pub uploaded_by: Option<String>,
    /// The admin (or operator) who let it run under the plugin's grant; `None` while no one
    /// has, and empty for versions stored before review existed.
    pub reviewed_by: Option<String>,
}

/// Who may make a version active, for [`Store::activate_plugin`].
pub enum Review<'a> {
    /// An admin or the operator: the version counts as reviewed by this actor from now on.
    By(&'a str),
    /// Anyone else: refused with [`Error::Unreviewed`] when the version is unreviewed and
    /// `reaches_out` says the grant in force (read in the same transaction) lets the plugin
    /// reach outside its sandbox.
    Required(&'a (dyn Fn(&str) -> bool + Sync)),
    /// The operator lets publishers activate any version (`publishers_activate_granted`).
    NotNeeded,
}

/// A run to create, with its steps.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub plugin_name: PluginName,
    pub plugin_version: PluginVersion,
    pub params: String,
    pub labels: BTreeMap<String, String>,
    pub poll_interval_ms: i64,
    pub max_errors: u32,
    pub deadline_at: UnixMillis,
    pub created_at: UnixMillis,
    pub idempotency_key: Option<String>,
    /// sha256 of the request that came with the idempotency key.
    pub idempotency_fingerprint: Option<String>,
    /// The schedule whose fire started this run.
    pub schedule_id: Option<String>,
    /// The token that triggered it; `None` for a schedule's fire.
    pub created_by: Option<String>,
    /// The run's own backoff for errored attempts.
    pub retry: Option<Retry>,
    pub steps: Vec<NewStep>,
    /// The run of the plugin's shadow version beside this one, written with it.
    pub shadow: Option<Box<NewRun>>,
    /// For a shadow run: the run it shadows.
    pub shadow_of: Option<RunId>,
}

impl NewRun {
    /// The run as `find_run` would return it right after `enqueue_run` wrote it.
    pub fn queued_record(&self) -> RunRecord {
        RunRecord {
            id: self.id.clone(),
            plugin_name: self.plugin_name.as_str().to_owned(),
            plugin_version: self.plugin_version.clone(),
            params: self.params.clone(),
            labels: self.labels.clone(),
            status: RunStatus::Queued,
            message: None,
            poll_interval_ms: self.poll_interval_ms,
            max_errors: self.max_errors,
            error_count: 0,
            current_step: 0,
            created_at: self.created_at,
            started_at: None,
            finished_at: None,
            deadline_at: self.deadline_at,
            next_tick_at: Some(self.created_at),
            lease_owner: None,
            http_requests: 0,
            log_bytes: 0,
            recording_bytes: 0,
            schedule_id: self.schedule_id.clone(),
            created_by: self.created_by.clone(),
            cancelled_by: None,
            retry: self.retry,
            shadow_of: self.shadow_of.clone(),
            current_step_name: None,
            steps: self
                .steps
                .iter()
                .enumerate()
                .map(|(position, step)| StepRecord {
                    position,
                    name: step.name.clone(),
                    status: StepStatus::Waiting,
                    attempts: 0,
                    timeout_ms: step.timeout_ms,
                    max_attempts: step.max_attempts,
                    message: None,
                    output: None,
                    first_attempt_at: None,
                    last_attempt_at: None,
                    finished_at: None,
                    passed_after_ms: None,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewStep {
    pub name: String,
    pub timeout_ms: Option<i64>,
    pub max_attempts: Option<u32>,
}

/// Whether `enqueue_run` created the run or found one with the same idempotency key.
#[derive(Debug)]
pub enum Enqueued {
    Created(RunRecord),
    Existing(RunRecord),
    /// The key was used before with another request; that request's run.
    KeyReused(RunRecord),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: RunId,
    pub plugin_name: String,
    pub plugin_version: PluginVersion,
    pub params: String,
    pub labels: BTreeMap<String, String>,
    pub status: RunStatus,
    pub message: Option<String>,
    pub poll_interval_ms: i64,
    pub max_errors: u32,
    pub error_count: u32,
    pub current_step: usize,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub deadline_at: UnixMillis,
    pub next_tick_at: Option<UnixMillis>,
    pub lease_owner: Option<String>,
    /// Outbound HTTP requests made by the run's step calls so far.
    pub http_requests: u32,
    /// Bytes of plugin log lines stored with the run's attempts (`run_log_bytes` caps them).
    pub log_bytes: u64,
    /// Bytes of the recordings of the run's attempts, uncompressed (`run_recording_bytes`
    /// caps them).
    pub recording_bytes: u64,
    pub schedule_id: Option<String>,
    /// The token that triggered it; `None` for a schedule's fire (see `schedule_id`).
    pub created_by: Option<String>,
    /// The token that cancelled it.
    pub cancelled_by: Option<String>,
    /// The run's own backoff for errored attempts; `None`: the grant's.
    pub retry: Option<Retry>,
    /// For a shadow run: the run it shadows.
    pub shadow_of: Option<RunId>,
    /// The name of the step at `current_step`: filled by `list_runs`, which has no steps.
    pub current_step_name: Option<String>,
    /// Empty in listings; filled by `find_run`.
    pub steps: Vec<StepRecord>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub position: usize,
    pub name: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub timeout_ms: Option<i64>,
    pub max_attempts: Option<u32>,
    pub message: Option<String>,
    pub output: Option<String>,
    pub first_attempt_at: Option<UnixMillis>,
    pub last_attempt_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub passed_after_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub position: usize,
    pub step: String,
    pub attempt: u32,
    pub outcome: AttemptOutcome,
    pub message: Option<String>,
    /// `None` when the page was read without them.
    pub logs: Option<Vec<LogLine>>,
    pub started_at: UnixMillis,
    pub duration_ms: i64,
    pub due_at: Option<UnixMillis>,
    pub node: Option<String>,
}

/// Which attempts of a run [`Store::list_attempts`] reads.
#[derive(Debug, Clone, Copy)]
pub struct AttemptPage {
    /// After this attempt (a step position and attempt number), if given.
    pub after: Option<(usize, u32)>,
    /// At most this many.
    pub limit: u32,
    /// With each attempt's log lines.
    pub logs: bool,
    /// Fewer when their messages (and log lines) take more than this many bytes, but at
    /// least one.
    pub bytes: usize,
}

/// What [`Store::list_attempts`] read.
#[derive(Debug, Default)]
pub struct AttemptList {
    pub attempts: Vec<AttemptRecord>,
    /// Attempts may follow the last one: the page is full, or its byte budget cut it short.
    pub more: bool,
}

impl AttemptPage {
    /// The first `limit` attempts, with their log lines, whatever their size.
    pub fn first(limit: u32) -> AttemptPage {
        AttemptPage {
            after: None,
            limit,
            logs: true,
            bytes: usize::MAX,
        }
    }
}

/// Filters of `list_runs`; `before` is the cursor (a run id: ids sort by creation time).
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub plugin: Option<String>,
    pub status: Option<RunStatus>,
    pub label: Option<(String, String)>,
    pub schedule: Option<String>,
    /// Shadow runs are listed too (else only primaries).
    pub shadow: bool,
    pub before: Option<RunId>,
    pub limit: u32,
}

/// A run this node may work on until `lease_token` is superseded.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub id: RunId,
    /// The node holding the lease.
    pub owner: String,
    pub lease_token: i64,
    /// The tick's due time when it was claimed.
    pub due_at: UnixMillis,
    /// The run as the claim found it, where the claim reads it too (SQLite's writer thread).
    pub loaded: Option<std::sync::Arc<LoadedTick>>,
}

/// What a tick needs from the database.
#[derive(Debug, Clone)]
pub struct LoadedTick {
    pub run: RunRecord,
    /// The plugin's current grant; `None` if the plugin no longer exists.
    pub grant_toml: Option<String>,
}

/// What `cancel_run` did.
#[derive(Debug)]
pub enum Cancelled {
    Cancelled(Box<RunRecord>),
    AlreadyFinished(RunStatus),
}

/// The result of one step of a tick, written atomically and only while the lease holds.
#[derive(Debug, Clone)]
pub struct TickWrite {
    pub run_id: RunId,
    pub lease_token: i64,
    /// The node that made the call, recorded with the attempt.
    pub node: String,
    pub now: UnixMillis,
    /// The call that was made, if any (a timeout found before calling makes none).
    pub attempt: Option<NewAttempt>,
    pub step: StepWrite,
    pub run: RunWrite,
    /// The notifiers watching the run, when this write may end it.
    pub notify: Option<NotifyWrite>,
}

#[derive(Debug, Clone)]
pub struct NewAttempt {
    pub attempt: u32,
    pub outcome: AttemptOutcome,
    pub message: Option<String>,
    pub logs: Vec<LogLine>,
    pub started_at: UnixMillis,
    pub duration_ms: i64,
    /// When the tick was due, for the first call of a tick.
    pub due_at: Option<UnixMillis>,
    /// The attempt's recording, compressed (zstd), when its run is recorded.
    pub recording: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct StepWrite {
    pub position: usize,
    pub status: StepStatus,
    pub message: Option<String>,
    pub output: Option<String>,
    pub passed_after_ms: Option<i64>,
    /// Terminal for the run: later steps become `skipped`.
    pub skip_rest: bool,
}

#[derive(Debug, Clone)]
pub struct RunWrite {
    pub status: RunStatus,
    /// The status the run had when it was claimed: a run that was and stays `running` has
    /// its status left as it is (see `sqlite_writer::update_run`).
    pub status_before: RunStatus,
    pub message: Option<String>,
    pub current_step: usize,
    pub error_count: u32,
    pub http_requests: u32,
    pub log_bytes: u64,
    pub recording_bytes: u64,
    /// The run passed, and records only failures: its attempts' recordings go.
    pub drop_recordings: bool,
    pub started_at: UnixMillis,
    /// `None` once the run is terminal.
    pub next_tick_at: Option<UnixMillis>,
    /// Keep the lease for this long by the database's clock (the tick goes on to the next
    /// step), or release it.
    pub keep_lease_ms: Option<i64>,
}

/// A schedule's options, with APScheduler's names and meanings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// A fire later than this is `missed`; `None`: never too late.
    pub misfire_grace_ms: Option<i64>,
    /// Several fires due at once collapse into the latest.
    pub coalesce: bool,
    /// A fire while this many runs of the schedule are unfinished is `skipped`.
    pub max_concurrent_runs: u32,
    pub paused: bool,
}

/// A schedule as stored; `created_at`/`updated_at` are set by the store.
#[derive(Debug, Clone)]
pub struct ScheduleRecord {
    pub id: String,
    pub plugin_name: String,
    pub params: String,
    pub labels: BTreeMap<String, String>,
    pub poll_interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub trigger: TriggerSpec,
    pub options: ScheduleOptions,
    /// The next nominal fire time; `None` once the trigger is done.
    pub next_fire_at: Option<UnixMillis>,
    /// `next_fire_at` plus this fire's jitter: when it is due.
    pub next_due_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// The token that created it; `None` for schedules made before this was recorded.
    pub created_by: Option<String>,
}

/// Which schedules a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ScheduleFilter {
    pub plugin: Option<String>,
    pub paused: Option<bool>,
}

/// One fire time of a schedule and what became of it.
#[derive(Debug, Clone)]
pub struct FireRecord {
    pub scheduled_at: UnixMillis,
    pub outcome: FireOutcome,
    pub reason: Option<String>,
    pub run_id: Option<String>,
    pub recorded_at: UnixMillis,
}

/// A schedule this node may fire until `lease_token` is superseded.
#[derive(Debug, Clone)]
pub struct ClaimedSchedule {
    pub id: String,
    pub lease_token: i64,
}

/// A fire to record, with the run it starts.
#[derive(Debug, Clone)]
pub struct NewFire {
    pub scheduled_at: UnixMillis,
    pub outcome: FireOutcome,
    pub reason: Option<String>,
    pub run: Option<NewRun>,
}

/// The result of firing a claimed schedule, written atomically while the lease holds.
#[derive(Debug, Clone)]
pub struct FireWrite {
    pub schedule_id: String,
    pub lease_token: i64,
    pub now: UnixMillis,
    pub fires: Vec<NewFire>,
    pub next_fire_at: Option<UnixMillis>,
    pub next_due_at: Option<UnixMillis>,
}
