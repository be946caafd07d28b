//! Shadow versions (README, "Changing a plugin while the server runs"): the shadow each plugin
//! may have, the runs that shadowed its primaries, and the decision that ends a shadow. A
//! decision is one conditional update of the shadow's row: whichever node makes it first
//! makes it, and its promotion, audit entry and notifications are written in the same
//! transaction, so all of them happen once or not at all.

use sqlx::FromRow;

use super::access::{AuditEntry, insert_audit};
use super::outbox::INSERT_NOTIFICATION;
use super::plugins::check_review;
use super::store::corrupt;
use super::{Change, Error, Result, Review, Store};
use crate::model::{
    NotifyEvent, PluginName, PluginVersion, RunId, RunStatus, ShadowOutcome, ShadowTally,
    StepStatus, UnixMillis,
};

/// One shadow of a plugin, current or ended.
#[derive(Debug, Clone)]
pub struct ShadowRecord {
    pub id: String,
    pub plugin_name: String,
    pub version: PluginVersion,
    pub started_at: UnixMillis,
    pub started_by: String,
    /// `None` while it shadows.
    pub ended_at: Option<UnixMillis>,
    pub outcome: Option<ShadowOutcome>,
    pub ended_by: Option<String>,
    /// The comparison a decision was made on (JSON), for decisions its comparison made.
    pub figures: Option<String>,
}

/// A current shadow with its plugin's grant, for the job that decides.
#[derive(Debug, Clone)]
pub struct CurrentShadow {
    pub shadow: ShadowRecord,
    pub grant_toml: String,
}

/// A primary and its shadow run, as a disagreement lists them.
#[derive(Debug, Clone)]
pub struct ShadowPair {
    pub primary: RunId,
    pub primary_status: RunStatus,
    pub shadow: RunId,
    pub shadow_status: RunStatus,
    pub created_at: UnixMillis,
}

/// One step of one run of the comparison.
#[derive(Debug, Clone)]
pub struct ShadowStep {
    /// The step belongs to the shadow run (else to the primary).
    pub shadow: bool,
    pub position: usize,
    pub name: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub passed_after_ms: Option<i64>,
}

/// What ends a shadow by its comparison.
#[derive(Debug, Clone)]
pub struct ShadowDecision {
    pub outcome: ShadowOutcome,
    /// The comparison as JSON, kept with the shadow.
    pub figures: String,
    /// The notifiers told about it, with the event each is sent.
    pub notify: Vec<(String, NotifyEvent)>,
    pub audit: AuditEntry,
}

const SHADOW_COLUMNS: &str =
    "id, plugin_name, version, started_at, started_by, ended_at, outcome, ended_by, figures";

/// The runs of shadow `$1` (plugin), `$2` (version), created from `$3` to `$4`, as `s`
/// ([`its_runs`] binds them).
const SHADOW_RUNS: &str = "s.shadow_of IS NOT NULL AND s.plugin_name = $1 AND s.plugin_version = $2 \
     AND s.created_at >= $3 AND s.created_at <= $4";

impl Store {
    /// Makes `version` the shadow of `name`, in place of any shadow it had. `review` is judged
    /// as for an activation: a shadow runs under the plugin's grant.
    pub async fn start_shadow(
        &self,
        name: &PluginName,
        version: &PluginVersion,
        audit: AuditEntry,
        review: Review<'_>,
    ) -> Result<()> {
        let (mut transaction, plugin) = self.lock_plugin(name.as_str()).await?;
        let Some((active, grant)) = plugin else {
            return Err(Error::NotFound);
        };
        if active == version.as_str() {
            return Err(Error::Conflict {
                constraint: "shadows.version".into(),
            });
        }
        check_review(&mut transaction, name.as_str(), version, &grant, review).await?;
        end_current(
            &mut transaction,
            name.as_str(),
            ShadowOutcome::Replaced,
            &audit.actor,
            audit.at,
        )
        .await?;
        sqlx::query(
            "INSERT INTO shadows (id, plugin_name, version, started_at, started_by) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(name.as_str())
        .bind(version.as_str())
        .bind(audit.at)
        .bind(&audit.actor)
        .execute(&mut *transaction)
        .await?;
        let audit = audit
            .with("version", version.as_str())
            .with("active_version", active);
        insert_audit(&mut transaction, &audit).await?;
        // Other nodes compile it before its first run reaches them.
        self.backend
            .notify(&mut *transaction, &Change::PluginActivated(version.clone()))
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Ends the shadow of `name` without promoting it; whether it had one.
    pub async fn stop_shadow(&self, name: &str, audit: AuditEntry) -> Result<bool> {
        let mut transaction = self.writes.begin().await?;
        let Some(version) = end_current(
            &mut transaction,
            name,
            ShadowOutcome::Stopped,
            &audit.actor,
            audit.at,
        )
        .await?
        else {
            return Ok(false);
        };
        insert_audit(&mut transaction, &audit.with("version", version)).await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Every current shadow, with its plugin's grant.
    pub async fn current_shadows(&self) -> Result<Vec<CurrentShadow>> {
        let rows: Vec<ShadowGrantRow> = sqlx::query_as(
            "SELECT s.id, s.plugin_name, s.version, s.started_at, s.started_by, s.ended_at, s.outcome, \
             s.ended_by, s.figures, p.grant_toml FROM shadows s JOIN plugins p ON p.name = s.plugin_name \
             WHERE s.ended_at IS NULL ORDER BY s.plugin_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(CurrentShadow {
                    grant_toml: row.grant_toml.clone(),
                    shadow: row.shadow.into_record()?,
                })
            })
            .collect()
    }

    /// The current shadow of `name`, else the one that ended last.
    pub async fn latest_shadow(&self, name: &str) -> Result<Option<ShadowRecord>> {
        let row: Option<ShadowRow> = sqlx::query_as(&format!(
            "SELECT {SHADOW_COLUMNS} FROM shadows WHERE plugin_name = $1 \
             ORDER BY CASE WHEN ended_at IS NULL THEN 0 ELSE 1 END, started_at DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ShadowRow::into_record).transpose()
    }

    /// The last shadow of `name` that ran `version`.
    pub async fn shadow_of_version(
        &self,
        name: &str,
        version: &PluginVersion,
    ) -> Result<Option<ShadowRecord>> {
        let row: Option<ShadowRow> = sqlx::query_as(&format!(
            "SELECT {SHADOW_COLUMNS} FROM shadows WHERE plugin_name = $1 AND version = $2 \
             ORDER BY started_at DESC LIMIT 1"
        ))
        .bind(name)
        .bind(version.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(ShadowRow::into_record).transpose()
    }

    /// How the shadow's runs and their primaries ended.
    pub async fn shadow_tally(&self, shadow: &ShadowRecord) -> Result<ShadowTally> {
        let sql = format!(
            "SELECT p.status, s.status, COUNT(*) FROM runs s JOIN runs p ON p.id = s.shadow_of \
             WHERE {SHADOW_RUNS} GROUP BY p.status, s.status"
        );
        let rows: Vec<(String, String, i64)> = its_runs(sqlx::query_as(&sql), shadow)
            .fetch_all(&self.pool)
            .await?;
        let pairs = rows
            .into_iter()
            .map(|(primary, shadow, count)| Ok((status(&primary)?, status(&shadow)?, count as u64)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ShadowTally::of_pairs(pairs))
    }

    /// Up to `limit` pairs of the shadow that ended differently (cancelled ones aside), newest
    /// first.
    pub async fn shadow_disagreements(
        &self,
        shadow: &ShadowRecord,
        limit: u32,
    ) -> Result<Vec<ShadowPair>> {
        let sql = format!(
            "SELECT p.id, p.status, s.id, s.status, s.created_at FROM runs s JOIN runs p ON p.id = s.shadow_of \
             WHERE {SHADOW_RUNS} AND p.status <> s.status \
             AND p.status IN ('passed', 'failed', 'errored', 'timed_out') \
             AND s.status IN ('passed', 'failed', 'errored', 'timed_out') \
             ORDER BY s.created_at DESC, s.id DESC LIMIT $5"
        );
        let rows: Vec<(String, String, String, String, i64)> =
            its_runs(sqlx::query_as(&sql), shadow)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(
                |(primary, primary_status, shadow, shadow_status, created_at)| {
                    Ok(ShadowPair {
                        primary: RunId::from_stored(primary),
                        primary_status: status(&primary_status)?,
                        shadow: RunId::from_stored(shadow),
                        shadow_status: status(&shadow_status)?,
                        created_at,
                    })
                },
            )
            .collect()
    }

    /// The steps of the shadow's runs and of their primaries.
    pub async fn shadow_steps(&self, shadow: &ShadowRecord) -> Result<Vec<ShadowStep>> {
        let sql = format!(
            "SELECT CAST(1 AS BIGINT), st.position, st.name, st.status, st.attempts, st.passed_after_ms \
             FROM runs s JOIN steps st ON st.run_id = s.id WHERE {SHADOW_RUNS} \
             UNION ALL \
             SELECT CAST(0 AS BIGINT), st.position, st.name, st.status, st.attempts, st.passed_after_ms \
             FROM runs s JOIN steps st ON st.run_id = s.shadow_of WHERE {SHADOW_RUNS}"
        );
        let rows: Vec<(i64, i64, String, String, i64, Option<i64>)> =
            its_runs(sqlx::query_as(&sql), shadow)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(
                |(side, position, name, step_status, attempts, passed_after_ms)| {
                    Ok(ShadowStep {
                        shadow: side == 1,
                        position: position as usize,
                        name,
                        status: StepStatus::parse(&step_status)
                            .ok_or_else(|| corrupt("step status", &step_status))?,
                        attempts: attempts as u32,
                        passed_after_ms,
                    })
                },
            )
            .collect()
    }

    /// Ends `shadow` as `decision` says, if it is still current: a promotion makes its version
    /// active. Its audit entry and notifications go in the same transaction. Returns whether
    /// this call decided (another node may have, first).
    pub async fn decide_shadow(
        &self,
        shadow: &ShadowRecord,
        decision: &ShadowDecision,
    ) -> Result<bool> {
        let at = decision.audit.at;
        // The plugin's row first, as every change of a plugin takes it: an activation at the
        // same moment goes before or after this one, never across it.
        let (mut transaction, plugin) = self.lock_plugin(&shadow.plugin_name).await?;
        if plugin.is_none() {
            return Ok(false);
        }
        let ended = sqlx::query(
            "UPDATE shadows SET ended_at = $1, outcome = $2, ended_by = $3, figures = $4 \
             WHERE id = $5 AND ended_at IS NULL",
        )
        .bind(at)
        .bind(decision.outcome.as_str())
        .bind(&decision.audit.actor)
        .bind(&decision.figures)
        .bind(&shadow.id)
        .execute(&mut *transaction)
        .await?;
        if ended.rows_affected() == 0 {
            return Ok(false);
        }
        if decision.outcome == ShadowOutcome::Promoted {
            sqlx::query("UPDATE plugins SET active_version = $1, updated_at = $2 WHERE name = $3")
                .bind(shadow.version.as_str())
                .bind(at)
                .bind(&shadow.plugin_name)
                .execute(&mut *transaction)
                .await?;
        }
        insert_audit(&mut transaction, &decision.audit).await?;
        // The notification names the shadow's last run: what a receiver can open to see it.
        let last_run: Option<(String,)> = sqlx::query_as(&format!(
            "SELECT s.id FROM runs s WHERE {SHADOW_RUNS} ORDER BY s.created_at DESC, s.id DESC LIMIT 1"
        ))
        .bind(&shadow.plugin_name)
        .bind(shadow.version.as_str())
        .bind(shadow.started_at)
        .bind(at)
        .fetch_optional(&mut *transaction)
        .await?;
        if let Some((run_id,)) = last_run {
            for (notifier, event) in &decision.notify {
                sqlx::query(INSERT_NOTIFICATION)
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(&run_id)
                    .bind(notifier)
                    .bind(event.as_str())
                    .bind(at)
                    .execute(&mut *transaction)
                    .await?;
            }
        }
        if decision.outcome == ShadowOutcome::Promoted {
            self.backend
                .notify(
                    &mut *transaction,
                    &Change::PluginActivated(shadow.version.clone()),
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(true)
    }
}

/// Ends the current shadow of `name` as `outcome`; its version, if it had one.
async fn end_current(
    transaction: &mut sqlx::AnyConnection,
    name: &str,
    outcome: ShadowOutcome,
    actor: &str,
    at: UnixMillis,
) -> Result<Option<String>> {
    let Some((version,)): Option<(String,)> =
        sqlx::query_as("SELECT version FROM shadows WHERE plugin_name = $1 AND ended_at IS NULL")
            .bind(name)
            .fetch_optional(&mut *transaction)
            .await?
    else {
        return Ok(None);
    };
    // Conditional on the version read: a node that decided in between ended it first.
    let ended = sqlx::query(
        "UPDATE shadows SET ended_at = $1, outcome = $2, ended_by = $3 \
         WHERE plugin_name = $4 AND version = $5 AND ended_at IS NULL",
    )
    .bind(at)
    .bind(outcome.as_str())
    .bind(actor)
    .bind(name)
    .bind(version.as_str())
    .execute(&mut *transaction)
    .await?;
    Ok((ended.rows_affected() == 1).then_some(version))
}

/// Inside an activation that makes `version` the active version of `name` in place of
/// another: the shadow ends, promoted by whoever activated it if it is that version, else
/// stopped (it was compared with the version that was active).
pub(super) async fn end_on_activation(
    transaction: &mut sqlx::AnyConnection,
    name: &str,
    version: &PluginVersion,
    audit: &AuditEntry,
) -> Result<()> {
    sqlx::query(
        "UPDATE shadows SET ended_at = $1, ended_by = $2, \
         outcome = CASE WHEN version = $3 THEN 'promoted' ELSE 'stopped' END \
         WHERE plugin_name = $4 AND ended_at IS NULL",
    )
    .bind(audit.at)
    .bind(&audit.actor)
    .bind(version.as_str())
    .bind(name)
    .execute(&mut *transaction)
    .await?;
    Ok(())
}

/// `query` with the parameters of [`SHADOW_RUNS`] bound for `shadow`.
fn its_runs<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    shadow: &'q ShadowRecord,
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    query
        .bind(shadow.plugin_name.as_str())
        .bind(shadow.version.as_str())
        .bind(shadow.started_at)
        .bind(shadow.ended_at.unwrap_or(i64::MAX))
}

fn status(text: &str) -> Result<RunStatus> {
    RunStatus::parse(text).ok_or_else(|| corrupt("run status", text))
}

#[derive(FromRow)]
struct ShadowRow {
    id: String,
    plugin_name: String,
    version: String,
    started_at: i64,
    started_by: String,
    ended_at: Option<i64>,
    outcome: Option<String>,
    ended_by: Option<String>,
    figures: Option<String>,
}

#[derive(FromRow)]
struct ShadowGrantRow {
    #[sqlx(flatten)]
    shadow: ShadowRow,
    grant_toml: String,
}

impl ShadowRow {
    fn into_record(self) -> Result<ShadowRecord> {
        Ok(ShadowRecord {
            id: self.id,
            plugin_name: self.plugin_name,
            version: PluginVersion::parse(&self.version).map_err(Error::Corrupt)?,
            started_at: self.started_at,
            started_by: self.started_by,
            ended_at: self.ended_at,
            outcome: self
                .outcome
                .map(|text| ShadowOutcome::parse(&text).ok_or_else(|| corrupt("outcome", &text)))
                .transpose()?,
            ended_by: self.ended_by,
            figures: self.figures,
        })
    }
}
