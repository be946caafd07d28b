//! The floors under `steps` and `triggers`: what the machine allows a durable engine, with
//! everything but the calls and the least a durable result needs taken away. The same trivial
//! steps as `steps` (a run of three steps that pass at once, each call a fresh instance) on 64
//! tasks of the bench's runtime, measured against the same ceiling (`cores ÷ one plugin
//! call`), in rounds:
//!
//! - **calls only**: the three calls of each run and nothing else;
//! - **calls + a hand-off**: and each run's results sent to another thread, which drops them;
//! - **calls + one row per step**: and the results written by one writer thread on SQLite
//!   (WAL, `synchronous = FULL`), grouped into one commit per batch: per run, one update of a
//!   narrow row fenced by a token and one insert per step into an append-only table; the last
//!   commit counts;
//! - **calls + one row per run**: the least of all, one insert per run holding its three
//!   results, nothing updated.
//!
//! No claims, no reads, no HTTP, no change log: an engine of this shape does less than any
//! that keeps what Stepwise keeps, so its rate bounds theirs from above. The same holds for
//! the trigger floor ([`triggers`]): a bare axum route, one row, one commit, one call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{Connection, params};
use stepwise_host::grant::Limits;
use stepwise_host::model::{AttemptOutcome, PluginVersion};
use stepwise_host::runtime::{LoadedPlugin, Runtime, StepCall};

use crate::Options;
use crate::server::{MISBEHAVE_WASM, no_capabilities};
use crate::stats::Summary;

const STEPS: [&str; 3] = ["first", "second", "third"];
const TASKS: usize = 64;
const ROUNDS: usize = 3;
/// Writes in one transaction at most, as the host's SQLite writer.
const MAX_BATCH: usize = 512;

/// One run's results, as the writer receives them.
struct Finished {
    run: i64,
    outcomes: Vec<(&'static str, Option<String>)>,
}

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let runs = options.runs.min(20_000);
    let (per_call_us, cores, ceiling) = crate::throughput::call_ceiling().await?;
    let runtime = Runtime::new(None, TASKS, &Limits::default())?;
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    let plugin = runtime
        .load(&PluginVersion::of_bytes(&bytes), bytes.into())
        .await?;
    let (mut calls_only, mut handed, mut per_step, mut per_run) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        calls_only.push(steps_per_second(&runtime, &plugin, runs, None).await?);
        for (rows, rates) in [
            (Rows::Nothing, &mut handed),
            (Rows::PerStep, &mut per_step),
            (Rows::PerRun, &mut per_run),
        ] {
            let dir = tempfile::tempdir()?;
            let writer = Writer::start(&dir.path().join("floor.sqlite"), runs, rows)?;
            rates.push(steps_per_second(&runtime, &plugin, runs, Some(writer)).await?);
        }
    }
    let median = |rates: &[f64]| Summary::of(rates).median;
    let (calls_only, handed, per_step, per_run) = (
        median(&calls_only),
        median(&handed),
        median(&per_step),
        median(&per_run),
    );
    let (mut posted, mut p99s, mut healthz) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (rate, p99, healthz_rate) = triggers(&runtime, &plugin).await?;
        posted.push(rate);
        p99s.push(p99);
        healthz.push(healthz_rate);
    }
    println!(
        "\n## the floor under triggers (medians of {ROUNDS} rounds of 10 s, 64 connections)\n\n\
         POST: {:.0} req/s, p99 {:.2} ms; GET /healthz on the same server: {:.0} req/s",
        median(&posted),
        median(&p99s),
        median(&healthz),
    );
    println!(
        "\n## the floor under steps (medians of {ROUNDS} rounds, {runs} runs × 3 steps)\n\n\
         one plugin call {per_call_us:.1} µs (median) on {cores} cores: ceiling {ceiling:.0} calls/s\n\
         calls only: {calls_only:.0} steps/s = {:.0} % of the ceiling\n\
         calls + a hand-off to a thread, nothing written: {handed:.0} steps/s = {:.0} % of the ceiling\n\
         calls + one row per step, durable: {per_step:.0} steps/s = {:.0} % of the ceiling\n\
         calls + one row per run, durable: {per_run:.0} steps/s = {:.0} % of the ceiling",
        100.0 * calls_only / ceiling,
        100.0 * handed / ceiling,
        100.0 * per_step / ceiling,
        100.0 * per_run / ceiling,
    );
    Ok(())
}

/// Calls every run's three steps on `TASKS` tasks; with a writer, hands each run's results to
/// it and waits for the commit of the last. Returns steps per second.
async fn steps_per_second(
    runtime: &Runtime,
    plugin: &Arc<LoadedPlugin>,
    runs: usize,
    writer: Option<Writer>,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (runtime, plugin, next) = (runtime.clone(), plugin.clone(), next.clone());
        let results = writer.as_ref().map(|writer| writer.results.clone());
        tasks.spawn(async move {
            let capabilities = no_capabilities();
            loop {
                let run = next.fetch_add(1, Ordering::Relaxed);
                if run >= runs {
                    return anyhow::Ok(());
                }
                let mut outcomes = Vec::with_capacity(STEPS.len());
                for (position, step) in STEPS.into_iter().enumerate() {
                    let call = StepCall {
                        run_id: run.to_string(),
                        step: step.into(),
                        attempt: 1,
                        elapsed: Duration::ZERO,
                        run_created_at_ms: 0,
                        params: "{}".into(),
                        outputs: "{}".into(),
                        traceparent: None,
                        tape: Default::default(),
                    };
                    let report = runtime
                        .run_step(&plugin, call, &capabilities)
                        .await
                        .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
                    anyhow::ensure!(
                        report.outcome == AttemptOutcome::Passed,
                        "step {position} did not pass: {:?}",
                        report.message
                    );
                    outcomes.push((report.outcome.as_str(), report.output));
                }
                if let Some(results) = &results {
                    results.send(Finished {
                        run: run as i64,
                        outcomes,
                    })?;
                }
            }
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.context("a calling task")??;
    }
    if let Some(writer) = writer {
        drop(writer.results);
        writer
            .done
            .await
            .context("the writer thread")?
            .context("writing")?;
    }
    Ok((runs * STEPS.len()) as f64 / started.elapsed().as_secs_f64())
}

/// What the writer keeps of a run.
#[derive(Clone, Copy)]
enum Rows {
    /// Nothing: the results are dropped.
    Nothing,
    /// The run's narrow row updated, fenced by its token, and a row per step.
    PerStep,
    /// One row holding the three results.
    PerRun,
}

/// The writer thread: group commits of whatever has queued.
struct Writer {
    results: mpsc::Sender<Finished>,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

impl Writer {
    fn start(path: &std::path::Path, runs: usize, rows: Rows) -> anyhow::Result<Writer> {
        let connection = Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             CREATE TABLE runs (id INTEGER PRIMARY KEY, token INTEGER NOT NULL, \
                 position INTEGER NOT NULL, status TEXT NOT NULL); \
             CREATE TABLE results (seq INTEGER PRIMARY KEY, run INTEGER NOT NULL, \
                 position INTEGER NOT NULL, outcome TEXT NOT NULL, output TEXT); \
             CREATE TABLE finished (seq INTEGER PRIMARY KEY, run INTEGER NOT NULL, \
                 results TEXT NOT NULL);",
        )?;
        let insert = "INSERT INTO runs (id, token, position, status) VALUES (?1, 1, 0, 'running')";
        connection.execute_batch("BEGIN")?;
        for run in 0..runs {
            connection.prepare_cached(insert)?.execute([run as i64])?;
        }
        connection.execute_batch("COMMIT")?;
        let (results, queue) = mpsc::channel();
        let (finished, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || {
                let _ = finished.send(write(&connection, &queue, rows));
            })?;
        Ok(Writer { results, done })
    }
}

/// Writes what the calling tasks finish until every sender is gone.
fn write(
    connection: &Connection,
    queue: &mpsc::Receiver<Finished>,
    rows: Rows,
) -> anyhow::Result<()> {
    let row: fn(&Connection, &Finished) -> anyhow::Result<()> = match rows {
        Rows::Nothing => {
            // Only the hand-off is measured: no transaction either.
            while queue.recv().is_ok() {}
            return Ok(());
        }
        Rows::PerStep => per_step,
        Rows::PerRun => per_run,
    };
    group_commits(connection, queue, |connection, finished| {
        row(connection, &finished)?;
        Ok(None)
    })
}

/// Group commits: whatever has queued (up to `MAX_BATCH` writes) in one transaction, then an
/// answer to each write that waits for its commit. Returns when every sender is gone.
fn group_commits<T>(
    connection: &Connection,
    queue: &mpsc::Receiver<T>,
    mut write: impl FnMut(&Connection, T) -> anyhow::Result<Option<tokio::sync::oneshot::Sender<()>>>,
) -> anyhow::Result<()> {
    while let Ok(first) = queue.recv() {
        connection.execute_batch("BEGIN IMMEDIATE")?;
        let mut answers = Vec::new();
        let mut written = 0;
        let mut next = Some(first);
        while let Some(item) = next {
            answers.extend(write(connection, item)?);
            written += 1;
            next = if written < MAX_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        connection.execute_batch("COMMIT")?;
        for committed in answers {
            let _ = committed.send(());
        }
    }
    Ok(())
}

/// The run's row, fenced by its token, and one row per step.
fn per_step(connection: &Connection, finished: &Finished) -> anyhow::Result<()> {
    let updated = connection
        .prepare_cached(
            "UPDATE runs SET position = ?2, status = 'passed' WHERE id = ?1 AND token = 1",
        )?
        .execute(params![finished.run, finished.outcomes.len() as i64])?;
    anyhow::ensure!(updated == 1, "run {} lost its token", finished.run);
    let mut insert = connection.prepare_cached(
        "INSERT INTO results (run, position, outcome, output) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (position, (outcome, output)) in finished.outcomes.iter().enumerate() {
        insert.execute(params![finished.run, position as i64, outcome, output])?;
    }
    Ok(())
}

/// One row holding the run's three results.
fn per_run(connection: &Connection, finished: &Finished) -> anyhow::Result<()> {
    let results: Vec<String> = finished
        .outcomes
        .iter()
        .map(|(outcome, output)| format!("{outcome}:{}", output.as_deref().unwrap_or("")))
        .collect();
    connection
        .prepare_cached("INSERT INTO finished (run, results) VALUES (?1, ?2)")?
        .execute(params![finished.run, results.join("\n")])?;
    Ok(())
}

/// What the trigger floor's writer is asked.
enum Write {
    /// A new run, answered after the commit that holds it.
    Run(i64, String, tokio::sync::oneshot::Sender<()>),
    /// A run's first call, pending: its row updated, its result added.
    Tick(i64, Option<String>),
}

/// The floor under `triggers`: `POST /runs` from 64 connections for 10 s against a server with
/// nothing but what a durable trigger needs: the body parsed as JSON, one row written by the
/// writer thread and committed (`synchronous = FULL`) before the `202`, then the run's one
/// call (it stays pending) and its result written. Returns requests/s, p99 ms, and the same
/// server's `GET /healthz` rate.
async fn triggers(
    runtime: &Runtime,
    plugin: &Arc<LoadedPlugin>,
) -> anyhow::Result<(f64, f64, f64)> {
    use axum::extract::State;
    use axum::http::StatusCode;

    struct Floor {
        writes: mpsc::Sender<Write>,
        runtime: Runtime,
        plugin: Arc<LoadedPlugin>,
        next: AtomicUsize,
    }

    async fn trigger(State(floor): State<Arc<Floor>>, body: axum::body::Bytes) -> StatusCode {
        let Ok(params) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return StatusCode::BAD_REQUEST;
        };
        let run = floor.next.fetch_add(1, Ordering::Relaxed) as i64;
        let (committed, answer) = tokio::sync::oneshot::channel();
        if floor
            .writes
            .send(Write::Run(run, params.to_string(), committed))
            .is_err()
            || answer.await.is_err()
        {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        let floor = floor.clone();
        tokio::spawn(async move {
            let call = StepCall {
                run_id: run.to_string(),
                step: "first".into(),
                attempt: 1,
                elapsed: Duration::ZERO,
                run_created_at_ms: 0,
                params: params.to_string(),
                outputs: "{}".into(),
                traceparent: None,
                tape: Default::default(),
            };
            if let Ok(report) = floor
                .runtime
                .run_step(&floor.plugin, call, &no_capabilities())
                .await
            {
                let _ = floor.writes.send(Write::Tick(run, report.message));
            }
        });
        StatusCode::ACCEPTED
    }

    let dir = tempfile::tempdir()?;
    let connection = Connection::open(dir.path().join("floor.sqlite"))?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         CREATE TABLE runs (id INTEGER PRIMARY KEY, params TEXT NOT NULL, status TEXT NOT NULL); \
         CREATE TABLE results (seq INTEGER PRIMARY KEY, run INTEGER NOT NULL, message TEXT);",
    )?;
    let (writes, queue) = mpsc::channel::<Write>();
    std::thread::Builder::new()
        .name("floor-writer".into())
        .spawn(move || {
            group_commits(&connection, &queue, |connection, write| match write {
                Write::Run(run, params, committed) => {
                    connection
                        .prepare_cached(
                            "INSERT INTO runs (id, params, status) VALUES (?1, ?2, 'queued')",
                        )?
                        .execute(params![run, params])?;
                    Ok(Some(committed))
                }
                Write::Tick(run, message) => {
                    connection
                        .prepare_cached("UPDATE runs SET status = 'running' WHERE id = ?1")?
                        .execute([run])?;
                    connection
                        .prepare_cached("INSERT INTO results (run, message) VALUES (?1, ?2)")?
                        .execute(params![run, message])?;
                    Ok(None)
                }
            })
        })?;
    let floor = Arc::new(Floor {
        writes,
        runtime: runtime.clone(),
        plugin: plugin.clone(),
        next: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/runs", axum::routing::post(trigger))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(floor);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let host = addr.to_string();
    let body = crate::throughput::pending_run()["params"].to_string();
    let hammer = |request: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            crate::load::hammer(addr, request, 64, Duration::from_secs(10))
        })
    };
    let mut posted = hammer(crate::load::post_json(&host, "/runs", None, &body)).await??;
    let healthz = hammer(crate::load::get(&host, "/healthz")).await??;
    server.abort();
    posted.latencies_ms.sort_by(f64::total_cmp);
    let p99 = posted.latencies_ms[(posted.latencies_ms.len() * 99).div_ceil(100) - 1];
    Ok((posted.per_second(), p99, healthz.per_second()))
}
