//! What the operator allows a plugin: its grant (hosts, sources, secrets, limits), the
//! policy every grant must stay within, and the host's limits; `manifest` reads a grant from
//! its manifest (`<name>.toml`, or the same keys as JSON from the API).

mod manifest;

pub use manifest::{
    LimitsFile, ManifestFile, RetryFile, ShadowFile, grant_toml_from_json, parse_grant,
    parse_retry_json, parse_stored_grant,
};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{Retry, ShadowPolicy};

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
    /// When shadows of plugins whose grant says nothing are promoted or dropped.
    pub shadow: Option<ShadowPolicy>,
    /// The share of a plugin's runs that a shadow version runs beside (above 0, at most 1);
    /// `None`: every run.
    pub shadow_share: Option<f64>,
    /// Which runs of plugins whose grant says nothing are recorded.
    pub record: RecordMode,
}

impl Policy {
    /// When a shadow of a plugin with the grant `grant_toml` (as stored) is promoted or
    /// dropped without anyone asking: the grant's `shadow`, else the policy's; `None`: only a
    /// person decides.
    pub fn shadow_of(&self, grant_toml: &str) -> Option<ShadowPolicy> {
        parse_stored_grant(grant_toml)
            .ok()
            .and_then(|grant| grant.shadow)
            .or(self.shadow)
    }

    /// Which runs of a plugin with `grant` are recorded: the grant's `record`, else the
    /// policy's.
    pub fn record_of(&self, grant: &Grant) -> RecordMode {
        grant.record.unwrap_or(self.record)
    }

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
    /// Subject patterns the plugin may read on the message sources among `sql_sources`.
    pub subjects: Vec<String>,
    /// Names of `[secrets.*]` in the host config whose placeholders the plugin may send.
    pub secrets: Vec<String>,
    pub poll_interval: Option<Duration>,
    pub limits: LimitOverrides,
    /// `[steps.NAME] timeout_ms`: how long each named step may stay pending.
    pub step_timeouts: BTreeMap<String, Duration>,
    /// The backoff after an errored attempt, for runs that set none of their own.
    pub retry: Option<Retry>,
    /// When a shadow version is promoted or dropped without anyone asking.
    pub shadow: Option<ShadowPolicy>,
    /// Which of the plugin's runs keep a recording of their capability calls; `None`: the
    /// policy's `record`.
    pub record: Option<RecordMode>,
}

/// Which runs keep a recording of every capability call their attempts made (`record` in a
/// grant or the policy), for `stepwise dev --replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    #[default]
    Off,
    /// Recorded while they run; a run that passes drops its recording.
    Failures,
    All,
}

impl Grant {
    /// Whether it lets a plugin reach anything outside its sandbox: a host, a source or a
    /// secret. New code for such a plugin is reviewed by an admin before it runs.
    pub fn grants_capabilities(&self) -> bool {
        !self.allowed_hosts.is_empty() || !self.sql_sources.is_empty() || !self.secrets.is_empty()
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
            shadow: None,
            shadow_share: None,
            record: RecordMode::Off,
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
