//! API tokens (README, "Running it for a team"): how a secret is made, shown once, and checked against the salted hash
//! that is all the database keeps. Shared by the API (`/v1/tokens`, and checking every request)
//! and `stepwise token`; the API decides what each role may do, `storage` keeps the records.

use sha2::{Digest, Sha256};

use crate::model::{PluginScope, Role, now_millis, parse_token_name};
use crate::storage::{self, AuditEntry, StoredToken};

/// Every token starts with this, so that secret scanners and people recognise one.
const PREFIX: &str = "swt_";

/// A token as it is created: the secret to show once, and what to store.
pub struct NewToken {
    /// `swt_<key id>_<secret>`: the bearer token, never stored.
    pub secret: String,
    pub stored: StoredToken,
}

/// A token presented by a caller, split into its parts.
pub struct PresentedToken<'a> {
    pub key_id: &'a str,
    secret: &'a str,
}

/// Makes a new token with 256 random bits of secret.
pub fn generate(
    name: String,
    role: Role,
    created_by: String,
    now: i64,
    terms: TokenTerms,
) -> anyhow::Result<NewToken> {
    let key_id = random_hex(8)?;
    let secret = random_hex(32)?;
    let salt = random_hex(16)?;
    let hash = hash(&salt, &secret);
    Ok(NewToken {
        secret: format!("{PREFIX}{key_id}_{secret}"),
        stored: StoredToken {
            name,
            role,
            key_id,
            salt,
            hash,
            created_at: now,
            created_by,
            revoked_at: None,
            expires_at: terms.lifetime.map(|lifetime| {
                now.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX))
            }),
            plugins: terms.plugins,
        },
    })
}

/// A random name for a token created without one.
pub fn generated_name(role: Role) -> anyhow::Result<String> {
    Ok(format!("{role}-{}", random_hex(4)?))
}

impl<'a> PresentedToken<'a> {
    /// Splits `swt_<key id>_<secret>`; `None` for anything else.
    pub fn parse(token: &'a str) -> Option<PresentedToken<'a>> {
        let (key_id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
        let hex = |text: &str, len: usize| {
            text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
        };
        (hex(key_id, 16) && hex(secret, 64)).then_some(PresentedToken { key_id, secret })
    }

    /// Whether this is the secret whose hash `stored` keeps.
    pub fn matches(&self, stored: &StoredToken) -> bool {
        let presented = hash(&stored.salt, self.secret);
        // The hashes are compared in constant time, so timing says nothing about how many
        // leading characters were right.
        presented.len() == stored.hash.len()
            && presented
                .bytes()
                .zip(stored.hash.bytes())
                .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                == 0
    }
}

fn hash(salt: &str, secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update(secret.as_bytes());
    hex::encode(hasher.finalize())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer)
        .map_err(|error| anyhow::anyhow!("reading random bytes: {error}"))?;
    Ok(hex::encode(buffer))
}

/// What limits a new token beyond its role.
#[derive(Debug, Clone, Default)]
pub struct TokenTerms {
    /// How long it works; `None` is until revoked.
    pub lifetime: Option<std::time::Duration>,
    /// The plugins it may act on; `None` is every plugin.
    pub plugins: Option<PluginScope>,
}

/// Why a token could not be created.
pub enum CreateError {
    InvalidName(String),
    /// Plugin patterns on a role they cannot confine.
    InvalidScope(String),
    Taken(String),
    Other(anyhow::Error),
}

/// Creates a token (named after its role and a random suffix when `name` is `None`), records
/// it in the audit log as made by `actor`, and returns it with its secret. Shared by the API
/// and `stepwise token create`.
pub async fn create_token(
    store: &storage::Store,
    name: Option<String>,
    role: Role,
    actor: &str,
    terms: TokenTerms,
) -> Result<NewToken, CreateError> {
    if terms.plugins.is_some() && !matches!(role, Role::Runner | Role::Publisher) {
        return Err(CreateError::InvalidScope(format!(
            "plugin patterns confine runner and publisher tokens; a {role} token {}",
            if role == Role::Admin {
                "manages tokens and grants, which no pattern can confine"
            } else {
                "changes nothing"
            }
        )));
    }
    let name = match name {
        Some(name) => parse_token_name(&name).map_err(CreateError::InvalidName)?,
        None => generated_name(role).map_err(CreateError::Other)?,
    };
    let now = now_millis();
    let lifetime = terms.lifetime;
    let plugins = terms.plugins.as_ref().map(ToString::to_string);
    let token =
        generate(name.clone(), role, actor.to_owned(), now, terms).map_err(CreateError::Other)?;
    let mut audit = AuditEntry::new(actor, "token.create", &name, now).with("role", role.as_str());
    if let Some(plugins) = plugins {
        audit = audit.with("plugins", plugins);
    }
    if let Some(lifetime) = lifetime {
        audit = audit.with(
            "expires_in",
            humantime::format_duration(lifetime).to_string(),
        );
    }
    match store.create_token(&token.stored, &audit).await {
        Ok(()) => {
            tracing::info!(token = %name, %role, actor, "token created");
            Ok(token)
        }
        Err(storage::Error::Conflict { .. }) => Err(CreateError::Taken(name)),
        Err(error) => Err(CreateError::Other(error.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_own_secret() {
        let token = generate(
            "ci".into(),
            Role::Runner,
            "cli".into(),
            0,
            TokenTerms::default(),
        )
        .expect("random");
        assert!(!token.stored.hash.contains(&token.secret));
        let presented = PresentedToken::parse(&token.secret).expect("well formed");
        assert_eq!(presented.key_id, token.stored.key_id);
        assert!(presented.matches(&token.stored));

        let other = generate(
            "ci".into(),
            Role::Runner,
            "cli".into(),
            0,
            TokenTerms::default(),
        )
        .expect("random");
        let forged = format!(
            "{PREFIX}{}_{}",
            token.stored.key_id,
            &other.secret[4 + 17..]
        );
        assert!(
            !PresentedToken::parse(&forged)
                .expect("well formed")
                .matches(&token.stored)
        );
        for malformed in ["", "swt_", "Bearer x", "swt_zz_zz", &token.secret[1..]] {
            assert!(PresentedToken::parse(malformed).is_none(), "{malformed}");
        }
    }

    #[test]
    fn roles_include_the_ones_before_them() {
        assert!(Role::Admin.includes(Role::Viewer));
        assert!(Role::Publisher.includes(Role::Runner));
        assert!(!Role::Runner.includes(Role::Publisher));
        assert!(!Role::Viewer.includes(Role::Runner));
        assert_eq!(Role::parse("publisher"), Ok(Role::Publisher));
        assert!(Role::parse("root").is_err());
    }
}
