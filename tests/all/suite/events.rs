//! Live events (SPEC §14): each change of a run as `event: step` / `event: run` in the order
//! the changes were made, a resume with `Last-Event-ID` that misses nothing, and a stream that
//! falls behind is reset without holding anything up.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{DEADLINE, EventStream, PluginFile, Setup, SseEvent, TestServer};

fn is_end_of(id: &str) -> impl Fn(&SseEvent) -> bool + '_ {
    move |event| {
        event.event == "run"
            && event.data["id"] == id
            && !matches!(event.data["status"].as_str(), Some("queued" | "running"))
    }
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

    // Resuming after the second change replays exactly the changes after it.
    let resumed_after = ids[1];
    let mut resumed =
        EventStream::open(&server, "/v1/events?plugin=misbehave", Some(resumed_after)).await;
    let replayed = resumed.until(|event| event.id == ids.last().copied()).await;
    let tail: Vec<(String, Option<i64>)> = events
        .iter()
        .skip_while(|event| event.id != Some(resumed_after))
        .skip(1)
        .map(|event| (event.event.clone(), event.id))
        .collect();
    let again: Vec<(String, Option<i64>)> = replayed
        .iter()
        .map(|event| (event.event.clone(), event.id))
        .collect();
    assert_eq!(again, tail);

    // A run's own stream: its state first, then (resumed from the start) its changes.
    let mut one = EventStream::open(&server, &format!("/v1/runs/{id}/events"), None).await;
    let snapshot = one.next().await.expect("the run's state");
    assert_eq!((snapshot.event.as_str(), snapshot.id), ("run", None));
    assert_eq!(snapshot.data["status"], "passed");
    let mut from_start =
        EventStream::open(&server, &format!("/v1/runs/{id}/events"), Some(0)).await;
    let all_of_it = from_start
        .until(|event| event.id == ids.last().copied())
        .await;
    let own_ids: Vec<i64> = all_of_it.iter().filter_map(|event| event.id).collect();
    assert_eq!(own_ids, ids);

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
    let server = TestServer::start(
        Setup::default()
            .with_config("events_buffer = 16\n")
            .with_plugin(PluginFile::misbehave("")),
    )
    .await;
    // A client that reads its headers and then nothing, through a small receive window.
    let address = server.base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small buffer");
    let mut stream = socket
        .connect(address.parse().expect("an address"))
        .await
        .expect("connecting");
    stream
        .write_all(
            format!("GET /v1/events HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n")
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
