//! NATS message sources against a real server with JetStream (`STEPWISE_TEST_NATS_URL`): a
//! step finds what was published since its run was created and nothing from before, through
//! a JetStream replay (a subject a stream keeps) or the host's tap (a core subject); the
//! application's own consumer sees nothing change and no consumer of the host's is left
//! behind; a grant bounds the subjects; the scan and window budgets hold; a restart keeps
//! replays and makes the tap say that its window is lost.

use serde_json::{Value, json};
use stepwise_demo::nats::Publisher;

use crate::support::{
    assert_failed_with, assert_find_fails, bus_server, find_step, found, millis, nats_url,
    step_message, tap_figure, trigger_find, unique_name,
};

/// The subject prefix (`stepwise_test.<name>`) and the stream name of one test.
fn names(test: &str) -> (String, String) {
    let id = unique_name(test).replace('-', "_");
    (format!("stepwise_test.{id}"), format!("STEPWISE_{id}"))
}

async fn publisher(url: &str) -> Publisher {
    Publisher::connect(url).await.expect("connecting to NATS")
}

/// A stream keeping `prefix.kept.>` in memory, and a durable consumer of the application's on
/// it that acknowledges explicitly.
async fn create_stream(nats: &mut Publisher, stream: &str, prefix: &str) {
    let created = nats
        .request(
            &format!("$JS.API.STREAM.CREATE.{stream}"),
            &json!({"name": stream, "subjects": [format!("{prefix}.kept.>")], "storage": "memory"}),
        )
        .await
        .expect("creating a stream");
    assert!(created.get("error").is_none(), "{created}");
    let app = nats
        .request(
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.app"),
            &json!({"stream_name": stream, "config": {"durable_name": "app", "ack_policy": "explicit", "deliver_policy": "all"}}),
        )
        .await
        .expect("creating the application's consumer");
    assert!(app.get("error").is_none(), "{app}");
}

async fn delete_stream(nats: &mut Publisher, stream: &str) {
    let _ = nats
        .request(&format!("$JS.API.STREAM.DELETE.{stream}"), &json!({}))
        .await;
}

#[tokio::test]
async fn a_stream_is_replayed_from_the_run_start_and_its_consumers_see_no_change() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, stream) = names("replay");
    let subject = format!("{prefix}.kept.collected");
    let mut nats = publisher(&url).await;
    create_stream(&mut nats, &stream, &prefix).await;
    nats.publish(&subject, &[], br#"{"event_id":"evt-0"}"#)
        .await
        .expect("publishing");
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 64).await;

    let id = trigger_find(&server, find_step(&subject, json!([]), 1)).await;
    // After the trigger, before the third step's first poll (two polls of the first step).
    nats.publish(&subject, &[("Trace-Id", "t-1")], br#"{"event_id":"evt-1"}"#)
        .await
        .expect("publishing");
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    assert_eq!(
        messages.len(),
        1,
        "only what came after the run was created: {messages:#?}"
    );
    assert_eq!(messages[0]["text"], r#"{"event_id":"evt-1"}"#);
    assert_eq!(messages[0]["subject"], subject.as_str());
    assert_eq!(messages[0]["position"], 2, "the stream sequence");
    assert_eq!(messages[0]["headers"], json!([["Trace-Id", "t-1"]]));
    let created = millis(&run["created_at"]);
    let published = messages[0]["published_at_ms"].as_i64().unwrap_or_default();
    assert!(published >= created, "{published} < {created}");

    // Filters are the host's: by a JSON field, by a header, and both. Each run finds the one
    // message meant for it among two published after it was created.
    let filters = [
        (json!([["json", "event_id", "evt-2"]]), "evt-2"),
        (json!([["header", "trace-id", "t-3"]]), "evt-3"),
        (
            json!([["header", "Trace-Id", "t-2"], ["json", "event_id", "evt-2"]]),
            "evt-2",
        ),
    ];
    let mut ids = Vec::new();
    for (conditions, _) in &filters {
        ids.push(trigger_find(&server, find_step(&subject, conditions.clone(), 1)).await);
    }
    for (event, trace) in [("evt-2", "t-2"), ("evt-3", "t-3")] {
        let payload = format!(r#"{{"event_id":"{event}"}}"#);
        nats.publish(&subject, &[("Trace-Id", trace)], payload.as_bytes())
            .await
            .expect("publishing");
    }
    for ((conditions, event), id) in filters.iter().zip(&ids) {
        let run = server.wait_until_finished(id).await;
        assert_eq!(run["status"], "passed", "{conditions}: {run:#}");
        let messages = found(&run);
        assert_eq!(messages.len(), 1, "{conditions}: {messages:#?}");
        assert_eq!(
            messages[0]["text"],
            format!(r#"{{"event_id":"{event}"}}"#),
            "{conditions}"
        );
    }

    // The application's consumer still has every message to deliver, none acknowledged for
    // it, and the host's own consumers are gone.
    let consumers = nats
        .request(&format!("$JS.API.CONSUMER.NAMES.{stream}"), &json!({}))
        .await
        .expect("listing consumers");
    assert_eq!(consumers["consumers"], json!(["app"]), "{consumers}");
    let app = nats
        .request(&format!("$JS.API.CONSUMER.INFO.{stream}.app"), &json!({}))
        .await
        .expect("the application's consumer");
    assert_eq!(app["num_pending"], 4, "{app}");
    assert_eq!(app["num_ack_pending"], 0, "{app}");
    assert_eq!(app["delivered"]["stream_seq"], 0, "{app}");
    delete_stream(&mut nats, &stream).await;
}

#[tokio::test]
async fn a_core_subject_is_answered_from_the_tap_from_the_run_start() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, _) = names("tap");
    let subject = format!("{prefix}.core.collected");
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 64).await;
    let mut nats = publisher(&url).await;
    nats.publish(&subject, &[], br#"{"event_id":"evt-0"}"#)
        .await
        .expect("publishing");

    let id = trigger_find(
        &server,
        find_step(
            &format!("{prefix}.core.*"),
            json!([["json", "event_id", "evt-1"]]),
            1,
        ),
    )
    .await;
    nats.publish(
        &format!("{prefix}.core.other"),
        &[],
        br#"{"event_id":"evt-2"}"#,
    )
    .await
    .expect("publishing");
    nats.publish(
        &subject,
        &[("Kind", "collected")],
        br#"{"event_id":"evt-1"}"#,
    )
    .await
    .expect("publishing");
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0]["text"], r#"{"event_id":"evt-1"}"#);
    assert_eq!(messages[0]["headers"], json!([["Kind", "collected"]]));

    // Without a filter: what came after the run's creation, in order, on every subject the
    // pattern matches, and not what came before.
    let id = trigger_find(
        &server,
        find_step(&format!("{prefix}.core.>"), json!([]), 0),
    )
    .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(
        found(&run),
        Vec::<Value>::new(),
        "nothing since this run: {run:#}"
    );

    let (held, text) = tap_figure(&server, "stepwise_tap_messages").await;
    assert!(held >= 3, "the tap's messages in /metrics: {text}");
}

#[tokio::test]
async fn a_grant_bounds_the_sources_and_subjects_a_step_may_read() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, _) = names("grant");
    let server = bus_server("nats", &url, &format!("\"{prefix}.a.>\""), 64).await;
    for (source, subject, expected) in [
        ("bus", format!("{prefix}.b.x"), "denied: subject"),
        ("bus", ">".to_owned(), "denied: subject"),
        ("bus", format!("{prefix}.>"), "denied: subject"),
        (
            "nowhere",
            format!("{prefix}.a.x"),
            "denied: message source \"nowhere\"",
        ),
        ("bus", format!("{prefix}.a.>.x"), "query failed"),
        ("bus", format!("{prefix}.a.x\r\nPUB x 1"), "query failed"),
    ] {
        assert_find_fails(&server, source, &subject, expected).await;
    }
}

#[tokio::test]
async fn a_filter_that_matches_nothing_costs_the_scan_limit_at_most() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, stream) = names("scan");
    let subject = format!("{prefix}.kept.flood");
    let mut nats = publisher(&url).await;
    create_stream(&mut nats, &stream, &prefix).await;
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 64).await;
    let id = trigger_find(
        &server,
        find_step(&subject, json!([["json", "event_id", "never"]]), 1),
    )
    .await;
    for n in 0..10_050 {
        nats.publish(&subject, &[], format!("{{\"n\":{n}}}").as_bytes())
            .await
            .expect("publishing");
    }
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "errored", "{run:#}");
    assert!(
        step_message(&run).contains("messages scan limit of 10000 per call exceeded"),
        "{}",
        step_message(&run)
    );
    delete_stream(&mut nats, &stream).await;
}

#[tokio::test]
async fn the_tap_window_drops_old_messages_counts_them_and_says_so() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, _) = names("window");
    let subject = format!("{prefix}.core.big");
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 1).await;
    // A filter that never matches: pending until the window has dropped what it must answer for.
    let id = trigger_find(
        &server,
        find_step(&subject, json!([["json", "n", "-1"]]), 1),
    )
    .await;
    let mut nats = publisher(&url).await;
    let padding = "x".repeat(100_000);
    for n in 0..30 {
        nats.publish(
            &subject,
            &[],
            format!("{{\"n\":{n},\"pad\":\"{padding}\"}}").as_bytes(),
        )
        .await
        .expect("publishing");
    }
    assert_failed_with(&server, &id, "window lost: the host's tap dropped messages").await;
    let (dropped, text) = tap_figure(&server, "stepwise_tap_dropped_total").await;
    assert!(dropped >= 20, "{text}");
    let (bytes, text) = tap_figure(&server, "stepwise_tap_bytes").await;
    assert!(bytes <= 1 << 20, "{text}");
}

#[tokio::test]
async fn after_a_restart_a_replay_still_finds_and_the_tap_says_its_window_is_lost() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, stream) = names("restart");
    let mut nats = publisher(&url).await;
    create_stream(&mut nats, &stream, &prefix).await;
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 64).await;
    let kept = format!("{prefix}.kept.collected");
    let core = format!("{prefix}.core.collected");
    let wait = |subject: &str| {
        json!({"plugin": "misbehave", "poll_interval_ms": 100, "params": {"steps": {
            "first": find_step(subject, json!([["json", "event_id", "evt-r"]]), 1),
        }}})
    };
    let replayed = server.trigger(wait(&kept)).await;
    let tapped = server.trigger(wait(&core)).await;
    let mut server = server;
    server.stop().await;
    // Published while the host is down: only the stream keeps it.
    for subject in [&kept, &core] {
        nats.publish(subject, &[], br#"{"event_id":"evt-r"}"#)
            .await
            .expect("publishing");
    }
    let server = server.restart().await;

    let run = server.wait_until_finished(&replayed).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_failed_with(
        &server,
        &tapped,
        "window lost: the host's tap of this source has kept messages",
    )
    .await;
    delete_stream(&mut nats, &stream).await;
}

#[tokio::test]
async fn a_stream_whose_limits_removed_messages_since_the_run_says_so() {
    let Some(url) = nats_url() else {
        return;
    };
    let (prefix, stream) = names("limits");
    let subject = format!("{prefix}.kept.collected");
    let mut nats = publisher(&url).await;
    let created = nats
        .request(
            &format!("$JS.API.STREAM.CREATE.{stream}"),
            &json!({"name": stream, "subjects": [format!("{prefix}.kept.>")], "storage": "memory", "max_msgs": 2}),
        )
        .await
        .expect("creating a stream");
    assert!(created.get("error").is_none(), "{created}");
    let server = bus_server("nats", &url, &format!("\"{prefix}.>\""), 64).await;
    let id = trigger_find(
        &server,
        find_step(&subject, json!([["json", "n", "-1"]]), 1),
    )
    .await;
    for n in 0..5 {
        nats.publish(&subject, &[], format!("{{\"n\":{n}}}").as_bytes())
            .await
            .expect("publishing");
    }
    assert_failed_with(
        &server,
        &id,
        &format!("window lost: stream {stream} keeps messages only since"),
    )
    .await;
    delete_stream(&mut nats, &stream).await;
}
