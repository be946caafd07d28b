//! Several nodes on one PostgreSQL database: changes on one node reach the others through
//! `LISTEN/NOTIFY` rather than their backstop poll, and a node killed with `kill -9` loses no
//! run and causes no step to be decided twice.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row;

use crate::support::{
    EventStream, MISBEHAVE_B_WASM, MISBEHAVE_WASM, PluginFile, Reply, Scheduling, Setup,
    TestDatabase, TestServer, Webhook, poll_until, start_program,
};

fn misbehave() -> Setup {
    Setup::default().with_plugin(PluginFile::misbehave(""))
}

#[tokio::test]
async fn a_version_activated_on_one_node_serves_the_next_run_on_another() {
    let a = TestServer::start(misbehave()).await;
    let b = a.another_node(Scheduling::default()).await;
    let bytes = std::fs::read(MISBEHAVE_B_WASM).expect("reading variant b");
    let (status, uploaded) = a.upload("misbehave", bytes).await;
    assert_eq!(status, 200, "{uploaded}");
    let new_version = uploaded["active_version"].clone();
    assert_ne!(
        new_version,
        json!(
            stepwise_host::model::PluginVersion::of_bytes(
                &std::fs::read(MISBEHAVE_WASM).expect("reading variant a")
            )
            .as_str()
        )
    );

    // The very next run triggered on the other node pins the new version and runs it.
    let id = b
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    let run = b.wait_until_finished(&id).await;
    assert_eq!(run["plugin_version"], new_version, "{run:#}");
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["variant"], "b", "{run:#}");
}

#[tokio::test]
async fn a_run_accepted_by_one_node_wakes_a_sleeping_node_at_once() {
    // `a` only serves the API; `b` would otherwise look for work once a minute.
    let a = TestServer::start(Setup {
        scheduling: Scheduling {
            max_concurrent_ticks: 0,
            ..Scheduling::default()
        },
        ..misbehave()
    })
    .await;
    let b = a
        .another_node(Scheduling {
            backstop: Duration::from_secs(60),
            ..Scheduling::default()
        })
        .await;
    let started = Instant::now();
    let id = a
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    let run = a.wait_until_finished(&id).await;
    let took = started.elapsed();
    assert_eq!(run["status"], "passed", "{run:#}");
    let attempts = a.attempts(&id).await;
    let b_id = std::fs::read_to_string(b.data_dir().join("node-id")).expect("b's node id");
    assert!(
        attempts
            .iter()
            .all(|attempt| attempt["node"] == b_id.trim()),
        "{attempts:#?}"
    );
    // Far inside b's 60 s backstop: only the notification can have woken it.
    assert!(
        took < Duration::from_secs(30),
        "b found the run after {took:?}, as if by its backstop poll"
    );
}

/// A `stepwise serve` process.
struct Node {
    child: Child,
    id: String,
    base: String,
    /// The last lines the node logged, shown when the test fails.
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(dir: &Path, database_url: &str) -> Node {
        Node::start_with(dir, database_url, "lease_ms = 2000\n")
    }

    /// A node whose `stepwise.toml` ends with `extra`.
    fn start_with(dir: &Path, database_url: &str, extra: &str) -> Node {
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).expect("creating the plugins dir");
        std::fs::copy(MISBEHAVE_WASM, plugins.join("misbehave.wasm")).expect("copying");
        std::fs::write(plugins.join("misbehave.toml"), "").expect("writing the grant");
        let config = dir.join("stepwise.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\ndatabase_url = {database_url:?}\n{extra}",
                dir.display().to_string()
            ),
        )
        .expect("writing the config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_stepwise-node"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("STEPWISE_LOG", "info");
        let (child, address, log) = start_program(command);
        let id = std::fs::read_to_string(dir.join("node-id")).expect("the node's id");
        Node {
            child,
            id: id.trim().to_owned(),
            base: format!("http://{address}"),
            log,
        }
    }

    fn kill(&mut self) {
        // SIGKILL: no graceful shutdown, no lease released.
        self.child.kill().expect("killing the node");
        self.child.wait().expect("reaping the node");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until_ready(client: &reqwest::Client, nodes: &[Node]) {
    for node in nodes {
        let ready = poll_until(|| async {
            let response = client
                .get(format!("{}/readyz", node.base))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        assert!(ready.is_some(), "node not ready: {:#?}", node.log.lock());
    }
}

const RUNS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_finish_every_run_exactly_once_when_one_is_killed() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("a temp dir"))
        .collect();
    let database = TestDatabase::create(dirs[0].path()).await;
    let mut nodes: Vec<Node> = dirs
        .iter()
        .map(|dir| Node::start(dir.path(), &database.url))
        .collect();
    let client = reqwest::Client::new();
    wait_until_ready(&client, &nodes).await;
    let pool = sqlx::PgPool::connect(&database.url)
        .await
        .expect("connecting");

    // The first and third steps are pending on their first call and pass on the second, polled
    // every 200 ms; the second passes at once. (The second has a 1.5 s timeout, shorter than
    // the lease: a run orphaned while pending there would rightly time out before a takeover.)
    let twice = json!({"action": "pending_until", "attempt": 2});
    let body = json!({
        "plugin": "misbehave",
        "params": {"steps": {"first": twice, "third": twice}},
        "poll_interval_ms": 200,
    });
    // Runs are sent to the second and third nodes (as a load balancer would once the first
    // is gone) while the first works on them too, until it is killed a third of the way in.
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..16 {
        let client = client.clone();
        let bases = [nodes[1].base.clone(), nodes[2].base.clone()];
        let body = body.clone();
        senders.spawn(async move {
            for i in (sender..RUNS).step_by(16) {
                let response = client
                    .post(format!("{}/v1/runs", bases[i % 2]))
                    .json(&body)
                    .send()
                    .await
                    .expect("triggering");
                assert_eq!(response.status(), 202);
            }
        });
    }

    let finished = |pool: sqlx::PgPool| async move {
        let row =
            sqlx::query("SELECT count(*) FROM runs WHERE status NOT IN ('queued', 'running')")
                .fetch_one(&pool)
                .await
                .expect("counting");
        row.get::<i64, _>(0) as usize
    };
    let third =
        poll_until(|| async { (finished(pool.clone()).await >= RUNS / 3).then_some(()) }).await;
    assert!(
        third.is_some(),
        "a third of the runs did not finish in time"
    );
    nodes[0].kill();
    let killed_at = Instant::now();
    let killed_unix = stepwise_host::model::now_millis();
    let killed = nodes[0].id.clone();
    let orphaned: Vec<String> = sqlx::query_scalar("SELECT id FROM runs WHERE lease_owner = $1")
        .bind(&killed)
        .fetch_all(&pool)
        .await
        .expect("reading the killed node's leases");
    let done_at_kill = finished(pool.clone()).await;
    while let Some(sent) = senders.join_next().await {
        sent.expect("a sender");
    }
    let triggered = started.elapsed();

    let deadline = Duration::from_secs(240);
    while finished(pool.clone()).await < RUNS {
        assert!(
            started.elapsed() < deadline,
            "not every run finished within {deadline:?}: {} of {RUNS}; node logs: {:#?}",
            finished(pool.clone()).await,
            nodes[1].log.lock()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let makespan = started.elapsed();

    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM runs GROUP BY status")
            .fetch_all(&pool)
            .await
            .expect("counting statuses");
    assert_eq!(statuses, vec![("passed".to_owned(), RUNS as i64)]);
    let passed_steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM steps WHERE status = 'passed'")
            .fetch_one(&pool)
            .await
            .expect("counting steps");
    assert_eq!(passed_steps, 3 * RUNS as i64);
    // Exactly one terminal result per step: one deciding attempt, never two.
    let decided_twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id, position FROM attempts \
         WHERE outcome IN ('passed', 'failed') GROUP BY run_id, position HAVING count(*) > 1) AS twice",
    )
    .fetch_one(&pool)
    .await
    .expect("counting");
    assert_eq!(decided_twice, 0, "steps with two terminal results");
    let deciding: i64 =
        sqlx::query_scalar("SELECT count(*) FROM attempts WHERE outcome = 'passed'")
            .fetch_one(&pool)
            .await
            .expect("counting");
    assert_eq!(deciding, 3 * RUNS as i64);

    // The killed node held leases; the runs under them finished on the other nodes.
    assert!(
        !orphaned.is_empty(),
        "the killed node held no lease; the test did not exercise a takeover"
    );
    let finished_elsewhere: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT run_id) FROM attempts WHERE run_id = ANY($1) AND node <> $2 \
         AND outcome = 'passed' AND position = 2",
    )
    .bind(&orphaned)
    .bind(&killed)
    .fetch_one(&pool)
    .await
    .expect("counting");
    assert_eq!(finished_elsewhere as usize, orphaned.len());
    let per_node: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT node, count(*) FROM attempts GROUP BY node ORDER BY node")
            .fetch_all(&pool)
            .await
            .expect("counting per node");
    // How long after the kill each orphaned run was first called again elsewhere.
    let mut takeovers: Vec<i64> = sqlx::query_scalar::<_, i64>(
        "SELECT min(started_at) FROM attempts WHERE run_id = ANY($1) AND node <> $2 \
         AND started_at >= $3 GROUP BY run_id",
    )
    .bind(&orphaned)
    .bind(&killed)
    .bind(killed_unix)
    .fetch_all(&pool)
    .await
    .expect("reading takeovers")
    .into_iter()
    .map(|at| at - killed_unix)
    .collect();
    takeovers.sort_unstable();
    assert_eq!(
        takeovers.len(),
        orphaned.len(),
        "every orphaned run was called again"
    );
    eprintln!(
        "cluster: {RUNS} runs triggered in {triggered:?}; node {killed} killed after {:?} with \
         {done_at_kill} runs done and {} leases held (lease 2000 ms); those were called again \
         {}..{} ms after the kill (median {} ms); all runs finished {:?} after the kill \
         (makespan {makespan:?}); calls per node {per_node:?}",
        killed_at - started,
        orphaned.len(),
        takeovers[0],
        takeovers[takeovers.len() - 1],
        takeovers[takeovers.len() / 2],
        killed_at.elapsed(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_delivery_leaves_exactly_one_delivery() {
    // The first POST hangs until its sender dies; the next is answered 200.
    let webhook = Webhook::start(vec![Reply::Hang]).await;
    let config = format!(
        "lease_ms = 1000\n[[notify]]\nname = \"ops\"\nurl = \"{}/ops\"\ntimeout_ms = 600000\n",
        webhook.base
    );
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("a temp dir"))
        .collect();
    let database = TestDatabase::create(dirs[0].path()).await;
    let mut nodes: Vec<Node> = dirs
        .iter()
        .map(|dir| Node::start_with(dir.path(), &database.url, &config))
        .collect();
    let client = reqwest::Client::new();
    wait_until_ready(&client, &nodes).await;
    let pool = sqlx::PgPool::connect(&database.url)
        .await
        .expect("connecting");
    let response = client
        .post(format!("{}/v1/runs", nodes[0].base))
        .json(&json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "fail"}}}}))
        .send()
        .await
        .expect("triggering");
    assert_eq!(response.status(), 202);
    let run: serde_json::Value = response.json().await.expect("the run");
    let run_id = run["id"].as_str().expect("an id").to_owned();

    // Whoever holds the delivery's lease while its POST hangs is killed.
    let posted = poll_until(|| async { (!webhook.received().is_empty()).then_some(()) }).await;
    assert!(posted.is_some(), "the notification was never posted");
    let holder: String = sqlx::query("SELECT lease_owner FROM notifications WHERE run_id = $1")
        .bind(&run_id)
        .fetch_one(&pool)
        .await
        .expect("the notification")
        .get::<Option<String>, _>(0)
        .expect("a lease holder");
    let killed = nodes
        .iter()
        .position(|node| node.id == holder)
        .expect("the holder is one of the nodes");
    nodes[killed].kill();
    let survivor = &nodes[(killed + 1) % 3];

    let delivered = poll_until(|| async {
        let response = client
            .get(format!("{}/v1/runs/{run_id}/notifications", survivor.base))
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        let notification = body["notifications"][0].clone();
        (notification["status"] == "delivered").then_some(notification)
    })
    .await
    .unwrap_or_else(|| panic!("not delivered after the kill: {:#?}", survivor.log.lock()));
    let received = webhook.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    assert!(
        received
            .iter()
            .all(|post| post.delivery == delivered["id"].as_str().unwrap()),
        "every POST carries the one delivery id: {received:#?}"
    );
    let answered: Vec<_> = received
        .iter()
        .filter(|post| post.reply == Reply::Status(200))
        .collect();
    assert_eq!(answered.len(), 1, "{received:#?}");
    // The dead node's attempt was never recorded; the survivor's was, once.
    let attempts = delivered["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{delivered:#}");
    assert_eq!(attempts[0]["status_code"], 200);
    assert_ne!(attempts[0]["node"], holder.as_str());
}

#[tokio::test]
async fn an_event_stream_on_one_node_sees_changes_made_on_another() {
    let a = TestServer::start(misbehave()).await;
    // `b` works on nothing: every change comes from `a`.
    let b = a
        .another_node(Scheduling {
            max_concurrent_ticks: 0,
            ..Scheduling::default()
        })
        .await;
    let mut stream = EventStream::open(&b, "/v1/events", None).await;
    assert_eq!(stream.next().await.expect("the open event").event, "open");
    let id = a
        .trigger(json!({"plugin": "misbehave", "params": {}}))
        .await;
    // Four changes: the new run and three calls' writes (each event shows the state when
    // it is sent).
    let changes = std::cell::Cell::new(0);
    let events = stream
        .until(|event| {
            changes.set(changes.get() + usize::from(event.id.is_some()));
            changes.get() == 4
        })
        .await;
    let steps: Vec<&str> = events
        .iter()
        .filter(|event| event.event == "step")
        .map(|event| event.data["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["first", "second", "third"]);
    let ids: Vec<i64> = events.iter().filter_map(|event| event.id).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    assert_eq!(events.last().unwrap().data, b.run(&id).await);
}
