//! Schedules through the API, and the firing rules with a controlled clock: a second firer on
//! the server's own database is driven with `fire_due(now)` at chosen times, the way a node
//! that was down would see them.

use std::sync::Arc;

use serde_json::{Value, json};
use stepwise_host::config::Settings;
use stepwise_host::model::now_millis;
use stepwise_host::scheduler::Wakeup;
use stepwise_host::scheduler::schedules::{Firer, ScheduleWakeup};
use stepwise_host::storage::Store;

use crate::support::{PluginFile, Setup, TestServer, millis, poll_until};

async fn server() -> TestServer {
    TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await
}

async fn create(server: &TestServer, body: Value) -> Value {
    let (status, schedule) = server.post_json("/v1/schedules", &body).await;
    assert_eq!(status, 201, "{schedule}");
    schedule
}

async fn fires(server: &TestServer, id: &str) -> Vec<Value> {
    let (status, schedule) = server.get_json(&format!("/v1/schedules/{id}")).await;
    assert_eq!(status, 200, "{schedule}");
    schedule["recent_fires"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn patch(server: &TestServer, id: &str, body: Value) -> Value {
    let response = server
        .client
        .patch(server.url(&format!("/v1/schedules/{id}")))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// A firer of our own on the server's database, to be driven at chosen times.
async fn firer(server: &TestServer) -> Firer {
    let settings = Settings::for_data_dir(server.data_dir());
    let store = Store::open(server.database_url())
        .await
        .expect("opening the server's database");
    Firer::new(
        store,
        Arc::new(settings),
        "test-clock".into(),
        Wakeup::default(),
        ScheduleWakeup::default(),
    )
}

#[tokio::test]
async fn an_interval_schedule_starts_runs_that_carry_its_id() {
    let server = server().await;
    let schedule = create(
        &server,
        json!({"plugin": "misbehave", "trigger": {"interval_ms": 200}, "labels": {"suite": "schedules"}}),
    )
    .await;
    let id = schedule["id"].as_str().expect("id");
    assert_eq!(schedule["coalesce"], true);
    assert_eq!(schedule["misfire_grace_ms"], 1000);
    assert_eq!(schedule["max_concurrent_runs"], 1);
    assert!(schedule["next_fire_at"].is_string(), "{schedule}");

    let runs = poll_until(|| async {
        let (_, list) = server.get_json(&format!("/v1/runs?schedule={id}")).await;
        let runs = list["runs"].as_array().cloned().unwrap_or_default();
        (runs.len() >= 2).then_some(runs)
    })
    .await
    .expect("two runs from the schedule");
    for run in &runs {
        assert_eq!(run["schedule_id"], id);
        assert_eq!(run["labels"]["suite"], "schedules");
    }
    let fired = fires(&server, id).await;
    assert!(
        fired
            .iter()
            .any(|fire| fire["outcome"] == "fired" && fire["run_id"].is_string())
    );

    // Deleting it stops future fires; its runs stay.
    let response = server
        .client
        .delete(server.url(&format!("/v1/schedules/{id}")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 204);
    assert_eq!(server.get_json(&format!("/v1/schedules/{id}")).await.0, 404);
    let started = firer(&server)
        .await
        .fire_due(now_millis() + 3_600_000)
        .await;
    assert_eq!(started.expect("a firing pass"), 0);
    assert_eq!(
        server.run(runs[0]["id"].as_str().expect("run id")).await["schedule_id"],
        id
    );
}

#[tokio::test]
async fn a_one_shot_schedule_fires_once() {
    let server = server().await;
    let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let schedule = create(
        &server,
        json!({"plugin": "misbehave", "trigger": {"at": at}}),
    )
    .await;
    let id = schedule["id"].as_str().expect("id");
    let fired = poll_until(|| async {
        let fires = fires(&server, id).await;
        (!fires.is_empty()).then_some(fires)
    })
    .await
    .expect("the one-shot fired");
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["outcome"], "fired");
    let (_, schedule) = server.get_json(&format!("/v1/schedules/{id}")).await;
    assert!(schedule["next_fire_at"].is_null(), "{schedule}");
    assert_eq!(
        firer(&server)
            .await
            .fire_due(now_millis() + 3_600_000)
            .await
            .expect("pass"),
        0
    );
    assert_eq!(fires(&server, id).await.len(), 1);
}

#[tokio::test]
async fn fires_missed_during_downtime_follow_grace_and_coalesce() {
    let server = server().await;
    let start = now_millis() + 60_000;
    let start_at = |offset: i64| {
        let time =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis((start + offset) as u64);
        humantime::format_rfc3339_millis(time).to_string()
    };
    let trigger = json!({"interval_ms": 1000, "start_at": start_at(0)});
    let kept = create(
        &server,
        json!({"plugin": "misbehave", "trigger": trigger, "coalesce": false,
               "misfire_grace_ms": 2500, "max_concurrent_runs": 100}),
    )
    .await;
    let coalesced = create(
        &server,
        json!({"plugin": "misbehave", "trigger": trigger, "misfire_grace_ms": 2500}),
    )
    .await;
    // The host comes back 10.2 s after the first fire time: fires at +0 s .. +10 s have come.
    let started = firer(&server)
        .await
        .fire_due(start + 10_200)
        .await
        .expect("pass");

    let outcomes = |fires: &[Value]| -> Vec<(i64, String)> {
        let mut list: Vec<(i64, String)> = fires
            .iter()
            .map(|fire| {
                let offset = millis(&fire["scheduled_at"]) - start;
                (
                    offset,
                    fire["outcome"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        list.sort();
        list
    };
    let kept_fires = fires(&server, kept["id"].as_str().expect("id")).await;
    let expected: Vec<(i64, String)> = (0..=10)
        .map(|second| {
            // 10.2 s - 2.5 s grace: fires from +8 s on are recent enough.
            let outcome = if second >= 8 { "fired" } else { "missed" };
            (second * 1000, outcome.to_owned())
        })
        .collect();
    assert_eq!(outcomes(&kept_fires), expected);
    let late = kept_fires
        .iter()
        .find(|fire| millis(&fire["scheduled_at"]) == start)
        .expect("the first fire");
    assert!(
        late["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("10200 ms late, beyond misfire_grace_ms of 2500 ms"),
        "{late}"
    );

    let coalesced_fires = fires(&server, coalesced["id"].as_str().expect("id")).await;
    let mut expected: Vec<(i64, String)> = (0..10)
        .map(|second| (second * 1000, "missed".to_owned()))
        .collect();
    expected.push((10_000, "fired".to_owned()));
    assert_eq!(outcomes(&coalesced_fires), expected);
    assert_eq!(started, 3 + 1);

    // A second pass at the same time fires nothing twice.
    assert_eq!(
        firer(&server)
            .await
            .fire_due(start + 10_200)
            .await
            .expect("pass"),
        0
    );
}

#[tokio::test]
async fn max_concurrent_runs_skips_fires_and_says_why() {
    let server = server().await;
    // Every run stays pending: the schedule's one allowed run never finishes.
    let params = json!({"steps": {"first": {"action": "pending"}}});
    let schedule = create(
        &server,
        json!({"plugin": "misbehave", "params": params, "trigger": {"interval_ms": 200}}),
    )
    .await;
    let id = schedule["id"].as_str().expect("id");
    let skipped = poll_until(|| async {
        fires(&server, id)
            .await
            .into_iter()
            .find(|fire| fire["outcome"] == "skipped")
    })
    .await
    .expect("a skipped fire");
    assert!(
        skipped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("1 runs of this schedule unfinished (max_concurrent_runs 1)"),
        "{skipped}"
    );
    let (_, list) = server.get_json(&format!("/v1/runs?schedule={id}")).await;
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_paused_schedule_does_not_fire_until_resumed() {
    let server = server().await;
    let schedule = create(
        &server,
        json!({"plugin": "misbehave", "trigger": {"interval_ms": 60000}, "paused": true}),
    )
    .await;
    let id = schedule["id"].as_str().expect("id");
    let firer = firer(&server).await;
    assert_eq!(
        firer
            .fire_due(now_millis() + 3_600_000)
            .await
            .expect("pass"),
        0
    );
    assert!(fires(&server, id).await.is_empty());

    let resumed = patch(&server, id, json!({"paused": false})).await;
    assert_eq!(resumed["paused"], false);
    let next = millis(&resumed["next_fire_at"]);
    assert!(next > now_millis(), "the next fire counts from the resume");
    assert_eq!(firer.fire_due(next + 10).await.expect("pass"), 1);
    let fired = fires(&server, id).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["outcome"], "fired");
}

#[tokio::test]
async fn invalid_schedules_get_422_naming_the_field() {
    let server = server().await;
    let cases = [
        (json!({"cron": "61 * * * *"}), "trigger.cron"),
        (
            json!({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}),
            "trigger.timezone",
        ),
        (
            json!({"interval_ms": 1000, "start_at": "2027-01-02T00:00:00Z", "end_at": "2027-01-01T00:00:00Z"}),
            "trigger.end_at",
        ),
        (json!({"interval_ms": 5}), "trigger.interval_ms"),
        // Found by schemathesis: the first fire, one interval after now, overflowed.
        (json!({"interval_ms": i64::MAX}), "trigger.interval_ms"),
        (json!({"at": "tomorrow"}), "trigger.at"),
        (json!({"cron": "* * * * *", "interval_ms": 1000}), "trigger"),
    ];
    for (trigger, field) in cases {
        let (status, problem) = server
            .post_json(
                "/v1/schedules",
                &json!({"plugin": "misbehave", "trigger": trigger}),
            )
            .await;
        assert_eq!(status, 422, "{trigger}: {problem}");
        assert_eq!(problem["field"], field, "{trigger}: {problem}");
    }
    let (status, problem) = server
        .post_json(
            "/v1/schedules",
            &json!({"plugin": "misbehave", "trigger": {"interval_ms": 1000}, "params": {"required_number": "x"}}),
        )
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("params.required_number")),
        "{problem}"
    );
    let (status, _) = server
        .post_json(
            "/v1/schedules",
            &json!({"plugin": "nope", "trigger": {"interval_ms": 1000}}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, problem) = server
        .post_json(
            "/v1/schedules",
            &json!({"plugin": "misbehave", "trigger": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}}),
        )
        .await;
    assert_eq!(status, 201, "{problem}");
}

#[tokio::test]
async fn schedules_are_listed_a_page_at_a_time_with_their_filters() {
    let server = server().await;
    let mut made = Vec::new();
    for index in 0..7 {
        let schedule = create(
            &server,
            json!({"plugin": "misbehave", "trigger": {"interval_ms": 3_600_000}, "paused": index % 2 == 0}),
        )
        .await;
        made.push(schedule["id"].as_str().expect("id").to_owned());
    }
    let pages = async |query: &str| {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cursor) => format!("/v1/schedules?{query}&cursor={cursor}"),
                None => format!("/v1/schedules?{query}"),
            };
            let (status, page) = server.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            let schedules = page["schedules"].as_array().expect("schedules");
            assert!(schedules.len() <= 3, "{page}");
            seen.extend(
                schedules
                    .iter()
                    .map(|s| (s["id"].as_str().unwrap().to_owned(), s["paused"] == true)),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return seen,
            }
        }
    };
    let all = pages("limit=3").await;
    assert_eq!(
        all.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        made
    );
    let paused = pages("limit=3&paused=true").await;
    assert_eq!(paused.len(), 4);
    assert!(paused.iter().all(|(_, paused)| *paused));
    for (query, field) in [("limit=0", "limit"), ("cursor=nope", "cursor")] {
        let (status, problem) = server.get_json(&format!("/v1/schedules?{query}")).await;
        assert_eq!(status, 422, "{query}: {problem}");
        assert_eq!(problem["field"], field);
    }
}
