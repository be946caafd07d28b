//! The host's own NATS client: the text protocol (`INFO`, `CONNECT`, `SUB`, `PUB`, `MSG` and
//! `HMSG`), read so that no message past a budget is ever held, and the JetStream API it needs
//! to replay a stream from a time: find the stream that keeps a subject, create an ephemeral
//! consumer (`deliver_policy = by_start_time`, `ack_policy = none`, in memory), pull from it,
//! delete it. Nothing is acknowledged, and no durable consumer or queue group is ever named.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufStream};

use super::ReplayError;
use super::tap::{self, Connected, Kept, Protocol, Reading, TapWriter, Window};
use crate::capabilities::wire::{self, Io, ReadError};

/// A NATS server as its URL names it: `nats://[user:password@|token@]host[:port]`, or
/// `tls://` to require TLS.
#[derive(Clone, Debug)]
pub(super) struct Target {
    host: String,
    port: u16,
    tls: bool,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let invalid = |why: &str| {
            format!("url must be nats://[user:password@|token@]host[:port] or tls://…: {why}")
        };
        let (tls, rest) =
            wire::after_scheme(url, "nats", "tls").ok_or_else(|| invalid("unknown scheme"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['?', '#', '/', ',']) {
            return Err(invalid("one server, no path, query or fragment"));
        }
        let authority = wire::Authority::parse(rest).map_err(invalid)?;
        let (user, password, token) = match authority.userinfo {
            None => (None, None, None),
            Some((user, Some(password))) => (Some(user), Some(password), None),
            Some((token, None)) => (None, None, Some(token)),
        };
        let (host, port) = (authority.host, authority.port.unwrap_or(4222));
        Ok(Target {
            host,
            port,
            tls,
            user,
            password,
            token,
        })
    }
}

/// One message as the server delivered it.
#[derive(Debug)]
pub(super) struct Delivery {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// The status of a headers-only message from JetStream (`404` no messages, `408` the
    /// pull expired, `409` …), from the headers' first line.
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// The longest protocol line the host reads (an `INFO`, a `MSG` header line, an `-ERR`).
const MAX_LINE: usize = 64 << 10;
/// The largest answer of the JetStream API the host reads (a stream's info with its subjects).
const MAX_API_ANSWER: usize = 1 << 20;

/// One connection to a server, past its `CONNECT`.
pub(super) struct Connection {
    stream: BufStream<Box<dyn Io>>,
    /// The largest payload the server accepts, from its `INFO`.
    pub max_payload: usize,
    next_sid: u64,
}

impl Connection {
    /// Connects, upgrades to TLS when the URL or the server asks, and says `CONNECT`; the
    /// server's `PONG` to the `PING` after it confirms that it accepted the credentials.
    pub(super) async fn open(target: &Target, timeout: Duration) -> Result<Connection, String> {
        tokio::time::timeout(timeout, Connection::open_now(target))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }

    pub(super) async fn open_now(target: &Target) -> Result<Connection, String> {
        let mut tcp = BufStream::new(wire::connect(&target.host, target.port).await?);
        let line = wire::read_line(&mut tcp, MAX_LINE)
            .await
            .map_err(|error| error.to_string())?;
        let info: Value = line
            .strip_prefix("INFO ")
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or("the server did not introduce itself as NATS")?;
        let tls_required = info["tls_required"].as_bool().unwrap_or(false);
        if target.tls && !tls_required && !info["tls_available"].as_bool().unwrap_or(false) {
            return Err("the URL asks for TLS (tls://), and the server offers none".into());
        }
        let io: Box<dyn Io> = if target.tls || tls_required {
            wire::tls(tcp.into_inner(), &target.host).await?
        } else {
            Box::new(tcp.into_inner())
        };
        let mut connect = json!({
            "verbose": false,
            "pedantic": false,
            "headers": true,
            "no_responders": true,
            "lang": "rust",
            "name": "stepwise",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
        });
        if let Some(user) = &target.user {
            connect["user"] = json!(user);
            connect["pass"] = json!(target.password);
        }
        if let Some(token) = &target.token {
            connect["auth_token"] = json!(token);
        }
        let mut connection = Connection {
            stream: BufStream::new(io),
            max_payload: info["max_payload"].as_u64().unwrap_or(1 << 20) as usize,
            next_sid: 0,
        };
        connection
            .write(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await?;
        loop {
            match connection
                .read(0)
                .await
                .map_err(|error| error.to_string())?
            {
                Frame::Pong => return Ok(connection),
                Frame::Error(error) => return Err(error),
                _ => continue,
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|error| error.to_string())?;
        self.stream.flush().await.map_err(|error| error.to_string())
    }

    /// Subscribes to `subject` (never in a queue group) and returns the subscription's id;
    /// with `max`, the server ends it by itself after that many messages.
    pub(super) async fn subscribe(
        &mut self,
        subject: &str,
        max: Option<u32>,
    ) -> Result<u64, String> {
        check_subject(subject)?;
        self.next_sid += 1;
        let sid = self.next_sid;
        let mut command = format!("SUB {subject} {sid}\r\n");
        if let Some(max) = max {
            command.push_str(&format!("UNSUB {sid} {max}\r\n"));
        }
        self.write(command.as_bytes()).await?;
        Ok(sid)
    }

    pub(super) async fn unsubscribe(&mut self, sid: u64) -> Result<(), String> {
        self.write(format!("UNSUB {sid}\r\n").as_bytes()).await
    }

    /// Publishes `body` to `subject` with replies going to `reply`. The host publishes only
    /// requests to the JetStream API (`$JS.API.…`), never to a subject of the application's.
    async fn publish_request(
        &mut self,
        subject: &str,
        reply: &str,
        body: &[u8],
    ) -> Result<(), String> {
        debug_assert!(subject.starts_with("$JS.API."));
        check_subject(subject)?;
        let mut command = format!("PUB {subject} {reply} {}\r\n", body.len()).into_bytes();
        command.extend_from_slice(body);
        command.extend_from_slice(b"\r\n");
        self.write(&command).await
    }

    /// Sends a JetStream API request and returns its JSON answer; an `error` in it is a
    /// refusal.
    pub(super) async fn api(&mut self, subject: &str, body: &Value) -> Result<Value, ReplayError> {
        let inbox = inbox();
        let sid = self.subscribe(&inbox, Some(1)).await?;
        self.publish_request(subject, &inbox, body.to_string().as_bytes())
            .await?;
        // Messages of an earlier pull may still arrive, up to the largest the server sends.
        let budget = MAX_API_ANSWER.max(self.max_payload + 4096);
        let delivery = self.next_message(sid, budget).await?;
        if delivery.status == Some(503) {
            return Err(ReplayError::Refused(
                "JetStream is not enabled on this server".into(),
            ));
        }
        let answer: Value = serde_json::from_slice(&delivery.payload).map_err(|_| {
            ReplayError::Connection(format!("{subject}: an answer that is not JSON"))
        })?;
        if let Some(error) = answer.get("error") {
            return Err(ReplayError::Refused(
                error["description"]
                    .as_str()
                    .unwrap_or("JetStream error")
                    .to_owned(),
            ));
        }
        Ok(answer)
    }

    /// The next message of subscription `sid` (see [`Connection::read`] for `budget`); an
    /// `-ERR` meanwhile (a permission the user lacks, say) means no answer is coming.
    async fn next_message(&mut self, sid: u64, budget: usize) -> Result<Delivery, ReplayError> {
        loop {
            match self
                .read(budget)
                .await
                .map_err(|error| ReplayError::Connection(error.to_string()))?
            {
                Frame::Message(delivery) if delivery.sid == sid => return Ok(delivery),
                Frame::Error(error) => return Err(ReplayError::Refused(error)),
                _ => {}
            }
        }
    }

    /// Reads the next frame, answering the server's `PING`s (see [`read_frame`]).
    pub(super) async fn read(&mut self, budget: usize) -> Result<Frame, ReadError> {
        let frame = read_frame(&mut self.stream, budget).await?;
        if let Frame::Ping = frame {
            self.stream.write_all(b"PONG\r\n").await?;
            self.stream.flush().await?;
        }
        Ok(frame)
    }
}

/// Reads the next frame; a message's payload and headers may take at most `budget` bytes, and
/// one past it is refused before it is read (the connection is then unusable).
async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    budget: usize,
) -> Result<Frame, ReadError> {
    let line = wire::read_line(reader, MAX_LINE).await?;
    let mut words = line.split_ascii_whitespace();
    let operation = words.next().unwrap_or_default().to_ascii_uppercase();
    match operation.as_str() {
        "PING" => Ok(Frame::Ping),
        "PONG" => Ok(Frame::Pong),
        "+OK" | "INFO" => Ok(Frame::Other),
        "-ERR" => Ok(Frame::Error(line[4..].trim().trim_matches('\'').to_owned())),
        "MSG" | "HMSG" => {
            let arguments: Vec<&str> = words.collect();
            let headers = operation == "HMSG";
            let numbers = if headers { 2 } else { 1 };
            if !(2 + numbers..=3 + numbers).contains(&arguments.len()) {
                return Err(ReadError::Protocol(format!("malformed {operation}")));
            }
            let number = |text: &str| {
                text.parse::<usize>()
                    .map_err(|_| ReadError::Protocol(format!("malformed {operation}")))
            };
            let total = number(arguments[arguments.len() - 1])?;
            let header_bytes = if headers {
                number(arguments[arguments.len() - 2])?
            } else {
                0
            };
            if header_bytes > total {
                return Err(ReadError::Protocol(format!("malformed {operation}")));
            }
            if total > budget {
                return Err(ReadError::TooBig);
            }
            let mut bytes = vec![0; total + 2];
            reader.read_exact(&mut bytes).await?;
            if !bytes.ends_with(b"\r\n") {
                return Err(ReadError::Protocol(format!("{operation} without its end")));
            }
            bytes.truncate(total);
            let payload = bytes.split_off(header_bytes);
            let (status, headers) = parse_headers(&bytes)?;
            let reply = (arguments.len() == 3 + numbers).then(|| arguments[2].to_owned());
            // A status comes from the server, never with a reply subject: a stored message
            // whose headers start like one is a message.
            let status = status.filter(|_| reply.is_none());
            Ok(Frame::Message(Delivery {
                subject: arguments[0].to_owned(),
                sid: number(arguments[1])? as u64,
                reply,
                status,
                headers,
                payload,
            }))
        }
        _ => Err(ReadError::Protocol(format!(
            "unknown operation {operation:?}"
        ))),
    }
}

pub(super) enum Frame {
    Message(Delivery),
    Ping,
    Pong,
    Error(String),
    /// `+OK`, `INFO`: nothing the host acts on.
    Other,
}

/// Whether `pattern` is a subject or wildcard pattern a step may ask for: `*` stands for one
/// token and `>` for the rest, each as a whole token, `>` last.
pub(super) fn check_pattern(pattern: &str) -> Result<(), String> {
    check_subject(pattern)?;
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if *token == ">" && index + 1 != tokens.len() {
            return Err(format!("{pattern:?}: > may only end a subject"));
        }
    }
    Ok(())
}

/// Whether every subject that `inner` matches is matched by `outer` (both NATS patterns).
pub(super) fn covers(outer: &str, inner: &str) -> bool {
    let mut inner_tokens = inner.split('.');
    for outer_token in outer.split('.') {
        if outer_token == ">" {
            return inner_tokens.next().is_some();
        }
        match inner_tokens.next() {
            None | Some(">") => return false,
            Some(token) if outer_token == "*" || token == outer_token => {}
            Some(_) => return false,
        }
    }
    inner_tokens.next().is_none()
}

/// A subscription or reply subject the host may put on a protocol line: no space or line end
/// (which would end the line and start another command), nothing empty.
fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty()
        || subject.len() > 1024
        || subject
            .bytes()
            .any(|byte| byte.is_ascii_whitespace() || byte.is_ascii_control())
        || subject.split('.').any(str::is_empty)
    {
        return Err(format!("{subject:?} is not a NATS subject"));
    }
    Ok(())
}

/// A reply subject of the host's own, new for each request.
fn inbox() -> String {
    format!("_INBOX.stepwise.{}", uuid::Uuid::now_v7().simple())
}

/// A message's headers, in their order.
type Headers = Vec<(String, String)>;

/// `NATS/1.0[ status[ description]]` and `Name: value` lines.
fn parse_headers(bytes: &[u8]) -> Result<(Option<u16>, Headers), ReadError> {
    if bytes.is_empty() {
        return Ok((None, Vec::new()));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ReadError::Protocol("headers that are not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let version = first
        .strip_prefix("NATS/1.0")
        .ok_or_else(|| ReadError::Protocol("headers without NATS/1.0".into()))?;
    let status = version
        .split_ascii_whitespace()
        .next()
        .and_then(|code| code.parse().ok());
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

/// What JetStream tells about a message it delivers, in its reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time ns>.<pending>`,
/// or with a domain and account hash first (`$JS.ACK.<domain>.<hash>.…`, 12 tokens or more).
#[derive(Debug, PartialEq)]
pub(super) struct Position {
    pub stream_sequence: u64,
    pub published_at_ns: u64,
    pub pending: u64,
}

pub(super) fn position(reply: &str) -> Option<Position> {
    let tokens: Vec<&str> = reply.split('.').collect();
    if tokens.len() < 9 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let numbers = if tokens.len() == 9 {
        &tokens[4..9]
    } else if tokens.len() >= 12 {
        &tokens[6..11]
    } else {
        return None;
    };
    Some(Position {
        stream_sequence: numbers[1].parse().ok()?,
        published_at_ns: numbers[3].parse().ok()?,
        pending: numbers[4].parse().ok()?,
    })
}

/// A stream that keeps a subject: its name, and its oldest message still kept.
pub(super) struct Stream {
    pub name: String,
    pub first_sequence: u64,
    pub first_ms: Option<i64>,
}

/// The JetStream stream that keeps every subject `pattern` matches, if one does. A server
/// without JetStream keeps none.
pub(super) async fn stream_keeping(
    connection: &mut Connection,
    pattern: &str,
) -> Result<Option<Stream>, String> {
    let names = match connection
        .api("$JS.API.STREAM.NAMES", &json!({ "subject": pattern }))
        .await
    {
        Ok(names) => names,
        Err(ReplayError::Refused(_)) => return Ok(None),
        Err(ReplayError::Connection(error)) => return Err(error),
    };
    for name in names["streams"].as_array().into_iter().flatten() {
        let Some(name) = name.as_str() else { continue };
        let info = connection
            .api(&format!("$JS.API.STREAM.INFO.{name}"), &json!({}))
            .await
            .map_err(|error| error.to_string())?;
        let keeps = info["config"]["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|subjects| covers(subjects, pattern));
        if keeps {
            let state = &info["state"];
            return Ok(Some(Stream {
                name: name.to_owned(),
                first_sequence: state["first_seq"].as_u64().unwrap_or(0),
                first_ms: state["first_ts"]
                    .as_str()
                    .and_then(|time| chrono::DateTime::parse_from_rfc3339(time).ok())
                    .map(|time| time.timestamp_millis()),
            }));
        }
    }
    Ok(None)
}

/// How long JetStream keeps a consumer of the host's that nobody reads: the host deletes it
/// when a read ends, and this bounds what a host that died meanwhile leaves behind.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(10);

/// Messages of `stream` on `subject` stored at or after `since_ms`, oldest first, handed one
/// at a time to `each` until it returns `false` or none is left. Each is read only if its
/// payload and headers take at most `max_message` bytes (a bigger one is an error, the
/// stream's later messages unread). The ephemeral consumer is deleted at the end, whatever
/// happened.
pub(super) async fn replay(
    connection: &mut Connection,
    stream: &str,
    subject: &str,
    since_ms: i64,
    max_message: usize,
    mut each: impl FnMut(Delivery, Position) -> bool,
) -> Result<(), ReplayError> {
    let start = chrono::DateTime::from_timestamp_millis(since_ms)
        .ok_or_else(|| ReplayError::Refused("the run's start is out of range".into()))?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let created = connection
        .api(
            &format!("$JS.API.CONSUMER.CREATE.{stream}"),
            &json!({
                "stream_name": stream,
                "config": {
                    "deliver_policy": "by_start_time",
                    "opt_start_time": start,
                    "ack_policy": "none",
                    "replay_policy": "instant",
                    "filter_subject": subject,
                    "inactive_threshold": CONSUMER_INACTIVE.as_nanos() as u64,
                    "mem_storage": true,
                    "num_replicas": 1,
                },
            }),
        )
        .await?;
    let name = created["name"]
        .as_str()
        .ok_or_else(|| {
            ReplayError::Connection("JetStream created a consumer without a name".into())
        })?
        .to_owned();
    let pending = created["num_pending"].as_u64().unwrap_or(0);
    let read = pull(connection, stream, &name, pending, max_message, &mut each).await;
    let deleted = connection
        .api(
            &format!("$JS.API.CONSUMER.DELETE.{stream}.{name}"),
            &json!({}),
        )
        .await;
    read?;
    deleted.map(|_| ())
}

/// Messages pulled in one request.
const BATCH: u64 = 256;

async fn pull(
    connection: &mut Connection,
    stream: &str,
    consumer: &str,
    mut pending: u64,
    max_message: usize,
    each: &mut impl FnMut(Delivery, Position) -> bool,
) -> Result<(), ReplayError> {
    let inbox = inbox();
    let sid = connection.subscribe(&inbox, None).await?;
    // Each batch may carry the largest message the server accepts, so that a big message
    // that no step wants is skipped rather than refused by the pull's `max_bytes`.
    let batch_bytes = connection.max_payload.max(1 << 20) as u64 + 4096;
    while pending > 0 {
        let batch = BATCH.min(pending);
        let request = json!({ "batch": batch, "max_bytes": batch_bytes, "no_wait": true });
        connection
            .publish_request(
                &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                &inbox,
                request.to_string().as_bytes(),
            )
            .await?;
        let mut delivered = 0;
        loop {
            let delivery = connection.next_message(sid, max_message).await?;
            if let Some(status) = delivery.status {
                // No message left now (404), the pull expired (408) or was cut short (409).
                if delivered == 0 && pending > 0 {
                    return Err(ReplayError::Refused(format!(
                        "JetStream ended the read with status {status} while {pending} messages were left"
                    )));
                }
                break;
            }
            let Some(position) = delivery.reply.as_deref().and_then(position) else {
                return Err(ReplayError::Connection(
                    "JetStream delivered a message without its position".into(),
                ));
            };
            pending = position.pending;
            delivered += 1;
            if !each(delivery, position) {
                connection.unsubscribe(sid).await?;
                return Ok(());
            }
            // A batch served in full ends without a status.
            if pending == 0 || delivered == batch {
                break;
            }
        }
    }
    Ok(connection.unsubscribe(sid).await?)
}

/// What a tap says to a NATS server: `SUB` and a `PING` for each pattern (its `PONG`
/// confirms the subscription), and every `MSG` and `HMSG` kept.
pub(super) struct TapProtocol(pub Target);

/// A tap connection's reading side, and the largest message its server accepts.
pub(super) struct TapReader {
    reader: Reading,
    budget: usize,
}

impl Protocol for TapProtocol {
    type Reader = TapReader;

    async fn connect(&self) -> Result<Connected<TapReader>, String> {
        let connection = Connection::open_now(&self.0).await?;
        let budget = connection.max_payload + 4096;
        let (reader, writer) = tap::split(connection.stream.into_inner());
        Ok((TapReader { reader, budget }, writer))
    }

    fn subscribe(&self, pattern: &str, sid: u64) -> Vec<u8> {
        format!("SUB {pattern} {sid}\r\nPING\r\n").into_bytes()
    }

    async fn read(
        &self,
        TapReader { mut reader, budget }: TapReader,
        window: &Window,
        writer: &TapWriter,
    ) -> Result<(), String> {
        loop {
            match read_frame(&mut reader, budget)
                .await
                .map_err(|error| error.to_string())?
            {
                Frame::Ping => {
                    if let Some(writer) = writer.lock().await.as_mut() {
                        writer
                            .write_all(b"PONG\r\n")
                            .await
                            .map_err(|error| error.to_string())?;
                        writer.flush().await.map_err(|error| error.to_string())?;
                    }
                }
                Frame::Pong => window.confirmed(chrono::Utc::now().timestamp_millis()),
                // A JetStream delivery to some consumer's inbox (a wide pattern matches inboxes
                // too) is not a publication.
                Frame::Message(delivery)
                    if delivery
                        .reply
                        .as_deref()
                        .is_some_and(|reply| reply.starts_with("$JS.ACK.")) => {}
                Frame::Message(delivery) => window.keep(
                    Kept {
                        subject: delivery.subject,
                        headers: delivery.headers,
                        payload: delivery.payload,
                        received_at_ms: chrono::Utc::now().timestamp_millis(),
                        position: 0,
                    },
                    Some(delivery.sid),
                    covers,
                ),
                Frame::Error(error) => {
                    tracing::warn!(%error, "message tap: the server refused a subscription");
                    if let Some(pattern) = error
                        .split_once("Permissions Violation for Subscription to ")
                        .map(|(_, rest)| rest.trim_matches(|c| c == '"' || c == '\''))
                    {
                        window.refused(pattern);
                    }
                }
                Frame::Other => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_server_and_credentials() {
        let target = Target::parse("nats://reader:p%40ss@bus.internal:4223").expect("url");
        assert_eq!(
            (target.host.as_str(), target.port, target.tls),
            ("bus.internal", 4223, false)
        );
        assert_eq!(
            (target.user.as_deref(), target.password.as_deref()),
            (Some("reader"), Some("p@ss"))
        );
        let target = Target::parse("tls://s3cret@[::1]").expect("url");
        assert_eq!(
            (target.host.as_str(), target.port, target.tls),
            ("::1", 4222, true)
        );
        assert_eq!(target.token.as_deref(), Some("s3cret"));
        assert!(Target::parse("nats://a:4222,b:4222").is_err());
        assert!(Target::parse("http://a").is_err());
    }

    #[test]
    fn patterns_cover_what_their_wildcards_match() {
        assert!(covers("events.>", "events.a"));
        assert!(covers("events.>", "events.a.b"));
        assert!(covers("events.>", "events.*"));
        assert!(covers("events.>", "events.>"));
        assert!(!covers("events.>", "events"));
        assert!(!covers("events.>", ">"));
        assert!(covers("events.*", "events.a"));
        assert!(!covers("events.*", "events.a.b"));
        assert!(!covers("events.*", "events.>"));
        assert!(covers("events.a", "events.a"));
        assert!(!covers("events.a", "events.*"));
        assert!(covers(">", "anything.at.all"));
        assert!(check_pattern("events.>").is_ok());
        assert!(check_pattern("events.>.a").is_err());
    }

    #[test]
    fn a_subject_cannot_carry_another_command() {
        assert!(check_subject("events.>").is_ok());
        assert!(check_subject("events.a\r\nPUB x 1").is_err());
        assert!(check_subject("events a").is_err());
        assert!(check_subject("events..a").is_err());
        assert!(check_subject("").is_err());
    }

    #[test]
    fn jetstream_reply_subjects_give_the_position() {
        let expected = Position {
            stream_sequence: 42,
            published_at_ns: 1_700_000_000_123_456_789,
            pending: 3,
        };
        assert_eq!(
            position("$JS.ACK.EVENTS.c1.1.42.7.1700000000123456789.3"),
            Some(expected)
        );
        assert_eq!(
            position("$JS.ACK.hub.ACCHASH.EVENTS.c1.1.42.7.1700000000123456789.3.rand"),
            Some(Position {
                stream_sequence: 42,
                published_at_ns: 1_700_000_000_123_456_789,
                pending: 3,
            })
        );
        assert_eq!(position("_INBOX.x"), None);
    }

    #[test]
    fn headers_give_status_and_fields() {
        let (status, headers) =
            parse_headers(b"NATS/1.0 404 No Messages\r\n\r\n").expect("headers");
        assert_eq!((status, headers.len()), (Some(404), 0));
        let (status, headers) =
            parse_headers(b"NATS/1.0\r\nTrace-Id: abc\r\nKind: a:b\r\n\r\n").expect("headers");
        assert_eq!(status, None);
        assert_eq!(
            headers,
            [
                ("Trace-Id".to_owned(), "abc".to_owned()),
                ("Kind".to_owned(), "a:b".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn a_message_past_the_budget_is_refused_before_it_is_read() {
        let frame = |wire: &'static [u8], budget| async move {
            read_frame(&mut tokio::io::BufReader::new(wire), budget).await
        };
        // Announced, not sent: refused at its header line.
        assert!(matches!(
            frame(b"MSG events.a 1 1000000000\r\n", 1 << 20).await,
            Err(ReadError::TooBig)
        ));
        let wire = b"HMSG events.a 7 reply.x 18 23\r\nNATS/1.0\r\nK: v\r\n\r\nhello\r\n";
        assert!(matches!(frame(wire, 22).await, Err(ReadError::TooBig)));
        let Frame::Message(delivery) = frame(wire, 23).await.expect("a message") else {
            panic!("not a message");
        };
        assert_eq!(
            (
                delivery.subject.as_str(),
                delivery.sid,
                delivery.reply.as_deref()
            ),
            ("events.a", 7, Some("reply.x"))
        );
        assert_eq!(delivery.payload, b"hello");
        assert_eq!(delivery.headers, [("K".to_owned(), "v".to_owned())]);
    }
}
