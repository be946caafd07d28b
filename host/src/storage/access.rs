//! Who may call the API and what they changed: API tokens (only their salted hashes) and the
//! audit log. Audit entries of plugin changes are written by the methods that make the change,
//! in the same transaction (`store.rs`); token changes are written here.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::{Error, Result, Store};
use crate::model::{PluginScope, Role, UnixMillis};

/// One change to record in the audit log.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// The token name, `anonymous` without authentication, `cli` or `plugins-dir`.
    pub actor: String,
    /// One of [`AUDIT_ACTIONS`].
    pub action: &'static str,
    /// What was changed: a plugin or token name.
    pub target: String,
    /// What changed, as text values; the method that writes the entry may add to it.
    pub detail: BTreeMap<String, String>,
    pub at: UnixMillis,
}

impl AuditEntry {
    pub fn new(actor: &str, action: &'static str, target: &str, at: UnixMillis) -> AuditEntry {
        AuditEntry {
            actor: actor.to_owned(),
            action,
            target: target.to_owned(),
            detail: BTreeMap::new(),
            at,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> AuditEntry {
        self.detail.insert(key.to_owned(), value.into());
        self
    }
}

/// A stored audit entry.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: i64,
    pub entry: AuditEntry,
}

/// What the database keeps of a token: enough to find it and check a presented secret, not
/// enough to rebuild it.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub name: String,
    pub role: Role,
    /// Public part of the token, to find its record without scanning.
    pub key_id: String,
    pub salt: String,
    /// `sha256(salt ‖ secret)` in hex.
    pub hash: String,
    pub created_at: i64,
    /// The token name (or `cli`) that created it.
    pub created_by: String,
    /// When it was revoked: it stays, refused, so that its name is never reused.
    pub revoked_at: Option<i64>,
    /// When it stops working, if it was given a lifetime.
    pub expires_at: Option<i64>,
    /// The plugins it may act on; `None` is every plugin.
    pub plugins: Option<PluginScope>,
}

impl StoredToken {
    /// Why this token is refused at `now`, if it is.
    pub fn refusal(&self, now: i64) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("the bearer token was revoked")
        } else if self.expires_at.is_some_and(|expires_at| expires_at <= now) {
            Some("the bearer token has expired")
        } else {
            None
        }
    }
}

/// The columns of a token, for every read of one (the SQL text is written once).
macro_rules! select_tokens {
    () => {
        "SELECT name, role, key_id, salt, hash, created_at, created_by, revoked_at, expires_at, \
         plugins FROM tokens"
    };
}

impl Store {
    /// Stores a new token; `Conflict` if its name is taken, by a token in use or a revoked
    /// one (names are never reused).
    pub async fn create_token(&self, token: &StoredToken, audit: &AuditEntry) -> Result<()> {
        let mut transaction = self.writes.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO tokens (name, role, key_id, salt, hash, created_at, created_by, expires_at, plugins) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&token.name)
        .bind(token.role.as_str())
        .bind(&token.key_id)
        .bind(&token.salt)
        .bind(&token.hash)
        .bind(token.created_at)
        .bind(&token.created_by)
        .bind(token.expires_at)
        .bind(token.plugins.as_ref().map(ToString::to_string))
        .execute(&mut *transaction)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(Error::Conflict {
                constraint: "tokens.name".into(),
            });
        }
        insert_audit(&mut transaction, audit).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The token whose public key id is `key_id`. Read from the database on every request, so
    /// a revocation holds on every node at once.
    pub async fn find_token(&self, key_id: &str) -> Result<Option<StoredToken>> {
        let row = match self.sqlite_readers() {
            Some(readers) => readers.find(FIND_TOKEN, key_id, TokenRow::from_sqlite)?,
            None => {
                sqlx::query_as(FIND_TOKEN)
                    .bind(key_id)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.map(TokenRow::into_token).transpose()
    }

    /// Every token, by name.
    pub async fn list_tokens(&self) -> Result<Vec<StoredToken>> {
        let rows: Vec<TokenRow> = sqlx::query_as(concat!(select_tokens!(), " ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TokenRow::into_token).collect()
    }

    /// Marks the token `name` revoked; `NotFound` if there is none in use.
    pub async fn revoke_token(&self, name: &str, audit: &AuditEntry) -> Result<()> {
        let mut transaction = self.writes.begin().await?;
        let deleted =
            sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL")
                .bind(name)
                .bind(audit.at)
                .execute(&mut *transaction)
                .await?;
        if deleted.rows_affected() == 0 {
            return Err(Error::NotFound);
        }
        insert_audit(&mut transaction, audit).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Records a change that writes nothing else (an upload that waits for review).
    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        let mut transaction = self.writes.begin().await?;
        insert_audit(&mut transaction, entry).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Audit entries newest first, older than the entry `before` if given.
    pub async fn list_audit(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT id, at, actor, action, target, detail FROM audit \
             WHERE $1 < 0 OR id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.unwrap_or(-1))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AuditRow::into_record).collect()
    }
}

/// Records `entry` in the transaction that makes the change it describes.
pub(super) async fn insert_audit(
    transaction: &mut sqlx::AnyConnection,
    entry: &AuditEntry,
) -> Result<()> {
    let detail = Json::Object(
        entry
            .detail
            .iter()
            .map(|(key, value)| (key.clone(), Json::String(value.clone())))
            .collect(),
    );
    sqlx::query(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(entry.at)
    .bind(&entry.actor)
    .bind(entry.action)
    .bind(&entry.target)
    .bind(detail.to_string())
    .execute(&mut *transaction)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    name: String,
    role: String,
    key_id: String,
    salt: String,
    hash: String,
    created_at: i64,
    created_by: String,
    revoked_at: Option<i64>,
    expires_at: Option<i64>,
    plugins: Option<String>,
}

const FIND_TOKEN: &str = concat!(select_tokens!(), " WHERE key_id = $1");

impl TokenRow {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
        Ok(TokenRow {
            name: row.get("name")?,
            role: row.get("role")?,
            key_id: row.get("key_id")?,
            salt: row.get("salt")?,
            hash: row.get("hash")?,
            created_at: row.get("created_at")?,
            created_by: row.get("created_by")?,
            revoked_at: row.get("revoked_at")?,
            expires_at: row.get("expires_at")?,
            plugins: row.get("plugins")?,
        })
    }

    fn into_token(self) -> Result<StoredToken> {
        Ok(StoredToken {
            role: Role::parse(&self.role).map_err(Error::Corrupt)?,
            plugins: self
                .plugins
                .map(|patterns| PluginScope::parse(patterns.split(',')).map_err(Error::Corrupt))
                .transpose()?,
            name: self.name,
            key_id: self.key_id,
            salt: self.salt,
            hash: self.hash,
            created_at: self.created_at,
            created_by: self.created_by,
            revoked_at: self.revoked_at,
            expires_at: self.expires_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: i64,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

impl AuditRow {
    fn into_record(self) -> Result<AuditRecord> {
        let action = AUDIT_ACTIONS
            .iter()
            .find(|known| **known == self.action)
            .ok_or_else(|| Error::Corrupt(format!("audit action {:?}", self.action)))?;
        let detail: BTreeMap<String, String> = serde_json::from_str(&self.detail)
            .map_err(|_| Error::Corrupt(format!("audit detail {:?}", self.detail)))?;
        Ok(AuditRecord {
            id: self.id,
            entry: AuditEntry {
                actor: self.actor,
                action,
                target: self.target,
                detail,
                at: self.at,
            },
        })
    }
}

/// Every action the audit log records.
pub const AUDIT_ACTIONS: &[&str] = &[
    "plugin.upload",
    "plugin.activate",
    "plugin.grant",
    "plugin.shadow",
    "plugin.shadow_stop",
    "shadow.promoted",
    "shadow.dropped",
    "token.create",
    "token.revoke",
];
