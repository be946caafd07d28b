//! Leases and fencing at the storage layer, where several nodes meet: a held lease is not
//! claimed again (whatever the claiming node's clock says), an expired one is, and the node
//! that lost it can neither renew it nor write a result.

use serde_json::json;
use stepwise_host::model::{AttemptOutcome, RunId, RunStatus, StepStatus, now_millis};
use stepwise_host::storage::{self, ClaimedRun, NewAttempt, RunWrite, StepWrite, Store, TickWrite};

use crate::support::{PluginFile, Scheduling, Setup, TestServer, poll_until};

/// A server that accepts runs but never works on them, so the test holds the leases itself.
async fn api_only_server() -> TestServer {
    TestServer::start(Setup {
        scheduling: Scheduling {
            max_concurrent_ticks: 0,
            ..Scheduling::default()
        },
        ..Setup::default().with_plugin(PluginFile::misbehave(""))
    })
    .await
}

fn first_step_passed(claim: &ClaimedRun) -> TickWrite {
    let now = now_millis();
    TickWrite {
        run_id: claim.id.clone(),
        lease_token: claim.lease_token,
        node: claim.owner.clone(),
        now,
        attempt: Some(NewAttempt {
            attempt: 1,
            outcome: AttemptOutcome::Passed,
            message: None,
            logs: vec![],
            started_at: now,
            duration_ms: 1,
            due_at: Some(claim.due_at),
            recording: None,
        }),
        step: StepWrite {
            position: 0,
            status: StepStatus::Passed,
            message: None,
            output: Some("{}".into()),
            passed_after_ms: Some(1),
            skip_rest: false,
        },
        run: RunWrite {
            status: RunStatus::Running,
            status_before: RunStatus::Queued,
            message: None,
            current_step: 1,
            error_count: 0,
            http_requests: 0,
            log_bytes: 0,
            recording_bytes: 0,
            drop_recordings: false,
            started_at: now,
            next_tick_at: Some(now),
            keep_lease_ms: None,
        },
        notify: None,
    }
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off() {
    let server = api_only_server().await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    let store = Store::open(server.database_url()).await.expect("opening");
    let lease_ms = 300;

    let claims = store
        .claim_due_runs("node-a", now_millis(), lease_ms, 10)
        .await
        .expect("claiming");
    assert_eq!(claims.len(), 1, "the due run is claimed");
    let a = claims[0].clone();
    assert_eq!(a.id.as_str(), id);
    // A claim is answered before its commit, so readers see the holder a moment later.
    let shown = poll_until(|| async {
        let run = server.run(&id).await;
        (run["node"] == "node-a").then_some(())
    })
    .await;
    assert!(shown.is_some(), "the holder is shown on the run");

    // Held: not claimable, even by a node whose clock runs an hour ahead.
    let hour_ahead = now_millis() + 3_600_000;
    let stolen = store
        .claim_due_runs("node-b", hour_ahead, lease_ms, 10)
        .await
        .expect("claiming");
    assert!(stolen.is_empty(), "a held lease was claimed: {stolen:?}");

    // Expired by the database's clock: node-b takes over with a newer token.
    let b = poll_until(|| async {
        let claims = store
            .claim_due_runs("node-b", now_millis(), 60_000, 10)
            .await
            .expect("claiming");
        claims.into_iter().next()
    })
    .await
    .expect("node-b takes the run over once the lease expired");
    assert!(b.lease_token > a.lease_token, "{b:?} after {a:?}");

    // node-a paused past its lease and comes back: it can neither renew nor write.
    let renewed = store
        .renew_lease(&a.id, a.lease_token, lease_ms)
        .await
        .expect("renewing");
    assert!(!renewed, "a lost lease was renewed");
    match store.record_tick(vec![first_step_passed(&a)]).await {
        Err(storage::Error::LeaseLost(lost)) => assert_eq!(lost, RunId::from_stored(id.clone())),
        other => panic!("the old holder wrote a result: {other:?}"),
    }
    assert!(
        store
            .renew_lease(&b.id, b.lease_token, 60_000)
            .await
            .expect("renewing"),
        "the holder renews its lease"
    );
    store
        .record_tick(vec![first_step_passed(&b)])
        .await
        .expect("the holder writes");
    // The same result again (a retried write, or a racing node with the same token) is refused:
    // a step's terminal result is written once.
    assert!(
        store
            .record_tick(vec![first_step_passed(&b)])
            .await
            .is_err()
    );

    let attempts = server.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert_eq!(attempts[0]["outcome"], "passed");
    assert_eq!(
        attempts[0]["node"], "node-b",
        "the attempt names the node that made it"
    );
    let run = server.run(&id).await;
    assert_eq!(run["steps"][0]["status"], "passed", "{run:#}");
    assert_eq!(run["current_step"], "second", "{run:#}");
}
