//! `stepwise:plugin/messages`: what was published on a bus since the run started, read from
//! the message sources named in the host's config (`[sources.*]` with `kind = "nats"`,
//! `"mqtt"`, `"rabbitmq"` or `"kafka"`) and granted to the plugin with the subjects it may
//! read (`subjects`). The host never joins a consumer group or queue of the application's,
//! acknowledges its messages, deletes or publishes anything: reading changes nothing the
//! real consumers see.
//!
//! How a source knows "since the run started" depends on what the broker keeps:
//! - **Replay by time** where the broker keeps history: a subject a JetStream stream keeps is
//!   read through an ephemeral consumer that starts at the run's creation and is deleted when
//!   the call ends (`nats.rs`), a RabbitMQ stream through a consumer at that offset in time
//!   (`amqp.rs`), a Kafka topic from the offsets its partitions give for that time
//!   (`kafka.rs`). Nothing lives in the host, so it survives restarts.
//! - **A tap** where it keeps none (core NATS subjects, MQTT topics, RabbitMQ exchanges): the
//!   host subscribes to every subject pattern that a grant names for the source and keeps a
//!   window of what arrives, bounded in age and bytes (`tap.rs`, driven by each backend's
//!   `Protocol`). A run the window cannot answer for in full gets `window-lost`.
//!
//! A call's budgets: `limit` messages (at most [`MAX_LIMIT`]), the result byte cap
//! (`sql_result_bytes`), [`MAX_SCANNED`] messages looked at, and the query time
//! (`sql_timeout_ms`). Passing one is a [`Violation`].

mod amqp;
mod kafka;
mod mqtt;
mod nats;
mod tap;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::HasData;

use super::recording::Tape;
use super::{HostFault, Violation};
use crate::bindings::messages::{Condition, Host, Message, MessagesError};
use crate::config::SourceConfig;
pub use tap::TapStats;
use tap::{Tap, Window};

/// The most messages one `find` may return.
pub const MAX_LIMIT: u32 = 1_000;
/// The most messages one `find` looks at, matching or not: a filter that matches nothing
/// costs this much at most.
pub const MAX_SCANNED: u64 = 10_000;
/// Connections to one source at once for replays.
const CONNECTIONS: usize = 4;
/// How long a connection may stay idle before it is closed rather than used again.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// How long a call waits for a connection; the host's time, not the plugin's.
const POOL_WAIT: Duration = Duration::from_secs(2);
/// The window a tap keeps per source unless its config says (`window_minutes`, `window_mib`).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_WINDOW_BYTES: usize = 64 << 20;

/// Why a replay (a JetStream consumer, a RabbitMQ stream's) could not go on.
#[derive(Debug)]
enum ReplayError {
    /// The server refused what was asked; the connection is still good.
    Refused(String),
    /// The connection failed; it is dropped.
    Connection(String),
}

impl From<String> for ReplayError {
    fn from(error: String) -> Self {
        ReplayError::Connection(error)
    }
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Refused(error) | ReplayError::Connection(error) => f.write_str(error),
        }
    }
}

/// Whether a source config is a message source: it names a `kind` of bus.
pub fn is_message_source(config: &SourceConfig) -> bool {
    config.kind.is_some()
}

/// Every configured message source, shared by all step calls; taps start when a grant first
/// names their subjects.
#[derive(Clone, Default)]
pub struct MessageSources {
    sources: Arc<HashMap<String, Arc<Source>>>,
}

struct Source {
    name: String,
    backend: Backend,
    window: Arc<Window>,
    /// Patterns a grant named, looked at once each: tapped, or kept by a stream.
    seen: Mutex<HashSet<String>>,
    tap: tokio::sync::OnceCell<Tap>,
}

/// What a source's kind reads it with.
enum Backend {
    Nats(NatsSource),
    Mqtt(mqtt::Target),
    Rabbit(RabbitSource),
    Kafka(KafkaSource),
}

/// A NATS server, with the connections that replays use.
struct NatsSource {
    target: nats::Target,
    pool: Pool<nats::Connection>,
}

/// A RabbitMQ broker, with the connections that stream replays use.
struct RabbitSource {
    target: amqp::Target,
    pool: Pool<amqp::Connection>,
}

/// Kafka brokers, with the client that replays use.
struct KafkaSource {
    target: kafka::Target,
    clients: kafka::Clients,
}

/// The connections to one source that calls take in turn, [`CONNECTIONS`] at most at once.
struct Pool<C> {
    idle: Mutex<Vec<(std::time::Instant, C)>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl<C: Pooled> Pool<C> {
    fn new() -> Pool<C> {
        Pool {
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS)),
        }
    }

    /// A slot, and in it an idle connection the server has surely not closed yet (a server
    /// closes a connection idle for minutes), or a new one from `open`; within
    /// [`POOL_WAIT`], the host's time, not the plugin's.
    async fn take<F: Future<Output = Result<C, String>>>(
        &self,
        open: impl FnOnce() -> F,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, C), String> {
        let slot = tokio::time::timeout(POOL_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| "no connection free within 2 s".to_owned())?
            .map_err(|error| error.to_string())?;
        let idle = {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            idle.retain(|(since, _)| since.elapsed() < IDLE_FOR);
            idle.pop()
        };
        let connection = match idle {
            Some((_, connection)) => connection,
            None => open().await?,
        };
        Ok((slot, connection))
    }

    /// Only a connection whose last exchange ended cleanly takes the next one.
    fn give_back(&self, connection: C) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if idle.len() < CONNECTIONS && connection.reusable() {
            idle.push((std::time::Instant::now(), connection));
        }
    }

    /// A replay's end: the connection goes back unless it failed, and the broker's refusal
    /// is the step's answer; `Err` is the connection's failure.
    fn settle(
        &self,
        connection: C,
        replayed: Result<(), ReplayError>,
    ) -> Result<Result<(), MessagesError>, String> {
        match replayed {
            Ok(()) => {
                self.give_back(connection);
                Ok(Ok(()))
            }
            Err(ReplayError::Refused(error)) => {
                self.give_back(connection);
                Ok(Err(MessagesError::QueryFailed(error)))
            }
            Err(ReplayError::Connection(error)) => Err(error),
        }
    }
}

/// A connection a [`Pool`] keeps.
trait Pooled {
    /// Whether it may take another call.
    fn reusable(&self) -> bool {
        true
    }
}

impl Pooled for nats::Connection {}

impl Pooled for amqp::Connection {
    fn reusable(&self) -> bool {
        self.reusable()
    }
}

impl Backend {
    fn new(kind: &str, url: &str) -> Result<Backend, String> {
        match kind {
            "nats" => Ok(Backend::Nats(NatsSource {
                target: nats::Target::parse(url)?,
                pool: Pool::new(),
            })),
            "mqtt" => Ok(Backend::Mqtt(mqtt::Target::parse(url)?)),
            "rabbitmq" => Ok(Backend::Rabbit(RabbitSource {
                target: amqp::Target::parse(url)?,
                pool: Pool::new(),
            })),
            "kafka" => Ok(Backend::Kafka(KafkaSource {
                target: kafka::Target::parse(url)?,
                clients: kafka::Clients::default(),
            })),
            other => Err(format!(
                "kind = {other:?} is not a message source this host reads (nats, mqtt, rabbitmq, kafka)"
            )),
        }
    }

    /// Whether `pattern` is a subject pattern in this kind's syntax.
    fn check_pattern(&self, pattern: &str) -> Result<(), String> {
        match self {
            Backend::Nats(_) => nats::check_pattern(pattern),
            Backend::Mqtt(_) => mqtt::check_pattern(pattern),
            Backend::Rabbit(_) => amqp::check_pattern(pattern),
            Backend::Kafka(_) => kafka::check_pattern(pattern),
        }
    }

    /// Whether the first pattern matches every subject the second does, in this kind's syntax.
    fn covers(&self) -> fn(&str, &str) -> bool {
        match self {
            Backend::Nats(_) => nats::covers,
            Backend::Mqtt(_) => mqtt::covers,
            Backend::Rabbit(_) => amqp::covers,
            Backend::Kafka(_) => kafka::covers,
        }
    }
}

impl MessageSources {
    /// Reads every message source's config without connecting.
    pub fn from_configs<'a>(
        configs: impl IntoIterator<Item = (&'a String, &'a SourceConfig)>,
    ) -> anyhow::Result<MessageSources> {
        let mut sources = HashMap::new();
        for (name, config) in configs {
            anyhow::ensure!(
                config.read_only,
                "source {name}: a message source is read-only (the host never publishes or acknowledges); remove read_only = false"
            );
            let backend = Backend::new(config.kind.as_deref().unwrap_or_default(), &config.url)
                .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
            sources.insert(
                name.clone(),
                Arc::new(Source {
                    name: name.clone(),
                    backend,
                    window: Arc::new(Window::new(config.window_bytes, config.window)),
                    seen: Mutex::default(),
                    tap: tokio::sync::OnceCell::new(),
                }),
            );
        }
        Ok(MessageSources {
            sources: Arc::new(sources),
        })
    }

    /// Makes the taps of `sources` cover `subjects` (a grant's), from now on: a pattern no
    /// stream keeps is subscribed to, on the source's tap connection. Returns at once; the
    /// subscribing goes on in the background, and a run that starts before it is confirmed
    /// is told its window is lost rather than answered from an incomplete one.
    pub fn tap(&self, sources: &[String], subjects: &[String]) {
        for (source, pattern) in self.new_patterns(sources, subjects) {
            tokio::spawn(async move { source.tap_pattern(&pattern).await });
        }
    }

    /// [`MessageSources::tap`], returning once the server has confirmed each new
    /// subscription, or after `within`: a host that starts taps them before it takes runs,
    /// and `stepwise dev` before its run starts.
    pub async fn tap_now(&self, sources: &[String], subjects: &[String], within: Duration) {
        // Spawned: a subscription whose wait times out here still goes on.
        let taps = self
            .new_patterns(sources, subjects)
            .into_iter()
            .map(|(source, pattern)| {
                tokio::spawn(async move {
                    if source.tap_pattern(&pattern).await {
                        source.window.until_confirmed(&pattern).await;
                    }
                })
            });
        if tokio::time::timeout(within, futures::future::join_all(taps))
            .await
            .is_err()
        {
            tracing::warn!(
                "message taps not confirmed within {} ms; runs started meanwhile may be told their window is lost",
                within.as_millis()
            );
        }
    }

    /// The (source, pattern) pairs among these never looked at before, now marked seen.
    fn new_patterns(&self, sources: &[String], subjects: &[String]) -> Vec<(Arc<Source>, String)> {
        let mut new = Vec::new();
        for source in sources.iter().filter_map(|name| self.sources.get(name)) {
            let mut seen = source
                .seen
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            for pattern in subjects {
                if source.backend.check_pattern(pattern).is_ok() && seen.insert(pattern.clone()) {
                    new.push((source.clone(), pattern.clone()));
                }
            }
        }
        new
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Each tap's figures, by source name.
    pub fn tap_stats(&self) -> Vec<(String, TapStats)> {
        let mut stats: Vec<_> = self
            .sources
            .iter()
            .map(|(name, source)| (name.clone(), source.window.stats()))
            .collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }

    /// Warns about a source that cannot be reached at start; the host starts anyway.
    pub async fn check_at_start(&self) {
        for (name, source) in self.sources.iter() {
            let within = Duration::from_secs(5);
            let reached = match &source.backend {
                Backend::Nats(server) => nats::Connection::open(&server.target, within)
                    .await
                    .map(drop),
                Backend::Mqtt(target) => target.check(within).await,
                Backend::Rabbit(broker) => amqp::Connection::open(&broker.target, within)
                    .await
                    .map(drop),
                Backend::Kafka(brokers) => brokers.clients.check(&brokers.target, within).await,
            };
            if let Err(error) = reached {
                tracing::warn!(source = %name, %error, "message source unreachable at start");
            }
        }
    }
}

impl Source {
    /// The step's call fails on the host's side: the source cannot be read now.
    fn unavailable(&self, error: impl std::fmt::Display) -> wasmtime::Error {
        wasmtime::Error::new(HostFault(format!(
            "message source {:?} unavailable: {error}",
            self.name
        )))
    }

    /// Subscribes the tap to `pattern` unless a stream keeps it or a wider pattern is tapped
    /// already; returns whether it subscribed.
    async fn tap_pattern(self: &Arc<Self>, pattern: &str) -> bool {
        // A pattern a stream keeps whole is replayed from the stream; tapping it too would
        // only fill the window.
        match &self.backend {
            Backend::Kafka(_) => return false,
            Backend::Rabbit(_)
                if matches!(amqp::subject(pattern), Ok(amqp::Subject::Stream(_))) =>
            {
                return false;
            }
            _ => {}
        }
        if let Backend::Nats(server) = &self.backend {
            match tokio::time::timeout(POOL_WAIT, server.stream_keeping(pattern)).await {
                Ok(Ok(Some(_))) => return false,
                Ok(Ok(None)) => {}
                Err(_) => {
                    tracing::warn!(source = %self.name, %pattern, "JetStream did not say within 2 s whether a stream keeps the subject; tapping it")
                }
                Ok(Err(error)) => {
                    tracing::warn!(source = %self.name, %pattern, %error, "could not ask JetStream whether a stream keeps the subject; tapping it")
                }
            }
        }
        if !self.window.add_pattern(pattern, self.backend.covers()) {
            return false;
        }
        let tap = self
            .tap
            .get_or_init(|| async {
                let (name, window) = (self.name.clone(), self.window.clone());
                match &self.backend {
                    Backend::Nats(server) => {
                        Tap::start(name, nats::TapProtocol(server.target.clone()), window)
                    }
                    Backend::Mqtt(target) => {
                        Tap::start(name, mqtt::TapProtocol(target.clone()), window)
                    }
                    Backend::Rabbit(broker) => {
                        Tap::start(name, amqp::TapProtocol::new(broker.target.clone()), window)
                    }
                    Backend::Kafka(_) => unreachable!("a Kafka topic is replayed, never tapped"),
                }
            })
            .await;
        tap.subscribe(pattern, &self.window).await;
        true
    }
}

impl NatsSource {
    /// The stream that keeps every subject `pattern` matches, if one does.
    async fn stream_keeping(&self, pattern: &str) -> Result<Option<nats::Stream>, String> {
        let (_slot, mut connection) = self.pool.take(|| self.open()).await?;
        let stream = nats::stream_keeping(&mut connection, pattern).await?;
        self.pool.give_back(connection);
        Ok(stream)
    }

    async fn open(&self) -> Result<nats::Connection, String> {
        nats::Connection::open(&self.target, POOL_WAIT).await
    }
}

/// State of the `messages` interface for one step call.
pub struct MessagesState {
    pub sources: MessageSources,
    /// Source names from the plugin's grant.
    pub granted: Vec<String>,
    /// Subject patterns from the plugin's grant.
    pub subjects: Vec<String>,
    /// When the run was created: `find` reads what was published from then on.
    pub since_ms: i64,
    pub max_result_bytes: usize,
    pub timeout: Duration,
    pub violation: Violation,
    /// Bytes of the messages this call looked at, for the allocator's trim at its end.
    pub read_bytes: u64,
    pub tape: Tape,
}

/// `HasData` marker so the generated `add_to_linker` hands the host `&mut MessagesState`.
pub struct MessagesCapability;

impl HasData for MessagesCapability {
    type Data<'a> = &'a mut MessagesState;
}

/// The messages one `find` keeps, within its budgets.
struct Selection<'a> {
    filter: &'a [Condition],
    limit: usize,
    max_bytes: usize,
    bytes: usize,
    scanned: u64,
    scanned_bytes: u64,
    found: Vec<Message>,
    /// The budget passed, if one was.
    exceeded: Option<String>,
}

impl<'a> Selection<'a> {
    fn new(filter: &'a [Condition], limit: usize, max_bytes: usize) -> Selection<'a> {
        Selection {
            filter,
            limit,
            max_bytes,
            bytes: 0,
            scanned: 0,
            scanned_bytes: 0,
            found: Vec::new(),
            exceeded: None,
        }
    }

    /// Looks at one message; returns whether to go on.
    fn offer(&mut self, message: MessageView<'_>) -> bool {
        self.scanned += 1;
        self.scanned_bytes += message.bytes() as u64;
        if self.filter.iter().all(|condition| message.meets(condition)) {
            let bytes = message.bytes();
            if self.bytes + bytes > self.max_bytes {
                self.exceeded = Some(format!(
                    "messages result size limit of {} bytes exceeded",
                    self.max_bytes
                ));
                return false;
            }
            self.bytes += bytes;
            self.found.push(message.to_owned());
            if self.found.len() == self.limit {
                return false;
            }
        }
        if self.scanned >= MAX_SCANNED {
            self.exceeded = Some(format!(
                "messages scan limit of {MAX_SCANNED} per call exceeded: narrow the subject, or look for a later message"
            ));
            return false;
        }
        true
    }
}

/// A message as a backend holds it, borrowed until the filter takes it.
struct MessageView<'a> {
    subject: &'a str,
    headers: &'a [(String, String)],
    payload: &'a [u8],
    published_at_ms: u64,
    position: u64,
}

impl MessageView<'_> {
    fn bytes(&self) -> usize {
        message_bytes(self.subject, self.headers, self.payload)
    }

    fn meets(&self, condition: &Condition) -> bool {
        match condition {
            Condition::Header(header) => self.headers.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case(&header.name) && *value == header.equals
            }),
            Condition::JsonField(field) => {
                serde_json::from_slice::<serde_json::Value>(self.payload)
                    .ok()
                    .and_then(|json| {
                        field_at(&json, &field.name).map(|value| match value {
                            serde_json::Value::String(text) => *text == field.equals,
                            other => {
                                serde_json::to_string(other).is_ok_and(|text| text == field.equals)
                            }
                        })
                    })
                    .unwrap_or(false)
            }
        }
    }

    fn to_owned(&self) -> Message {
        Message {
            subject: self.subject.to_owned(),
            payload: self.payload.to_vec(),
            headers: self.headers.to_vec(),
            published_at_ms: self.published_at_ms,
            position: self.position,
        }
    }
}

/// What a message counts against a byte budget: its subject, headers and payload.
fn message_bytes(subject: &str, headers: &[(String, String)], payload: &[u8]) -> usize {
    subject.len()
        + payload.len()
        + headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

/// The value at a dotted path (`user.id`, `items.0.sku`).
fn field_at<'a>(json: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(json, |value, key| match value {
        serde_json::Value::Object(object) => object.get(key),
        serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

type CallResult<T> = wasmtime::Result<Result<T, MessagesError>>;

impl MessagesState {
    fn limit(&self, limit: String) -> MessagesError {
        self.violation.record(limit.clone());
        MessagesError::LimitExceeded(limit)
    }

    async fn find_on(
        &self,
        source: &Source,
        subject: &str,
        selection: &mut Selection<'_>,
    ) -> CallResult<()> {
        match &source.backend {
            Backend::Nats(server) => self.find_on_nats(source, server, subject, selection).await,
            Backend::Rabbit(broker)
                if matches!(amqp::subject(subject), Ok(amqp::Subject::Stream(_))) =>
            {
                self.find_on_stream(source, broker, subject, selection)
                    .await
            }
            Backend::Kafka(brokers) => {
                self.find_on_topic(source, brokers, subject, selection)
                    .await
            }
            Backend::Mqtt(_) | Backend::Rabbit(_) => {
                Ok(self.find_in_window(source, subject, selection).await)
            }
        }
    }

    /// A subject a stream keeps is replayed from it, any other read from the tap's window.
    async fn find_on_nats(
        &self,
        source: &Source,
        server: &NatsSource,
        subject: &str,
        selection: &mut Selection<'_>,
    ) -> CallResult<()> {
        let (slot, mut connection) = server
            .pool
            .take(|| server.open())
            .await
            .map_err(|error| source.unavailable(error))?;
        let stream = match nats::stream_keeping(&mut connection, subject).await {
            Ok(stream) => stream,
            Err(error) => return Err(source.unavailable(error)),
        };
        let Some(stream) = stream else {
            server.pool.give_back(connection);
            drop(slot);
            return Ok(self.find_in_window(source, subject, selection).await);
        };
        // Limits of the stream's own (age, size, count) removed messages, and the oldest it
        // keeps is younger than the run: what came between is not known.
        if stream.first_sequence > 1
            && let Some(first_ms) = stream.first_ms
            && first_ms > self.since_ms
        {
            server.pool.give_back(connection);
            return Ok(Err(MessagesError::WindowLost(format!(
                "stream {} keeps messages only since {} (its limits removed older ones), after this run started at {}",
                stream.name,
                tap::rfc3339(first_ms),
                tap::rfc3339(self.since_ms)
            ))));
        }
        // Any message the server accepts is read (and let go unless the filter keeps it).
        let max_message = connection.max_payload + 4096;
        let replayed = nats::replay(
            &mut connection,
            &stream.name,
            subject,
            self.since_ms,
            max_message,
            |delivery, position| {
                selection.offer(MessageView {
                    subject: &delivery.subject,
                    headers: &delivery.headers,
                    payload: &delivery.payload,
                    published_at_ms: position.published_at_ns / 1_000_000,
                    position: position.stream_sequence,
                })
            },
        )
        .await;
        server
            .pool
            .settle(connection, replayed)
            .map_err(|error| source.unavailable(error))
    }

    /// Replays a RabbitMQ stream from the run's creation.
    async fn find_on_stream(
        &self,
        source: &Source,
        broker: &RabbitSource,
        stream: &str,
        selection: &mut Selection<'_>,
    ) -> CallResult<()> {
        let (_slot, mut connection) = broker
            .pool
            .take(|| amqp::Connection::open(&broker.target, POOL_WAIT))
            .await
            .map_err(|error| source.unavailable(error))?;
        let now = chrono::Utc::now().timestamp_millis() as u64;
        let replayed = amqp::replay(
            &mut connection,
            stream,
            self.since_ms,
            self.max_result_bytes,
            |message| {
                selection.offer(MessageView {
                    subject: &message.subject,
                    headers: message.headers,
                    payload: message.payload,
                    published_at_ms: message.published_at_ms.unwrap_or(now),
                    position: message.offset,
                })
            },
        )
        .await;
        broker
            .pool
            .settle(connection, replayed)
            .map_err(|error| source.unavailable(error))
    }

    /// Replays a Kafka topic from the run's creation.
    async fn find_on_topic(
        &self,
        source: &Source,
        brokers: &KafkaSource,
        topic: &str,
        selection: &mut Selection<'_>,
    ) -> CallResult<()> {
        if topic.ends_with('*') {
            return Ok(Err(MessagesError::QueryFailed(format!(
                "{topic:?}: a Kafka subject is one topic"
            ))));
        }
        let replayed = kafka::replay(
            &brokers.clients,
            &brokers.target,
            topic,
            self.since_ms,
            |record| {
                selection.offer(MessageView {
                    subject: topic,
                    headers: record.headers,
                    payload: record.payload,
                    published_at_ms: record.published_at_ms,
                    position: record.offset,
                })
            },
        )
        .await;
        match replayed {
            Ok(()) => Ok(Ok(())),
            Err(ReplayError::Refused(error)) => Ok(Err(MessagesError::QueryFailed(error))),
            Err(ReplayError::Connection(error)) => Err(source.unavailable(error)),
        }
    }

    async fn find_in_window(
        &self,
        source: &Source,
        subject: &str,
        selection: &mut Selection<'_>,
    ) -> Result<(), MessagesError> {
        // The filter may read the whole window: not on the host's own workers, where a
        // call's first poll runs, but on the call's thread, which this wait moves it to.
        tokio::task::yield_now().await;
        let now = chrono::Utc::now().timestamp_millis();
        let kept = source
            .window
            .since(subject, self.since_ms, now, source.backend.covers())
            .map_err(MessagesError::WindowLost)?;
        for message in kept {
            let view = MessageView {
                subject: &message.subject,
                headers: &message.headers,
                payload: &message.payload,
                published_at_ms: message.received_at_ms as u64,
                position: message.position,
            };
            if !selection.offer(view) {
                break;
            }
        }
        Ok(())
    }
}

impl Host for MessagesState {
    async fn find(
        &mut self,
        source: String,
        subject: String,
        filter: Vec<Condition>,
        limit: u32,
    ) -> CallResult<Vec<Message>> {
        let tape = self.tape.clone();
        if tape.is_off() {
            return self.find_live(source, subject, filter, limit).await;
        }
        let request = serde_json::json!({
            "source": source,
            "subject": subject,
            "filter": filter,
            "limit": limit,
        });
        tape.exchange(
            "messages.find",
            || request,
            self.find_live(source, subject, filter, limit),
        )
        .await
    }
}

impl MessagesState {
    async fn find_live(
        &mut self,
        source: String,
        subject: String,
        filter: Vec<Condition>,
        limit: u32,
    ) -> CallResult<Vec<Message>> {
        if !self.granted.contains(&source) {
            return Ok(Err(MessagesError::Denied(format!(
                "message source {source:?} is not granted to this plugin"
            ))));
        }
        let Some(target) = self.sources.sources.get(&source).cloned() else {
            return Ok(Err(MessagesError::Denied(format!(
                "message source {source:?} is not a message source configured on this host"
            ))));
        };
        let backend = &target.backend;
        if let Err(error) = backend.check_pattern(&subject) {
            return Ok(Err(MessagesError::QueryFailed(error)));
        }
        if !self.subjects.iter().any(|granted| {
            backend.check_pattern(granted).is_ok() && (backend.covers())(granted, &subject)
        }) {
            return Ok(Err(MessagesError::Denied(format!(
                "subject {subject:?} is not within the grant's subjects {:?}",
                self.subjects
            ))));
        }
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Ok(Err(MessagesError::QueryFailed(format!(
                "limit must be between 1 and {MAX_LIMIT}, not {limit}"
            ))));
        }
        let mut selection = Selection::new(&filter, limit as usize, self.max_result_bytes);
        let found = tokio::time::timeout(
            self.timeout,
            self.find_on(&target, &subject, &mut selection),
        )
        .await;
        self.read_bytes += selection.scanned_bytes;
        match found {
            Err(_elapsed) => Ok(Err(self.limit(format!(
                "messages time limit of {} ms exceeded",
                self.timeout.as_millis()
            )))),
            Ok(Err(fault)) => Err(fault),
            Ok(Ok(Err(error))) => Ok(Err(error)),
            Ok(Ok(Ok(()))) => match selection.exceeded {
                Some(limit) => Ok(Err(self.limit(limit))),
                None => Ok(Ok(selection.found)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::messages::FieldEquals;

    #[test]
    fn filters_read_json_fields_and_headers() {
        let headers = [("Trace-Id".to_owned(), "t-1".to_owned())];
        let view = MessageView {
            subject: "events.a",
            headers: &headers,
            payload: br#"{"event_id":"evt-1","n":3,"user":{"id":7},"items":[{"sku":"a"}]}"#,
            published_at_ms: 0,
            position: 1,
        };
        let field = |name: &str, equals: &str| {
            Condition::JsonField(FieldEquals {
                name: name.into(),
                equals: equals.into(),
            })
        };
        assert!(view.meets(&field("event_id", "evt-1")));
        assert!(!view.meets(&field("event_id", "evt-2")));
        assert!(view.meets(&field("n", "3")));
        assert!(view.meets(&field("user.id", "7")));
        assert!(view.meets(&field("items.0.sku", "a")));
        assert!(!view.meets(&field("missing", "null")));
        assert!(view.meets(&Condition::Header(FieldEquals {
            name: "trace-id".into(),
            equals: "t-1".into()
        })));
    }

    #[test]
    fn a_selection_stops_at_the_limit_the_bytes_or_the_scan_cap() {
        let view = || MessageView {
            subject: "s",
            headers: &[],
            payload: b"0123456789",
            published_at_ms: 0,
            position: 0,
        };
        let mut selection = Selection::new(&[], 2, 1_000);
        assert!(selection.offer(view()));
        assert!(!selection.offer(view()), "the limit reached");
        assert!(selection.exceeded.is_none());
        let mut selection = Selection::new(&[], 100, 20);
        assert!(selection.offer(view()));
        assert!(!selection.offer(view()));
        assert!(
            selection
                .exceeded
                .as_deref()
                .unwrap_or_default()
                .contains("size")
        );
        let never = [Condition::Header(FieldEquals {
            name: "x".into(),
            equals: "y".into(),
        })];
        let mut selection = Selection::new(&never, 1, 1_000);
        let mut offered = 0;
        while selection.offer(view()) {
            offered += 1;
        }
        assert_eq!(offered + 1, MAX_SCANNED);
        assert!(
            selection
                .exceeded
                .as_deref()
                .unwrap_or_default()
                .contains("scan")
        );
    }
}
