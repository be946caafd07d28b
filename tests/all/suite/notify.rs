//! Notifiers (README, "Alerts"): one POST per reported failure and one `recovered`, in the `json` and
//! `slack` formats; filters and `after_consecutive`; retries with growing gaps until
//! `max_delivery_ms`; a receiver that hangs never delays a tick.

use std::time::Duration;

use serde_json::{Value, json};
use stepwise_host::model::{RetentionPolicy, now_millis};
use stepwise_host::retention::sweep;
use stepwise_host::storage::Store;

use crate::support::{PluginFile, Reply, Setup, TestServer, Webhook, poll_until, rollups_folded};

fn notifier(name: &str, webhook: &Webhook, extra: &str) -> String {
    format!(
        "[[notify]]\nname = \"{name}\"\nurl = \"{}/{name}\"\nretry = {{initial_ms = 100, factor = 2.0}}\n{extra}\n",
        webhook.base
    )
}

async fn server(config: &str) -> TestServer {
    TestServer::start(
        Setup::default()
            .with_config(config)
            .with_plugin(PluginFile::misbehave("")),
    )
    .await
}

fn failing_at_second(labels: Value) -> Value {
    json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "fail"}}}, "labels": labels})
}

fn passing(labels: Value) -> Value {
    json!({"plugin": "misbehave", "params": {}, "labels": labels})
}

async fn notifications(server: &TestServer, id: &str) -> Vec<Value> {
    let (status, body) = server
        .get_json(&format!("/v1/runs/{id}/notifications"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Finishes the run and waits until every notification of it is delivered or failed.
async fn settled(server: &TestServer, id: &str) -> Vec<Value> {
    server.wait_until_finished(id).await;
    let settled = poll_until(|| async {
        let list = notifications(server, id).await;
        list.iter()
            .all(|notification| notification["status"] != "pending")
            .then_some(list)
    })
    .await;
    settled.unwrap_or_else(|| panic!("run {id}'s notifications did not settle"))
}

#[tokio::test]
async fn a_failure_is_posted_once_per_run_and_the_recovery_once() {
    let webhook = Webhook::start(vec![]).await;
    let config = format!(
        "public_urls = [\"https://stepwise.example.com/\"]\n{}{}",
        notifier("ops", &webhook, "on = [\"failed\", \"recovered\"]"),
        notifier("chat", &webhook, "format = \"slack\"\non = [\"failed\"]"),
    );
    let server = server(&config).await;
    let labels = json!({"suite": "notify"});

    let first = server.trigger(failing_at_second(labels.clone())).await;
    let sent = settled(&server, &first).await;
    assert_eq!(sent.len(), 2, "{sent:#?}");
    for notification in &sent {
        assert_eq!(notification["event"], "failed");
        assert_eq!(notification["status"], "delivered", "{notification:#}");
        assert_eq!(notification["attempts"][0]["status_code"], 200);
    }
    let run = server.run(&first).await;
    let received = webhook.received();
    let ops: Vec<_> = received.iter().filter(|post| post.path == "/ops").collect();
    assert_eq!(ops.len(), 1, "{received:#?}");
    let body = &ops[0].body;
    assert_eq!(body["event"], "failed");
    // Byte for byte, field order included (serde_json keeps the order it read).
    assert_eq!(
        body["run"].to_string(),
        run.to_string(),
        "the run as GET /v1/runs/{{id}} shows it"
    );
    assert_eq!(body["failed_step"], "second");
    assert_eq!(body["message"], run["steps"][1]["message"]);
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["verified_steps"][0]["name"], "first");
    assert_eq!(
        body["verified_steps"][0]["passed_after_ms"],
        run["steps"][0]["passed_after_ms"]
    );
    assert_eq!(
        body["url"],
        format!("https://stepwise.example.com/runs/{first}")
    );
    let ops_notification = sent
        .iter()
        .find(|notification| notification["notifier"] == "ops")
        .expect("the ops notification");
    assert_eq!(ops[0].delivery, ops_notification["id"].as_str().unwrap());
    assert_eq!(ops[0].event, "failed");
    let chat: Vec<_> = received
        .iter()
        .filter(|post| post.path == "/chat")
        .collect();
    assert_eq!(chat.len(), 1, "{received:#?}");
    let text = chat[0].body["text"].as_str().expect("a slack text");
    let step_message = run["steps"][1]["message"].as_str().unwrap();
    for expected in [
        "*misbehave* failed at step `second` after 1 attempt:",
        step_message,
        "Verified: first in ",
        &format!("<https://stepwise.example.com/runs/{first}|Run {first}>"),
    ] {
        assert!(text.contains(expected), "{expected:?} not in {text:?}");
    }

    // A second failure of the same series is posted again; then the first pass is a recovery
    // (to the notifier that listens for it), and the next pass is no news.
    let second = server.trigger(failing_at_second(labels.clone())).await;
    assert_eq!(settled(&server, &second).await.len(), 2);
    let recovered = server.trigger(passing(labels.clone())).await;
    let sent = settled(&server, &recovered).await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0]["event"], "recovered");
    assert_eq!(sent[0]["notifier"], "ops");
    let quiet = server.trigger(passing(labels.clone())).await;
    assert!(settled(&server, &quiet).await.is_empty());
    // Another series (other labels) has its own streak: its pass after nothing is no news.
    let other = server.trigger(passing(json!({"suite": "other"}))).await;
    assert!(settled(&server, &other).await.is_empty());

    let received = webhook.received();
    let events: Vec<(&str, &str)> = received
        .iter()
        .map(|post| (post.path.as_str(), post.event.as_str()))
        .collect();
    assert_eq!(received.len(), 5, "{events:?}");
    let recovery: Vec<_> = received
        .iter()
        .filter(|post| post.event == "recovered")
        .collect();
    assert_eq!(recovery.len(), 1, "{events:?}");
    assert_eq!(recovery[0].body["failed_step"], Value::Null);
    assert_eq!(recovery[0].body["run"]["id"], recovered.as_str());
}

#[tokio::test]
async fn filters_and_after_consecutive_choose_what_each_notifier_hears() {
    let webhook = Webhook::start(vec![]).await;
    let config = format!(
        "{}{}{}",
        notifier("prod", &webhook, "labels = {env = \"prod\"}"),
        notifier("elsewhere", &webhook, "plugins = [\"http-status\"]"),
        notifier("streak", &webhook, "after_consecutive = 2"),
    );
    let server = server(&config).await;
    let names = |list: &[Value]| -> Vec<String> {
        let mut names: Vec<String> = list
            .iter()
            .map(|notification| notification["notifier"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let dev = server
        .trigger(failing_at_second(json!({"env": "dev"})))
        .await;
    assert!(settled(&server, &dev).await.is_empty());
    let prod = server
        .trigger(failing_at_second(json!({"env": "prod"})))
        .await;
    assert_eq!(names(&settled(&server, &prod).await), ["prod"]);
    let again = server
        .trigger(failing_at_second(json!({"env": "prod"})))
        .await;
    assert_eq!(names(&settled(&server, &again).await), ["prod", "streak"]);
    // A cancelled run neither breaks nor extends the streak.
    let cancelled = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending"}}}, "labels": {"env": "prod"}}))
        .await;
    let (status, body) = server
        .post_json(&format!("/v1/runs/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(settled(&server, &cancelled).await.is_empty());
    let back = server.trigger(passing(json!({"env": "prod"}))).await;
    assert_eq!(names(&settled(&server, &back).await), ["prod", "streak"]);
    assert!(
        webhook
            .received()
            .iter()
            .all(|post| post.path != "/elsewhere")
    );
}

#[tokio::test]
async fn a_receiver_that_fails_is_retried_with_growing_gaps_until_it_answers() {
    let webhook = Webhook::start(vec![
        Reply::Status(500),
        Reply::Status(500),
        Reply::Status(500),
    ])
    .await;
    // Waits of 200, 600 and 1,800 ms (each ±20 %): the ranges lie hundreds of milliseconds
    // apart, more than a loaded store's claim and record can add to one gap.
    let config = notifier("ops", &webhook, "").replace("factor = 2.0", "factor = 3.0");
    let config = config.replace("initial_ms = 100", "initial_ms = 200");
    let server = server(&config).await;
    let id = server.trigger(failing_at_second(json!({}))).await;
    let sent = settled(&server, &id).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["status"], "delivered", "{:#}", sent[0]);
    let codes: Vec<&Value> = sent[0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attempt| &attempt["status_code"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(500), &json!(200)]);
    assert_eq!(
        sent[0]["attempts"][0]["error"],
        "the receiver answered 500 Internal Server Error"
    );
    let received = webhook.received();
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|post| post.delivery == received[0].delivery)
    );
    let gaps: Vec<Duration> = received
        .windows(2)
        .map(|pair| pair[1].at - pair[0].at)
        .collect();
    assert!(gaps[0] >= Duration::from_millis(160), "{gaps:?}");
    assert!(
        gaps.windows(2).all(|pair| pair[1] > pair[0]),
        "gaps do not grow: {gaps:?}"
    );
    // The counter moves just after the commit that the notification list already shows.
    let lines = [
        "stepwise_notifications_total{notifier=\"ops\",result=\"retried\"} 3",
        "stepwise_notifications_total{notifier=\"ops\",result=\"delivered\"} 1",
    ];
    let scrape = || async {
        server
            .client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("scraping /metrics")
            .text()
            .await
            .expect("the metrics text")
    };
    let counted = poll_until(|| async {
        let metrics = scrape().await;
        lines
            .iter()
            .all(|line| metrics.contains(line))
            .then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "{lines:?} not all in:\n{}",
        scrape().await
    );
}

#[tokio::test]
async fn a_delivery_is_given_up_after_max_delivery_ms() {
    let webhook = Webhook::start(vec![Reply::Status(503); 100]).await;
    let server = server(&notifier("ops", &webhook, "max_delivery_ms = 1000")).await;
    let id = server.trigger(failing_at_second(json!({}))).await;
    let sent = settled(&server, &id).await;
    assert_eq!(sent[0]["status"], "failed", "{:#}", sent[0]);
    let attempts = sent[0]["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{attempts:#?}");
    assert!(attempts.iter().all(|attempt| attempt["status_code"] == 503));
    assert_eq!(webhook.received().len(), attempts.len());
}

#[tokio::test]
async fn a_receiver_that_hangs_never_delays_a_tick() {
    let webhook = Webhook::start(vec![Reply::Hang; 10]).await;
    let server = server(&notifier("ops", &webhook, "timeout_ms = 600000")).await;
    let failed = server.trigger(failing_at_second(json!({}))).await;
    server.wait_until_finished(&failed).await;
    let posted = poll_until(|| async { (!webhook.received().is_empty()).then_some(()) }).await;
    assert!(posted.is_some(), "the notification was never posted");
    // While that POST hangs, other runs go through all their steps.
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(server.trigger(passing(json!({"other": "series"}))).await);
    }
    for id in &runs {
        assert_eq!(server.wait_until_finished(id).await["status"], "passed");
    }
    let pending = notifications(&server, &failed).await;
    assert_eq!(pending[0]["status"], "pending", "{pending:#?}");
    assert!(pending[0]["attempts"].as_array().unwrap().is_empty());

    // Retention keeps a run while its notification is being delivered, and takes the others.
    let store = Store::open(server.database_url()).await.expect("opening");
    let policy = RetentionPolicy {
        finished_runs: Duration::from_millis(1),
        ..RetentionPolicy::default()
    };
    let tomorrow = now_millis() + 24 * 3600 * 1000;
    rollups_folded(&store).await;
    sweep(&store, &policy, tomorrow, 1000)
        .await
        .expect("sweeping");
    assert_eq!(server.run(&failed).await["status"], "failed");
    for id in &runs {
        let (status, body) = server.get_json(&format!("/v1/runs/{id}")).await;
        assert_eq!((status, &body["code"]), (404, &json!("run_expired")));
    }
}

/// A receiver checks a json notification's signature as the README shows: HMAC-SHA256 over
/// `<t>.<raw body>` keyed by the notifier's secret. And a plugin's message cannot add lines
/// to a Slack text (such as a forged "recovered" one).
#[tokio::test]
async fn json_notifications_are_signed_and_slack_text_keeps_plugin_text_on_its_line() {
    use hmac::Mac;
    let webhook = Webhook::start(vec![]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = "a-webhook-signing-key-0123456789";
    std::fs::write(dir.path().join("key"), key).expect("writing the key");
    let config = format!(
        "[secrets.hook]\nfile = {:?}\n{}{}",
        dir.path().join("key").display().to_string(),
        notifier("ops", &webhook, "on = [\"failed\"]\nsecret = \"hook\""),
        notifier("chat", &webhook, "format = \"slack\"\non = [\"failed\"]"),
    );
    let server = server(&config).await;
    let forged = "broke\n:large_green_circle: *misbehave* recovered: the run passed.";
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"second": {"action": "fail", "message": forged}}}}))
        .await;
    settled(&server, &id).await;
    let received = webhook.received();
    let ops = received
        .iter()
        .find(|post| post.path == "/ops")
        .expect("the json notification");
    let (time, signature) = ops
        .signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .unwrap_or_else(|| panic!("no signature: {:?}", ops.signature));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{time}.").as_bytes());
    mac.update(&ops.raw);
    mac.verify_slice(&hex::decode(signature).expect("hex"))
        .expect("the signature verifies");
    let sent_at: i64 = time.parse().expect("seconds");
    assert!((now_millis() / 1000 - sent_at).abs() < 300, "{time}");
    // A body changed on the way does not verify.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{time}.").as_bytes());
    mac.update(&[&ops.raw[..], b" "].concat());
    assert!(mac.verify_slice(&hex::decode(signature).unwrap()).is_err());

    let chat = received
        .iter()
        .find(|post| post.path == "/chat")
        .expect("the slack notification");
    assert!(chat.signature.is_empty(), "slack is not signed");
    let text = chat.body["text"].as_str().expect("a slack text");
    assert!(
        text.lines()
            .all(|line| !line.starts_with(":large_green_circle:")),
        "{text}"
    );
    assert!(text.contains(">broke :large_green_circle:"), "{text}");
}
