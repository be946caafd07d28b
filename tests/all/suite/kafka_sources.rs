//! Kafka message sources against a real Kafka-protocol broker (`STEPWISE_TEST_KAFKA_URL`;
//! `.ci/run` starts `tansu`): a step finds what was produced on a topic since its run was
//! created, across partitions and oldest first, and nothing from before; filters read
//! headers and the record's key; a grant bounds the topics; a filter that matches nothing
//! costs the scan cap at most; a restart changes nothing, as nothing lives in the host.

use std::collections::BTreeMap;

use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use serde_json::{Value, json};

use crate::support::{
    assert_find_fails, bus_server, find_step, found, kafka_url, step_message, trigger_find,
    unique_name,
};

/// The application's side: a producer (rskafka produces; the host's side only reads).
async fn producer(url: &str) -> Client {
    let broker = url.strip_prefix("kafka://").expect("a kafka:// URL");
    ClientBuilder::new(vec![broker.trim_end_matches('/').to_owned()])
        .build()
        .await
        .expect("connecting to Kafka")
}

/// A topic of its own for one test, with `partitions`.
async fn topic(client: &Client, test: &str, partitions: i32) -> String {
    let name = format!("stepwise-test.{}", unique_name(test));
    client
        .controller_client()
        .expect("a controller")
        .create_topic(&name, partitions, 1, 5_000)
        .await
        .expect("creating a topic");
    name
}

/// Produces one record on `partition`, returning once the broker has it.
async fn produce(
    client: &Client,
    topic: &str,
    partition: i32,
    key: Option<&str>,
    headers: &[(&str, &str)],
    value: &[u8],
) {
    let partition = client
        .partition_client(topic, partition, UnknownTopicHandling::Retry)
        .await
        .expect("a partition");
    let headers: BTreeMap<String, Vec<u8>> = headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.as_bytes().to_vec()))
        .collect();
    let record = Record {
        key: key.map(|key| key.as_bytes().to_vec()),
        value: Some(value.to_vec()),
        headers,
        timestamp: chrono::Utc::now(),
    };
    partition
        .produce(vec![record], Compression::NoCompression)
        .await
        .expect("producing");
}

#[tokio::test]
async fn a_topic_is_replayed_from_the_run_start_across_partitions_oldest_first() {
    let Some(url) = kafka_url() else {
        return;
    };
    let client = producer(&url).await;
    let topic = topic(&client, "replay", 2).await;
    produce(&client, &topic, 0, None, &[], br#"{"event_id":"evt-0"}"#).await;
    let server = bus_server("kafka", &url, &format!("\"{topic}\""), 64).await;

    let id = trigger_find(&server, find_step(&topic, json!([]), 2)).await;
    produce(
        &client,
        &topic,
        1,
        Some("k-1"),
        &[("trace-id", "t-1")],
        br#"{"event_id":"evt-1"}"#,
    )
    .await;
    produce(
        &client,
        &topic,
        0,
        Some("k-2"),
        &[],
        br#"{"event_id":"evt-2"}"#,
    )
    .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    let texts: Vec<&Value> = messages.iter().map(|message| &message["text"]).collect();
    assert_eq!(
        texts,
        [r#"{"event_id":"evt-1"}"#, r#"{"event_id":"evt-2"}"#],
        "only what came after the run was created, oldest first: {messages:#?}"
    );
    assert_eq!(messages[0]["subject"], topic.as_str());
    assert_eq!(messages[0]["position"], 0, "the offset in partition 1");
    assert_eq!(messages[1]["position"], 1, "the offset in partition 0");
    assert_eq!(
        messages[0]["headers"],
        json!([
            ["trace-id", "t-1"],
            ["kafka-key", "k-1"],
            ["kafka-partition", "1"]
        ])
    );
    assert!(
        messages[0]["published_at_ms"].as_u64() <= messages[1]["published_at_ms"].as_u64(),
        "{messages:#?}"
    );

    // Filters are the host's: a header, the key, a JSON field.
    for conditions in [
        json!([["header", "Trace-Id", "t-1"]]),
        json!([["header", "kafka-key", "k-1"]]),
        json!([["json", "event_id", "evt-1"]]),
    ] {
        let id = server
            .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": find_step(&topic, conditions.clone(), 0)}}}))
            .await;
        let run = server.wait_until_finished(&id).await;
        assert_eq!(run["status"], "passed", "{conditions}: {run:#}");
        // A run made now sees nothing of before it.
        assert_eq!(
            run["steps"][0]["output"]["messages"],
            json!([]),
            "{conditions}"
        );
        let id = trigger_find(&server, find_step(&topic, conditions.clone(), 1)).await;
        produce(
            &client,
            &topic,
            1,
            Some("k-1"),
            &[("trace-id", "t-1")],
            br#"{"event_id":"evt-1"}"#,
        )
        .await;
        let run = server.wait_until_finished(&id).await;
        assert_eq!(run["status"], "passed", "{conditions}: {run:#}");
        assert_eq!(found(&run).len(), 1, "{conditions}: {run:#}");
    }
}

#[tokio::test]
async fn a_grant_bounds_the_topics_a_step_may_read() {
    let Some(url) = kafka_url() else {
        return;
    };
    let server = bus_server("kafka", &url, "\"orders.*\", \"events\"", 64).await;
    for (subject, expected) in [
        ("payments", "denied: subject"),
        ("events2", "denied: subject"),
        ("orders.*", "query failed"),
        ("orders collected", "query failed"),
        ("orders.none", "query failed: no topic"),
    ] {
        assert_find_fails(&server, "bus", subject, expected).await;
    }
}

#[tokio::test]
async fn a_filter_that_matches_nothing_costs_the_scan_limit_at_most() {
    let Some(url) = kafka_url() else {
        return;
    };
    let client = producer(&url).await;
    let topic = topic(&client, "scan", 1).await;
    let server = bus_server("kafka", &url, &format!("\"{topic}\""), 64).await;
    let id = trigger_find(
        &server,
        find_step(&topic, json!([["json", "event_id", "never"]]), 1),
    )
    .await;
    let partition = client
        .partition_client(&topic, 0, UnknownTopicHandling::Retry)
        .await
        .expect("a partition");
    for batch in 0..21 {
        let records = (0..500)
            .map(|n| Record {
                key: None,
                value: Some(format!("{{\"n\":{}}}", batch * 500 + n).into_bytes()),
                headers: BTreeMap::new(),
                timestamp: chrono::Utc::now(),
            })
            .collect();
        partition
            .produce(records, Compression::NoCompression)
            .await
            .expect("producing");
    }
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        step_message(&run).contains("messages scan limit of 10000 per call exceeded"),
        "{}",
        step_message(&run)
    );
}

#[tokio::test]
async fn after_a_restart_a_topic_still_finds() {
    let Some(url) = kafka_url() else {
        return;
    };
    let client = producer(&url).await;
    let topic = topic(&client, "restart", 1).await;
    let server = bus_server("kafka", &url, &format!("\"{topic}\""), 64).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "poll_interval_ms": 100, "params": {"steps": {
                "first": find_step(&topic, json!([["json", "event_id", "evt-r"]]), 1),
            }}}),
        )
        .await;
    let mut server = server;
    server.stop().await;
    produce(&client, &topic, 0, None, &[], br#"{"event_id":"evt-r"}"#).await;
    let server = server.restart().await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
}
