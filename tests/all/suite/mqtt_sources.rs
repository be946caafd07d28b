//! MQTT message sources against a real broker (`STEPWISE_TEST_MQTT_URL`): a step finds what was
//! published since its run was created, from the host's tap, and nothing from before (a
//! retained message included); the application's own subscribers, a shared subscription group
//! among them, still get every message; a grant bounds the topics; the window's bounds hold,
//! a message larger than the whole window included; a restart makes the tap say that its
//! window is lost.

use serde_json::{Value, json};
use stepwise_demo::mqtt::Publisher;

use crate::support::{
    assert_failed_with, assert_find_fails, bus_server, find_step, found, mqtt_url, tap_figure,
    trigger_find, unique_name,
};

/// The topic prefix of one test.
fn prefix(test: &str) -> String {
    format!("stepwise-test/{}", unique_name(test))
}

#[tokio::test]
async fn a_topic_is_answered_from_the_tap_from_the_run_start_and_the_application_misses_nothing() {
    let Some(url) = mqtt_url() else {
        return;
    };
    let prefix = prefix("tap");
    let topic = format!("{prefix}/collected");
    // The application's consumers: a group sharing the topic's messages, as its workers do.
    let mut application = Publisher::connect(&url)
        .await
        .expect("connecting to the MQTT broker");
    application
        .subscribe(&format!("$share/app/{prefix}/#"))
        .await
        .expect("subscribing");
    let mut publisher = Publisher::connect(&url)
        .await
        .expect("connecting to the MQTT broker");
    publisher
        .publish(&topic, &[], br#"{"event_id":"evt-r"}"#, true)
        .await
        .expect("publishing");
    let server = bus_server("mqtt", &url, &format!("\"{prefix}/#\""), 64).await;
    publisher
        .publish(&topic, &[], br#"{"event_id":"evt-0"}"#, false)
        .await
        .expect("publishing");

    let id = trigger_find(
        &server,
        find_step(
            &format!("{prefix}/+"),
            json!([["json", "event_id", "evt-1"]]),
            1,
        ),
    )
    .await;
    publisher
        .publish(
            &format!("{prefix}/other"),
            &[],
            br#"{"event_id":"evt-2"}"#,
            false,
        )
        .await
        .expect("publishing");
    publisher
        .publish(
            &topic,
            &[("Kind", "collected")],
            br#"{"event_id":"evt-1"}"#,
            false,
        )
        .await
        .expect("publishing");
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "passed", "{run:#}");
    let messages = found(&run);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0]["text"], r#"{"event_id":"evt-1"}"#);
    assert_eq!(messages[0]["subject"], topic.as_str());
    assert_eq!(messages[0]["headers"], json!([["Kind", "collected"]]));

    // Without a filter: nothing from before the run, the retained message included.
    let id = trigger_find(&server, find_step(&format!("{prefix}/#"), json!([]), 0)).await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(found(&run), Vec::<Value>::new(), "{run:#}");
    let (held, text) = tap_figure(&server, "stepwise_tap_messages").await;
    assert!(held >= 3, "the tap's messages in /metrics: {text}");

    // The application's group got every message published while the host tapped the topic.
    let mut delivered = Vec::new();
    for _ in 0..4 {
        delivered.push(
            String::from_utf8(
                tokio::time::timeout(crate::support::DEADLINE, application.next_message())
                    .await
                    .expect("a message within the deadline")
                    .expect("a message"),
            )
            .expect("UTF-8"),
        );
    }
    assert_eq!(
        delivered,
        [
            r#"{"event_id":"evt-r"}"#,
            r#"{"event_id":"evt-0"}"#,
            r#"{"event_id":"evt-2"}"#,
            r#"{"event_id":"evt-1"}"#
        ]
    );
    publisher
        .publish(&topic, &[], b"", true)
        .await
        .expect("publishing");
}

#[tokio::test]
async fn a_grant_bounds_the_topics_a_step_may_read() {
    let Some(url) = mqtt_url() else {
        return;
    };
    let prefix = prefix("grant");
    let server = bus_server("mqtt", &url, &format!("\"{prefix}/a/#\""), 64).await;
    for (subject, expected) in [
        (format!("{prefix}/b/x"), "denied: subject"),
        ("#".to_owned(), "denied: subject"),
        (format!("{prefix}/#"), "denied: subject"),
        ("$SYS/#".to_owned(), "denied: subject"),
        (format!("$share/app/{prefix}/a/#"), "query failed"),
        (format!("{prefix}/a/#/x"), "query failed"),
    ] {
        assert_find_fails(&server, "bus", &subject, expected).await;
    }
}

#[tokio::test]
async fn the_tap_window_drops_old_and_oversized_messages_counts_them_and_says_so() {
    let Some(url) = mqtt_url() else {
        return;
    };
    let prefix = prefix("window");
    let topic = format!("{prefix}/big");
    let server = bus_server("mqtt", &url, &format!("\"{prefix}/#\""), 1).await;
    let id = trigger_find(&server, find_step(&topic, json!([["json", "n", "-1"]]), 1)).await;
    let mut publisher = Publisher::connect(&url)
        .await
        .expect("connecting to the MQTT broker");
    let padding = "x".repeat(100_000);
    for n in 0..30 {
        publisher
            .publish(
                &topic,
                &[],
                format!("{{\"n\":{n},\"pad\":\"{padding}\"}}").as_bytes(),
                false,
            )
            .await
            .expect("publishing");
    }
    assert_failed_with(&server, &id, "window lost: the host's tap dropped messages").await;
    let (dropped, text) = tap_figure(&server, "stepwise_tap_dropped_total").await;
    assert!(dropped >= 20, "{text}");
    let (bytes, text) = tap_figure(&server, "stepwise_tap_bytes").await;
    assert!(bytes <= 1 << 20, "{text}");

    // A message larger than the whole window is never held: it counts as dropped, and a run
    // from before it is told so.
    let id = trigger_find(&server, find_step(&topic, json!([["json", "n", "-1"]]), 1)).await;
    publisher
        .publish(&topic, &[], &vec![b'x'; 3 << 20], false)
        .await
        .expect("publishing");
    assert_failed_with(&server, &id, "window lost: the host's tap dropped messages").await;
    let (after, text) = tap_figure(&server, "stepwise_tap_dropped_total").await;
    assert_eq!(after, dropped + 1, "{text}");
}

#[tokio::test]
async fn after_a_restart_the_tap_says_its_window_is_lost() {
    let Some(url) = mqtt_url() else {
        return;
    };
    let prefix = prefix("restart");
    let topic = format!("{prefix}/collected");
    let server = bus_server("mqtt", &url, &format!("\"{prefix}/#\""), 64).await;
    let id = server
        .trigger(
            json!({"plugin": "misbehave", "poll_interval_ms": 100, "params": {"steps": {
                "first": find_step(&topic, json!([["json", "event_id", "evt-r"]]), 1),
            }}}),
        )
        .await;
    let mut server = server;
    server.stop().await;
    let mut publisher = Publisher::connect(&url)
        .await
        .expect("connecting to the MQTT broker");
    publisher
        .publish(&topic, &[], br#"{"event_id":"evt-r"}"#, false)
        .await
        .expect("publishing");
    let server = server.restart().await;
    assert_failed_with(
        &server,
        &id,
        "window lost: the host's tap of this source has kept messages",
    )
    .await;
}
