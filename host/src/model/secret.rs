//! Where the operator lets a secret go, and what may name one.

/// Whether `name` can be a secret's name: it must read back unambiguously in a placeholder.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Where the host puts a secret's value in a request to one of the secret's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A header, whose whole value is `format` with `{}` replaced by the secret's value.
    Header {
        name: http::HeaderName,
        format: String,
    },
    /// A query parameter of this name.
    Query(String),
}

/// Headers a secret may not be declared for: they frame the request or say where it goes,
/// which is the host's to decide.
const RESERVED_HEADERS: [&str; 16] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "traceparent",
];

impl Place {
    /// `header = NAME` with an optional `format` holding `{}` once.
    pub fn header(name: &str, format: Option<&str>) -> Result<Place, String> {
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header {name:?} is not a valid header name"))?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(format!(
                "header {name:?} is reserved: it frames or routes the request"
            ));
        }
        let format = format.unwrap_or("{}").to_owned();
        if format.matches("{}").count() != 1 {
            return Err(format!(
                "format {format:?} must hold `{{}}` exactly once, where the value goes"
            ));
        }
        if http::HeaderValue::from_str(&format.replace("{}", "")).is_err() {
            return Err(format!(
                "format {format:?} holds characters a header value may not"
            ));
        }
        Ok(Place::Header {
            name: header,
            format,
        })
    }

    /// `query = NAME`.
    pub fn query(name: &str) -> Result<Place, String> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"-._~".contains(&byte));
        if !valid {
            return Err(format!(
                "query parameter {name:?} must be 1-128 letters, digits, '-', '.', '_' or '~'"
            ));
        }
        Ok(Place::Query(name.to_owned()))
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Header { name, format } if format == "{}" => write!(f, "header {name}"),
            Place::Header { name, format } => write!(f, "header {name} as {format:?}"),
            Place::Query(name) => write!(f, "query parameter {name}"),
        }
    }
}
