//! The host's own Redis client: connections (plain or TLS) to one source, commands written as
//! arrays of bulk strings (so no argument can become another command), and replies read
//! within a byte budget. A bulk string's length comes before its bytes, so a value past the
//! budget is refused before the host reads it; an array's announced length reserves nothing.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};

pub(super) use crate::capabilities::wire::ReadError;
use crate::capabilities::wire::{self, Io};

/// A Redis source as its URL names it: `redis://[user[:password]@]host[:port][/db]`, or
/// `rediss://` for TLS.
#[derive(Clone)]
pub(super) struct Target {
    host: String,
    port: u16,
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    database: u32,
}

/// Whether `url` is a Redis URL.
pub fn is_url(url: &str) -> bool {
    url.starts_with("redis:") || url.starts_with("rediss:")
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let invalid = |why: &str| {
            format!("url must be redis://[user[:password]@]host[:port][/db] or rediss://…: {why}")
        };
        let (tls, rest) =
            wire::after_scheme(url, "redis", "rediss").ok_or_else(|| invalid("unknown scheme"))?;
        if rest.contains(['?', '#']) {
            return Err(invalid("no query or fragment is read"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let authority = wire::Authority::parse(authority).map_err(invalid)?;
        let (username, password) = match authority.userinfo {
            None => (None, None),
            Some((user, password)) => (Some(user).filter(|user| !user.is_empty()), password),
        };
        let (host, port) = (authority.host, authority.port.unwrap_or(6379));
        let database = match path {
            "" => 0,
            path => path
                .parse()
                .map_err(|_| invalid("the path is a database number"))?,
        };
        Ok(Target {
            host,
            port,
            tls,
            username,
            password,
            database,
        })
    }

    /// The ACL user the source connects as.
    pub(super) fn user(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }
}

/// One connection to a source, authenticated and on its database.
pub(super) struct Connection {
    stream: BufStream<Box<dyn Io>>,
}

/// A reply as the host reads it (RESP2).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// The longest header or simple line the host reads: a length, an integer, a status or an
/// error message.
const MAX_LINE: usize = 64 << 10;
/// How deeply arrays nest in a reply the host reads (a stream entry is three deep).
const MAX_DEPTH: usize = 4;

impl Connection {
    /// Connects, authenticates and selects the target's database, within `timeout`.
    pub(super) async fn open(target: &Target, timeout: Duration) -> Result<Connection, String> {
        tokio::time::timeout(timeout, Connection::open_now(target))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }

    async fn open_now(target: &Target) -> Result<Connection, String> {
        let tcp = wire::connect(&target.host, target.port).await?;
        let io: Box<dyn Io> = if target.tls {
            wire::tls(tcp, &target.host).await?
        } else {
            Box::new(tcp)
        };
        let mut connection = Connection {
            stream: BufStream::new(io),
        };
        if let Some(password) = &target.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &target.username {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            connection.expect_ok(&auth, "AUTH").await?;
        }
        if target.database != 0 {
            let database = target.database.to_string();
            connection
                .expect_ok(&[b"SELECT", database.as_bytes()], "SELECT")
                .await?;
        }
        Ok(connection)
    }

    async fn expect_ok(&mut self, command: &[&[u8]], what: &str) -> Result<(), String> {
        match self.call(command, MAX_LINE).await {
            Ok(Reply::Simple(_)) => Ok(()),
            Ok(Reply::Error(error)) => Err(format!("{what}: {error}")),
            Ok(other) => Err(format!("{what}: unexpected reply {other:?}")),
            Err(error) => Err(format!("{what}: {error:?}")),
        }
    }

    /// Sends one command and reads its reply, reading at most `budget` bytes of it.
    pub(super) async fn call(
        &mut self,
        command: &[&[u8]],
        budget: usize,
    ) -> Result<Reply, ReadError> {
        self.stream.write_all(&encode(command)).await?;
        self.stream.flush().await?;
        let mut left = budget;
        read_reply(&mut self.stream, &mut left, 0).await
    }
}

/// A command as an array of bulk strings.
pub(super) fn encode(command: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", command.len()).into_bytes();
    for argument in command {
        out.extend_from_slice(format!("${}\r\n", argument.len()).as_bytes());
        out.extend_from_slice(argument);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn take(left: &mut usize, bytes: usize) -> Result<(), ReadError> {
    *left = left.checked_sub(bytes).ok_or(ReadError::TooBig)?;
    Ok(())
}

async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    left: &mut usize,
) -> Result<String, ReadError> {
    if *left < 2 {
        return Err(ReadError::TooBig);
    }
    let line = wire::read_line(reader, MAX_LINE.min(*left)).await?;
    take(left, line.len() + 2)?;
    Ok(line)
}

fn read_reply<'a, R: AsyncBufReadExt + Unpin + Send>(
    reader: &'a mut R,
    left: &'a mut usize,
    depth: usize,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Reply, ReadError>> + Send + 'a>> {
    Box::pin(async move {
        let line = read_line(reader, left).await?;
        let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
        let length = || {
            rest.parse::<i64>()
                .map_err(|_| ReadError::Protocol(format!("invalid length {rest:?}")))
        };
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => Ok(Reply::Integer(length()?)),
            "$" => {
                let Ok(bytes) = usize::try_from(length()?) else {
                    return Ok(Reply::Bulk(None));
                };
                // The value and its line end; refused before a byte of it is read.
                take(left, bytes.saturating_add(2))?;
                let mut value = vec![0; bytes + 2];
                reader.read_exact(&mut value).await?;
                if !value.ends_with(b"\r\n") {
                    return Err(ReadError::Protocol("a bulk string without its end".into()));
                }
                value.truncate(bytes);
                Ok(Reply::Bulk(Some(value)))
            }
            "*" => {
                let Ok(count) = usize::try_from(length()?) else {
                    return Ok(Reply::Array(None));
                };
                if depth == MAX_DEPTH {
                    return Err(ReadError::Protocol("arrays nested too deeply".into()));
                }
                // Each element takes at least its header line, so a count beyond what is
                // left cannot be read within the budget.
                if count.saturating_mul(4) > *left {
                    return Err(ReadError::TooBig);
                }
                let mut elements = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    elements.push(read_reply(reader, left, depth + 1).await?);
                }
                Ok(Reply::Array(Some(elements)))
            }
            _ => Err(ReadError::Protocol(format!("unknown reply type {kind:?}"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(wire: &[u8], budget: usize) -> Result<Reply, ReadError> {
        let mut reader = tokio::io::BufReader::new(wire);
        let mut left = budget;
        read_reply(&mut reader, &mut left, 0).await
    }

    #[tokio::test]
    async fn replies_are_read_within_their_budget() {
        let wire = b"*2\r\n$3\r\nabc\r\n:-2\r\n";
        assert_eq!(
            parse(wire, wire.len()).await.expect("a reply"),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"abc".to_vec())),
                Reply::Integer(-2)
            ]))
        );
        assert!(matches!(
            parse(wire, wire.len() - 1).await,
            Err(ReadError::TooBig)
        ));
        // A value announced beyond the budget is refused before it is read (it is not there).
        assert!(matches!(
            parse(b"$1000000000\r\n", 1 << 20).await,
            Err(ReadError::TooBig)
        ));
        assert!(matches!(
            parse(b"*1000000000\r\n", 1 << 20).await,
            Err(ReadError::TooBig)
        ));
        assert_eq!(
            parse(b"$-1\r\n", 100).await.expect("nil"),
            Reply::Bulk(None)
        );
        assert_eq!(
            parse(b"-WRONGTYPE no\r\n", 100).await.expect("an error"),
            Reply::Error("WRONGTYPE no".into())
        );
    }

    #[test]
    fn an_argument_cannot_become_a_command() {
        assert_eq!(
            encode(&[b"GET", b"a\r\nFLUSHALL"]),
            b"*2\r\n$3\r\nGET\r\n$11\r\na\r\nFLUSHALL\r\n"
        );
    }

    #[test]
    fn urls_name_host_port_user_and_database() {
        let target = Target::parse("rediss://reader:p%40ss@cache.internal:6380/2").expect("url");
        assert_eq!(
            (
                target.host.as_str(),
                target.port,
                target.tls,
                target.database
            ),
            ("cache.internal", 6380, true, 2)
        );
        assert_eq!(target.user(), "reader");
        assert_eq!(target.password.as_deref(), Some("p@ss"));
        let target = Target::parse("redis://:secret@[::1]").expect("url");
        assert_eq!((target.host.as_str(), target.port), ("::1", 6379));
        assert_eq!(target.user(), "default");
        assert!(Target::parse("redis://host/x").is_err());
        assert!(Target::parse("redis://host?tls=1").is_err());
    }
}
