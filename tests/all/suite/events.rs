//! Live events (README, "Live events"): each change of a run as `event: step` / `event: run`
//! in the order the changes were made, a resume with `Last-Event-ID` that misses nothing and
//! sends each run once within a byte budget, a stream that falls behind is reset and one that
//! stops reading is dropped without holding anything up, streams are capped per token and in
//! all, and a revoked token's stream ends.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stepwise_host::config::AuthMode;
use stepwise_host::model::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    DEADLINE, EventStream, MISBEHAVE_WASM, PluginFile, Setup, SseEvent, TestDatabase, TestServer,
    poll_until, start_program,
};

fn is_end_of(id: &str) -> impl Fn(&SseEvent) -> bool + '_ {
    move |event| {
        event.event == "run"
            && event.data["id"] == id
            && !matches!(event.data["status"].as_str(), Some("queued" | "running"))
    }
}

/// A client that opens the stream at `path`, reads the response head and then nothing,
/// through a small receive window.
async fn client_that_stops_reading(server: &TestServer, path: &str) -> tokio::net::TcpStream {
    let address = server.base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small buffer");
    let mut stream = socket
        .connect(address.parse().expect("an address"))
        .await
        .expect("connecting");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("sending the request");
    let mut head = [0_u8; 512];
    let read = stream.read(&mut head).await.expect("reading the head");
    assert!(
        String::from_utf8_lossy(&head[..read]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..read])
    );
    stream
}

fn twice_pending() -> Value {
    json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending_until", "attempt": 2}}},
           "poll_interval_ms": 100})
}

#[tokio::test]
async fn streams_send_every_change_in_order_and_resume_without_a_gap() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let mut all = EventStream::open(&server, "/v1/events?plugin=misbehave", None).await;
    // Listening: the latest change's id (none yet).
    let open = all.next().await.expect("the open event");
    assert_eq!((open.event.as_str(), open.id), ("open", Some(0)));
    let id = server.trigger(twice_pending()).await;
    // Five changes: the new run, and four calls' writes (the first step pending once). Each
    // event carries the state when it is sent, which may be later than its change.
    let changes = std::cell::Cell::new(0);
    let events = all
        .until(|event| {
            changes.set(changes.get() + usize::from(event.id.is_some()));
            changes.get() == 5
        })
        .await;
    assert_eq!(events.last().unwrap().data["status"], "passed");

    // Run events carry increasing ids; a step event comes just before its change's run event.
    let ids: Vec<i64> = events.iter().filter_map(|event| event.id).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    assert!(
        events
            .iter()
            .all(|event| (event.event == "run") == event.id.is_some()),
        "{events:#?}"
    );
    assert_eq!(events[0].event, "run");
    let steps: Vec<&str> = events
        .iter()
        .filter(|event| event.event == "step")
        .map(|event| {
            assert_eq!(event.data["run_id"], id.as_str());
            event.data["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(steps, ["first", "first", "second", "third"]);
    let last = events.last().unwrap();
    assert_eq!(last.data, server.run(&id).await, "the run as GET shows it");

    // Resuming after the second change sends the run that changed since once, as it is now,
    // with the id of the last change (nothing after it is missed); then changes come live.
    let resumed_after = ids[1];
    let mut resumed =
        EventStream::open(&server, "/v1/events?plugin=misbehave", Some(resumed_after)).await;
    let replayed = resumed.next().await.expect("the changed run");
    assert_eq!(
        (replayed.event.as_str(), replayed.id),
        ("run", ids.last().copied())
    );
    assert_eq!(replayed.data, server.run(&id).await);
    let next = server.trigger(twice_pending()).await;
    let live = resumed.until(is_end_of(&next)).await;
    assert!(
        live.iter().all(|event| event.data["id"] == next.as_str()
            || event.data["run_id"] == next.as_str()),
        "{live:#?}"
    );

    // A run's own stream: its state first; resumed from the start, the run once, as it is.
    let mut one = EventStream::open(&server, &format!("/v1/runs/{id}/events"), None).await;
    let snapshot = one.next().await.expect("the run's state");
    assert_eq!((snapshot.event.as_str(), snapshot.id), ("run", None));
    assert_eq!(snapshot.data["status"], "passed");
    let mut from_start =
        EventStream::open(&server, &format!("/v1/runs/{id}/events"), Some(0)).await;
    let resumed_run = from_start.next().await.expect("the run");
    assert_eq!(resumed_run.event, "run");
    assert_eq!(resumed_run.data["status"], "passed");
    assert!(
        resumed_run.id >= ids.last().copied(),
        "{resumed_run:?} after {ids:?}"
    );

    // An id this server never gave is told to reset, not left waiting for the log to reach it.
    let mut unknown = EventStream::open(&server, "/v1/events", Some(1_000_000)).await;
    assert_eq!(unknown.next().await.expect("an event").event, "reset");

    // Filters and ids are checked like the rest of the API.
    for (path, field) in [
        ("/v1/events?status=done", "status"),
        ("/v1/events?plugn=x", "plugn"),
    ] {
        let (status, body) = server.get_json(path).await;
        assert_eq!((status, &body["field"]), (422, &json!(field)), "{body}");
    }
    let response = server
        .client
        .get(server.url(&format!("/v1/runs/{id}/events")))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .expect("requesting");
    assert_eq!(response.status(), 422);
    let (status, body) = server
        .get_json("/v1/runs/01a22b65-864a-72f2-afe2-07434d4f567d/events")
        .await;
    assert_eq!((status, &body["code"]), (404, &json!("run_not_found")));
}

#[tokio::test]
async fn a_stream_that_falls_behind_is_reset_and_holds_nothing_up() {
    // The write timeout (`header_read_timeout_ms`) would drop this client before it reads
    // again: that is the next test's case.
    let server = TestServer::start(
        Setup::default()
            .with_config("events_buffer = 16\nheader_read_timeout_ms = 600000\n")
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let mut stream = client_that_stops_reading(&server, "/v1/events").await;

    // Far more changes than the buffer holds, and more bytes than the sockets and the HTTP
    // server buffer (32 labels of 200 bytes make each run event 7 KiB), all finished while
    // the client reads nothing.
    let labels: serde_json::Map<String, Value> = (0..32)
        .map(|index| (format!("label-{index}"), json!("x".repeat(200))))
        .collect();
    let mut runs = Vec::new();
    for _ in 0..400 {
        runs.push(
            server
                .trigger(json!({"plugin": "misbehave", "params": {}, "labels": labels}))
                .await,
        );
    }
    for id in &runs {
        assert_eq!(server.wait_until_finished(id).await["status"], "passed");
    }

    // Now it reads: what was in flight, then a reset, then the end of the stream.
    let mut received = Vec::new();
    let mut ended = false;
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut chunk = vec![0_u8; 65536];
    while !ended && std::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_secs(1), stream.read(&mut chunk)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => ended = true,
            Ok(Ok(read)) => received.extend_from_slice(&chunk[..read]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.contains("event: reset"),
        "no reset in {} bytes",
        text.len()
    );
    assert!(ended, "the stream did not end after its reset");
    // The hub itself goes on: a new stream sees new changes.
    let mut fresh = EventStream::open(&server, "/v1/events", None).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    fresh.until(is_end_of(&id)).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_frees_its_stream() {
    // No keep-alive within the test: its wake-up lets a stalled stream find its queue
    // overflowed and end, which would free the stream without the write timeout.
    let server = TestServer::start(
        Setup::default()
            .with_config(
                "max_event_streams = 1\nheader_read_timeout_ms = 500\nevents_keep_alive_ms = 3600000\n",
            )
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    let _silent = client_that_stops_reading(&server, "/v1/events").await;
    // It holds the only stream this server allows.
    let refused = EventStream::request(&server, "/v1/events", None, None).await;
    assert_eq!(refused.status(), 429);
    // Runs whose events (each carries 256 KiB of params) soon fill what the sockets buffer:
    // once the client has taken nothing for the write timeout, it is disconnected, and the
    // stream it held is free.
    let padding = "x".repeat(256 << 10);
    let freed = poll_until(|| async {
        server
            .trigger(json!({"plugin": "misbehave", "params": {"padding": padding}}))
            .await;
        let response = EventStream::request(&server, "/v1/events", None, None).await;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(
        freed.is_some(),
        "the client that stopped reading kept its stream"
    );
}

/// A problem's `detail`, asserting its status and code.
async fn problem(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("a problem");
    assert_eq!(body["code"], code, "{body}");
    body["detail"].as_str().expect("a detail").to_owned()
}

#[tokio::test]
async fn streams_are_capped_per_token_and_in_all() {
    let server = TestServer::start(Setup::default().with_auth(AuthMode::Tokens).with_config(
        "max_event_streams_per_token = 2\nmax_event_streams = 3\nevents_keep_alive_ms = 100\n",
    ))
    .await;
    let first = server.create_token(Role::Viewer).await;
    let second = server.create_token(Role::Viewer).await;
    let mut first_streams = Vec::new();
    for _ in 0..2 {
        first_streams.push(EventStream::open_as(&server, "/v1/events", None, Some(&first)).await);
    }
    let refused = EventStream::request(&server, "/v1/events", None, Some(&first)).await;
    let detail = problem(refused, 429, "too_many_streams").await;
    assert!(detail.contains("max_event_streams_per_token"), "{detail}");

    let _third = EventStream::open_as(&server, "/v1/events", None, Some(&second)).await;
    let refused = EventStream::request(&server, "/v1/events", None, Some(&second)).await;
    let detail = problem(refused, 429, "too_many_streams").await;
    assert!(detail.contains("max_event_streams allows"), "{detail}");

    // A stream the client closes gives its place back once the server finds it closed (at
    // its next keep-alive at the latest).
    first_streams.pop();
    let reopened = poll_until(|| async {
        let response = EventStream::request(&server, "/v1/events", None, Some(&second)).await;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(reopened.is_some(), "a closed stream kept its place");
}

#[tokio::test]
async fn a_revoked_tokens_stream_ends_within_a_keep_alive() {
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_config("events_keep_alive_ms = 200\n"),
    )
    .await;
    let admin = server.create_token(Role::Admin).await;
    let created = server
        .client
        .post(server.url("/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"role": "viewer", "name": "watcher"}))
        .send()
        .await
        .expect("creating a token");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("the new token");
    let watcher = created["secret"].as_str().expect("its secret").to_owned();
    let mut watched = EventStream::open_as(&server, "/v1/events", None, Some(&watcher)).await;
    assert_eq!(watched.next().await.expect("listening").event, "open");

    let revoked = server
        .client
        .delete(server.url("/v1/tokens/watcher"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("revoking");
    assert_eq!(revoked.status(), 204);
    let revoked_at = Instant::now();
    let last = watched.next().await.expect("a reset");
    assert_eq!(last.event, "reset", "{last:?}");
    assert!(
        last.data["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("revoked")),
        "{last:?}"
    );
    assert!(watched.next().await.is_none(), "the stream went on");
    // One keep-alive interval, and room for a slow machine.
    assert!(
        revoked_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        revoked_at.elapsed()
    );
    // The token is refused from now on, streams and all.
    let refused = EventStream::request(&server, "/v1/events", None, Some(&watcher)).await;
    assert_eq!(refused.status(), 401);
}

/// The server's process, killed when the test ends however it ends.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A field of `/proc/{pid}/status` in KiB: `VmRSS` (resident now) or `VmHWM` (the most
/// since the peak was last reset).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// How much more than `before` the server held at its peak since the peak was reset.
const REPLAY_MEMORY_BOUND_KIB: u64 = 64 << 10;

#[tokio::test]
async fn a_resume_from_far_back_sends_each_run_once_within_its_budget_and_bounded_memory() {
    // The server runs as a process of its own: its memory is then its own, not shared with
    // the tests that run beside this one.
    let dir = tempfile::tempdir().expect("a temp dir");
    let database = TestDatabase::create(dir.path()).await;
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("the plugins dir");
    std::fs::copy(MISBEHAVE_WASM, plugins.join("misbehave.wasm")).expect("copying");
    std::fs::write(plugins.join("misbehave.toml"), "").expect("writing the grant");
    let config = dir.path().join("stepwise.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\ndatabase_url = {:?}\nevents_replay_bytes = 200000\n",
            dir.path().display().to_string(),
            database.url
        ),
    )
    .expect("writing the config");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"));
    command.args(["serve", "--config"]).arg(&config);
    let (child, address, log) = start_program(command);
    let server = Process(child);
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let ready = poll_until(|| async {
        let response = client.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "not ready: {:#?}", log.lock());

    // Twenty runs of 20 KB each (their params), finished.
    let padding = "x".repeat(20_000);
    let mut runs = Vec::new();
    for _ in 0..20 {
        let response = client
            .post(format!("{base}/v1/runs"))
            .json(&json!({"plugin": "misbehave", "params": {"padding": padding}}))
            .send()
            .await
            .expect("triggering");
        assert_eq!(response.status(), 202);
        let run: Value = response.json().await.expect("the run");
        runs.push(run["id"].as_str().expect("an id").to_owned());
    }
    for id in &runs {
        let finished = poll_until(|| async {
            let run: Value = client
                .get(format!("{base}/v1/runs/{id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (run["status"] == "passed").then_some(())
        })
        .await;
        assert!(finished.is_some(), "run {id} did not pass");
    }
    let listen = |last_event_id: Option<i64>| {
        let mut request = client
            .get(format!("{base}/v1/events"))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        async move { EventStream::from_response(request.send().await.expect("a stream")) }
    };
    // Then each of them changed 500 times: 10,000 changes to resume after, as many as one
    // resume reads.
    let at = stepwise_host::model::now_millis();
    let insert = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500) \
                  INSERT INTO events (run_id, at) SELECT runs.id, $1 FROM n CROSS JOIN runs";
    let resume_after = match database.url.strip_prefix("sqlite://") {
        Some(_) => {
            let pool = sqlx::SqlitePool::connect(&database.url)
                .await
                .expect("connecting");
            let head = listen(None).await.next().await.expect("listening");
            sqlx::query(insert)
                .bind(at)
                .execute(&pool)
                .await
                .expect("inserting");
            head.id.expect("the latest change's id")
        }
        None => {
            let pool = sqlx::PgPool::connect(&database.url)
                .await
                .expect("connecting");
            // The server numbers changes (`seq`, the event id) after they are committed.
            let all_numbered = || async {
                let (waiting,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM events WHERE seq IS NULL")
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (waiting == 0).then_some(())
            };
            assert!(poll_until(all_numbered).await.is_some(), "not numbered");
            let head = listen(None).await.next().await.expect("listening");
            sqlx::query(insert)
                .bind(at)
                .execute(&pool)
                .await
                .expect("inserting");
            assert!(poll_until(all_numbered).await.is_some(), "not numbered");
            head.id.expect("the latest change's id")
        }
    };

    let pid = server.0.id();
    let before = memory_kib(pid, "VmRSS");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting the peak");
    let mut resumed = listen(Some(resume_after)).await;
    let first = resumed.next().await.expect("the first run");
    let peak = memory_kib(pid, "VmHWM") - before;
    assert!(
        peak < REPLAY_MEMORY_BOUND_KIB,
        "{peak} KiB more before the first event"
    );
    let mut events = vec![first];
    events.extend(resumed.until(|event| event.event == "reset").await);
    assert!(resumed.next().await.is_none(), "the stream went on");
    let peak = memory_kib(pid, "VmHWM") - before;
    assert!(
        peak < REPLAY_MEMORY_BOUND_KIB,
        "{peak} KiB more during the resume"
    );

    // Each run at most once, under ever later ids, until the budget is spent: about 200 KB
    // of runs of 20 KB, then a reset that names the budget.
    let (reset, sent) = events.split_last().expect("events");
    assert!(
        reset.data["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("events_replay_bytes")),
        "{reset:?}"
    );
    assert!(sent.iter().all(|event| event.event == "run"), "{sent:#?}");
    let ids: Vec<&str> = sent
        .iter()
        .map(|event| event.data["id"].as_str().expect("a run id"))
        .collect();
    let distinct: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a run sent twice: {ids:?}");
    assert!((9..=11).contains(&ids.len()), "{} runs sent", ids.len());
    let event_ids: Vec<i64> = sent.iter().map(|event| event.id.expect("an id")).collect();
    assert!(
        event_ids.windows(2).all(|pair| pair[0] < pair[1]),
        "{event_ids:?}"
    );
}
