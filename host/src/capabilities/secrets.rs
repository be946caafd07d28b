//! Operator-declared secrets (SPEC §12). A plugin never holds a secret's value: it writes the
//! placeholder `{{secret:NAME}}` in an outbound header value or in the URL's query, and the
//! HTTP capability replaces it in its send hook, only for a plugin granted the secret and a
//! request to one of the secret's `hosts`. Whatever a plugin returns or logs is redacted
//! before the host keeps it: every occurrence of a value, in the forms a plugin could get it
//! back in (raw, JSON-escaped, URL-encoded, base64 at any alignment), becomes the placeholder.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

use crate::config::SourceConfig;
use crate::model::AllowedHost;

const OPEN: &str = "{{secret:";
const CLOSE: &str = "}}";

/// Shortest value accepted. Redaction tells a plugin whether a guess it returns was a value
/// (the guess comes back as a placeholder), so a value must be too long to guess; a short one
/// would also be redacted wherever it happens to occur.
pub const MIN_VALUE_BYTES: usize = 8;
/// Values replaced by a reload that are still redacted: a remote system may go on accepting,
/// and echoing, a rotated-out value for a while.
const RETIRED_KEPT: usize = 16;
/// Shortest base64 run redacted for a value at an offset: shorter runs would match by chance.
const MIN_BASE64_CHARS: usize = 6;

/// The placeholder a plugin writes for `name`.
pub fn placeholder(name: &str) -> String {
    format!("{OPEN}{name}{CLOSE}")
}

/// Whether `name` can be a secret's name: it must read back unambiguously in a placeholder.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// One secret with its value, as loaded from the operator's config.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub value: String,
    /// Where its value may be sent.
    pub hosts: Vec<AllowedHost>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// The secrets in force, with the matcher that redacts their values.
#[derive(Default)]
pub struct SecretSet {
    secrets: Vec<Secret>,
    /// Earlier values of these secrets, from before a reload: redacted, never sent.
    retired: Vec<Secret>,
    /// Every redacted form of every value; `owners[i]` is the secret of pattern `i`.
    redactor: Option<AhoCorasick>,
    owners: Vec<usize>,
}

impl std::fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.secrets).finish()
    }
}

/// Why a request's placeholder was not replaced.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl SecretSet {
    pub fn new(secrets: Vec<Secret>) -> anyhow::Result<SecretSet> {
        SecretSet::with_retired(secrets, Vec::new())
    }

    /// `secrets` loaded again to replace `previous`, whose values that changed stay redacted.
    pub fn after(secrets: Vec<Secret>, previous: &SecretSet) -> anyhow::Result<SecretSet> {
        let mut retired: Vec<Secret> = previous
            .secrets
            .iter()
            .chain(&previous.retired)
            .filter(|old| !secrets.iter().any(|new| new.value == old.value))
            .cloned()
            .collect();
        retired.truncate(RETIRED_KEPT);
        SecretSet::with_retired(secrets, retired)
    }

    fn with_retired(secrets: Vec<Secret>, retired: Vec<Secret>) -> anyhow::Result<SecretSet> {
        let mut patterns = Vec::new();
        let mut owners = Vec::new();
        for secret in &secrets {
            anyhow::ensure!(
                valid_name(&secret.name),
                "secret name {:?} must be 1-63 letters, digits, '_' or '-'",
                secret.name
            );
            anyhow::ensure!(
                secret.value.len() >= MIN_VALUE_BYTES,
                "secret {:?} has a value of {} bytes: at least {MIN_VALUE_BYTES} are needed to redact it reliably",
                secret.name,
                secret.value.len()
            );
        }
        for (index, secret) in secrets.iter().chain(&retired).enumerate() {
            for form in redacted_forms(&secret.value) {
                if !patterns.contains(&form) {
                    patterns.push(form);
                    owners.push(index);
                }
            }
        }
        let redactor = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&patterns)?,
            )
        };
        Ok(SecretSet {
            secrets,
            retired,
            redactor,
            owners,
        })
    }

    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|secret| secret.name == name)
    }

    /// `text` with every form of every secret's value replaced by that secret's placeholder.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(redactor) = &self.redactor else {
            return Cow::Borrowed(text);
        };
        let mut matches = redactor.find_iter(text).peekable();
        if matches.peek().is_none() {
            return Cow::Borrowed(text);
        }
        let mut redacted = String::with_capacity(text.len());
        let mut last = 0;
        for found in matches {
            redacted.push_str(&text[last..found.start()]);
            let owner = self.owners[found.pattern().as_usize()];
            let name = match self.secrets.get(owner) {
                Some(secret) => &secret.name,
                None => &self.retired[owner - self.secrets.len()].name,
            };
            redacted.push_str(&placeholder(name));
            last = found.end();
        }
        redacted.push_str(&text[last..]);
        Cow::Owned(redacted)
    }

    /// A step's JSON output redacted value by value: a value written with JSON escapes
    /// (`\u0026`, `\/`) does not match as text, yet reads as the value once parsed. Text
    /// that is not JSON is redacted as text.
    pub fn redact_json(&self, output: String) -> String {
        if self.redactor.is_none() {
            return output;
        }
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&output) else {
            return self.redact(&output).into_owned();
        };
        self.redact_value(&mut value);
        value.to_string()
    }

    fn redact_value(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(text) => {
                if let Cow::Owned(redacted) = self.redact(text) {
                    *text = redacted;
                }
            }
            Value::Number(number) => {
                if let Cow::Owned(redacted) = self.redact(&number.to_string()) {
                    *value = Value::String(redacted);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.redact_value(item)),
            Value::Object(object) => {
                let entries = std::mem::take(object);
                for (key, mut item) in entries {
                    self.redact_value(&mut item);
                    object.insert(self.redact(&key).into_owned(), item);
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    /// `query` with the placeholders of its parameters filled, URL-encoded: each parameter
    /// is decoded first, so a placeholder counts however it was encoded. `None` when none
    /// holds one.
    pub fn substitute_query(
        &self,
        query: &str,
        granted: &[String],
        target: (&str, &str, u16),
    ) -> Result<Option<String>, Refusal> {
        let mut changed = false;
        let mut parts = Vec::new();
        for part in query.split('&') {
            let (name, value) = match part.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (part, None),
            };
            let filled = match value {
                Some(value) => {
                    let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                    self.substitute(&decoded, granted, target)?
                }
                None => None,
            };
            match filled {
                Some(filled) => {
                    changed = true;
                    parts.push(format!("{name}={}", percent_encode(&filled)));
                }
                None => parts.push(part.to_owned()),
            }
        }
        Ok(changed.then(|| parts.join("&")))
    }

    /// `text` with each placeholder replaced by its value when the secret is
    /// `granted` and may go to `scheme://host:port`; the first placeholder that may not be
    /// replaced refuses the whole request. `None` when `text` holds no placeholder.
    pub fn substitute(
        &self,
        text: &str,
        granted: &[String],
        (scheme, host, port): (&str, &str, u16),
    ) -> Result<Option<String>, Refusal> {
        let placeholders = find_placeholders(text);
        if placeholders.is_empty() {
            return Ok(None);
        }
        let mut replaced = String::with_capacity(text.len());
        let mut last = 0;
        for (start, end, name) in placeholders {
            let Some(secret) = self.get(name) else {
                return Err(Refusal(format!(
                    "secret {name:?} is not configured on this host"
                )));
            };
            if !granted.iter().any(|granted| granted == name) {
                return Err(Refusal(format!(
                    "secret {name:?} is not granted to this plugin (its grant's `secrets`)"
                )));
            }
            if !secret
                .hosts
                .iter()
                .any(|allowed| allowed.allows(scheme, host, port))
            {
                let hosts: Vec<String> = secret.hosts.iter().map(ToString::to_string).collect();
                return Err(Refusal(format!(
                    "secret {name:?} may not be sent to {scheme}://{host}:{port} (its hosts: {})",
                    if hosts.is_empty() {
                        "none".to_owned()
                    } else {
                        hosts.join(", ")
                    }
                )));
            }
            replaced.push_str(&text[last..start]);
            replaced.push_str(&secret.value);
            last = end;
        }
        replaced.push_str(&text[last..]);
        Ok(Some(replaced))
    }

    /// The sources with the placeholders of their URLs filled (URL-encoded); the operator
    /// wrote them, so every secret may be used there, whatever its hosts.
    pub fn fill_source_urls(
        &self,
        sources: &BTreeMap<String, SourceConfig>,
    ) -> anyhow::Result<BTreeMap<String, SourceConfig>> {
        let mut filled_sources = sources.clone();
        for (source, config) in &mut filled_sources {
            let url = std::mem::take(&mut config.url);
            let mut last = 0;
            for (start, end, name) in find_placeholders(&url) {
                let secret = self.get(name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "sources.{source}.url uses secret {name:?}, which is not a [secrets.{name}] of this config"
                    )
                })?;
                config.url.push_str(&url[last..start]);
                config.url.push_str(&percent_encode(&secret.value));
                last = end;
            }
            config.url.push_str(&url[last..]);
        }
        Ok(filled_sources)
    }

    /// `error` with the values of secrets taken out: one that could quote a filled URL.
    pub fn redact_error(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!("{}", self.redact(&format!("{error:#}")))
    }
}

/// Whether `text` holds anything that reads as a placeholder, also once URL-decoded (up to
/// three times, as layers of encoding may be undone on the way): such text never leaves the
/// host unfilled.
pub fn mentions_placeholder(text: &str) -> bool {
    let mut text = text.to_owned();
    for _ in 0..4 {
        if text.to_ascii_lowercase().contains(OPEN) {
            return true;
        }
        let decoded = percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == text {
            return false;
        }
        text = decoded;
    }
    text.to_ascii_lowercase().contains(OPEN)
}

/// `(start, end, name)` of every placeholder in `text`, in order.
fn find_placeholders(text: &str) -> Vec<(usize, usize, &str)> {
    let lower = text.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = lower[at..].find(OPEN) {
        let start = at + offset;
        let name_start = start + OPEN.len();
        match lower[name_start..].find(CLOSE) {
            Some(length) => {
                let end = name_start + length + CLOSE.len();
                found.push((start, end, &text[name_start..name_start + length]));
                at = end;
            }
            None => break,
        }
    }
    found
}

/// Every form of `value` redacted: as is, JSON-escaped, URL-encoded the ways encoders
/// differ (only reserved bytes or every byte but letters and digits; upper or lower hex; `+`
/// or `%20` for a space), and base64 (standard and URL-safe) at each of the three alignments
/// it may have inside a longer encoded text, such as `user:secret` in a Basic header. The
/// same again for the value as the host sends it in a query (URL-encoded), which a system
/// under check may echo back encoded once more.
fn redacted_forms(value: &str) -> Vec<String> {
    let mut bases = vec![value.to_owned()];
    let in_query = percent_encode(value).into_owned();
    if in_query != value {
        bases.push(in_query);
    }
    let mut forms = Vec::new();
    for base in &bases {
        forms.push(base.clone());
        let json = serde_json::to_string(base).unwrap_or_default();
        forms.push(json[1..json.len() - 1].to_owned());
        for encoded in [
            percent_encode(base).into_owned(),
            percent_encoding::utf8_percent_encode(base, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        ] {
            let lower = lower_hex(&encoded);
            forms.push(encoded.replace("%20", "+"));
            forms.push(lower.replace("%20", "+"));
            forms.push(lower);
            forms.push(encoded);
        }
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            for offset in 0..3 {
                let mut bytes = vec![0u8; offset];
                bytes.extend_from_slice(base.as_bytes());
                let text = engine.encode(&bytes);
                // Only the characters every bit of which comes from the value itself.
                let first = (offset * 8).div_ceil(6);
                let last = (bytes.len() * 8) / 6;
                if last > first && last - first >= MIN_BASE64_CHARS {
                    forms.push(text[first..last].to_owned());
                }
            }
        }
    }
    forms.retain(|form| !form.is_empty());
    forms
}

/// `encoded` with the hex digits of its escapes in lower case (`%2f`), the rest untouched.
fn lower_hex(encoded: &str) -> String {
    let mut lower = String::with_capacity(encoded.len());
    let mut escape = 0;
    for character in encoded.chars() {
        if character == '%' {
            escape = 2;
            lower.push(character);
        } else if escape > 0 {
            escape -= 1;
            lower.push(character.to_ascii_lowercase());
        } else {
            lower.push(character);
        }
    }
    lower
}

/// Every byte but the unreserved ones (RFC 3986) percent-encoded, for a query or a URL part.
pub fn percent_encode(value: &str) -> Cow<'_, str> {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, RESERVED).into()
}

/// The secrets in force, shared by every call and replaced as a whole when the operator
/// reloads them (SIGHUP): a call keeps the set it started with.
#[derive(Clone, Default)]
pub struct Secrets(Arc<RwLock<Arc<SecretSet>>>);

impl Secrets {
    pub fn new(set: SecretSet) -> Secrets {
        Secrets(Arc::new(RwLock::new(Arc::new(set))))
    }

    pub fn current(&self) -> Arc<SecretSet> {
        self.0
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub fn replace(&self, set: SecretSet) {
        *self.0.write().unwrap_or_else(|poison| poison.into_inner()) = Arc::new(set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> SecretSet {
        SecretSet::new(vec![Secret {
            name: "crm".into(),
            value: "s3cr3t value/+".into(),
            hosts: vec![AllowedHost::parse("https://crm.example.com").unwrap()],
        }])
        .unwrap()
    }

    #[test]
    fn every_form_of_a_value_is_redacted() {
        let set = set();
        let value = "s3cr3t value/+";
        let basic = STANDARD_NO_PAD.encode(format!("user:{value}"));
        let url_safe = URL_SAFE_NO_PAD.encode(format!("ab{value}"));
        for text in [
            format!("token={value}!"),
            format!("q={}", percent_encode(value)),
            format!("q={}", percent_encode(value).to_ascii_lowercase()),
            format!("Basic {basic}"),
            format!("x{url_safe}"),
        ] {
            let redacted = set.redact(&text);
            assert!(redacted.contains("{{secret:crm}}"), "{text} → {redacted}");
            assert!(!redacted.contains(value), "{redacted}");
        }
        assert_eq!(set.redact("nothing here"), "nothing here");
    }

    #[test]
    fn placeholders_are_replaced_only_where_allowed() {
        let set = set();
        let granted = ["crm".to_owned()];
        let to_crm = ("https", "crm.example.com", 443);
        assert_eq!(
            set.substitute("Bearer {{secret:crm}}", &granted, to_crm),
            Ok(Some("Bearer s3cr3t value/+".into()))
        );
        // However a query parameter encodes the placeholder, it is filled, encoded.
        for query in [
            "a=%7B%7Bsecret:crm%7D%7D&b=1",
            "a=%7B%7Bsecret%3Acrm%7D%7D&b=1",
            "a=%7b%7bsecret%3acrm%7d%7d&b=1",
            "a={{secret:crm}}&b=1",
        ] {
            assert_eq!(
                set.substitute_query(query, &granted, to_crm),
                Ok(Some("a=s3cr3t%20value%2F%2B&b=1".into())),
                "{query}"
            );
        }
        // What is left over still reads as a placeholder, and is refused by the caller.
        for malformed in [
            "{{secret:crm%7D%7D",
            "{%7Bsecret:crm}}",
            "%257B%257Bsecret:x",
        ] {
            assert!(mentions_placeholder(malformed), "{malformed}");
        }
        assert!(!mentions_placeholder("/items?q=%7Bjson%7D"));
        assert_eq!(set.substitute("plain", &granted, to_crm), Ok(None));
        let elsewhere = set.substitute("{{secret:crm}}", &granted, ("https", "evil.example", 443));
        assert!(
            elsewhere
                .unwrap_err()
                .0
                .contains("may not be sent to https://evil.example:443")
        );
        let ungranted = set.substitute("{{secret:crm}}", &[], to_crm);
        assert!(ungranted.unwrap_err().0.contains("not granted"));
        let unknown = set.substitute("{{secret:other}}", &granted, to_crm);
        assert!(unknown.unwrap_err().0.contains("not configured"));
    }

    #[test]
    fn escaped_json_lower_hex_and_rotated_out_values_are_redacted() {
        let set = set();
        let output = set.redact_json(r#"{"a":"s3cr3t value\/+","s3cr3t value/+":[1]}"#.to_owned());
        assert_eq!(output, r#"{"a":"{{secret:crm}}","{{secret:crm}}":[1]}"#);
        let mixed = SecretSet::new(vec![Secret {
            name: "t".into(),
            value: "Tok/en12abc".into(),
            hosts: Vec::new(),
        }])
        .unwrap();
        assert_eq!(mixed.redact("x=Tok%2fen12abc"), "x={{secret:t}}");
        let rotated = SecretSet::after(
            vec![Secret {
                name: "crm".into(),
                value: "the new value".into(),
                hosts: Vec::new(),
            }],
            &set,
        )
        .unwrap();
        assert_eq!(rotated.redact("old s3cr3t value/+"), "old {{secret:crm}}");
        assert_eq!(rotated.redact("new the new value"), "new {{secret:crm}}");
    }

    #[test]
    fn short_values_and_odd_names_are_refused() {
        let short = SecretSet::new(vec![Secret {
            name: "pin".into(),
            value: "123".into(),
            hosts: Vec::new(),
        }]);
        assert!(short.unwrap_err().to_string().contains("at least 8"));
        assert!(!valid_name("a}}b"));
        assert!(valid_name("crm_token-2"));
    }
}
