//! Operator-declared secrets (README "Secrets"). A plugin never holds a secret's value. The
//! operator declares where each value goes (a header, with an optional format, or a query
//! parameter) and to which hosts; the HTTP capability sets it there itself in its send hook,
//! on every request of a plugin granted the secret to one of those hosts. A placeholder
//! `{{secret:NAME}}` is accepted only at that place (it is replaced like the rest of the
//! value), so no text a plugin copies from its params or from a response ever decides where
//! a value goes. Responses are redacted before the guest reads them, so a host that echoes a
//! value back hands the plugin only the placeholder; whatever a plugin returns or logs is
//! redacted again before the host keeps it. Redaction covers every form of a value a plugin
//! could get it back in (raw, JSON-escaped, URL-encoded, base64 at any alignment).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

use crate::config::SourceConfig;
use crate::grant::AllowedHost;
use crate::model::{Place, valid_name};

const OPEN: &str = "{{secret:";
const CLOSE: &str = "}}";

/// Shortest value accepted. Redaction tells a plugin whether a guess it returns was a value
/// (the guess comes back as a placeholder), so a value must be too long to guess; a short one
/// would also be redacted wherever it happens to occur. For the same reason a value of
/// digits only (a PIN) is refused whatever its length.
pub const MIN_VALUE_BYTES: usize = 16;
/// Values replaced by a reload that are still redacted: a remote system may go on accepting,
/// and echoing, a rotated-out value for a while.
const RETIRED_KEPT: usize = 16;
/// Shortest base64 run redacted for a value at an offset: shorter runs would match by chance.
const MIN_BASE64_CHARS: usize = 6;

/// The placeholder a plugin writes for `name`.
pub fn placeholder(name: &str) -> String {
    format!("{OPEN}{name}{CLOSE}")
}

/// One secret with its value, as loaded from the operator's config.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub value: String,
    /// Where its value may be sent.
    pub hosts: Vec<AllowedHost>,
    /// Where in those requests; `None` for a secret used only in the config (a source URL).
    pub place: Option<Place>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

impl Secret {
    fn may_go_to(&self, (scheme, host, port): (&str, &str, u16)) -> bool {
        self.hosts
            .iter()
            .any(|allowed| allowed.allows(scheme, host, port))
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
    /// The longest form: what a streamed text keeps back until more of it arrives.
    longest: usize,
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
                "secret {:?} has a value of {} bytes: at least {MIN_VALUE_BYTES} are needed, so that it can be neither guessed nor redacted by chance",
                secret.name,
                secret.value.len()
            );
            anyhow::ensure!(
                !secret.value.bytes().all(|byte| byte.is_ascii_digit()),
                "secret {:?} is digits only: such a value can be guessed, use a random token",
                secret.name
            );
            if let Some(Place::Header { name, format }) = &secret.place {
                anyhow::ensure!(
                    http::HeaderValue::from_str(&format.replace("{}", &secret.value)).is_ok(),
                    "secret {:?} cannot go in header {name}: its value holds characters a header may not",
                    secret.name
                );
            }
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
            longest: patterns.iter().map(String::len).max().unwrap_or(0),
        })
    }

    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    /// The value of secret `name`, for the host's own use (signing its webhooks).
    pub fn value_of(&self, name: &str) -> Option<&str> {
        self.get(name).map(|secret| secret.value.as_str())
    }

    fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|secret| secret.name == name)
    }

    /// `text` with every form of every secret's value replaced by that secret's placeholder.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Whole characters are replaced by ASCII, so the text stays UTF-8.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// The same for bytes that need not be text: a response body or header.
    pub fn redact_bytes<'a>(&self, text: &'a [u8]) -> Cow<'a, [u8]> {
        let mut redacted = Vec::new();
        match self.redact_until(text, text.len(), &mut redacted) {
            None => Cow::Borrowed(text),
            Some(end) => {
                redacted.extend_from_slice(&text[end..]);
                Cow::Owned(redacted)
            }
        }
    }

    /// Appends to `out` the redacted `text` up to where the last match that starts before
    /// `before` ends (at least up to `before`), and returns that end; `None`, writing nothing,
    /// when no match starts before `before`.
    fn redact_until(&self, text: &[u8], before: usize, out: &mut Vec<u8>) -> Option<usize> {
        let redactor = self.redactor.as_ref()?;
        let mut last = None;
        for found in redactor.find_iter(text) {
            if found.start() >= before {
                break;
            }
            out.extend_from_slice(&text[last.unwrap_or(0)..found.start()]);
            out.extend_from_slice(
                placeholder(self.owner_name(found.pattern().as_usize())).as_bytes(),
            );
            last = Some(found.end());
        }
        let end = last?;
        Some(end)
    }

    fn owner_name(&self, pattern: usize) -> &str {
        let owner = self.owners[pattern];
        match self.secrets.get(owner) {
            Some(secret) => &secret.name,
            None => &self.retired[owner - self.secrets.len()].name,
        }
    }

    /// Whether any value is configured, that is, whether anything can need redacting.
    pub fn is_empty(&self) -> bool {
        self.redactor.is_none()
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

    /// Puts the value of every secret the plugin is `granted` whose hosts include `target`
    /// at the secret's place in `request`, replacing whatever the plugin wrote there.
    /// Placeholders the plugin wrote are accepted only at the place of the secret they name,
    /// for a granted secret that may go to `target`; any other placeholder, or anything that
    /// still reads as one (in the path, a parameter's name, an odd encoding), refuses the
    /// whole request. Returns the names of the secrets placed.
    pub fn place<B>(
        &self,
        request: &mut http::Request<B>,
        granted: &[String],
        target: (&str, &str, u16),
    ) -> Result<Vec<String>, Refusal> {
        for (name, value) in request.headers() {
            let text = String::from_utf8_lossy(value.as_bytes());
            if mentions_placeholder(&text) {
                self.check_placeholders(
                    &text,
                    granted,
                    target,
                    |place| matches!(place, Place::Header { name: header, .. } if header == name),
                )?;
            }
        }
        let query = request.uri().query().unwrap_or_default().to_owned();
        for part in query.split('&').filter(|part| !part.is_empty()) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            if mentions_placeholder(&name) {
                return Err(unplaced());
            }
            if mentions_placeholder(&value) {
                self.check_placeholders(
                    &value,
                    granted,
                    target,
                    |place| matches!(place, Place::Query(parameter) if *parameter == name),
                )?;
            }
        }
        let placed: Vec<&Secret> = self
            .secrets
            .iter()
            .filter(|secret| granted.contains(&secret.name) && secret.may_go_to(target))
            .filter(|secret| secret.place.is_some())
            .collect();
        for (index, secret) in placed.iter().enumerate() {
            if let Some(other) = placed[..index]
                .iter()
                .find(|other| other.place == secret.place)
            {
                return Err(Refusal(format!(
                    "secrets {:?} and {:?} both go in the same place of requests to this host; \
                     grant this plugin only one of them",
                    other.name, secret.name
                )));
            }
        }
        let mut query_parts: Vec<String> = query
            .split('&')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect();
        let mut query_changed = false;
        for secret in &placed {
            match &secret.place {
                Some(Place::Header { name, format }) => {
                    let mut value =
                        http::HeaderValue::from_str(&format.replace("{}", &secret.value)).map_err(
                            |_| Refusal(format!("secret {:?} cannot go in a header", secret.name)),
                        )?;
                    value.set_sensitive(true);
                    request.headers_mut().insert(name.clone(), value);
                }
                Some(Place::Query(parameter)) => {
                    query_parts.retain(|part| {
                        let name = part.split_once('=').map_or(part.as_str(), |(name, _)| name);
                        percent_encoding::percent_decode_str(name).decode_utf8_lossy()
                            != parameter.as_str()
                    });
                    query_parts.push(format!("{parameter}={}", percent_encode(&secret.value)));
                    query_changed = true;
                }
                None => {}
            }
        }
        if query_changed {
            let invalid = || Refusal("the query with its secrets is not a valid URL".to_owned());
            let mut parts = request.uri().clone().into_parts();
            let path_and_query = format!("{}?{}", request.uri().path(), query_parts.join("&"));
            parts.path_and_query = Some(path_and_query.parse().map_err(|_| invalid())?);
            *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| invalid())?;
        }
        let elsewhere = [
            Some(request.uri().path()),
            request
                .uri()
                .authority()
                .map(|authority| authority.as_str()),
        ]
        .into_iter()
        .flatten()
        .any(mentions_placeholder);
        if elsewhere {
            return Err(unplaced());
        }
        Ok(placed.iter().map(|secret| secret.name.clone()).collect())
    }

    /// Checks the placeholders of one header or query value: each must name a configured
    /// secret that the plugin is granted, that may go to `target`, and whose place this is.
    fn check_placeholders(
        &self,
        text: &str,
        granted: &[String],
        (scheme, host, port): (&str, &str, u16),
        here: impl Fn(&Place) -> bool,
    ) -> Result<(), Refusal> {
        let placeholders = find_placeholders(text);
        if placeholders.is_empty() {
            return Err(unplaced());
        }
        for (_, _, name) in placeholders {
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
            if !secret.may_go_to((scheme, host, port)) {
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
            match &secret.place {
                Some(place) if here(place) => {}
                Some(place) => {
                    return Err(Refusal(format!(
                        "secret {name:?} goes only in its {place}, where the host sets it \
                         itself; a placeholder anywhere else may not leave the host"
                    )));
                }
                None => {
                    return Err(Refusal(format!(
                        "secret {name:?} has no place in requests (the operator gave it no \
                         header or query); it may not leave the host"
                    )));
                }
            }
        }
        Ok(())
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

fn unplaced() -> Refusal {
    Refusal(
        "a secret placeholder is where the host does not set secrets (only the header or query \
         parameter the operator declared for the secret) or is malformed; it may not leave the \
         host"
            .to_owned(),
    )
}

/// A streamed text (a response body) redacted as it passes: what could be the start of a
/// value is kept back until the next chunk shows whether it is one, so a value split across
/// chunks is caught like one within a chunk.
pub struct StreamRedactor {
    set: Arc<SecretSet>,
    pending: Vec<u8>,
}

impl StreamRedactor {
    pub fn new(set: Arc<SecretSet>) -> StreamRedactor {
        StreamRedactor {
            set,
            pending: Vec::new(),
        }
    }

    /// The redacted text that `chunk` completes: everything but the last bytes that may
    /// still begin a value.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let keep = self.set.longest.saturating_sub(1);
        if self.pending.len() <= keep {
            return Vec::new();
        }
        let safe = self.pending.len() - keep;
        let mut out = Vec::with_capacity(safe);
        // Redacted up to the end of the last value that starts before `safe`; raw from there.
        let redacted_to = self
            .set
            .redact_until(&self.pending, safe, &mut out)
            .unwrap_or(0);
        let end = redacted_to.max(safe);
        out.extend_from_slice(&self.pending[redacted_to..end]);
        self.pending.drain(..end);
        out
    }

    /// The rest, at the end of the text.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.set.redact_bytes(&rest).into_owned()
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

    const VALUE: &str = "s3cr3t value/+ long enough";

    fn crm(place: Place) -> Secret {
        Secret {
            name: "crm".into(),
            value: VALUE.into(),
            hosts: vec![AllowedHost::parse("https://crm.example.com").unwrap()],
            place: Some(place),
        }
    }

    fn set() -> SecretSet {
        SecretSet::new(vec![crm(
            Place::header("authorization", Some("Bearer {}")).unwrap()
        )])
        .unwrap()
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut request = http::Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap()
    }

    const TO_CRM: (&str, &str, u16) = ("https", "crm.example.com", 443);

    #[test]
    fn every_form_of_a_value_is_redacted() {
        let set = set();
        let basic = STANDARD_NO_PAD.encode(format!("user:{VALUE}"));
        let url_safe = URL_SAFE_NO_PAD.encode(format!("ab{VALUE}"));
        for text in [
            format!("token={VALUE}!"),
            format!("q={}", percent_encode(VALUE)),
            format!("q={}", percent_encode(VALUE).to_ascii_lowercase()),
            format!("Basic {basic}"),
            format!("x{url_safe}"),
        ] {
            let redacted = set.redact(&text);
            assert!(redacted.contains("{{secret:crm}}"), "{text} → {redacted}");
            assert!(!redacted.contains(VALUE), "{redacted}");
        }
        assert_eq!(set.redact("nothing here"), "nothing here");
    }

    #[test]
    fn the_host_sets_a_secret_at_its_place_and_nowhere_else() {
        let set = set();
        let granted = ["crm".to_owned()];
        // Set by the host, with or without a placeholder at its place.
        for headers in [vec![], vec![("authorization", "Bearer {{secret:crm}}")]] {
            let mut sent = request("https://crm.example.com/x", &headers);
            assert_eq!(
                set.place(&mut sent, &granted, TO_CRM),
                Ok(vec!["crm".into()])
            );
            assert_eq!(
                sent.headers()["authorization"],
                format!("Bearer {VALUE}").as_str()
            );
        }
        // A placeholder anywhere else (another header, a query value, the path, a
        // parameter's name, encoded or malformed) refuses the request.
        for (uri, headers) in [
            (
                "https://crm.example.com/x",
                vec![("x-request-id", "{{secret:crm}}")],
            ),
            (
                "https://crm.example.com/x?q=%7B%7Bsecret%3Acrm%7D%7D",
                vec![],
            ),
            ("https://crm.example.com/%7B%7Bsecret:crm%7D%7D", vec![]),
            ("https://crm.example.com/x?%7B%7Bsecret:crm%7D%7D=1", vec![]),
            ("https://crm.example.com/x?q={{secret:crm", vec![]),
        ] {
            let mut sent = request(uri, &headers);
            let refusal = set.place(&mut sent, &granted, TO_CRM).unwrap_err();
            assert!(
                refusal.0.contains("may not leave the host"),
                "{uri}: {}",
                refusal.0
            );
        }
        // Elsewhere, or without the grant: nothing is set, and a placeholder is refused.
        let elsewhere = ("https", "evil.example", 443);
        let mut sent = request("https://evil.example/", &[]);
        assert_eq!(set.place(&mut sent, &granted, elsewhere), Ok(vec![]));
        assert!(sent.headers().get("authorization").is_none());
        let mut sent = request(
            "https://evil.example/",
            &[("authorization", "{{secret:crm}}")],
        );
        let refusal = set.place(&mut sent, &granted, elsewhere).unwrap_err();
        assert!(
            refusal
                .0
                .contains("may not be sent to https://evil.example:443")
        );
        let mut sent = request(
            "https://crm.example.com/",
            &[("authorization", "{{secret:crm}}")],
        );
        assert!(
            set.place(&mut sent, &[], TO_CRM)
                .unwrap_err()
                .0
                .contains("not granted")
        );
        let mut sent = request(
            "https://crm.example.com/",
            &[("authorization", "{{secret:x}}")],
        );
        let refusal = set.place(&mut sent, &granted, TO_CRM).unwrap_err();
        assert!(refusal.0.contains("not configured"));
    }

    #[test]
    fn a_query_secret_replaces_the_parameter_the_plugin_wrote() {
        let set = SecretSet::new(vec![crm(Place::query("api_key").unwrap())]).unwrap();
        let mut sent = request(
            "https://crm.example.com/x?a=1&api_key=%7B%7Bsecret%3Acrm%7D%7D&api_key=2",
            &[],
        );
        assert!(set.place(&mut sent, &["crm".to_owned()], TO_CRM).is_ok());
        assert_eq!(
            sent.uri().query(),
            Some("a=1&api_key=s3cr3t%20value%2F%2B%20long%20enough")
        );
    }

    #[test]
    fn a_streamed_text_is_redacted_like_a_whole_one() {
        let set = Arc::new(set());
        let text = format!(
            "start {VALUE} middle {} end {VALUE}",
            STANDARD_NO_PAD.encode(format!("u:{VALUE}"))
        );
        let whole = set.redact(&text).into_owned();
        for chunk in [1, 2, 7, 13, 64] {
            let mut redactor = StreamRedactor::new(set.clone());
            let mut out = Vec::new();
            for piece in text.as_bytes().chunks(chunk) {
                out.extend(redactor.push(piece));
            }
            out.extend(redactor.finish());
            assert_eq!(String::from_utf8(out).unwrap(), whole, "chunks of {chunk}");
        }
        assert!(!whole.contains(VALUE));
    }

    #[test]
    fn escaped_json_lower_hex_and_rotated_out_values_are_redacted() {
        let set = set();
        let output = set.redact_json(format!(
            r#"{{"a":"{}","{VALUE}":[1]}}"#,
            VALUE.replace('/', "\\/")
        ));
        assert_eq!(output, r#"{"a":"{{secret:crm}}","{{secret:crm}}":[1]}"#);
        let mixed = SecretSet::new(vec![Secret {
            name: "t".into(),
            value: "Tok/en12abcdefghij".into(),
            hosts: Vec::new(),
            place: None,
        }])
        .unwrap();
        assert_eq!(mixed.redact("x=Tok%2fen12abcdefghij"), "x={{secret:t}}");
        let rotated = SecretSet::after(
            vec![Secret {
                name: "crm".into(),
                value: "the new value, long".into(),
                hosts: Vec::new(),
                place: None,
            }],
            &set,
        )
        .unwrap();
        assert_eq!(
            rotated.redact(&format!("old {VALUE}")),
            "old {{secret:crm}}"
        );
        assert_eq!(
            rotated.redact("new the new value, long"),
            "new {{secret:crm}}"
        );
    }

    #[test]
    fn short_or_numeric_values_bad_places_and_odd_names_are_refused() {
        let value = |value: &str| {
            SecretSet::new(vec![Secret {
                name: "pin".into(),
                value: value.into(),
                hosts: Vec::new(),
                place: None,
            }])
        };
        assert!(
            value("12345678abc")
                .unwrap_err()
                .to_string()
                .contains("at least 16")
        );
        assert!(
            value("12345678901234567890")
                .unwrap_err()
                .to_string()
                .contains("digits only")
        );
        assert!(Place::header("host", None).is_err());
        assert!(Place::header("x-api-key", Some("no placeholder")).is_err());
        assert!(Place::header("x-api-key", Some("{} {}")).is_err());
        assert!(Place::query("a b").is_err());
        assert!(!valid_name("a}}b"));
        assert!(valid_name("crm_token-2"));
    }
}
