//! Plugins and their versions: components stored once by content hash, the active version
//! and grant of each name.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value as Json, json};
use sqlx::FromRow;

use super::access::{AuditEntry, insert_audit};
use super::store::corrupt;
use super::{
    Change, Error, PluginRecord, PluginVersionRecord, Result, Review, ShadowVersion, Store,
};
use crate::model::{Actor, CheckInfo, PluginName, PluginVersion, StepInfo, UnixMillis};

/// Plugins with their active version and their shadow, if any.
macro_rules! select_plugins {
    () => {
        "SELECT p.name, p.active_version, p.grant_toml, p.updated_at, v.check_info, \
         s.version AS shadow_version, s.started_at AS shadow_since, sv.check_info AS shadow_check_info \
         FROM plugins p JOIN plugin_versions v ON v.plugin_name = p.name AND v.version = p.active_version \
         LEFT JOIN shadows s ON s.plugin_name = p.name AND s.ended_at IS NULL \
         LEFT JOIN plugin_versions sv ON sv.plugin_name = p.name AND sv.version = s.version"
    };
}

/// The columns of a plugin version, for every read of one.
macro_rules! select_versions {
    () => {
        "SELECT version, check_info, created_at, uploaded_by, reviewed_by FROM plugin_versions"
    };
}

impl Store {
    /// Stores a plugin version (bytes once per content hash) as stored by `uploader`, and
    /// reviewed by them if they review. Saving the same version again changes nothing but a
    /// missing review; returns whether the version was new for this plugin name.
    pub async fn save_plugin_version(
        &self,
        name: &PluginName,
        version: &PluginVersion,
        bytes: &[u8],
        check_info: &CheckInfo,
        now: UnixMillis,
        uploader: Actor<'_>,
    ) -> Result<bool> {
        let reviewed_by = uploader.reviews.then_some(uploader.name);
        let mut transaction = self.writes.begin().await?;
        sqlx::query("INSERT INTO components (version, bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(version.as_str())
            .bind(bytes)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO plugin_versions (plugin_name, version, check_info, created_at, uploaded_by, reviewed_by) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(name.as_str())
        .bind(version.as_str())
        .bind(check_info_to_json(check_info).to_string())
        .bind(now)
        .bind(uploader.name)
        .bind(reviewed_by)
        .execute(&mut *transaction)
        .await?;
        if inserted.rows_affected() == 0
            && let Some(reviewer) = reviewed_by
        {
            mark_reviewed(&mut transaction, name.as_str(), version, reviewer).await?;
        }
        transaction.commit().await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Whether `version` was ever stored, under any plugin name.
    pub async fn component_exists(&self, version: &PluginVersion) -> Result<bool> {
        let found: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM components WHERE version = $1")
            .bind(version.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// One stored version of `name`, if the plugin ever had it.
    pub async fn find_plugin_version(
        &self,
        name: &str,
        version: &PluginVersion,
    ) -> Result<Option<PluginVersionRecord>> {
        let row: Option<VersionRow> = sqlx::query_as(concat!(
            select_versions!(),
            " WHERE plugin_name = $1 AND version = $2"
        ))
        .bind(name)
        .bind(version.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(version_record).transpose()
    }

    /// Replaces the grant of a plugin without touching its versions, and records the change
    /// (with the grant it replaced) in the audit log.
    pub async fn update_grant(
        &self,
        name: &str,
        grant_toml: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (mut transaction, plugin) = self.lock_plugin(name).await?;
        let Some((_, previous)) = plugin else {
            return Err(Error::NotFound);
        };
        sqlx::query("UPDATE plugins SET grant_toml = $1, updated_at = $2 WHERE name = $3")
            .bind(grant_toml)
            .bind(audit.at)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        // Whoever may set a grant may review code, and grants it to the code that runs now:
        // the active version and the shadow beside it.
        sqlx::query(
            "UPDATE plugin_versions SET reviewed_by = $1 WHERE plugin_name = $2 AND reviewed_by IS NULL \
             AND (version = (SELECT active_version FROM plugins WHERE name = $2) \
             OR version IN (SELECT version FROM shadows WHERE plugin_name = $2 AND ended_at IS NULL))",
        )
        .bind(&audit.actor)
        .bind(name)
        .execute(&mut *transaction)
        .await?;
        let audit = audit
            .with("grant", grant_toml)
            .with("previous_grant", previous);
        insert_audit(&mut transaction, &audit).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The versions something still needs compiled: every active version and the version of
    /// every unfinished run.
    pub async fn versions_in_use(&self) -> Result<HashSet<PluginVersion>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT active_version FROM plugins UNION \
             SELECT version FROM shadows WHERE ended_at IS NULL UNION \
             SELECT DISTINCT plugin_version FROM runs WHERE status IN ('queued', 'running')",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(version,)| PluginVersion::parse(&version).map_err(Error::Corrupt))
            .collect()
    }

    /// Makes `version` the one new runs of `name` use, and records it in the audit log with
    /// the version it replaced. `grant_toml` replaces the grant; `None` keeps the grant as it
    /// is *now* (none for a new plugin), so a grant changed while this version was being
    /// compiled is never overwritten by an older read. `review` says who may: the grant it is
    /// judged against is the one read here, under the same lock as the write.
    pub async fn activate_plugin(
        &self,
        name: &PluginName,
        version: &PluginVersion,
        grant_toml: Option<&str>,
        audit: AuditEntry,
        review: Review<'_>,
    ) -> Result<()> {
        let (mut transaction, previous) = self.lock_plugin(name.as_str()).await?;
        let grant_in_force = grant_toml
            .or(previous.as_ref().map(|(_, grant)| grant.as_str()))
            .unwrap_or_default();
        check_review(
            &mut transaction,
            name.as_str(),
            version,
            grant_in_force,
            review,
        )
        .await?;
        // The grant update is conditional in SQL, not decided from `previous`: on SQLite
        // nothing locks the row between the read and the write.
        sqlx::query(
            "INSERT INTO plugins (name, active_version, grant_toml, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version, \
             grant_toml = CASE WHEN $5 = 1 THEN excluded.grant_toml ELSE plugins.grant_toml END, \
             updated_at = excluded.updated_at",
        )
        .bind(name.as_str())
        .bind(version.as_str())
        .bind(grant_toml.unwrap_or_default())
        .bind(audit.at)
        .bind(i64::from(grant_toml.is_some()))
        .execute(&mut *transaction)
        .await?;
        if previous
            .as_ref()
            .is_some_and(|(active, _)| active != version.as_str())
        {
            super::shadows::end_on_activation(&mut transaction, name.as_str(), version, &audit)
                .await?;
        }
        let mut audit = audit.with("version", version.as_str());
        if let Some((previous_version, _)) = &previous {
            audit = audit.with("previous_version", previous_version.as_str());
        }
        if let Some(grant_toml) = grant_toml {
            audit = audit.with("grant", grant_toml);
            if let Some((_, previous_grant)) = &previous {
                audit = audit.with("previous_grant", previous_grant.as_str());
            }
        }
        insert_audit(&mut transaction, &audit).await?;
        self.backend
            .notify(&mut *transaction, &Change::PluginActivated(version.clone()))
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// A transaction that changes plugin `name`, with its active version and grant as it
    /// holds them (`None` for a name not known yet): nothing else changes them until it ends.
    pub(super) async fn lock_plugin(
        &self,
        name: &str,
    ) -> Result<(
        sqlx::Transaction<'static, sqlx::Any>,
        Option<(String, String)>,
    )> {
        let mut transaction = self
            .pool
            .begin_with(self.backend.begin_read_write())
            .await?;
        let plugin: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT active_version, grant_toml FROM plugins WHERE name = $1{}",
            self.backend.for_update()
        ))
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        Ok((transaction, plugin))
    }

    /// The plugin with its active version, if the name is known.
    pub async fn find_plugin(&self, name: &str) -> Result<Option<PluginRecord>> {
        let row = match self.sqlite_readers() {
            Some(readers) => readers.find(FIND_PLUGIN, name, PluginRow::from_sqlite)?,
            None => {
                sqlx::query_as(FIND_PLUGIN)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.map(PluginRow::into_record).transpose()
    }

    /// Every plugin with its active version, by name.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRecord>> {
        let rows: Vec<PluginRow> = sqlx::query_as(concat!(select_plugins!(), " ORDER BY p.name"))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(PluginRow::into_record).collect()
    }

    /// All versions stored for `name`, newest first.
    pub async fn list_plugin_versions(&self, name: &str) -> Result<Vec<PluginVersionRecord>> {
        let rows: Vec<VersionRow> = sqlx::query_as(concat!(
            select_versions!(),
            " WHERE plugin_name = $1 ORDER BY created_at DESC, version"
        ))
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(version_record).collect()
    }

    /// The component bytes of a version.
    pub async fn load_component(&self, version: &PluginVersion) -> Result<Vec<u8>> {
        let bytes: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT bytes FROM components WHERE version = $1")
                .bind(version.as_str())
                .fetch_optional(&self.pool)
                .await?;
        bytes.map(|(bytes,)| bytes).ok_or(Error::NotFound)
    }
}

#[derive(FromRow)]
struct PluginRow {
    name: String,
    active_version: String,
    grant_toml: String,
    updated_at: i64,
    check_info: String,
    shadow_version: Option<String>,
    shadow_since: Option<i64>,
    shadow_check_info: Option<String>,
}

const FIND_PLUGIN: &str = concat!(select_plugins!(), " WHERE p.name = $1");

impl PluginRow {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<PluginRow> {
        Ok(PluginRow {
            name: row.get("name")?,
            active_version: row.get("active_version")?,
            grant_toml: row.get("grant_toml")?,
            updated_at: row.get("updated_at")?,
            check_info: row.get("check_info")?,
            shadow_version: row.get("shadow_version")?,
            shadow_since: row.get("shadow_since")?,
            shadow_check_info: row.get("shadow_check_info")?,
        })
    }

    fn into_record(self) -> Result<PluginRecord> {
        Ok(PluginRecord {
            name: PluginName::parse(&self.name).map_err(Error::Corrupt)?,
            active_version: PluginVersion::parse(&self.active_version).map_err(Error::Corrupt)?,
            grant_toml: self.grant_toml,
            check_info: check_info_from_json(&self.check_info)?,
            updated_at: self.updated_at,
            shadow: match (
                self.shadow_version,
                self.shadow_since,
                self.shadow_check_info,
            ) {
                (Some(version), Some(since), Some(check_info)) => Some(ShadowVersion {
                    version: PluginVersion::parse(&version).map_err(Error::Corrupt)?,
                    check_info: check_info_from_json(&check_info)?,
                    since,
                }),
                _ => None,
            },
        })
    }
}

fn check_info_to_json(info: &CheckInfo) -> Json {
    let steps: Vec<Json> = info
        .steps
        .iter()
        .map(|step| {
            json!({
                "name": step.name,
                "description": step.description,
                "timeout_ms": step.timeout.map(|timeout| timeout.as_millis() as u64),
                "max_attempts": step.max_attempts,
            })
        })
        .collect();
    json!({
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "steps": steps,
        "params_schema": info.params_schema,
    })
}

fn check_info_from_json(text: &str) -> Result<CheckInfo> {
    let bad = || corrupt("check info", text);
    let value: Json = serde_json::from_str(text).map_err(|_| bad())?;
    let string = |value: &Json, key: &str| value[key].as_str().map(str::to_owned);
    let steps = value["steps"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|step| {
            Ok(StepInfo {
                name: string(step, "name").ok_or_else(bad)?,
                description: string(step, "description").unwrap_or_default(),
                timeout: step["timeout_ms"].as_u64().map(Duration::from_millis),
                max_attempts: step["max_attempts"].as_u64().map(|max| max as u32),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CheckInfo {
        name: string(&value, "name").unwrap_or_default(),
        version: string(&value, "version").unwrap_or_default(),
        description: string(&value, "description").unwrap_or_default(),
        steps,
        params_schema: string(&value, "params_schema"),
    })
}

/// Whether `review` lets `version` of `name` run under `grant_in_force` (read in the caller's
/// transaction), marking it reviewed when the reviewer may; [`Error::Unreviewed`] if not.
pub(super) async fn check_review(
    transaction: &mut sqlx::AnyConnection,
    name: &str,
    version: &PluginVersion,
    grant_in_force: &str,
    review: Review<'_>,
) -> Result<()> {
    match review {
        Review::By(reviewer) => mark_reviewed(transaction, name, version, reviewer).await,
        Review::Required(reaches_out) if reaches_out(grant_in_force) => {
            let reviewed: Option<(Option<String>,)> = sqlx::query_as(
                "SELECT reviewed_by FROM plugin_versions WHERE plugin_name = $1 AND version = $2",
            )
            .bind(name)
            .bind(version.as_str())
            .fetch_optional(&mut *transaction)
            .await?;
            match reviewed {
                Some((Some(_),)) => Ok(()),
                _ => Err(Error::Unreviewed),
            }
        }
        Review::Required(_) | Review::NotNeeded => Ok(()),
    }
}

/// Records that `reviewer` let `version` of `name` run under the plugin's grant (a first
/// review stays the one recorded).
async fn mark_reviewed(
    transaction: &mut sqlx::AnyConnection,
    name: &str,
    version: &PluginVersion,
    reviewer: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE plugin_versions SET reviewed_by = $1 \
         WHERE plugin_name = $2 AND version = $3 AND reviewed_by IS NULL",
    )
    .bind(reviewer)
    .bind(name)
    .bind(version.as_str())
    .execute(&mut *transaction)
    .await?;
    Ok(())
}

#[derive(FromRow)]
struct VersionRow {
    version: String,
    check_info: String,
    created_at: i64,
    uploaded_by: Option<String>,
    reviewed_by: Option<String>,
}

fn version_record(row: VersionRow) -> Result<PluginVersionRecord> {
    Ok(PluginVersionRecord {
        version: PluginVersion::parse(&row.version).map_err(Error::Corrupt)?,
        check_info: check_info_from_json(&row.check_info)?,
        created_at: row.created_at,
        uploaded_by: row.uploaded_by,
        reviewed_by: row.reviewed_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StepInfo;

    #[test]
    fn check_info_round_trips_through_json() {
        let info = CheckInfo {
            name: "demo".into(),
            version: "1".into(),
            description: "d".into(),
            steps: vec![StepInfo {
                name: "a".into(),
                description: String::new(),
                timeout: Some(Duration::from_millis(1500)),
                max_attempts: Some(3),
            }],
            params_schema: Some("{}".into()),
        };
        let text = check_info_to_json(&info).to_string();
        assert_eq!(check_info_from_json(&text).expect("valid"), info);
    }
}
