//! Ids, enums and plain records shared by every layer. No I/O, no serde, no sqlx: the wire
//! formats belong to `api` (JSON), `storage` (SQL) and `bindings` (WIT).

use std::fmt;
use std::time::Duration;

/// A plugin name: `[a-z0-9][a-z0-9-]{0,62}` (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginName(String);

impl PluginName {
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "plugin name {name:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PluginName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plugin version: the lowercase hex sha256 of the component bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginVersion(String);

impl PluginVersion {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self(hex::encode(sha2::Sha256::digest(bytes)))
    }

    /// A version named by a user: 64 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "version {text:?} must be a sha256 in lowercase hex (64 digits)"
            ))
        }
    }

    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PluginVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run id: a UUIDv7, so ids sort by creation time and double as the list cursor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunId(String);

impl RunId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn parse(text: &str) -> Option<Self> {
        uuid::Uuid::parse_str(text)
            .ok()
            .map(|id| Self(id.hyphenated().to_string()))
    }

    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// A run's status (SPEC §2).
    RunStatus {
        Queued => "queued",
        Running => "running",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

text_enum!(
    /// A step's status within one run (SPEC §2).
    StepStatus {
        Waiting => "waiting",
        Pending => "pending",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Skipped => "skipped",
    }
);

impl StepStatus {
    /// A result was recorded: the step ran to a verdict (not `skipped`, which it never did).
    pub fn is_decided(self) -> bool {
        matches!(
            self,
            StepStatus::Passed | StepStatus::Failed | StepStatus::Errored | StepStatus::TimedOut
        )
    }
}

text_enum!(
    /// What one call of `run-step` came to. `Errored` is a plugin fault (trap, limit, bad
    /// output); the other three are the check's own answer.
    AttemptOutcome {
        Passed => "passed",
        Pending => "pending",
        Failed => "failed",
        Errored => "errored",
    }
);

text_enum!(
    LogLevel {
        Trace => "trace",
        Debug => "debug",
        Info => "info",
        Warn => "warn",
        Error => "error",
    }
);

/// One log line a plugin wrote (or the host wrote on its behalf, such as a denied request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// What `describe` told us about a plugin version.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub steps: Vec<StepInfo>,
    pub params_schema: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub name: String,
    pub description: String,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

/// One entry of a grant's `allowed_hosts`: `host:port`, or `scheme://host[:port]` to allow
/// only that scheme. Host names compare case-insensitively; IPv6 literals go in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// `http` or `https`; `None` allows both.
    pub scheme: Option<String>,
    /// Lowercase, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl AllowedHost {
    pub fn parse(entry: &str) -> Result<AllowedHost, String> {
        let invalid = || {
            format!(
                "allowed_hosts entry {entry:?} must be host:port or scheme://host[:port] (scheme http or https)"
            )
        };
        let (scheme, rest) = match entry.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
            None => (None, entry),
        };
        let default_port = match scheme.as_deref() {
            None => None,
            Some("http") => Some(80),
            Some("https") => Some(443),
            Some(_) => return Err(invalid()),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(invalid)?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some(port) => port.parse::<u16>().map_err(|_| invalid())?,
            None => default_port.ok_or_else(invalid)?,
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(invalid());
        }
        Ok(AllowedHost {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request with this scheme, host (lowercase, no brackets) and port may go out.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme
            .as_deref()
            .is_none_or(|allowed| allowed == scheme)
            && self.host == host
            && self.port == port
    }
}

/// Sandbox limits of SPEC §7; the config sets defaults and a grant may override each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall clock of one `run-step` or `describe` call.
    pub call_timeout: Duration,
    pub memory_bytes: u64,
    /// Size of a step's output or message.
    pub output_bytes: usize,
    pub http_response_bytes: usize,
    pub http_timeout: Duration,
    pub sql_rows: usize,
    pub sql_timeout: Duration,
    /// Errored attempts after which the run is `errored`.
    pub max_errors: u32,
    /// Elements of all tables of one instance.
    pub table_elements: usize,
    /// Component and core instances one call may create.
    pub instances: usize,
    /// Outbound HTTP requests over the whole run, every attempt together.
    pub http_requests_per_run: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            memory_bytes: 64 << 20,
            output_bytes: 64 << 10,
            http_response_bytes: 4 << 20,
            http_timeout: Duration::from_secs(10),
            sql_rows: 10_000,
            sql_timeout: Duration::from_secs(10),
            max_errors: 3,
            table_elements: 100_000,
            instances: 64,
            http_requests_per_run: 10_000,
        }
    }
}

/// What the operator allows one plugin (SPEC §2). The default grants nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grant {
    /// `host:port` pairs the plugin may call over HTTP.
    pub allowed_hosts: Vec<String>,
    /// Names of `[sources.*]` in the host config.
    pub sql_sources: Vec<String>,
    pub poll_interval: Option<Duration>,
    pub limits: LimitOverrides,
}

/// Per-plugin overrides of the configured [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitOverrides {
    pub call_timeout: Option<Duration>,
    pub memory_bytes: Option<u64>,
    pub output_bytes: Option<usize>,
    pub http_response_bytes: Option<usize>,
    pub http_timeout: Option<Duration>,
    pub sql_rows: Option<usize>,
    pub sql_timeout: Option<Duration>,
    pub max_errors: Option<u32>,
    pub table_elements: Option<usize>,
    pub instances: Option<usize>,
    pub http_requests_per_run: Option<u32>,
}

impl Limits {
    pub fn with_overrides(self, overrides: &LimitOverrides) -> Limits {
        Limits {
            call_timeout: overrides.call_timeout.unwrap_or(self.call_timeout),
            memory_bytes: overrides.memory_bytes.unwrap_or(self.memory_bytes),
            output_bytes: overrides.output_bytes.unwrap_or(self.output_bytes),
            http_response_bytes: overrides
                .http_response_bytes
                .unwrap_or(self.http_response_bytes),
            http_timeout: overrides.http_timeout.unwrap_or(self.http_timeout),
            sql_rows: overrides.sql_rows.unwrap_or(self.sql_rows),
            sql_timeout: overrides.sql_timeout.unwrap_or(self.sql_timeout),
            max_errors: overrides.max_errors.unwrap_or(self.max_errors),
            table_elements: overrides.table_elements.unwrap_or(self.table_elements),
            instances: overrides.instances.unwrap_or(self.instances),
            http_requests_per_run: overrides
                .http_requests_per_run
                .unwrap_or(self.http_requests_per_run),
        }
    }
}

/// When a schedule fires (SPEC §2): a cron expression in a time zone, a fixed interval, or
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerSpec {
    Cron {
        expr: String,
        timezone: String,
    },
    Interval {
        interval_ms: i64,
        /// Each fire is delayed by a random 0..=jitter_ms.
        jitter_ms: i64,
        start_at: Option<UnixMillis>,
        end_at: Option<UnixMillis>,
    },
    At {
        at: UnixMillis,
    },
}

/// What became of one scheduled fire time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireOutcome {
    /// A run was started.
    Fired,
    /// Too late (beyond `misfire_grace_ms`), or folded into a later fire by `coalesce`.
    Missed,
    /// On time, but not started (`max_concurrent_runs` reached, params no longer valid).
    Skipped,
}

impl FireOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FireOutcome::Fired => "fired",
            FireOutcome::Missed => "missed",
            FireOutcome::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<FireOutcome> {
        match text {
            "fired" => Some(FireOutcome::Fired),
            "missed" => Some(FireOutcome::Missed),
            "skipped" => Some(FireOutcome::Skipped),
            _ => None,
        }
    }
}

/// Milliseconds since the Unix epoch: the one time representation stored and compared.
pub type UnixMillis = i64;

pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_parse_with_and_without_scheme() {
        let entry = AllowedHost::parse("Collector.Example.com:8443").expect("valid");
        assert!(entry.allows("https", "collector.example.com", 8443));
        assert!(entry.allows("http", "collector.example.com", 8443));
        let https = AllowedHost::parse("https://api.example.com").expect("valid");
        assert_eq!(https.port, 443);
        assert!(!https.allows("http", "api.example.com", 443));
        let v6 = AllowedHost::parse("[::1]:9000").expect("valid");
        assert!(v6.allows("http", "::1", 9000));
        for invalid in [
            "example.com",
            "ftp://example.com",
            ":80",
            "a@b:80",
            "host:99999",
        ] {
            assert!(AllowedHost::parse(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn plugin_names_follow_the_spec() {
        assert!(PluginName::parse("event-pipeline").is_ok());
        assert!(PluginName::parse("a").is_ok());
        assert!(PluginName::parse("-a").is_err());
        assert!(PluginName::parse("Upper").is_err());
        assert!(PluginName::parse("").is_err());
        assert!(PluginName::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn status_text_round_trips() {
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(*status));
        }
        for status in StepStatus::ALL {
            assert_eq!(StepStatus::parse(status.as_str()), Some(*status));
        }
        assert!(!RunStatus::Running.is_terminal());
        assert!(RunStatus::TimedOut.is_terminal());
    }

    #[test]
    fn grant_overrides_only_what_it_names() {
        let overrides = LimitOverrides {
            memory_bytes: Some(1 << 20),
            ..LimitOverrides::default()
        };
        let limits = Limits::default().with_overrides(&overrides);
        assert_eq!(limits.memory_bytes, 1 << 20);
        assert_eq!(limits.call_timeout, Limits::default().call_timeout);
    }
}
