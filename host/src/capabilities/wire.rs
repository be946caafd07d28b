//! What the host's own protocol clients share (Redis in `kv/resp.rs`; NATS, MQTT and AMQP
//! under `messages/`): their URLs' scheme and authority, a connection that is plain TCP or TLS
//! behind one type, a line read that never holds more than the caller allows, and a reader of
//! a binary packet read whole.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

/// What follows a URL's scheme, `plain://` or `secure://`, and whether it was the secure one
/// (TLS); `None` for another scheme.
pub(super) fn after_scheme<'a>(url: &'a str, plain: &str, secure: &str) -> Option<(bool, &'a str)> {
    let rest = |scheme: &str| url.strip_prefix(scheme)?.strip_prefix("://");
    match (rest(secure), rest(plain)) {
        (Some(rest), _) => Some((true, rest)),
        (None, Some(rest)) => Some((false, rest)),
        (None, None) => None,
    }
}

/// A URL's authority, `[user[:password]@]host[:port]`, its user info percent-decoded.
#[derive(Debug, PartialEq)]
pub(super) struct Authority {
    /// The user, and the password when a `:` follows it.
    pub userinfo: Option<(String, Option<String>)>,
    /// Without the brackets of an IPv6 literal.
    pub host: String,
    pub port: Option<u16>,
}

impl Authority {
    /// Reads `text`; the error says what is wrong with it.
    pub(super) fn parse(text: &str) -> Result<Authority, &'static str> {
        let (userinfo, address) = match text.rsplit_once('@') {
            Some((userinfo, address)) => (Some(userinfo), address),
            None => (None, text),
        };
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| "user and password must be UTF-8 once decoded")
        };
        let userinfo = match userinfo {
            None => None,
            Some(userinfo) => Some(match userinfo.split_once(':') {
                Some((user, password)) => (decode(user)?, Some(decode(password)?)),
                None => (decode(userinfo)?, None),
            }),
        };
        let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed [")?;
            (host, after.strip_prefix(':'))
        } else {
            match address.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (address, None),
            }
        };
        if host.is_empty() {
            return Err("no host");
        }
        let port = port
            .map(|port| port.parse().map_err(|_| "invalid port"))
            .transpose()?;
        Ok(Authority {
            userinfo,
            host: host.to_owned(),
            port,
        })
    }
}

/// A packet or frame already read whole, read from its start: each read fails, rather than
/// panics, past its end.
pub(super) struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a malformed packet or frame, cut short".into());
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }

    pub(super) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_be_bytes)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A TCP connection to `host:port`, without Nagle's delay (the host's clients write whole
/// requests and wait for the answer).
pub(super) async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|error| error.to_string())?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// `stream` after a TLS handshake for `host`, checked against the web PKI roots (as the HTTP
/// capability's own connections are).
pub(super) async fn tls(stream: impl Io, host: &str) -> Result<Box<dyn Io>, String> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|error| error.to_string())?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::clone(&crate::capabilities::http::connect::TLS));
    let stream = connector
        .connect(name, stream)
        .await
        .map_err(|error| format!("TLS: {error}"))?;
    Ok(Box::new(stream))
}

/// Why a line (or what it announces) could not be read. The connection is then unusable.
#[derive(Debug)]
pub(super) enum ReadError {
    /// It would pass the budget; nothing past the budget was read.
    TooBig,
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> Self {
        ReadError::Io(error)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooBig => f.write_str("a reply past the size limit"),
            ReadError::Io(error) => write!(f, "{error}"),
            ReadError::Protocol(error) => write!(f, "protocol error: {error}"),
        }
    }
}

/// Reads one `\r\n`-terminated line of at most `max` bytes and returns it without its end.
pub(super) async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Err(ReadError::Protocol("connection closed".into()));
    }
    if !line.ends_with(b"\r\n") {
        return Err(if read == max {
            ReadError::TooBig
        } else {
            ReadError::Protocol("a line without its end".into())
        });
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| ReadError::Protocol("a line that is not UTF-8".into()))
}
