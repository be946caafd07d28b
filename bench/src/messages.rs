//! Message sources: how long after a message is published a step that polls every 200 ms
//! finds it, per backend and mode (`--nats`: a JetStream replay and the tap of a core subject;
//! `--mqtt`: the tap; `--rabbitmq`: a stream replay and the tap of an exchange; `--kafka`: a
//! topic replay). The time runs from the publisher's acknowledgement (the broker has the
//! message) to the end of the attempt that found it.

use std::collections::BTreeMap;
use std::time::Duration;

use amqprs::channel::{
    BasicPublishArguments, Channel, ExchangeDeclareArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use anyhow::Context;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use serde_json::json;
use stepwise_host::config::SourceConfig;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM, epoch_millis, now_millis};
use crate::stats::{print_header, print_row};

const POLL_MS: u64 = 200;

/// The names the bench gives its subjects, streams, exchanges and topics.
const PREFIX: &str = "stepwise-bench";

/// The application's side of one broker: what it publishes with.
enum Publisher {
    Nats(stepwise_demo::nats::Publisher),
    Mqtt(stepwise_demo::mqtt::Publisher),
    /// The connection is held: the channel closes with it.
    Rabbit {
        channel: Channel,
        _connection: Connection,
    },
    Kafka(Client),
}

impl Publisher {
    /// Publishes `payload` where `subject` (a subject as a step names it) is read, and
    /// returns once the broker has it.
    async fn publish(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        match self {
            Publisher::Nats(nats) => nats.publish(subject, &[], payload).await?,
            Publisher::Mqtt(mqtt) => mqtt.publish(subject, &[], payload, false).await?,
            Publisher::Rabbit { channel, .. } => {
                let (exchange, key) = subject.split_once('/').unwrap_or(("", subject));
                channel
                    .basic_publish(
                        BasicProperties::default(),
                        payload.to_vec(),
                        BasicPublishArguments::new(exchange, key),
                    )
                    .await?;
                // A method answered after it on the same channel: the broker has routed it.
                channel.flow(true).await?;
            }
            Publisher::Kafka(client) => {
                let partition = client
                    .partition_client(subject, 0, UnknownTopicHandling::Retry)
                    .await?;
                let record = rskafka::record::Record {
                    key: None,
                    value: Some(payload.to_vec()),
                    headers: BTreeMap::new(),
                    timestamp: chrono::Utc::now(),
                };
                partition
                    .produce(vec![record], Compression::NoCompression)
                    .await?;
            }
        }
        Ok(())
    }
}

/// One broker of the scenario: its source, the subjects a grant names for it, and the
/// modes measured, each with the subject a step reads.
struct Bus {
    source: &'static str,
    kind: &'static str,
    url: String,
    subjects: Vec<String>,
    modes: Vec<(&'static str, String)>,
    publisher: Publisher,
}

async fn buses(options: &Options) -> anyhow::Result<Vec<Bus>> {
    let id = std::process::id();
    let mut buses = Vec::new();
    if let Some(url) = &options.nats {
        let mut nats = stepwise_demo::nats::Publisher::connect(url)
            .await
            .context("connecting to --nats")?;
        let stream = format!("STEPWISE_BENCH_{id}");
        let created = nats
            .request(
                &format!("$JS.API.STREAM.CREATE.{stream}"),
                &json!({"name": stream, "subjects": [format!("{PREFIX}.{id}.kept.>")], "storage": "memory", "max_age": 600_000_000_000u64}),
            )
            .await?;
        anyhow::ensure!(
            created.get("error").is_none(),
            "creating a stream: {created}"
        );
        buses.push(Bus {
            source: "nats",
            kind: "nats",
            url: url.clone(),
            subjects: vec![format!("{PREFIX}.{id}.>")],
            modes: vec![
                (
                    "NATS, JetStream replay",
                    format!("{PREFIX}.{id}.kept.collected"),
                ),
                (
                    "NATS, the tap of a core subject",
                    format!("{PREFIX}.{id}.core.collected"),
                ),
            ],
            publisher: Publisher::Nats(nats),
        });
    }
    if let Some(url) = &options.mqtt {
        let mqtt = stepwise_demo::mqtt::Publisher::connect(url)
            .await
            .context("connecting to --mqtt")?;
        buses.push(Bus {
            source: "mqtt",
            kind: "mqtt",
            url: url.clone(),
            subjects: vec![format!("{PREFIX}/{id}/#")],
            modes: vec![("MQTT, the tap", format!("{PREFIX}/{id}/collected"))],
            publisher: Publisher::Mqtt(mqtt),
        });
    }
    if let Some(url) = &options.rabbitmq {
        let (connection, channel) = rabbitmq(url).await.context("connecting to --rabbitmq")?;
        let stream = format!("{PREFIX}.{id}.stream");
        let exchange = format!("{PREFIX}.{id}");
        let mut arguments = FieldTable::new();
        arguments.insert(
            "x-queue-type".try_into().expect("a field name"),
            FieldValue::from("stream"),
        );
        channel
            .queue_declare(
                QueueDeclareArguments::new(&stream)
                    .durable(true)
                    .arguments(arguments)
                    .finish(),
            )
            .await?;
        channel
            .exchange_declare(ExchangeDeclareArguments::new(&exchange, "topic"))
            .await?;
        buses.push(Bus {
            source: "rabbitmq",
            kind: "rabbitmq",
            url: url.clone(),
            subjects: vec![stream.clone(), format!("{exchange}/#")],
            modes: vec![
                ("RabbitMQ, stream replay", stream),
                (
                    "RabbitMQ, the tap of an exchange",
                    format!("{exchange}/collected"),
                ),
            ],
            publisher: Publisher::Rabbit {
                channel,
                _connection: connection,
            },
        });
    }
    if let Some(url) = &options.kafka {
        let broker = url
            .strip_prefix("kafka://")
            .context("--kafka must be kafka://host:port")?
            .trim_end_matches('/');
        let client = ClientBuilder::new(vec![broker.to_owned()])
            .build()
            .await
            .context("connecting to --kafka")?;
        let topic = format!("{PREFIX}.{id}");
        client
            .controller_client()?
            .create_topic(&topic, 1, 1, 5_000)
            .await?;
        buses.push(Bus {
            source: "kafka",
            kind: "kafka",
            url: url.clone(),
            subjects: vec![topic.clone()],
            modes: vec![("Kafka, topic replay", topic)],
            publisher: Publisher::Kafka(client),
        });
    }
    anyhow::ensure!(
        !buses.is_empty(),
        "the messages scenario needs one of --nats, --mqtt, --rabbitmq, --kafka URL"
    );
    Ok(buses)
}

/// A connection and a channel to the broker at `url` (`amqp://host:port`, as guest).
pub async fn rabbitmq(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let address = url
        .strip_prefix("amqp://")
        .context("--rabbitmq must be amqp://host:port (guest)")?
        .trim_end_matches('/');
    let (host, port) = address.rsplit_once(':').context("host:port")?;
    let connection = Connection::open(&OpenConnectionArguments::new(
        host,
        port.parse()?,
        "guest",
        "guest",
    ))
    .await?;
    let channel = connection.open_channel(None).await?;
    Ok((connection, channel))
}

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let mut buses = buses(options).await?;
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start_tuned(&dir.path().join("data"), |settings| {
        for bus in &buses {
            settings.sources.insert(
                bus.source.to_owned(),
                SourceConfig {
                    kind: Some(bus.kind.to_owned()),
                    ..SourceConfig::new(bus.url.clone())
                },
            );
        }
    })
    .await?;
    let sources: Vec<&str> = buses.iter().map(|bus| bus.source).collect();
    let subjects: Vec<&String> = buses.iter().flat_map(|bus| &bus.subjects).collect();
    server
        .upload_with_grant(
            "reader",
            std::fs::read(MISBEHAVE_WASM)?,
            &format!("sql_sources = {sources:?}\nsubjects = {subjects:?}\n"),
        )
        .await?;
    for bus in &mut buses {
        for (mode, subject) in bus.modes.clone() {
            let mut latencies = Vec::new();
            for round in 0..options.repeat.max(5) {
                latencies.push(publish_to_found(&server, bus, &subject, round).await?);
            }
            print_header(&format!(
                "messages: publish → found, a step polling every {POLL_MS} ms ({mode})"
            ));
            print_row(
                "publish acknowledged → attempt that found it ended",
                "ms",
                &latencies,
            );
        }
    }
    clean_up(&mut buses).await;
    Ok(())
}

/// Removes what the scenario made on the brokers (a Kafka topic stays: `rskafka` deletes
/// none).
async fn clean_up(buses: &mut [Bus]) {
    for bus in buses {
        match &mut bus.publisher {
            Publisher::Nats(nats) => {
                let stream = format!("STEPWISE_BENCH_{}", std::process::id());
                let _ = nats
                    .request(&format!("$JS.API.STREAM.DELETE.{stream}"), &json!({}))
                    .await;
            }
            Publisher::Rabbit { channel, .. } => {
                let stream = format!("{PREFIX}.{}.stream", std::process::id());
                let _ = channel
                    .queue_delete(QueueDeleteArguments::new(&stream))
                    .await;
            }
            Publisher::Mqtt(_) | Publisher::Kafka(_) => {}
        }
    }
}

/// Starts a run whose step looks for one event every 200 ms, publishes the event at a moment
/// spread over the poll interval, and returns how long after the publish the attempt that
/// found it ended.
async fn publish_to_found(
    server: &BenchServer,
    bus: &mut Bus,
    subject: &str,
    round: usize,
) -> anyhow::Result<f64> {
    let event = format!("evt-{}-{round}", now_millis());
    let step = json!({"action": "messages", "source": bus.source, "subject": subject, "where": [["json", "event_id", event]], "expect": 1});
    let id = server
        .trigger(&json!({"plugin": "reader", "poll_interval_ms": POLL_MS, "params": {"steps": {"first": step}}}))
        .await?;
    // Rounds publish at different points of the poll interval, so that the median is the
    // interval's average wait and not one phase of it. The first wait is past a second: a
    // RabbitMQ stream's time offsets are whole seconds.
    let offset = (round as u64 * 37) % POLL_MS;
    tokio::time::sleep(Duration::from_millis(1_000 + offset)).await;
    bus.publisher
        .publish(subject, json!({"event_id": event}).to_string().as_bytes())
        .await?;
    let published = now_millis();
    let run = server
        .wait_for(&id, |run| {
            !matches!(run["status"].as_str(), Some("queued" | "running"))
        })
        .await?;
    anyhow::ensure!(
        run["status"] == "passed",
        "the reading run ended {}: {}",
        run["status"],
        run["steps"][0]["message"]
    );
    let attempts = server.attempts(&id).await?;
    let found = attempts.last().context("no attempt")?;
    let ended = epoch_millis(&found["started_at"])? + found["duration_ms"].as_f64().unwrap_or(0.0);
    Ok(ended - published)
}
