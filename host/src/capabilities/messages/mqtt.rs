//! The host's own MQTT 5 client, for a tap. MQTT brokers keep no history a subscriber could
//! replay, so every MQTT source is read through the host's tap. What it says to the broker
//! changes nothing the application's clients see:
//! - a clean start with no session kept after the connection (session expiry 0): nothing of
//!   the host's stays on the broker once it goes;
//! - subscriptions at QoS 0, so the broker waits for no acknowledgement of the host's;
//! - retained messages not sent on subscribing (retain handling 2): they were published
//!   before any run that could ask for them;
//! - shared subscriptions (`$share/…`) refused: joining one would take messages from the
//!   application's own subscribers.
//!
//! Each pattern has a subscription identifier of its own, so that a message two patterns match
//! is kept once, and every packet is read within a budget: a message larger than the tap's
//! whole window is skipped unread and counted as dropped.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::tap::{self, Connected, KeepAlive, Kept, Protocol, Reading, TapWriter, Window};
use crate::capabilities::wire::{self, Bytes, Io};

/// A broker as its URL names it: `mqtt://[user[:password]@]host[:port]`, or `mqtts://` for
/// TLS.
#[derive(Clone, Debug)]
pub(super) struct Target {
    host: String,
    port: u16,
    tls: bool,
    user: Option<String>,
    password: Option<String>,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let invalid = |why: &str| {
            format!("url must be mqtt://[user:password@]host[:port] or mqtts://…: {why}")
        };
        let (tls, rest) =
            wire::after_scheme(url, "mqtt", "mqtts").ok_or_else(|| invalid("unknown scheme"))?;
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['?', '#', '/']) {
            return Err(invalid("no path, query or fragment"));
        }
        let authority = wire::Authority::parse(rest).map_err(invalid)?;
        let (user, password) = match authority.userinfo {
            None => (None, None),
            Some((user, password)) => (Some(user), password),
        };
        Ok(Target {
            port: authority.port.unwrap_or(default_port),
            host: authority.host,
            tls,
            user,
            password,
        })
    }

    /// Connects and logs in; the broker's keep-alive, if it sets one.
    async fn open(&self) -> Result<(Box<dyn Io>, Option<u16>), String> {
        let tcp = wire::connect(&self.host, self.port).await?;
        let mut io: Box<dyn Io> = if self.tls {
            wire::tls(tcp, &self.host).await?
        } else {
            Box::new(tcp)
        };
        let client = format!("stepwise-tap-{}", uuid::Uuid::now_v7().simple());
        io.write_all(&connect_packet(self, &client))
            .await
            .map_err(|error| error.to_string())?;
        io.flush().await.map_err(|error| error.to_string())?;
        match read_packet(&mut io, 0).await? {
            Packet::ConnAck { reason, keep_alive } if reason < 0x80 => Ok((io, keep_alive)),
            Packet::ConnAck { reason, .. } => Err(format!(
                "the broker refused the connection: {}",
                reason_text(reason)
            )),
            _ => Err("the server did not answer as an MQTT 5 broker".into()),
        }
    }

    /// Whether the broker takes the host's login; the connection is closed at once.
    pub(super) async fn check(&self, within: Duration) -> Result<(), String> {
        let (mut io, _) = tokio::time::timeout(within, self.open())
            .await
            .map_err(|_| format!("no answer within {} ms", within.as_millis()))??;
        let _ = io.write_all(&[DISCONNECT, 0]).await;
        Ok(())
    }
}

/// How often the host tells the broker it is there, at most (the broker may ask for less).
const KEEP_ALIVE: u16 = 30;
/// The largest packet other than a message the host reads (acknowledgements, a disconnect's
/// reason).
const MAX_CONTROL: usize = 64 << 10;
const PUBLISH: u8 = 3;
const PINGREQ: u8 = 0xC0;
const DISCONNECT: u8 = 0xE0;
/// Subscription options: QoS 0, retained messages not sent (retain handling 2).
const OPTIONS: u8 = 0x20;

/// Whether `pattern` is a topic filter a step may ask for: `+` stands for one level and `#`
/// for the rest, each as a whole level, `#` last; no shared subscription.
pub(super) fn check_pattern(pattern: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("{pattern:?} is not an MQTT topic filter: {why}"));
    if pattern.is_empty() || pattern.len() > 65_535 {
        return invalid("empty, or past 65,535 bytes");
    }
    if pattern.contains('\0') {
        return invalid("a NUL character");
    }
    if pattern.starts_with("$share/") {
        return invalid(
            "a shared subscription would take messages from the application's subscribers",
        );
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (index, level) in levels.iter().enumerate() {
        if level.contains(['+', '#']) && level.len() > 1 {
            return invalid("+ and # stand for whole levels");
        }
        if *level == "#" && index + 1 != levels.len() {
            return invalid("# may only end a filter");
        }
    }
    Ok(())
}

/// Whether every topic that `inner` matches is matched by `outer` (both MQTT filters). A
/// wildcard at the first level does not match a topic that starts with `$` (the broker's own,
/// such as `$SYS/…`), as in MQTT.
pub(super) fn covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') && outer.starts_with(['+', '#']) {
        return false;
    }
    let mut inner_levels = inner.split('/');
    for outer_level in outer.split('/') {
        if outer_level == "#" {
            return true;
        }
        match inner_levels.next() {
            None | Some("#") => return false,
            Some("+") if outer_level == "+" => {}
            Some("+") => return false,
            Some(level) if outer_level == "+" || level == outer_level => {}
            Some(_) => return false,
        }
    }
    inner_levels.next().is_none()
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value % 128) as u8;
        value /= 128;
        out.push(if value > 0 { byte | 0x80 } else { byte });
        if value == 0 {
            return;
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn connect_packet(target: &Target, client: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, b"MQTT");
    body.push(5);
    // A clean start; no properties: the session ends with the connection, and the broker
    // sends every message with its topic (no aliases).
    let mut flags = 0x02;
    if target.user.is_some() {
        flags |= 0x80;
    }
    if target.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&KEEP_ALIVE.to_be_bytes());
    body.push(0);
    put_bytes(&mut body, client.as_bytes());
    for field in [&target.user, &target.password].into_iter().flatten() {
        put_bytes(&mut body, field.as_bytes());
    }
    packet(0x10, &body)
}

/// The packet identifier of subscription `sid`'s `SUBSCRIBE` (never 0).
fn packet_id(sid: u64) -> u16 {
    (sid % 65_535 + 1) as u16
}

/// What an MQTT message a broker delivered carries.
#[derive(Debug)]
struct Publish {
    topic: String,
    /// A retained message sent on subscribing rather than a publication.
    retained: bool,
    subscriptions: Vec<u64>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

#[derive(Debug)]
enum Packet {
    ConnAck {
        reason: u8,
        keep_alive: Option<u16>,
    },
    Publish(Publish),
    /// A message larger than the budget, skipped unread.
    Skipped,
    SubAck {
        packet_id: u16,
        reasons: Vec<u8>,
    },
    Disconnect {
        reason: u8,
        text: Option<String>,
    },
    Other,
}

/// What MQTT reads of a packet's body beyond plain integers.
trait Fields<'a> {
    fn varint(&mut self) -> Result<u64, String>;
    fn binary(&mut self) -> Result<&'a [u8], String>;
    fn text(&mut self) -> Result<String, String>;
    /// A property list: each read and handed to `each`.
    fn properties(&mut self, each: impl FnMut(Property)) -> Result<(), String>;
}

impl<'a> Fields<'a> for Bytes<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in [0, 7, 14, 21] {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a malformed variable-length integer".into())
    }

    fn binary(&mut self) -> Result<&'a [u8], String> {
        let length = self.u16()?;
        self.take(length.into())
    }

    fn text(&mut self) -> Result<String, String> {
        String::from_utf8(self.binary()?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }

    fn properties(&mut self, mut each: impl FnMut(Property)) -> Result<(), String> {
        let length = usize::try_from(self.varint()?).map_err(|error| error.to_string())?;
        let mut list = Bytes(self.take(length)?);
        while !list.is_empty() {
            let property = match list.u8()? {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                    list.u8()?;
                    Property::Other
                }
                0x13 => Property::KeepAlive(list.u16()?),
                0x21..=0x23 => {
                    list.u16()?;
                    Property::Other
                }
                0x02 | 0x11 | 0x18 | 0x27 => {
                    list.take(4)?;
                    Property::Other
                }
                0x0B => Property::Subscription(list.varint()?),
                0x03 => Property::ContentType(list.text()?),
                0x1F => Property::Reason(list.text()?),
                0x08 | 0x12 | 0x15 | 0x1A | 0x1C => {
                    list.text()?;
                    Property::Other
                }
                0x09 | 0x16 => {
                    list.binary()?;
                    Property::Other
                }
                0x26 => Property::User(list.text()?, list.text()?),
                other => return Err(format!("an unknown property {other:#04x}")),
            };
            each(property);
        }
        Ok(())
    }
}

enum Property {
    KeepAlive(u16),
    Subscription(u64),
    ContentType(String),
    User(String, String),
    Reason(String),
    Other,
}

/// Reads one packet; a message past `budget` bytes is skipped without being held.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    budget: usize,
) -> Result<Packet, String> {
    let io = |error: std::io::Error| error.to_string();
    let first = reader.read_u8().await.map_err(io)?;
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = reader.read_u8().await.map_err(io)?;
        length |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        if shift == 21 {
            return Err("a malformed packet length".into());
        }
    }
    let kind = first >> 4;
    if kind == PUBLISH && length > budget {
        tokio::io::copy(&mut reader.take(length as u64), &mut tokio::io::sink())
            .await
            .map_err(io)?;
        return Ok(Packet::Skipped);
    }
    if kind != PUBLISH && length > MAX_CONTROL {
        return Err(format!("a packet of {length} bytes past the limit"));
    }
    let mut bytes = vec![0; length];
    reader.read_exact(&mut bytes).await.map_err(io)?;
    let mut body = Bytes(&bytes);
    Ok(match kind {
        2 => {
            body.u8()?;
            let reason = body.u8()?;
            let mut keep_alive = None;
            if !body.is_empty() {
                body.properties(|property| {
                    if let Property::KeepAlive(seconds) = property {
                        keep_alive = Some(seconds);
                    }
                })?;
            }
            Packet::ConnAck { reason, keep_alive }
        }
        PUBLISH => {
            let topic = body.text()?;
            if (first >> 1) & 3 > 0 {
                // A packet identifier: the host subscribes at QoS 0, so none is expected.
                body.u16()?;
            }
            let (mut subscriptions, mut headers) = (Vec::new(), Vec::new());
            body.properties(|property| match property {
                Property::Subscription(id) => subscriptions.push(id),
                Property::ContentType(value) => headers.push(("content-type".to_owned(), value)),
                Property::User(name, value) => headers.push((name, value)),
                _ => {}
            })?;
            if topic.is_empty() {
                return Err("a message without its topic".into());
            }
            Packet::Publish(Publish {
                topic,
                retained: first & 1 == 1,
                subscriptions,
                headers,
                payload: body.0.to_vec(),
            })
        }
        9 => {
            let packet_id = body.u16()?;
            body.properties(|_| {})?;
            Packet::SubAck {
                packet_id,
                reasons: body.0.to_vec(),
            }
        }
        14 => {
            let reason = if body.is_empty() { 0 } else { body.u8()? };
            let mut text = None;
            if !body.is_empty() {
                body.properties(|property| {
                    if let Property::Reason(reason) = property {
                        text = Some(reason);
                    }
                })?;
            }
            Packet::Disconnect { reason, text }
        }
        _ => Packet::Other,
    })
}

/// A reason code's meaning, for the codes a tap can meet.
fn reason_text(reason: u8) -> String {
    let text = match reason {
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x84 => "MQTT 5 not supported",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x97 => "quota exceeded",
        0x9E => "shared subscriptions not supported",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "",
    };
    format!("{text} ({reason:#04x})")
}

/// What a tap says to an MQTT broker: a `SUBSCRIBE` for each pattern (its `SUBACK` confirms
/// it), `PINGREQ` within the keep-alive, and every message kept.
pub(super) struct TapProtocol(pub Target);

/// A tap connection's reading side, and the keep-alive its broker wants.
pub(super) struct TapReader {
    reader: Reading,
    keep_alive: Duration,
}

impl Protocol for TapProtocol {
    type Reader = TapReader;

    async fn connect(&self) -> Result<Connected<TapReader>, String> {
        let (io, keep_alive) = self.0.open().await?;
        let (reader, writer) = tap::split(io);
        let keep_alive = keep_alive.unwrap_or(KEEP_ALIVE).clamp(1, KEEP_ALIVE);
        let keep_alive = Duration::from_secs(keep_alive.into());
        Ok((TapReader { reader, keep_alive }, writer))
    }

    fn subscribe(&self, pattern: &str, sid: u64) -> Vec<u8> {
        let mut body = packet_id(sid).to_be_bytes().to_vec();
        let mut properties = vec![0x0B];
        // A subscription identifier is the tap's own id: they start at 1 and grow by one with
        // each subscription, far from the 268,435,455 an identifier can reach.
        put_varint(&mut properties, sid as usize);
        put_varint(&mut body, properties.len());
        body.extend_from_slice(&properties);
        put_bytes(&mut body, pattern.as_bytes());
        body.push(OPTIONS);
        packet(0x82, &body)
    }

    async fn read(
        &self,
        TapReader {
            mut reader,
            keep_alive,
        }: TapReader,
        window: &Window,
        writer: &TapWriter,
    ) -> Result<(), String> {
        // Half the keep-alive between pings; an answer to one must come within the next.
        let mut alive = KeepAlive::new(keep_alive, vec![PINGREQ, 0]);
        loop {
            alive.until_readable(&mut reader, writer).await?;
            let now = chrono::Utc::now().timestamp_millis();
            match read_packet(&mut reader, window.max_bytes()).await? {
                Packet::Publish(publish) if publish.retained => {}
                Packet::Publish(publish) => {
                    // The broker names every subscription that matched; the first one keeps it.
                    let sid = publish.subscriptions.iter().min().copied();
                    window.keep(
                        Kept {
                            subject: publish.topic,
                            headers: publish.headers,
                            payload: publish.payload,
                            received_at_ms: now,
                            position: 0,
                        },
                        sid,
                        covers,
                    );
                }
                Packet::Skipped => window.skipped(now),
                Packet::SubAck {
                    packet_id: id,
                    reasons,
                } => {
                    window.confirmed(now);
                    if reasons.iter().any(|reason| *reason >= 0x80) {
                        let refused = window.pattern_of(|sid| packet_id(sid) == id);
                        tracing::warn!(
                            pattern = refused.as_deref().unwrap_or_default(),
                            reason = reason_text(reasons[0]),
                            "message tap: the broker refused a subscription"
                        );
                        if let Some(pattern) = refused {
                            window.refused(&pattern);
                        }
                    }
                }
                Packet::Disconnect { reason, text } => {
                    return Err(format!(
                        "the broker disconnected the tap: {}{}",
                        reason_text(reason),
                        text.map(|text| format!(": {text}")).unwrap_or_default()
                    ));
                }
                Packet::ConnAck { .. } | Packet::Other => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_broker_and_credentials() {
        let target = Target::parse("mqtt://tap:s%40cret@broker:1884").expect("valid");
        assert_eq!((target.host.as_str(), target.port), ("broker", 1884));
        assert_eq!(target.user.as_deref(), Some("tap"));
        assert_eq!(target.password.as_deref(), Some("s@cret"));
        assert!(!target.tls);
        let target = Target::parse("mqtts://broker").expect("valid");
        assert_eq!((target.port, target.tls), (8883, true));
        for invalid in [
            "nats://broker",
            "mqtt://broker/topic",
            "mqtt://",
            "mqtt://b:x",
        ] {
            assert!(Target::parse(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn filters_cover_what_their_wildcards_match() {
        for valid in ["events/#", "events/+/collected", "#", "+", "a//b", "$SYS/#"] {
            assert!(check_pattern(valid).is_ok(), "{valid}");
        }
        for invalid in [
            "",
            "events/#/x",
            "events/a#",
            "ev+/x",
            "$share/g/events/#",
            "a\0b",
        ] {
            assert!(check_pattern(invalid).is_err(), "{invalid:?}");
        }
        assert!(covers("events/#", "events/a/b"));
        assert!(
            covers("events/#", "events"),
            "# matches the parent level too"
        );
        assert!(covers("events/+", "events/a"));
        assert!(covers("events/+", "events/+"));
        assert!(covers("#", "events/#"));
        assert!(!covers("events/+", "events/a/b"));
        assert!(!covers("events/+", "events/#"));
        assert!(!covers("events/a", "events/+"));
        assert!(!covers("events/a/#", "events/#"));
        assert!(
            !covers("#", "$SYS/broker"),
            "a wildcard does not reach $ topics"
        );
        assert!(!covers("+/broker", "$SYS/broker"));
        assert!(covers("$SYS/#", "$SYS/broker"));
    }

    /// A `PUBLISH` as a broker sends it: `topic`, QoS 0, with these properties.
    fn publish(topic: &str, properties: &[u8], payload: &[u8], retain: bool) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, topic.as_bytes());
        put_varint(&mut body, properties.len());
        body.extend_from_slice(properties);
        body.extend_from_slice(payload);
        packet(0x30 | u8::from(retain), &body)
    }

    #[tokio::test]
    async fn a_message_gives_its_topic_properties_and_payload_and_one_past_the_budget_is_skipped() {
        let mut properties = vec![0x0B];
        put_varint(&mut properties, 300);
        properties.push(0x26);
        put_bytes(&mut properties, b"trace-id");
        put_bytes(&mut properties, b"t-1");
        properties.push(0x03);
        put_bytes(&mut properties, b"application/json");
        properties.extend_from_slice(&[0x01, 1]);
        let mut wire = publish("events/a", &properties, br#"{"n":1}"#, false);
        wire.extend(publish("events/big", &[], &[b'x'; 5_000], false));
        wire.extend(publish("events/kept", &[], b"r", true));
        wire.extend([0x90, 4, 0, 7, 0, 0x87]);
        let mut reader = &wire[..];
        let Packet::Publish(message) = read_packet(&mut reader, 1_000).await.expect("a packet")
        else {
            panic!("not a message");
        };
        assert_eq!(message.topic, "events/a");
        assert_eq!(message.subscriptions, [300]);
        assert_eq!(
            message.headers,
            [
                ("trace-id".to_owned(), "t-1".to_owned()),
                ("content-type".to_owned(), "application/json".to_owned())
            ]
        );
        assert_eq!(message.payload, br#"{"n":1}"#);
        assert!(!message.retained);
        assert!(matches!(
            read_packet(&mut reader, 1_000).await,
            Ok(Packet::Skipped)
        ));
        assert!(matches!(
            read_packet(&mut reader, 1_000).await,
            Ok(Packet::Publish(Publish { retained: true, .. }))
        ));
        let Ok(Packet::SubAck { packet_id, reasons }) = read_packet(&mut reader, 1_000).await
        else {
            panic!("not a SUBACK");
        };
        assert_eq!((packet_id, reasons), (7, vec![0x87]));
        // A control packet is never read past its own limit.
        let mut huge = vec![0x90];
        put_varint(&mut huge, MAX_CONTROL + 1);
        assert!(read_packet(&mut &huge[..], usize::MAX).await.is_err());
    }

    #[test]
    fn a_subscription_names_its_identifier_and_asks_for_no_retained_messages() {
        let wire = TapProtocol(Target::parse("mqtt://b").expect("valid")).subscribe("events/#", 3);
        assert_eq!(
            wire,
            [
                0x82, 16, 0, 4, 2, 0x0B, 3, 0, 8, b'e', b'v', b'e', b'n', b't', b's', b'/', b'#',
                0x20
            ]
        );
    }
}
