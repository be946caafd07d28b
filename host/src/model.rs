//! Ids, enums and plain records shared by every layer. No I/O, no serde, no sqlx: the wire
//! formats belong to `api` (JSON), `storage` (SQL) and `bindings` (WIT).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A plugin name: `[a-z0-9][a-z0-9-]{0,62}`.
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

/// A plugin version: the lowercase hex sha256 of the component bytes. Made only from bytes or by
/// [`PluginVersion::parse`], so it is always 64 hex digits: safe to name a file after.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginVersion(String);

impl PluginVersion {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self(hex::encode(sha2::Sha256::digest(bytes)))
    }

    /// A version from outside this process (a user, another node, a stored row): 64
    /// lowercase hex digits.
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// A run's status.
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
    /// A step's status within one run. `cancelled`: the run was cancelled before
    /// the step finished.
    StepStatus {
        Waiting => "waiting",
        Pending => "pending",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Skipped => "skipped",
        Cancelled => "cancelled",
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

/// As an entry would be written: `scheme://host:port`, or `host:port` for either scheme.
impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match &self.scheme {
            Some(scheme) => write!(f, "{scheme}://{host}:{}", self.port),
            None => write!(f, "{host}:{}", self.port),
        }
    }
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

/// One `allowed_hosts` pattern of the operator's `[policy]`: `[scheme://]host[:port]`, where
/// the host may be `*` (any host) or `*.example.com` (any name under example.com, not
/// example.com itself), and the port may be `*`. A missing port means any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: Option<String>,
    host: HostMatch,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// Names ending in `.suffix`.
    Subdomains(String),
    Exact(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let invalid = || {
            format!(
                "policy allowed_hosts pattern {pattern:?} must be [scheme://]host[:port], where host may be * or *.domain and port may be *"
            )
        };
        let (scheme, rest) = match pattern.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = scheme.to_ascii_lowercase();
                if scheme != "http" && scheme != "https" {
                    return Err(invalid());
                }
                (Some(scheme), rest)
            }
            None => (None, pattern),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(invalid)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(invalid)?)),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            None | Some("*") => None,
            Some(port) => Some(port.parse::<u16>().map_err(|_| invalid())?),
        };
        let host = host.to_ascii_lowercase();
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(invalid());
        }
        let host = if host == "*" {
            HostMatch::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(invalid());
            }
            HostMatch::Subdomains(suffix.to_owned())
        } else if host.contains('*') {
            return Err(invalid());
        } else {
            HostMatch::Exact(host)
        };
        Ok(HostPattern { scheme, host, port })
    }

    /// Whether every request `entry` allows is one this pattern allows too.
    pub fn covers(&self, entry: &AllowedHost) -> bool {
        let scheme_ok = match (&self.scheme, &entry.scheme) {
            (None, _) => true,
            (Some(pattern), Some(entry)) => pattern == entry,
            // The entry allows both schemes; the pattern only one.
            (Some(_), None) => false,
        };
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(host) => *host == entry.host,
            HostMatch::Subdomains(suffix) => entry
                .host
                .strip_suffix(suffix.as_str())
                .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.')),
        };
        scheme_ok && host_ok && self.port.is_none_or(|port| port == entry.port)
    }
}

/// The operator's ceilings on grants (`[policy]` in `stepwise.toml`). `None` means no ceiling
/// of that kind.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub allowed_hosts: Option<Vec<HostPattern>>,
    pub sql_sources: Option<Vec<String>>,
    pub max_limits: LimitOverrides,
    /// New code of a plugin whose grant reaches outside the sandbox may become active without
    /// an admin's review (by default it waits, inactive, for one).
    pub publishers_activate_granted: bool,
}

impl Policy {
    /// The first part of `grant` beyond the ceilings, as the grant key that names it and why.
    pub fn violation(&self, grant: &Grant, host_limits: &Limits) -> Option<(String, String)> {
        if let Some(patterns) = &self.allowed_hosts {
            for entry in &grant.allowed_hosts {
                let covered = AllowedHost::parse(entry)
                    .is_ok_and(|parsed| patterns.iter().any(|pattern| pattern.covers(&parsed)));
                if !covered {
                    return Some((
                        "allowed_hosts".to_owned(),
                        format!(
                            "allowed_hosts entry {entry:?} is outside the operator's policy (policy.allowed_hosts)"
                        ),
                    ));
                }
            }
        }
        if let Some(sources) = &self.sql_sources {
            for source in &grant.sql_sources {
                if !sources.contains(source) {
                    return Some((
                        "sql_sources".to_owned(),
                        format!(
                            "sql source {source:?} is outside the operator's policy (policy.sql_sources)"
                        ),
                    ));
                }
            }
        }
        let granted = host_limits.with_overrides(&grant.limits);
        let ceiling = host_limits.with_overrides(&self.max_limits);
        granted
            .first_above(&ceiling, &self.max_limits)
            .map(|(key, granted, ceiling)| {
                (
                    format!("limits.{key}"),
                    format!("limits.{key} = {granted} is above the operator's ceiling of {ceiling} (policy.max_limits)"),
                )
            })
    }

    /// `grant` cut down to the ceilings: what a run may use even if the grant was stored
    /// before the policy was tightened.
    pub fn confine(&self, mut grant: Grant, host_limits: &Limits) -> (Grant, Limits) {
        if let Some(patterns) = &self.allowed_hosts {
            grant.allowed_hosts.retain(|entry| {
                AllowedHost::parse(entry)
                    .is_ok_and(|parsed| patterns.iter().any(|pattern| pattern.covers(&parsed)))
            });
        }
        if let Some(sources) = &self.sql_sources {
            grant.sql_sources.retain(|source| sources.contains(source));
        }
        let limits = host_limits.with_overrides(&grant.limits).capped_by(
            &host_limits.with_overrides(&self.max_limits),
            &self.max_limits,
        );
        (grant, limits)
    }
}

/// Sandbox limits (README, "What a plugin can and cannot do"); the config sets defaults and a grant may override each.
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
    /// Bytes of one query's result (every value of every row), counted while it is read, and
    /// the largest string or blob a SQLite source may build.
    pub sql_result_bytes: usize,
    /// Errored attempts after which the run is `errored`.
    pub max_errors: u32,
    /// Elements of all tables of one instance.
    pub table_elements: usize,
    /// Component and core instances one call may create.
    pub instances: usize,
    /// Outbound HTTP requests over the whole run, every attempt together.
    pub http_requests_per_run: u32,
    /// Outbound HTTP requests of one call in flight at once.
    pub http_concurrent_requests: usize,
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
            sql_result_bytes: 4 << 20,
            max_errors: 3,
            table_elements: 100_000,
            instances: 64,
            http_requests_per_run: 10_000,
            http_concurrent_requests: 8,
        }
    }
}

/// What the operator allows one plugin. The default grants nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grant {
    /// `host:port` pairs the plugin may call over HTTP.
    pub allowed_hosts: Vec<String>,
    /// Names of `[sources.*]` in the host config.
    pub sql_sources: Vec<String>,
    /// Names of `[secrets.*]` in the host config whose placeholders the plugin may send.
    pub secrets: Vec<String>,
    pub poll_interval: Option<Duration>,
    pub limits: LimitOverrides,
    /// `[steps.NAME] timeout_ms`: how long each named step may stay pending.
    pub step_timeouts: BTreeMap<String, Duration>,
    /// The backoff after an errored attempt, for runs that set none of their own.
    pub retry: Option<Retry>,
}

impl Grant {
    /// Whether it lets a plugin reach anything outside its sandbox: a host, a source or a
    /// secret. New code for such a plugin is reviewed by an admin before it runs.
    pub fn grants_capabilities(&self) -> bool {
        !self.allowed_hosts.is_empty() || !self.sql_sources.is_empty() || !self.secrets.is_empty()
    }
}

/// How long to wait before calling a step again after an `errored` attempt,
/// instead of the poll interval, which is for `pending`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Retry {
    /// The wait after the run's `errors`-th errored attempt (counting from 1):
    /// `initial × factor^(errors − 1)`, at most `max`.
    pub fn delay(&self, errors: u32) -> Duration {
        let exponent = errors.saturating_sub(1).min(1024) as i32;
        let millis = self.initial.as_millis() as f64 * self.factor.powi(exponent);
        Duration::from_millis(millis.min(self.max.as_millis() as f64) as u64)
    }
}

text_enum!(
    /// What a notifier is told about.
    NotifyEvent {
        Failed => "failed",
        TimedOut => "timed_out",
        Errored => "errored",
        Recovered => "recovered",
    }
);

text_enum!(
    /// The body a notifier posts: `json` (the run as the API shows it) or a Slack
    /// incoming-webhook message.
    NotifyFormat {
        Json => "json",
        Slack => "slack",
    }
);

text_enum!(
    /// Where one notification's delivery stands.
    DeliveryStatus {
        Pending => "pending",
        Delivered => "delivered",
        Failed => "failed",
    }
);

/// An operator's `[[notify]]`: where to post, about which runs, and when. Only the
/// operator's config creates one; no API call or plugin can name a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Notifier {
    pub name: String,
    pub url: String,
    pub format: NotifyFormat,
    pub on: Vec<NotifyEvent>,
    /// Empty: every plugin.
    pub plugins: Vec<String>,
    /// Schedule ids; empty: runs of any schedule, and runs without one.
    pub schedules: Vec<String>,
    /// Each must be among the run's labels.
    pub labels: BTreeMap<String, String>,
    /// Failing runs in a row of one series before a failure is sent.
    pub after_consecutive: u32,
    /// Gaps between delivery attempts (jittered by the deliverer).
    pub retry: Retry,
    /// One POST's wall clock.
    pub timeout: Duration,
    /// How long after the run finished a delivery is still tried; then it is `failed`.
    pub max_delivery: Duration,
    /// The `[secrets.NAME]` whose value signs each POST (`stepwise-signature`).
    pub secret: Option<String>,
}

/// A series' failing runs in a row before and after the run that just finished (a passed run
/// resets it to 0; a cancelled one leaves it alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub before: u32,
    pub now: u32,
}

impl Notifier {
    /// Whether this notifier's filters select a run of `plugin`, started by `schedule`, with
    /// `labels`.
    pub fn watches(
        &self,
        plugin: &str,
        schedule: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.plugins.is_empty() || self.plugins.iter().any(|name| name == plugin))
            && (self.schedules.is_empty()
                || schedule.is_some_and(|id| self.schedules.iter().any(|wanted| wanted == id)))
            && self
                .labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// What to tell about a run of a watched series that ended with `status`, leaving `streak`:
    /// a failure once `after_consecutive` runs in a row failed, `recovered` for the first pass
    /// after a streak that was reported.
    pub fn event(&self, status: RunStatus, streak: Streak) -> Option<NotifyEvent> {
        let event = match status {
            RunStatus::Failed => NotifyEvent::Failed,
            RunStatus::TimedOut => NotifyEvent::TimedOut,
            RunStatus::Errored => NotifyEvent::Errored,
            RunStatus::Passed if streak.before >= self.after_consecutive => NotifyEvent::Recovered,
            _ => return None,
        };
        let reported = event == NotifyEvent::Recovered || streak.now >= self.after_consecutive;
        (reported && self.on.contains(&event)).then_some(event)
    }
}

impl RunStatus {
    /// Whether a run that ended so counts against its series' streak.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            RunStatus::Failed | RunStatus::TimedOut | RunStatus::Errored
        )
    }
}

/// The series a run belongs to for `recovered` and `after_consecutive`: its schedule, or for a
/// run without one its plugin and labels.
pub fn notify_series(
    plugin: &str,
    schedule: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> String {
    match schedule {
        Some(id) => format!("schedule:{id}"),
        None => {
            let labels: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key:?}={value:?}"))
                .collect();
            format!("plugin:{plugin}:{}", labels.join(","))
        }
    }
}

/// `[retention]`: how long finished work is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// A finished run (with its steps, labels and notifications) older than this is deleted.
    pub finished_runs: Duration,
    /// A schedule keeps at most this many finished runs, even younger ones; 0: no cap.
    pub keep_last_per_schedule: u32,
    /// Attempt rows (with their logs) older than this are deleted, the run's too.
    pub attempts: Duration,
    /// A plugin version no run uses and not active is deleted once this old.
    pub plugin_versions: Duration,
    /// How often a node looks for work (one node at a time does it).
    pub interval: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        const DAY: u64 = 24 * 3600;
        RetentionPolicy {
            finished_runs: Duration::from_secs(30 * DAY),
            keep_last_per_schedule: 100,
            attempts: Duration::from_secs(7 * DAY),
            plugin_versions: Duration::from_secs(90 * DAY),
            interval: Duration::from_secs(300),
        }
    }
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
    pub sql_result_bytes: Option<usize>,
    pub max_errors: Option<u32>,
    pub table_elements: Option<usize>,
    pub instances: Option<usize>,
    pub http_requests_per_run: Option<u32>,
    pub http_concurrent_requests: Option<usize>,
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
            sql_result_bytes: overrides.sql_result_bytes.unwrap_or(self.sql_result_bytes),
            max_errors: overrides.max_errors.unwrap_or(self.max_errors),
            table_elements: overrides.table_elements.unwrap_or(self.table_elements),
            instances: overrides.instances.unwrap_or(self.instances),
            http_requests_per_run: overrides
                .http_requests_per_run
                .unwrap_or(self.http_requests_per_run),
            http_concurrent_requests: overrides
                .http_concurrent_requests
                .unwrap_or(self.http_concurrent_requests),
        }
    }
}

macro_rules! limit_comparisons {
    ($($field:ident: $key:literal => |$value:ident: $ty:ty| $shown:expr,)+) => {
        impl Limits {
            /// The first limit (as its config key, with both values as configured) that is
            /// above `ceiling`, among those `capped` names.
            pub fn first_above(
                &self,
                ceiling: &Limits,
                capped: &LimitOverrides,
            ) -> Option<(&'static str, String, String)> {
                $(
                    if capped.$field.is_some() && self.$field > ceiling.$field {
                        let shown = |$value: $ty| $shown.to_string();
                        return Some(($key, shown(self.$field), shown(ceiling.$field)));
                    }
                )+
                None
            }

            /// Every limit as its config key and its value in the key's unit.
            pub fn entries(&self) -> Vec<(&'static str, u64)> {
                vec![$(($key, {
                    let shown = |$value: $ty| $shown as u64;
                    shown(self.$field)
                })),+]
            }

            /// Each limit that `capped` names, lowered to `ceiling` where it is above it.
            pub fn capped_by(mut self, ceiling: &Limits, capped: &LimitOverrides) -> Limits {
                $(
                    if capped.$field.is_some() && self.$field > ceiling.$field {
                        self.$field = ceiling.$field;
                    }
                )+
                self
            }
        }

        impl LimitOverrides {
            /// The config keys of the limits this sets.
            pub fn keys(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(
                    if self.$field.is_some() {
                        keys.push($key);
                    }
                )+
                keys
            }
        }
    };
}

limit_comparisons! {
    call_timeout: "call_timeout_ms" => |value: Duration| value.as_millis(),
    memory_bytes: "memory_mib" => |value: u64| value >> 20,
    output_bytes: "output_bytes" => |value: usize| value,
    http_response_bytes: "http_response_bytes" => |value: usize| value,
    http_timeout: "http_timeout_ms" => |value: Duration| value.as_millis(),
    sql_rows: "sql_rows" => |value: usize| value,
    sql_timeout: "sql_timeout_ms" => |value: Duration| value.as_millis(),
    sql_result_bytes: "sql_result_bytes" => |value: usize| value,
    max_errors: "max_errors" => |value: u32| value,
    table_elements: "table_elements" => |value: usize| value,
    instances: "instances" => |value: usize| value,
    http_requests_per_run: "http_requests_per_run" => |value: u32| value,
    http_concurrent_requests: "http_concurrent_requests" => |value: usize| value,
}

/// When a schedule fires: a cron expression in a time zone, a fixed interval, or
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
    pub const ALL: [FireOutcome; 3] = [
        FireOutcome::Fired,
        FireOutcome::Missed,
        FireOutcome::Skipped,
    ];

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
    fn a_plugin_scope_allows_only_names_its_patterns_match() {
        let scope = PluginScope::parse(["team-a-*", "shared"]).expect("valid");
        for allowed in ["team-a-", "team-a-crm", "team-a-x-y", "shared"] {
            assert!(scope.allows(allowed), "{allowed}");
        }
        for refused in [
            "team-b-crm",
            "team-a",
            "shared-x",
            "xteam-a-crm",
            "crm-sync",
        ] {
            assert!(!scope.allows(refused), "{refused}");
        }
        let middle = PluginScope::parse(["a*b*c"]).expect("valid");
        assert!(middle.allows("abc") && middle.allows("a-b-b-c") && !middle.allows("a-b-c-d"));
        assert!(PluginScope::parse(["*"]).expect("valid").allows("anything"));
        for invalid in [vec![], vec![""], vec!["Team-A"], vec!["a/b"], vec!["a?"]] {
            assert!(PluginScope::parse(invalid.clone()).is_err(), "{invalid:?}");
        }
        // A long run of stars against a near miss stays fast (no exponential backtracking).
        let stars = PluginScope::parse(["*a*a*a*a*a*a*a*a*a*a*b"]).expect("valid");
        assert!(!stars.allows(&"a".repeat(60)));
    }

    #[test]
    fn a_notifier_reports_failures_after_its_streak_and_recovery_once() {
        let notifier = Notifier {
            format: NotifyFormat::Json,
            on: vec![NotifyEvent::Failed, NotifyEvent::Recovered],
            after_consecutive: 2,
            ..notifier_for_filters()
        };
        let streak = |before, now| Streak { before, now };
        assert_eq!(notifier.event(RunStatus::Failed, streak(0, 1)), None);
        assert_eq!(
            notifier.event(RunStatus::Failed, streak(1, 2)),
            Some(NotifyEvent::Failed)
        );
        assert_eq!(
            notifier.event(RunStatus::Failed, streak(2, 3)),
            Some(NotifyEvent::Failed)
        );
        // Not in `on`.
        assert_eq!(notifier.event(RunStatus::TimedOut, streak(3, 4)), None);
        assert_eq!(
            notifier.event(RunStatus::Passed, streak(4, 0)),
            Some(NotifyEvent::Recovered)
        );
        // A pass after an unreported failure, or after a pass, is no news.
        assert_eq!(notifier.event(RunStatus::Passed, streak(1, 0)), None);
        assert_eq!(notifier.event(RunStatus::Passed, streak(0, 0)), None);
        assert_eq!(notifier.event(RunStatus::Cancelled, streak(5, 5)), None);
    }

    #[test]
    fn a_notifier_watches_runs_its_filters_select() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect()
        };
        let notifier = Notifier {
            plugins: vec!["crm".into()],
            labels: labels(&[("env", "prod")]),
            ..notifier_for_filters()
        };
        assert!(notifier.watches("crm", None, &labels(&[("env", "prod"), ("x", "1")])));
        assert!(!notifier.watches("crm", None, &labels(&[("env", "dev")])));
        assert!(!notifier.watches("other", None, &labels(&[("env", "prod")])));
        let scheduled = Notifier {
            schedules: vec!["s1".into()],
            ..notifier_for_filters()
        };
        assert!(scheduled.watches("crm", Some("s1"), &BTreeMap::new()));
        assert!(!scheduled.watches("crm", Some("s2"), &BTreeMap::new()));
        assert!(!scheduled.watches("crm", None, &BTreeMap::new()));
        // Series: labels are part of an unscheduled run's series, in a form no value can forge.
        assert_ne!(
            notify_series("p", None, &labels(&[("a", "1,\"b\"=\"2")])),
            notify_series("p", None, &labels(&[("a", "1"), ("b", "2")]))
        );
        assert_eq!(
            notify_series("p", Some("s1"), &labels(&[("a", "1")])),
            "schedule:s1"
        );
    }

    fn notifier_for_filters() -> Notifier {
        Notifier {
            name: "ops".into(),
            url: "http://127.0.0.1:1/".into(),
            format: NotifyFormat::Slack,
            on: vec![NotifyEvent::Failed],
            plugins: vec![],
            schedules: vec![],
            labels: BTreeMap::new(),
            after_consecutive: 1,
            retry: Retry {
                initial: Duration::from_secs(1),
                factor: 2.0,
                max: Duration::from_secs(60),
            },
            timeout: Duration::from_secs(10),
            max_delivery: Duration::from_secs(3600),
            secret: None,
        }
    }

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

    #[test]
    fn policy_patterns_cover_only_what_they_name() {
        let entry = |text: &str| AllowedHost::parse(text).expect("valid entry");
        let subdomains = HostPattern::parse("https://*.example.com").expect("valid");
        assert!(subdomains.covers(&entry("https://api.example.com")));
        assert!(subdomains.covers(&entry("https://a.b.example.com:8443")));
        assert!(!subdomains.covers(&entry("https://example.com")));
        assert!(!subdomains.covers(&entry("https://evilexample.com")));
        assert!(
            !subdomains.covers(&entry("api.example.com:443")),
            "both schemes"
        );
        let port = HostPattern::parse("127.0.0.1:9000").expect("valid");
        assert!(port.covers(&entry("127.0.0.1:9000")));
        assert!(!port.covers(&entry("127.0.0.1:9001")));
        assert!(
            HostPattern::parse("*")
                .expect("valid")
                .covers(&entry("[::1]:1"))
        );
        for invalid in ["", "ftp://x", "a*b.com", "*.", "x:port"] {
            assert!(HostPattern::parse(invalid).is_err(), "{invalid}");
        }

        let policy = Policy {
            allowed_hosts: Some(vec![port]),
            sql_sources: Some(vec!["warehouse".into()]),
            max_limits: LimitOverrides {
                memory_bytes: Some(16 << 20),
                ..LimitOverrides::default()
            },
            publishers_activate_granted: false,
        };
        let grant = Grant {
            allowed_hosts: vec!["127.0.0.1:9000".into(), "evil.example:80".into()],
            sql_sources: vec!["warehouse".into(), "other".into()],
            limits: LimitOverrides {
                memory_bytes: Some(64 << 20),
                max_errors: Some(9),
                ..LimitOverrides::default()
            },
            ..Grant::default()
        };
        let (key, _) = policy
            .violation(&grant, &Limits::default())
            .expect("beyond the policy");
        assert_eq!(key, "allowed_hosts");
        let (confined, limits) = policy.confine(grant, &Limits::default());
        assert_eq!(confined.allowed_hosts, ["127.0.0.1:9000"]);
        assert_eq!(confined.sql_sources, ["warehouse"]);
        assert_eq!(limits.memory_bytes, 16 << 20);
        assert_eq!(limits.max_errors, 9, "no ceiling on max_errors");
        let within = Grant {
            limits: LimitOverrides {
                memory_bytes: Some(32 << 20),
                ..LimitOverrides::default()
            },
            ..Grant::default()
        };
        assert_eq!(
            policy
                .violation(&within, &Limits::default())
                .map(|(key, _)| key),
            Some("limits.memory_mib".to_owned())
        );
    }
}
