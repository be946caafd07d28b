//! The host's own AMQP 0-9-1 client, for RabbitMQ. A subject names one of two things:
//! - **a stream** (`events-log`, a name without `/`): a stream queue, replayed from the run's
//!   creation by a consumer with `x-stream-offset` at that time. Reading a stream removes
//!   nothing from it, and its acknowledgements only let more through to the host's own
//!   consumer. Before consuming, the host makes sure the queue is a stream: a consumer of a
//!   classic or quorum queue would take the application's messages.
//! - **an exchange's route** (`events/order.*`): the host's tap binds a queue of its own
//!   (exclusive, deleted with its connection, server-side ack-free) to the exchange with that
//!   binding key, and keeps what the exchange routes to it. The application's queues get
//!   their copies as before.
//!
//! Every frame is read within the frame size the host negotiated, and a message's body only
//! within a budget: a larger one is skipped unread.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufStream};

use super::ReplayError;
use super::tap::{self, Connected, KeepAlive, Kept, Protocol, Reading, TapWriter, Window};
use crate::capabilities::wire::{self, Bytes, Io};

/// A broker as its URL names it: `amqp://[user[:password]@]host[:port][/vhost]` (the vhost
/// percent-encoded, `%2F` for `/`, the default), or `amqps://` for TLS.
#[derive(Clone, Debug)]
pub(super) struct Target {
    host: String,
    port: u16,
    tls: bool,
    user: String,
    password: String,
    vhost: String,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let invalid = |why: &str| {
            format!("url must be amqp://[user:password@]host[:port][/vhost] or amqps://…: {why}")
        };
        let (tls, rest) =
            wire::after_scheme(url, "amqp", "amqps").ok_or_else(|| invalid("unknown scheme"))?;
        let default_port = if tls { 5671 } else { 5672 };
        let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        if vhost.contains(['/', '?', '#']) || authority.contains(['?', '#']) {
            return Err(invalid("one vhost, no query or fragment"));
        }
        let vhost = match vhost {
            "" => "/".to_owned(),
            vhost => percent_encoding::percent_decode_str(vhost)
                .decode_utf8()
                .map_err(|_| invalid("the vhost must be UTF-8 once decoded"))?
                .into_owned(),
        };
        let authority = wire::Authority::parse(authority).map_err(invalid)?;
        let (user, password) = match authority.userinfo {
            None => ("guest".to_owned(), "guest".to_owned()),
            Some((user, password)) => (user, password.unwrap_or_default()),
        };
        Ok(Target {
            port: authority.port.unwrap_or(default_port),
            host: authority.host,
            tls,
            user,
            password,
            vhost,
        })
    }
}

/// What a subject names.
#[derive(Debug, PartialEq)]
pub(super) enum Subject<'a> {
    Stream(&'a str),
    Route { exchange: &'a str, key: &'a str },
}

/// Reads a subject: `stream` or `exchange/binding.key`.
pub(super) fn subject(text: &str) -> Result<Subject<'_>, String> {
    let invalid = |why: &str| {
        Err(format!(
            "{text:?} is not a RabbitMQ subject (a stream's name, or exchange/binding.key): {why}"
        ))
    };
    if text.bytes().any(|byte| byte.is_ascii_control()) {
        return invalid("a control character");
    }
    let subject = match text.split_once('/') {
        None => Subject::Stream(text),
        Some((exchange, key)) => Subject::Route { exchange, key },
    };
    match subject {
        Subject::Stream(name) if name.is_empty() || name.len() > 255 => {
            invalid("a name of 1 to 255 bytes")
        }
        Subject::Route { exchange: "", .. } => {
            invalid("the default exchange routes to queues by name: name the stream or an exchange")
        }
        Subject::Route { exchange, key } if exchange.len() > 255 || key.len() > 255 => {
            invalid("names and keys of at most 255 bytes")
        }
        subject => Ok(subject),
    }
}

pub(super) fn check_pattern(pattern: &str) -> Result<(), String> {
    subject(pattern).map(drop)
}

/// Whether every subject that `inner` names is named by `outer`: the same stream, or the same
/// exchange with a binding key that covers the other as a topic exchange matches keys (`*`
/// one word, `#` none or more).
pub(super) fn covers(outer: &str, inner: &str) -> bool {
    match (subject(outer), subject(inner)) {
        (Ok(Subject::Stream(outer)), Ok(Subject::Stream(inner))) => outer == inner,
        (
            Ok(Subject::Route { exchange, key }),
            Ok(Subject::Route {
                exchange: inner_exchange,
                key: inner_key,
            }),
        ) => exchange == inner_exchange && key_covers(key, inner_key),
        _ => false,
    }
}

fn key_covers(outer: &str, inner: &str) -> bool {
    let outer: Vec<&str> = outer.split('.').collect();
    let inner: Vec<&str> = inner.split('.').collect();
    // covered[i][j]: outer's words from i cover inner's from j.
    let mut covered = vec![vec![false; inner.len() + 1]; outer.len() + 1];
    covered[outer.len()][inner.len()] = true;
    for i in (0..outer.len()).rev() {
        for j in (0..=inner.len()).rev() {
            covered[i][j] = match (outer[i], inner.get(j).copied()) {
                ("#", next) => covered[i + 1][j] || (next.is_some() && covered[i][j + 1]),
                (_, None | Some("#")) => false,
                ("*", Some(_)) => covered[i + 1][j + 1],
                (_, Some("*")) => false,
                (word, Some(other)) => word == other && covered[i + 1][j + 1],
            };
        }
    }
    covered[0][0]
}

// Frame types and the methods the host uses, as (class, method).
const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const START: (u16, u16) = (10, 10);
const TUNE: (u16, u16) = (10, 30);
const OPEN_OK: (u16, u16) = (10, 41);
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
const DECLARE_OK: (u16, u16) = (50, 11);
const BIND_OK: (u16, u16) = (50, 21);
const QOS_OK: (u16, u16) = (60, 11);
const CONSUME_OK: (u16, u16) = (60, 21);
const DELIVER: (u16, u16) = (60, 60);

/// The largest frame the host accepts; bodies come in frames of at most this.
const FRAME_MAX: u32 = 128 << 10;
/// Seconds between heartbeats each side of a tap's connection sends when it has nothing else
/// to say. A replay's connections ask for none: they wait idle in the pool between calls,
/// and a broker closes a connection whose heartbeats stop; each call has its time limit.
const HEARTBEAT_SECONDS: u16 = 30;

/// A method's arguments, written in AMQP's encoding.
#[derive(Default)]
struct Args(Vec<u8>);

impl Args {
    fn u8(mut self, value: u8) -> Args {
        self.0.push(value);
        self
    }
    fn u16(mut self, value: u16) -> Args {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    fn u32(mut self, value: u32) -> Args {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    fn u64(mut self, value: u64) -> Args {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    /// A short string: the caller keeps it within 255 bytes (subjects are checked).
    fn short(mut self, text: &str) -> Args {
        let bytes = &text.as_bytes()[..text.len().min(255)];
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }
    fn long(mut self, bytes: &[u8]) -> Args {
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }
    fn table(self, fields: &[(String, Field)]) -> Args {
        let mut table = Vec::new();
        for (name, value) in fields {
            let bytes = &name.as_bytes()[..name.len().min(255)];
            table.push(bytes.len() as u8);
            table.extend_from_slice(bytes);
            match value {
                Field::Text(text) => {
                    table.push(b'S');
                    table.extend_from_slice(&(text.len() as u32).to_be_bytes());
                    table.extend_from_slice(text.as_bytes());
                }
                Field::Integer(number) => {
                    table.push(b'l');
                    table.extend_from_slice(&number.to_be_bytes());
                }
                Field::Bool(value) => table.extend_from_slice(&[b't', u8::from(*value)]),
                Field::Timestamp(seconds) => {
                    table.push(b'T');
                    table.extend_from_slice(&seconds.to_be_bytes());
                }
            }
        }
        self.long(&table)
    }
}

/// A value the host puts in an argument table.
#[derive(Clone, Debug, PartialEq)]
enum Field {
    Text(String),
    Integer(i64),
    Bool(bool),
    Timestamp(u64),
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

fn method(channel: u16, (class, id): (u16, u16), args: Args) -> Vec<u8> {
    let mut payload = Vec::with_capacity(args.0.len() + 4);
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(&args.0);
    frame(METHOD, channel, &payload)
}

/// What AMQP reads of a frame beyond plain integers.
trait Fields<'a> {
    fn short(&mut self) -> Result<String, String>;
    fn long(&mut self) -> Result<&'a [u8], String>;
    /// A field table, its values as JSON.
    fn table(&mut self) -> Result<Vec<(String, serde_json::Value)>, String>;
    fn value(&mut self) -> Result<serde_json::Value, String>;
}

impl<'a> Fields<'a> for Bytes<'a> {
    fn short(&mut self) -> Result<String, String> {
        let length = self.u8()?;
        Ok(String::from_utf8_lossy(self.take(length.into())?).into_owned())
    }
    fn long(&mut self) -> Result<&'a [u8], String> {
        let length = self.u32()?;
        self.take(length as usize)
    }

    fn table(&mut self) -> Result<Vec<(String, serde_json::Value)>, String> {
        let mut table = Bytes(self.long()?);
        let mut fields = Vec::new();
        while !table.is_empty() {
            let name = table.short()?;
            fields.push((name, table.value()?));
        }
        Ok(fields)
    }

    fn value(&mut self) -> Result<serde_json::Value, String> {
        use serde_json::{Value, json};
        Ok(match self.u8()? {
            b't' => json!(self.u8()? != 0),
            b'b' => json!(self.u8()? as i8),
            b'B' => json!(self.u8()?),
            b's' => json!(self.u16()? as i16),
            b'u' => json!(self.u16()?),
            b'I' => json!(self.u32()? as i32),
            b'i' => json!(self.u32()?),
            b'l' => json!(self.u64()? as i64),
            b'T' => json!(self.u64()?),
            b'f' => json!(f32::from_bits(self.u32()?)),
            b'd' => json!(f64::from_bits(self.u64()?)),
            b'D' => {
                let scale = self.u8()?;
                let value = self.u32()? as i32;
                json!(format!("{}", value as f64 / 10f64.powi(scale.into())))
            }
            b'S' | b'x' => json!(String::from_utf8_lossy(self.long()?)),
            b'F' => Value::Object(self.table()?.into_iter().collect()),
            b'A' => {
                let mut items = Bytes(self.long()?);
                let mut values = Vec::new();
                while !items.is_empty() {
                    values.push(items.value()?);
                }
                Value::Array(values)
            }
            b'V' => Value::Null,
            other => return Err(format!("an unknown field type {:?}", other as char)),
        })
    }
}

/// One frame as read.
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    fn method(&self) -> Option<((u16, u16), Bytes<'_>)> {
        if self.kind != METHOD || self.payload.len() < 4 {
            return None;
        }
        let mut cursor = Bytes(&self.payload);
        let id = (cursor.u16().ok()?, cursor.u16().ok()?);
        Some((id, cursor))
    }
}

async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, String> {
    let io = |error: std::io::Error| error.to_string();
    let mut header = [0; 7];
    reader.read_exact(&mut header).await.map_err(io)?;
    let size = u32::from_be_bytes(header[3..7].try_into().expect("4 bytes"));
    if size > FRAME_MAX {
        return Err(format!(
            "a frame of {size} bytes, past the {FRAME_MAX} agreed"
        ));
    }
    let mut payload = vec![0; size as usize + 1];
    reader.read_exact(&mut payload).await.map_err(io)?;
    if payload.pop() != Some(FRAME_END) {
        return Err("a frame without its end".into());
    }
    Ok(Frame {
        kind: header[0],
        channel: u16::from_be_bytes([header[1], header[2]]),
        payload,
    })
}

/// A channel or connection the server closed, with its reply code and text.
#[derive(Debug)]
struct Closed {
    code: u16,
    text: String,
}

fn closed(mut args: Bytes<'_>) -> Closed {
    Closed {
        code: args.u16().unwrap_or_default(),
        text: args.short().unwrap_or_default(),
    }
}

/// A delivered message, with what the host reads of its properties.
struct Delivery {
    exchange: String,
    routing_key: String,
    headers: Vec<(String, String)>,
    /// The `timestamp` property, in seconds, when the publisher set it.
    timestamp: Option<u64>,
    /// `x-stream-offset`, for a stream's message.
    offset: Option<u64>,
    delivery_tag: u64,
    /// `None` when it was larger than the budget and skipped.
    body: Option<Vec<u8>>,
}

/// Reads a message's content header and body after its `basic.deliver`.
async fn read_content<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut deliver: Bytes<'_>,
    budget: usize,
) -> Result<Delivery, String> {
    deliver.short()?;
    let delivery_tag = deliver.u64()?;
    deliver.u8()?;
    let exchange = deliver.short()?;
    let routing_key = deliver.short()?;
    let header = read_content_frame(reader).await?;
    if header.kind != HEADER {
        return Err("a message without its content header".into());
    }
    let mut cursor = Bytes(&header.payload);
    cursor.u16()?;
    cursor.u16()?;
    let size = cursor.u64()?;
    let flags = cursor.u16()?;
    let (mut headers, mut timestamp, mut offset) = (Vec::new(), None, None);
    // The properties present, in the order of their flag bits from the highest.
    for bit in (2..16).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        match bit {
            15 => headers.push(("content-type".to_owned(), cursor.short()?)),
            14 => headers.push(("content-encoding".to_owned(), cursor.short()?)),
            13 => {
                for (name, value) in cursor.table()? {
                    if name == "x-stream-offset" {
                        offset = value.as_u64();
                        continue;
                    }
                    let text = match value {
                        serde_json::Value::String(text) => text,
                        other => other.to_string(),
                    };
                    headers.push((name, text));
                }
            }
            12 | 11 => {
                cursor.u8()?;
            }
            6 => timestamp = Some(cursor.u64()?),
            10 => headers.push(("correlation-id".to_owned(), cursor.short()?)),
            7 => headers.push(("message-id".to_owned(), cursor.short()?)),
            5 => headers.push(("type".to_owned(), cursor.short()?)),
            3 => headers.push(("app-id".to_owned(), cursor.short()?)),
            _ => {
                cursor.short()?;
            }
        }
    }
    let keep = size <= budget as u64;
    let mut body = Vec::with_capacity(if keep { size as usize } else { 0 });
    let mut read = 0u64;
    while read < size {
        let frame = read_content_frame(reader).await?;
        if frame.kind != BODY {
            return Err("a message whose body was cut short".into());
        }
        read += frame.payload.len() as u64;
        if keep {
            body.extend_from_slice(&frame.payload);
        }
    }
    Ok(Delivery {
        exchange,
        routing_key,
        headers,
        timestamp,
        offset,
        delivery_tag,
        body: keep.then_some(body),
    })
}

/// The next frame of a message's content: heartbeats may come between its frames.
async fn read_content_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, String> {
    loop {
        let frame = read_frame(reader).await?;
        if frame.kind != HEARTBEAT {
            return Ok(frame);
        }
    }
}

/// Says the protocol header, logs in and opens the vhost, with heartbeats every `heartbeat`
/// seconds at most (0: none); the connection and the heartbeat interval agreed.
async fn handshake(
    target: &Target,
    heartbeat: u16,
) -> Result<(BufStream<Box<dyn Io>>, Duration), String> {
    let wanted = heartbeat;
    let tcp = wire::connect(&target.host, target.port).await?;
    let io: Box<dyn Io> = if target.tls {
        wire::tls(tcp, &target.host).await?
    } else {
        Box::new(tcp)
    };
    let mut stream = BufStream::new(io);
    let write = async |stream: &mut BufStream<Box<dyn Io>>, bytes: &[u8]| {
        stream
            .write_all(bytes)
            .await
            .map_err(|error| error.to_string())?;
        stream.flush().await.map_err(|error| error.to_string())
    };
    write(&mut stream, b"AMQP\x00\x00\x09\x01").await?;
    let start = read_frame(&mut stream).await?;
    match start.method() {
        Some((START, mut args)) => {
            args.u8()?;
            args.u8()?;
            args.table()?;
            let mechanisms = String::from_utf8_lossy(args.long()?).into_owned();
            if !mechanisms.split(' ').any(|mechanism| mechanism == "PLAIN") {
                return Err(format!("the broker offers no PLAIN login ({mechanisms})"));
            }
        }
        _ => return Err("the server did not answer as an AMQP 0-9-1 broker".into()),
    }
    let mut login = vec![0];
    login.extend_from_slice(target.user.as_bytes());
    login.push(0);
    login.extend_from_slice(target.password.as_bytes());
    let properties = [
        ("product".to_owned(), Field::Text("stepwise".into())),
        (
            "connection_name".to_owned(),
            Field::Text("stepwise (reads only)".into()),
        ),
    ];
    let start_ok = Args::default()
        .table(&properties)
        .short("PLAIN")
        .long(&login)
        .short("en_US");
    write(&mut stream, &method(0, (10, 11), start_ok)).await?;
    let tune = read_frame(&mut stream).await?;
    let (channel_max, frame_max, heartbeat) = match tune.method() {
        Some((TUNE, mut args)) => (args.u16()?, args.u32()?, args.u16()?),
        Some((CONNECTION_CLOSE, args)) => {
            let closed = closed(args);
            return Err(format!("the broker refused the login: {}", closed.text));
        }
        _ => return Err("the broker did not tune the connection".into()),
    };
    let frame_max = if frame_max == 0 {
        FRAME_MAX
    } else {
        frame_max.min(FRAME_MAX)
    };
    let heartbeat = match (wanted, heartbeat) {
        (0, _) => 0,
        (wanted, 0) => wanted,
        (wanted, offered) => offered.min(wanted),
    };
    let tune_ok = Args::default()
        .u16(channel_max)
        .u32(frame_max)
        .u16(heartbeat);
    let open = Args::default().short(&target.vhost).short("").u8(0);
    let mut both = method(0, (10, 31), tune_ok);
    both.extend(method(0, (10, 40), open));
    write(&mut stream, &both).await?;
    let opened = read_frame(&mut stream).await?;
    match opened.method() {
        Some((OPEN_OK, _)) => Ok((stream, Duration::from_secs(heartbeat.into()))),
        Some((CONNECTION_CLOSE, args)) => Err(format!(
            "the broker refused vhost {:?}: {}",
            target.vhost,
            closed(args).text
        )),
        _ => Err("the broker did not open the vhost".into()),
    }
}

/// A connection for replays: one method at a time, each on a channel of its own (a channel
/// the broker closes on an error is not used again).
pub(super) struct Connection {
    stream: BufStream<Box<dyn Io>>,
    next_channel: u16,
    /// Streams this connection has found to be streams.
    streams: Vec<String>,
}

/// The most channels one connection opens before the pool replaces it.
const CHANNELS_PER_CONNECTION: u16 = 1_000;

impl Connection {
    pub(super) async fn open(target: &Target, timeout: Duration) -> Result<Connection, String> {
        let (stream, _) = tokio::time::timeout(timeout, handshake(target, 0))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))??;
        Ok(Connection {
            stream,
            next_channel: 1,
            streams: Vec::new(),
        })
    }

    /// Whether the pool may hand it out again.
    pub(super) fn reusable(&self) -> bool {
        self.next_channel < CHANNELS_PER_CONNECTION
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|error| error.to_string())?;
        self.stream.flush().await.map_err(|error| error.to_string())
    }

    /// The next method on `channel`: `Err(Refused)` when the broker closed the channel.
    async fn next_method(&mut self, channel: u16) -> Result<Frame, ReplayError> {
        loop {
            let frame = read_frame(&mut self.stream).await?;
            if frame.kind == HEARTBEAT {
                self.send(&frame_heartbeat()).await?;
                continue;
            }
            match frame.method() {
                Some((CONNECTION_CLOSE, args)) => {
                    return Err(ReplayError::Connection(format!(
                        "the broker closed the connection: {}",
                        closed(args).text
                    )));
                }
                Some((CHANNEL_CLOSE, args)) if frame.channel == channel => {
                    let closed = closed(args);
                    self.send(&method(channel, CHANNEL_CLOSE_OK, Args::default()))
                        .await?;
                    return Err(ReplayError::Refused(format!(
                        "{} ({})",
                        closed.text, closed.code
                    )));
                }
                _ if frame.channel == channel => return Ok(frame),
                // A late frame of a channel the host closed.
                _ => {}
            }
        }
    }

    /// Sends a method on `channel` and returns once the broker answers it with `expect`.
    async fn call(
        &mut self,
        channel: u16,
        request: Vec<u8>,
        expect: (u16, u16),
    ) -> Result<(), ReplayError> {
        self.send(&request).await?;
        loop {
            let frame = self.next_method(channel).await?;
            if frame.method().is_some_and(|(id, _)| id == expect) {
                return Ok(());
            }
        }
    }

    async fn open_channel(&mut self) -> Result<u16, ReplayError> {
        let channel = self.next_channel;
        self.next_channel += 1;
        let open = method(channel, (20, 10), Args::default().short(""));
        self.call(channel, open, CHANNEL_OPEN_OK).await?;
        Ok(channel)
    }

    async fn close_channel(&mut self, channel: u16) -> Result<(), ReplayError> {
        let close = Args::default().u16(200).short("").u16(0).u16(0);
        self.call(
            channel,
            method(channel, CHANNEL_CLOSE, close),
            CHANNEL_CLOSE_OK,
        )
        .await
    }

    /// Makes sure `name` is a stream queue without changing it. A passive declaration says
    /// whether it exists; a declaration as a stream with the same arguments as it has says
    /// whether it is one (the broker names the first argument that differs, with its value,
    /// and the host adds it until nothing differs, or the queue type does).
    async fn check_stream(&mut self, name: &str) -> Result<(), ReplayError> {
        if self.streams.iter().any(|known| known == name) {
            return Ok(());
        }
        let channel = self.open_channel().await?;
        let passive = Args::default()
            .u16(0)
            .short(name)
            .u8(0b0000_0001)
            .table(&[]);
        match self
            .call(channel, method(channel, (50, 10), passive), DECLARE_OK)
            .await
        {
            Ok(()) => self.close_channel(channel).await?,
            Err(ReplayError::Refused(error)) => {
                return Err(ReplayError::Refused(format!("no stream {name:?}: {error}")));
            }
            Err(error) => return Err(error),
        }
        let mut arguments = vec![("x-queue-type".to_owned(), Field::Text("stream".into()))];
        for _ in 0..32 {
            let channel = self.open_channel().await?;
            // Durable, as every stream is; not passive.
            let declare = Args::default()
                .u16(0)
                .short(name)
                .u8(0b0000_0010)
                .table(&arguments);
            match self
                .call(channel, method(channel, (50, 10), declare), DECLARE_OK)
                .await
            {
                Ok(()) => {
                    self.close_channel(channel).await?;
                    self.streams.push(name.to_owned());
                    return Ok(());
                }
                Err(ReplayError::Refused(error)) => match inequivalent(&error) {
                    Some((argument, value))
                        if argument.starts_with("x-")
                            && argument != "x-queue-type"
                            && !arguments.iter().any(|(known, _)| *known == argument) =>
                    {
                        arguments.push((argument, value));
                    }
                    _ => {
                        return Err(ReplayError::Refused(format!(
                            "{name:?} is not a stream queue, and only a stream is read without taking messages from its consumers: {error}"
                        )));
                    }
                },
                Err(error) => return Err(error),
            }
        }
        Err(ReplayError::Refused(format!(
            "could not tell whether {name:?} is a stream"
        )))
    }
}

/// The argument and its current value that a `PRECONDITION_FAILED` names: "inequivalent arg
/// 'x-max-age' for queue 'q' in vhost '/': received none but current is the value '7D' of
/// type 'longstr'".
fn inequivalent(error: &str) -> Option<(String, Field)> {
    let (_, rest) = error.split_once("inequivalent arg '")?;
    let (argument, rest) = rest.split_once('\'')?;
    let (_, rest) = rest.split_once("but current is the value '")?;
    let (value, rest) = rest.rsplit_once("' of type '")?;
    let kind = rest.split('\'').next()?;
    let field = match kind {
        "longstr" | "shortstr" => Field::Text(value.to_owned()),
        "bool" => Field::Bool(value == "true"),
        "signedint" | "long" | "short" | "byte" | "unsignedbyte" | "unsignedshort"
        | "unsignedint" => Field::Integer(value.parse().ok()?),
        _ => return None,
    };
    Some((argument.to_owned(), field))
}

fn frame_heartbeat() -> Vec<u8> {
    frame(HEARTBEAT, 0, &[])
}

/// How long a replay waits for the broker's next message before it takes the stream as read
/// to its end: a stream sends what it has without pause, and a message that comes later is
/// found by the next poll.
const CAUGHT_UP: Duration = Duration::from_millis(50);
/// Messages in flight to a replay, and how many it acknowledges at once (acknowledgements of
/// a stream's consumer only let more through; the stream keeps every message).
const PREFETCH: u16 = 512;

/// One message of a replay, for `each`.
pub(super) struct Replayed<'a> {
    pub subject: String,
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
    pub published_at_ms: Option<u64>,
    pub offset: u64,
}

/// Reads stream `name` from `since_ms` (to the second: a stream's time offsets are in
/// seconds), handing each message to `each` until it returns `false`, the stream has nothing
/// more, or a message is larger than `budget` (`Err(Refused)`).
pub(super) async fn replay(
    connection: &mut Connection,
    name: &str,
    since_ms: i64,
    budget: usize,
    mut each: impl FnMut(Replayed<'_>) -> bool,
) -> Result<(), ReplayError> {
    connection.check_stream(name).await?;
    let channel = connection.open_channel().await?;
    let qos = Args::default().u32(0).u16(PREFETCH).u8(0);
    connection
        .call(channel, method(channel, (60, 10), qos), QOS_OK)
        .await?;
    let tag = format!("stepwise-replay-{}", uuid::Uuid::now_v7().simple());
    let offset = [(
        "x-stream-offset".to_owned(),
        Field::Timestamp((since_ms.max(0) / 1000) as u64),
    )];
    let consume = Args::default()
        .u16(0)
        .short(name)
        .short(&tag)
        .u8(0)
        .table(&offset);
    connection
        .call(channel, method(channel, (60, 20), consume), CONSUME_OK)
        .await?;
    let mut unacknowledged = 0u16;
    let outcome = loop {
        let ready = tokio::time::timeout(CAUGHT_UP, connection.stream.fill_buf()).await;
        if ready.is_err() {
            break Ok(());
        }
        let frame = connection.next_method(channel).await?;
        let Some((DELIVER, args)) = frame.method() else {
            continue;
        };
        let delivery = read_content(&mut connection.stream, args, budget).await?;
        let Some(body) = &delivery.body else {
            break Err(ReplayError::Refused(format!(
                "a message on stream {name:?} is larger than the messages result size limit of {budget} bytes"
            )));
        };
        let go_on = each(Replayed {
            subject: name.to_owned(),
            headers: &delivery.headers,
            payload: body,
            published_at_ms: delivery.timestamp.map(|seconds| seconds * 1000),
            offset: delivery.offset.unwrap_or_default(),
        });
        unacknowledged += 1;
        if unacknowledged >= PREFETCH / 2 {
            let ack = Args::default().u64(delivery.delivery_tag).u8(1);
            connection.send(&method(channel, (60, 80), ack)).await?;
            unacknowledged = 0;
        }
        if !go_on {
            break Ok(());
        }
    };
    // Closing the channel ends its consumer; the stream keeps every message.
    connection.close_channel(channel).await?;
    outcome
}

/// What a tap says to RabbitMQ: a queue of its own, exclusive to its connection (the broker
/// deletes it with the connection) and consumed without acknowledgements, bound to each
/// exchange and key (its `queue.bind-ok` confirms it); every message routed there is kept.
pub(super) struct TapProtocol {
    target: Target,
    /// The live connection's queue.
    queue: Mutex<String>,
}

impl TapProtocol {
    pub(super) fn new(target: Target) -> TapProtocol {
        TapProtocol {
            target,
            queue: Mutex::default(),
        }
    }
}

/// The channel a tap's connection uses.
const TAP_CHANNEL: u16 = 1;

/// A tap connection's reading side, and the heartbeat interval agreed.
pub(super) struct TapReader {
    reader: Reading,
    heartbeat: Duration,
}

impl Protocol for TapProtocol {
    type Reader = TapReader;

    async fn connect(&self) -> Result<Connected<TapReader>, String> {
        let opened = async {
            let (stream, heartbeat) = handshake(&self.target, HEARTBEAT_SECONDS).await?;
            let mut connection = Connection {
                stream,
                next_channel: TAP_CHANNEL,
                streams: Vec::new(),
            };
            let channel = connection.open_channel().await.map_err(|e| e.to_string())?;
            let queue = format!("stepwise.tap.{}", uuid::Uuid::now_v7().simple());
            // Exclusive and auto-deleted, with no arguments.
            let declare = Args::default()
                .u16(0)
                .short(&queue)
                .u8(0b0000_1100)
                .table(&[]);
            connection
                .call(channel, method(channel, (50, 10), declare), DECLARE_OK)
                .await
                .map_err(|e| e.to_string())?;
            // Without acknowledgements, exclusive: the broker sends as fast as the host reads.
            let consume = Args::default()
                .u16(0)
                .short(&queue)
                .short("stepwise-tap")
                .u8(0b0000_0110)
                .table(&[]);
            connection
                .call(channel, method(channel, (60, 20), consume), CONSUME_OK)
                .await
                .map_err(|e| e.to_string())?;
            *self
                .queue
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = queue;
            Ok::<_, String>((connection.stream.into_inner(), heartbeat))
        };
        let (io, heartbeat) = opened.await?;
        let (reader, writer) = tap::split(io);
        Ok((TapReader { reader, heartbeat }, writer))
    }

    fn subscribe(&self, pattern: &str, _sid: u64) -> Vec<u8> {
        let Ok(Subject::Route { exchange, key }) = subject(pattern) else {
            return Vec::new();
        };
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let bind = Args::default()
            .u16(0)
            .short(&queue)
            .short(exchange)
            .short(key)
            .u8(0)
            .table(&[]);
        method(TAP_CHANNEL, (50, 20), bind)
    }

    async fn read(
        &self,
        TapReader {
            mut reader,
            heartbeat,
        }: TapReader,
        window: &Window,
        writer: &TapWriter,
    ) -> Result<(), String> {
        let mut alive = KeepAlive::new(heartbeat, frame_heartbeat());
        loop {
            alive.until_readable(&mut reader, writer).await?;
            let frame = read_frame(&mut reader).await?;
            let now = chrono::Utc::now().timestamp_millis();
            match frame.method() {
                Some((DELIVER, args)) => {
                    let delivery = read_content(&mut reader, args, window.max_bytes()).await?;
                    let Some(payload) = delivery.body else {
                        window.skipped(now);
                        continue;
                    };
                    window.keep(
                        Kept {
                            subject: format!("{}/{}", delivery.exchange, delivery.routing_key),
                            headers: delivery.headers,
                            payload,
                            received_at_ms: now,
                            position: 0,
                        },
                        None,
                        covers,
                    );
                }
                Some((BIND_OK, _)) => window.confirmed(now),
                Some((CHANNEL_CLOSE, args)) => {
                    // A bind the broker refused (no such exchange, or no permission) closes
                    // the channel: that pattern is not tapped, and the tap starts again.
                    let closed = closed(args);
                    let refused = window.next_unconfirmed();
                    tracing::warn!(
                        pattern = refused.as_deref().unwrap_or_default(),
                        error = %closed.text,
                        "message tap: the broker refused a binding"
                    );
                    if let Some(pattern) = refused {
                        window.refused(&pattern);
                    }
                    return Err(format!(
                        "the broker closed the tap's channel: {}",
                        closed.text
                    ));
                }
                Some((CONNECTION_CLOSE, args)) => {
                    return Err(format!(
                        "the broker closed the connection: {}",
                        closed(args).text
                    ));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_broker_credentials_and_vhost() {
        let target =
            Target::parse("amqp://reader:s%40cret@rabbit:5673/orders%2Fprod").expect("valid");
        assert_eq!((target.host.as_str(), target.port), ("rabbit", 5673));
        assert_eq!(
            (target.user.as_str(), target.password.as_str()),
            ("reader", "s@cret")
        );
        assert_eq!(target.vhost, "orders/prod");
        let target = Target::parse("amqps://rabbit").expect("valid");
        assert_eq!(
            (target.port, target.tls, target.vhost.as_str()),
            (5671, true, "/")
        );
        assert_eq!(target.user, "guest");
        for invalid in [
            "amqp://",
            "mqtt://rabbit",
            "amqp://rabbit/a/b",
            "amqp://rabbit?x=1",
        ] {
            assert!(Target::parse(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn subjects_name_a_stream_or_an_exchange_route() {
        assert_eq!(subject("orders-log"), Ok(Subject::Stream("orders-log")));
        assert_eq!(
            subject("orders/order.*"),
            Ok(Subject::Route {
                exchange: "orders",
                key: "order.*"
            })
        );
        for invalid in ["", "/orders", "a\rb"] {
            assert!(subject(invalid).is_err(), "{invalid:?}");
        }
        assert!(covers("orders/#", "orders/order.created"));
        assert!(covers("orders/#", "orders/"), "# matches no word");
        assert!(covers("orders/order.#", "orders/order.*.x"));
        assert!(covers("orders/*.created", "orders/order.created"));
        assert!(covers("orders/#.created", "orders/a.b.created"));
        assert!(covers("orders/*", "orders/*"));
        assert!(!covers("orders/*", "orders/#"));
        assert!(!covers("orders/order.*", "orders/order.a.b"));
        assert!(!covers("orders/#", "payments/x"));
        assert!(
            !covers("orders/#", "orders"),
            "a route does not cover a stream"
        );
        assert!(covers("orders-log", "orders-log"));
        assert!(!covers("orders-log", "orders-log2"));
    }

    #[test]
    fn an_inequivalent_argument_is_read_with_its_value() {
        let error = "PRECONDITION_FAILED - inequivalent arg 'x-max-age' for queue 's' in vhost '/': received none but current is the value '7D' of type 'longstr' (406)";
        assert_eq!(
            inequivalent(error),
            Some(("x-max-age".to_owned(), Field::Text("7D".into())))
        );
        let error = "PRECONDITION_FAILED - inequivalent arg 'x-max-length-bytes' for queue 's' in vhost '/': received none but current is the value '1000000000' of type 'signedint'";
        assert_eq!(
            inequivalent(error),
            Some((
                "x-max-length-bytes".to_owned(),
                Field::Integer(1_000_000_000)
            ))
        );
        let error = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'stream' of type 'longstr' but current is none";
        assert_eq!(inequivalent(error), None);
    }

    /// A delivery as the broker sends it: `basic.deliver`, the content header, one body frame.
    fn delivery(flags: u16, properties: &[u8], body: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let deliver = Args::default()
            .short("tag")
            .u64(7)
            .u8(0)
            .short("orders")
            .short("order.created");
        let mut header = Args::default()
            .u16(60)
            .u16(0)
            .u64(body.len() as u64)
            .u16(flags)
            .0;
        header.extend_from_slice(properties);
        let mut wire = frame(HEADER, 1, &header);
        wire.extend(frame(HEARTBEAT, 0, &[]));
        wire.extend(frame(BODY, 1, body));
        (deliver.0, wire)
    }

    #[tokio::test]
    async fn a_delivery_gives_its_properties_and_one_past_the_budget_is_skipped() {
        let headers = Args::default().table(&[
            ("trace-id".to_owned(), Field::Text("t-1".into())),
            ("x-stream-offset".to_owned(), Field::Integer(42)),
            ("attempt".to_owned(), Field::Integer(2)),
        ]);
        let properties = Args::default().short("application/json").0;
        let mut all = properties;
        all.extend(headers.0);
        all.extend(Args::default().u64(1_700_000_000).0);
        let flags = (1 << 15) | (1 << 13) | (1 << 6);
        let (deliver, wire) = delivery(flags, &all, br#"{"n":1}"#);
        let read = read_content(&mut &wire[..], Bytes(&deliver), 100)
            .await
            .expect("a delivery");
        assert_eq!(
            (read.exchange.as_str(), read.routing_key.as_str()),
            ("orders", "order.created")
        );
        assert_eq!(read.delivery_tag, 7);
        assert_eq!(read.offset, Some(42));
        assert_eq!(read.timestamp, Some(1_700_000_000));
        assert_eq!(
            read.headers,
            [
                ("content-type".to_owned(), "application/json".to_owned()),
                ("trace-id".to_owned(), "t-1".to_owned()),
                ("attempt".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(read.body.as_deref(), Some(&br#"{"n":1}"#[..]));
        let (deliver, wire) = delivery(0, &[], &[b'x'; 200]);
        let read = read_content(&mut &wire[..], Bytes(&deliver), 100)
            .await
            .expect("a delivery");
        assert!(read.body.is_none(), "past the budget: skipped");
    }
}
