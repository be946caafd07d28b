//! Who may call the API and what for: roles, the actors the audit log names, and the plugin
//! patterns a token may be confined to.

use std::fmt;

/// What a caller of the API may do (README, "Running it for a team"). Each role includes the ones before it, so the
/// derived order is the order of power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Every `GET`.
    Viewer,
    /// Also triggers and cancels runs and manages schedules.
    Runner,
    /// Also uploads plugin bytes and activates versions.
    Publisher,
    /// Also sets grants, manages tokens and reads the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Runner, Role::Publisher, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Runner => "runner",
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| format!("role {text:?} must be one of viewer, runner, publisher, admin"))
    }

    /// Whether a caller with this role may do what `needed` allows.
    pub fn includes(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The audit log's actor for changes made without a token: by `stepwise` commands on the
/// database, by the watched plugins directory, and by callers when `--auth none`.
pub const CLI_ACTOR: &str = "cli";
pub const DIRECTORY_ACTOR: &str = "plugins-dir";
pub const ANONYMOUS_ACTOR: &str = "anonymous";

/// Who asks for a change to plugins: the name the audit log records, and whether they may let
/// new code run under a plugin's grant (an admin, or the operator through the plugins
/// directory).
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub name: &'a str,
    pub reviews: bool,
}

/// The plugins a token may act on: `None` is every plugin; otherwise the names that match one
/// of its patterns, where `*` stands for any run of characters (`team-a-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginScope(Vec<String>);

impl PluginScope {
    /// At most this many patterns, so a scope stays readable in listings and the audit log.
    pub const MAX_PATTERNS: usize = 32;

    /// Patterns are plugin names that may hold `*`: `[a-z0-9*-]{1,63}`.
    pub fn parse<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<PluginScope, String> {
        let mut parsed = Vec::new();
        for pattern in patterns {
            let pattern = pattern.trim();
            let valid = !pattern.is_empty()
                && pattern.len() <= 63
                && pattern
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '*');
            if !valid {
                return Err(format!(
                    "plugin pattern {pattern:?} must be a plugin name in which * stands for any \
                     characters, such as team-a-*"
                ));
            }
            if !parsed.iter().any(|known| known == pattern) {
                parsed.push(pattern.to_owned());
            }
        }
        if parsed.is_empty() {
            return Err("give at least one plugin pattern, such as team-a-*".to_owned());
        }
        if parsed.len() > Self::MAX_PATTERNS {
            return Err(format!(
                "at most {} plugin patterns per token",
                Self::MAX_PATTERNS
            ));
        }
        Ok(PluginScope(parsed))
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Whether `name` matches one of the patterns.
    pub fn allows(&self, name: &str) -> bool {
        self.0.iter().any(|pattern| glob_matches(pattern, name))
    }
}

impl fmt::Display for PluginScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// `*` matches any run of characters (none included); everything else matches itself. Greedy
/// with one backtrack point, so linear in practice and never exponential.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// An API token's name: `[a-z0-9][a-z0-9._-]{0,62}`, so that it is safe in logs, the audit log
/// and the idempotency scope.
pub fn parse_token_name(name: &str) -> Result<String, String> {
    if [CLI_ACTOR, DIRECTORY_ACTOR, ANONYMOUS_ACTOR].contains(&name) {
        return Err(format!(
            "token name {name:?} is reserved: the audit log names changes made without a token so"
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "token name {name:?} must match [a-z0-9][a-z0-9._-]{{0,62}}"
        ))
    }
}
