//! Message sources: how long after a message is published a step that polls every 200 ms
//! finds it, per mode of a NATS source (a JetStream replay, the host's tap of a core
//! subject). The time runs from the publisher's acknowledgement (the server has the message)
//! to the end of the attempt that found it.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use stepwise_demo::nats::Publisher;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM, epoch_millis, now_millis};
use crate::stats::{print_header, print_row};

const POLL_MS: u64 = 200;

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let url = options
        .nats
        .clone()
        .context("the messages scenario needs --nats URL (a server with JetStream)")?;
    let mut nats = Publisher::connect(&url)
        .await
        .context("connecting to --nats")?;
    let stream = format!("STEPWISE_BENCH_{}", std::process::id());
    let created = nats
        .request(
            &format!("$JS.API.STREAM.CREATE.{stream}"),
            &json!({"name": stream, "subjects": ["stepwise-bench.kept.>"], "storage": "memory"}),
        )
        .await?;
    anyhow::ensure!(
        created.get("error").is_none(),
        "creating a stream: {created}"
    );
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start_tuned(&dir.path().join("data"), |settings| {
        settings.sources.insert(
            "bus".to_owned(),
            stepwise_host::config::SourceConfig {
                kind: Some("nats".to_owned()),
                ..stepwise_host::config::SourceConfig::new(url.clone())
            },
        );
    })
    .await?;
    server
        .upload_with_grant(
            "reader",
            std::fs::read(MISBEHAVE_WASM)?,
            "sql_sources = [\"bus\"]\nsubjects = [\"stepwise-bench.>\"]\n",
        )
        .await?;
    let measured = async {
        for (mode, subject) in [
            ("JetStream replay", "stepwise-bench.kept.collected"),
            ("tap (core NATS)", "stepwise-bench.core.collected"),
        ] {
            let mut latencies = Vec::new();
            for round in 0..options.repeat.max(5) {
                latencies.push(publish_to_found(&server, &mut nats, subject, round).await?);
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
        anyhow::Ok(())
    }
    .await;
    let _ = nats
        .request(&format!("$JS.API.STREAM.DELETE.{stream}"), &json!({}))
        .await;
    measured
}

/// Starts a run whose step looks for one event every 200 ms, publishes the event at a moment
/// spread over the poll interval, and returns how long after the publish the attempt that
/// found it ended.
async fn publish_to_found(
    server: &BenchServer,
    nats: &mut Publisher,
    subject: &str,
    round: usize,
) -> anyhow::Result<f64> {
    let event = format!("evt-{}-{round}", now_millis());
    let step = json!({"action": "messages", "source": "bus", "subject": subject, "where": [["json", "event_id", event]], "expect": 1});
    let id = server
        .trigger(&json!({"plugin": "reader", "poll_interval_ms": POLL_MS, "params": {"steps": {"first": step}}}))
        .await?;
    // Rounds publish at different points of the poll interval, so that the median is the
    // interval's average wait and not one phase of it.
    let offset = (round as u64 * 37) % POLL_MS;
    tokio::time::sleep(Duration::from_millis(POLL_MS + offset)).await;
    nats.publish(
        subject,
        &[],
        json!({"event_id": event}).to_string().as_bytes(),
    )
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
