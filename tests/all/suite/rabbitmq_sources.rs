//! RabbitMQ message sources against a real broker (`STEPWISE_TEST_RABBITMQ_URL`), with an
//! application's side written with another client (`amqprs`): a stream is replayed from the
//! run's creation and keeps every message, with no consumer of the host's left on it; an
//! exchange's route is answered from the host's tap while the application's own queue still
//! gets every message; a classic queue named as a stream is refused untouched; a grant bounds
//! the subjects; the window's bounds hold; a restart keeps replays and makes the tap say its
//! window is lost.

use amqprs::channel::{
    BasicPublishArguments, Channel, ExchangeDeclareArguments, ExchangeDeleteArguments,
    QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use serde_json::{Value, json};

use crate::support::{
    assert_failed_with, assert_find_fails, bus_server, find_step, found, rabbitmq_url, tap_figure,
    trigger_find, unique_name,
};

/// The stream, exchange or queue name of one test.
fn name(test: &str) -> String {
    format!("stepwise-test.{}", unique_name(test))
}

/// The application's side: a connection and a channel to the broker at `url`
/// (`amqp://host:port`, guest).
async fn application(url: &str) -> (Connection, Channel) {
    let address = url
        .strip_prefix("amqp://")
        .expect("an amqp:// URL")
        .trim_end_matches('/');
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let connection = Connection::open(&OpenConnectionArguments::new(
        host,
        port.parse().expect("a port"),
        "guest",
        "guest",
    ))
    .await
    .expect("connecting to RabbitMQ");
    let channel = connection.open_channel(None).await.expect("a channel");
    (connection, channel)
}

fn table(fields: &[(&str, FieldValue)]) -> FieldTable {
    let mut table = FieldTable::new();
    for (name, value) in fields {
        table.insert((*name).try_into().expect("a field name"), value.clone());
    }
    table
}

/// A stream with a retention argument of its own (which the host must carry when it checks
/// that the queue is a stream).
async fn declare_stream(channel: &Channel, stream: &str) {
    let arguments = table(&[
        ("x-queue-type", FieldValue::from("stream")),
        ("x-max-age", FieldValue::from("1h")),
    ]);
    channel
        .queue_declare(
            QueueDeclareArguments::new(stream)
                .durable(true)
                .arguments(arguments)
                .finish(),
        )
        .await
        .expect("declaring a stream");
}

/// Publishes and returns once the broker has routed it: a method answered after it on the
/// same channel comes after the publication.
async fn publish(
    channel: &Channel,
    exchange: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut properties = BasicProperties::default();
    if !headers.is_empty() {
        let fields: Vec<(&str, FieldValue)> = headers
            .iter()
            .map(|(name, value)| (*name, FieldValue::from(*value)))
            .collect();
        properties.with_headers(table(&fields));
    }
    channel
        .basic_publish(
            properties.finish(),
            body.to_vec(),
            BasicPublishArguments::new(exchange, key),
        )
        .await
        .expect("publishing");
    channel
        .flow(true)
        .await
        .expect("a round trip after publishing");
}

/// A queue's consumers and messages, by a passive declaration (the broker's own count).
async fn consumers_and_messages(channel: &Channel, queue: &str) -> (u32, u32) {
    let (_, messages, consumers) = channel
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .expect("a passive declaration")
        .expect("an answer");
    (consumers, messages)
}

/// Waits for the clock's next second: a stream's time offsets are whole seconds, so a message
/// published in the second a run starts in may be replayed to it.
async fn next_second() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    let start = now();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while now() == start && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_stream_is_replayed_from_the_run_start_and_keeps_every_message() {
    let Some(url) = rabbitmq_url() else {
        return;
    };
    let stream = name("replay");
    let (_connection, channel) = application(&url).await;
    declare_stream(&channel, &stream).await;
    publish(&channel, "", &stream, &[], br#"{"event_id":"evt-0"}"#).await;
    next_second().await;
    let server = bus_server("rabbitmq", &url, &format!("\"{stream}\""), 64).await;

    let id = trigger_find(&server, find_step(&stream, json!([]), 1)).await;
    publish(
        &channel,
        "",
        &stream,
        &[("trace-id", "t-1")],
        br#"{"event_id":"evt-1"}"#,
    )
    .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    assert_eq!(
        messages.len(),
        1,
        "only what came after the run was created: {messages:#?}"
    );
    assert_eq!(messages[0]["text"], r#"{"event_id":"evt-1"}"#);
    assert_eq!(messages[0]["subject"], stream.as_str());
    assert_eq!(messages[0]["position"], 1, "the stream offset");
    assert_eq!(messages[0]["headers"], json!([["trace-id", "t-1"]]));

    // Filters are the host's; each run finds the one message meant for it.
    let filters = [
        (json!([["json", "event_id", "evt-2"]]), "evt-2"),
        (json!([["header", "Trace-Id", "t-3"]]), "evt-3"),
    ];
    let mut ids = Vec::new();
    for (conditions, _) in &filters {
        ids.push(trigger_find(&server, find_step(&stream, conditions.clone(), 1)).await);
    }
    for (event, trace) in [("evt-2", "t-2"), ("evt-3", "t-3")] {
        let payload = format!(r#"{{"event_id":"{event}"}}"#);
        publish(
            &channel,
            "",
            &stream,
            &[("trace-id", trace)],
            payload.as_bytes(),
        )
        .await;
    }
    for ((conditions, event), id) in filters.iter().zip(&ids) {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "passed", "{conditions}: {run:#}");
        let messages = found(&run);
        assert_eq!(messages.len(), 1, "{conditions}: {messages:#?}");
        assert_eq!(messages[0]["text"], format!(r#"{{"event_id":"{event}"}}"#));
    }
    // No consumer of the host's is left on the stream.
    assert_eq!(consumers_and_messages(&channel, &stream).await.0, 0);
    channel
        .queue_delete(QueueDeleteArguments::new(&stream))
        .await
        .expect("deleting the stream");
}

#[tokio::test]
async fn an_exchange_route_is_answered_from_the_tap_and_the_application_queue_misses_nothing() {
    let Some(url) = rabbitmq_url() else {
        return;
    };
    let exchange = name("tap");
    let queue = format!("{exchange}.app");
    let (_connection, channel) = application(&url).await;
    channel
        .exchange_declare(ExchangeDeclareArguments::new(&exchange, "topic"))
        .await
        .expect("declaring an exchange");
    channel
        .queue_declare(QueueDeclareArguments::new(&queue))
        .await
        .expect("declaring the application's queue");
    channel
        .queue_bind(QueueBindArguments::new(&queue, &exchange, "#"))
        .await
        .expect("binding it");
    let server = bus_server("rabbitmq", &url, &format!("\"{exchange}/#\""), 64).await;
    publish(
        &channel,
        &exchange,
        "order.created",
        &[],
        br#"{"event_id":"evt-0"}"#,
    )
    .await;

    let id = trigger_find(
        &server,
        find_step(
            &format!("{exchange}/order.*"),
            json!([["json", "event_id", "evt-1"]]),
            1,
        ),
    )
    .await;
    publish(
        &channel,
        &exchange,
        "payment.created",
        &[],
        br#"{"event_id":"evt-2"}"#,
    )
    .await;
    publish(
        &channel,
        &exchange,
        "order.created",
        &[("kind", "collected")],
        br#"{"event_id":"evt-1"}"#,
    )
    .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0]["text"], r#"{"event_id":"evt-1"}"#);
    assert_eq!(messages[0]["subject"], format!("{exchange}/order.created"));
    assert_eq!(messages[0]["headers"], json!([["kind", "collected"]]));

    let id = trigger_find(&server, find_step(&format!("{exchange}/#"), json!([]), 0)).await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(
        found(&run),
        Vec::<Value>::new(),
        "nothing since this run: {run:#}"
    );

    // The application's queue holds every message, none taken or acknowledged for it.
    assert_eq!(consumers_and_messages(&channel, &queue).await, (0, 3));
    channel
        .queue_delete(QueueDeleteArguments::new(&queue))
        .await
        .expect("deleting the queue");
    channel
        .exchange_delete(ExchangeDeleteArguments::new(&exchange))
        .await
        .expect("deleting the exchange");
}

#[tokio::test]
async fn a_grant_bounds_the_subjects_and_a_queue_that_is_not_a_stream_is_left_alone() {
    let Some(url) = rabbitmq_url() else {
        return;
    };
    let classic = name("classic");
    let (_connection, channel) = application(&url).await;
    channel
        .queue_declare(QueueDeclareArguments::new(&classic))
        .await
        .expect("declaring a classic queue");
    publish(&channel, "", &classic, &[], b"the application's").await;
    let server = bus_server(
        "rabbitmq",
        &url,
        &format!("\"{classic}\", \"events/order.#\""),
        64,
    )
    .await;
    let not_a_stream = format!("query failed: {classic:?} is not a stream queue");
    for (subject, expected) in [
        (classic.clone(), not_a_stream.as_str()),
        ("events/#".to_owned(), "denied: subject"),
        ("other/order.created".to_owned(), "denied: subject"),
        ("other-stream".to_owned(), "denied: subject"),
        ("/orders".to_owned(), "query failed"),
    ] {
        assert_find_fails(&server, "bus", &subject, expected).await;
    }
    // The classic queue still has its message for its consumers.
    assert_eq!(consumers_and_messages(&channel, &classic).await, (0, 1));
    channel
        .queue_delete(QueueDeleteArguments::new(&classic))
        .await
        .expect("deleting the queue");
}

#[tokio::test]
async fn the_tap_window_drops_old_and_oversized_messages_and_says_so() {
    let Some(url) = rabbitmq_url() else {
        return;
    };
    let exchange = name("window");
    let (_connection, channel) = application(&url).await;
    channel
        .exchange_declare(ExchangeDeclareArguments::new(&exchange, "topic"))
        .await
        .expect("declaring an exchange");
    let server = bus_server("rabbitmq", &url, &format!("\"{exchange}/#\""), 1).await;
    let subject = format!("{exchange}/big");
    let id = trigger_find(
        &server,
        find_step(&subject, json!([["json", "n", "-1"]]), 1),
    )
    .await;
    let padding = "x".repeat(100_000);
    for n in 0..30 {
        let body = format!("{{\"n\":{n},\"pad\":\"{padding}\"}}");
        publish(&channel, &exchange, "big", &[], body.as_bytes()).await;
    }
    assert_failed_with(&server, &id, "window lost: the host's tap dropped messages").await;
    let (dropped, text) = tap_figure(&server, "stepwise_tap_dropped_total").await;
    assert!(dropped >= 20, "{text}");
    let (bytes, text) = tap_figure(&server, "stepwise_tap_bytes").await;
    assert!(bytes <= 1 << 20, "{text}");
    // A message larger than the whole window is skipped unread, and counts.
    let id = trigger_find(
        &server,
        find_step(&subject, json!([["json", "n", "-1"]]), 1),
    )
    .await;
    publish(&channel, &exchange, "big", &[], &vec![b'x'; 3 << 20]).await;
    assert_failed_with(&server, &id, "window lost: the host's tap dropped messages").await;
    let (after, text) = tap_figure(&server, "stepwise_tap_dropped_total").await;
    assert_eq!(after, dropped + 1, "{text}");
    channel
        .exchange_delete(ExchangeDeleteArguments::new(&exchange))
        .await
        .expect("deleting the exchange");
}

#[tokio::test]
async fn after_a_restart_a_stream_still_finds_and_the_tap_says_its_window_is_lost() {
    let Some(url) = rabbitmq_url() else {
        return;
    };
    let stream = name("restart");
    let exchange = format!("{stream}.exchange");
    let (_connection, channel) = application(&url).await;
    declare_stream(&channel, &stream).await;
    channel
        .exchange_declare(ExchangeDeclareArguments::new(&exchange, "topic"))
        .await
        .expect("declaring an exchange");
    let server = bus_server(
        "rabbitmq",
        &url,
        &format!("\"{stream}\", \"{exchange}/#\""),
        64,
    )
    .await;
    let wait = |subject: &str| {
        json!({"plugin": "misbehave", "poll_interval_ms": 100, "params": {"steps": {
            "first": find_step(subject, json!([["json", "event_id", "evt-r"]]), 1),
        }}})
    };
    let replayed = server.trigger(wait(&stream)).await;
    let tapped = server.trigger(wait(&format!("{exchange}/collected"))).await;
    let mut server = server;
    server.stop().await;
    publish(&channel, "", &stream, &[], br#"{"event_id":"evt-r"}"#).await;
    publish(
        &channel,
        &exchange,
        "collected",
        &[],
        br#"{"event_id":"evt-r"}"#,
    )
    .await;
    let server = server.restart().await;
    let run = server.wait_until_finished(&replayed).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_failed_with(
        &server,
        &tapped,
        "window lost: the host's tap of this source has kept messages",
    )
    .await;
    channel
        .queue_delete(QueueDeleteArguments::new(&stream))
        .await
        .expect("deleting the stream");
    channel
        .exchange_delete(ExchangeDeleteArguments::new(&exchange))
        .await
        .expect("deleting the exchange");
}
