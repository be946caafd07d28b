//! Throughput: triggers per second, runs all due at once, trivial steps end to end, and one
//! plugin call on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use stepwise_host::capabilities::secrets::{Secret, SecretSet};
use stepwise_host::config::{AuthMode, Settings};
use stepwise_host::grant::Limits;
use stepwise_host::model::{PluginVersion, now_millis};
use stepwise_host::runtime::{Capabilities, Runtime, StepCall};
use stepwise_host::scheduler::planning::{RunOptions, plan_run};
use stepwise_host::storage::Store;

use crate::server::{BenchServer, MISBEHAVE_B_WASM, MISBEHAVE_WASM};
use crate::stats::{print_header, print_row};
use crate::{Options, load};

/// `POST /v1/runs` from 64 connections for 10 s, without authentication and then with a
/// bearer token checked on every request, on fresh servers; and `GET /healthz` on the same
/// servers the same way, the limit of the HTTP stack. Each run's first step stays pending with
/// an hour's poll, so every run costs its trigger and one tick. The load comes from
/// `load::hammer`, on a thread of its own.
pub async fn triggers(_options: &Options) -> anyhow::Result<()> {
    // Interleaved rounds, so that a noisy neighbour on the machine hits both modes alike.
    const ROUNDS: usize = 3;
    let (mut open, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        open.push(triggers_with(AuthMode::None).await?);
        tokens.push(triggers_with(AuthMode::Tokens).await?);
    }
    let median = |rounds: &[Round], of: fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(of).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!("\n## triggers: medians over {ROUNDS} rounds\n");
    println!("| | POST /v1/runs req/s | p50 ms | p99 ms | GET /healthz req/s | POST ÷ healthz |");
    println!("|---|---|---|---|---|---|");
    for (name, rounds) in [("--auth none", &open), ("--auth tokens", &tokens)] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} % |",
            median(rounds, |round| round.per_second),
            median(rounds, |round| round.p50_ms),
            median(rounds, |round| round.p99_ms),
            median(rounds, |round| round.healthz_per_second),
            100.0 * median(rounds, |round| round.per_second / round.healthz_per_second),
        );
    }
    Ok(())
}

/// One round of `triggers`.
struct Round {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    healthz_per_second: f64,
}

/// A trigger of a run whose first step stays pending for an hour: it costs its trigger and
/// one tick.
pub(crate) fn pending_run() -> serde_json::Value {
    json!({
        "plugin": "misbehave",
        "poll_interval_ms": 3_600_000,
        "params": {"steps": {"first": {"action": "pending"}}},
    })
}

async fn triggers_with(auth: AuthMode) -> anyhow::Result<Round> {
    const CONNECTIONS: usize = 64;
    const SECONDS: u64 = 10;
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start_with_auth(dir.path(), auth).await?);
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    let post = load::post_json(
        server.host_port(),
        "/v1/runs",
        server.authorization.as_deref(),
        &pending_run().to_string(),
    );
    let addr = server.addr();
    let duration = Duration::from_secs(SECONDS);
    let mut load =
        tokio::task::spawn_blocking(move || load::hammer(addr, post, CONNECTIONS, duration))
            .await??;
    let healthz = load::get(server.host_port(), "/healthz");
    let healthz =
        tokio::task::spawn_blocking(move || load::hammer(addr, healthz, CONNECTIONS, duration))
            .await??;
    // Every 202 is a run on disk: the count must match.
    let settings = Settings::for_data_dir(dir.path());
    let database = sqlx::SqlitePool::connect(&settings.database_url).await?;
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
        .fetch_one(&database)
        .await?;
    anyhow::ensure!(
        stored as usize == load.latencies_ms.len(),
        "{} runs accepted, {stored} stored",
        load.latencies_ms.len()
    );
    let auth_name = match auth {
        AuthMode::None => "--auth none",
        AuthMode::Tokens => "--auth tokens",
    };
    print_header(&format!(
        "POST /v1/runs, durable (SQLite WAL, synchronous FULL), {CONNECTIONS} connections, {SECONDS} s, {auth_name}"
    ));
    print_row("request latency", "ms", &load.latencies_ms);
    print_row(
        "GET /healthz latency, same server",
        "ms",
        &healthz.latencies_ms,
    );
    println!(
        "\nthroughput: {:.0} requests/s ({} accepted in {:.1} s); GET /healthz {:.0} requests/s",
        load.per_second(),
        load.latencies_ms.len(),
        load.elapsed.as_secs_f64(),
        healthz.per_second(),
    );
    load.latencies_ms.sort_by(f64::total_cmp);
    let quantile = |q: usize| load.latencies_ms[(load.latencies_ms.len() * q).div_ceil(100) - 1];
    Ok(Round {
        per_second: load.per_second(),
        p50_ms: quantile(50),
        p99_ms: quantile(99),
        healthz_per_second: healthz.per_second(),
    })
}

/// `runs` runs of a 3-step plugin, made due at the same moment: they are written while the
/// server is down, and the server starts. Steps pass 1 s, 2 s and 3 s after the run started;
/// the poll interval is 1 s, so the ideal makespan is 3 s.
pub async fn due_at_once(options: &Options) -> anyhow::Result<()> {
    let runs = options.runs;
    let (per_call_us, cores, ceiling) = call_ceiling().await?;
    let params = json!({"steps": {
        "first": {"action": "pass_after_ms", "ms": 1000},
        "second": {"action": "pass_after_ms", "ms": 2000},
        "third": {"action": "pass_after_ms", "ms": 3000},
    }});
    let written = Instant::now();
    let (dir, settings) = due_runs(runs, &params, Some(Duration::from_secs(1))).await?;
    let written = written.elapsed();

    let started = Instant::now();
    let started_ms = now_millis();
    let server = BenchServer::start(dir.path()).await?;
    let database = sqlx::SqlitePool::connect(&settings.database_url).await?;
    wait_until_finished(
        &database,
        started,
        Duration::from_secs(1800),
        Duration::from_millis(100),
    )
    .await?;
    let (first_start, last_finish, not_passed): (i64, i64, i64) = sqlx::query_as(
        "SELECT min(started_at), max(finished_at), sum(status <> 'passed') FROM runs",
    )
    .fetch_one(&database)
    .await?;
    let failures: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT status, message, count(*) FROM runs WHERE status <> 'passed' GROUP BY status, message \
         ORDER BY count(*) DESC LIMIT 5",
    )
    .fetch_all(&database)
    .await?;
    let (calls,): (i64,) = sqlx::query_as("SELECT count(*) FROM attempts")
        .fetch_one(&database)
        .await?;
    // The runs were written before the server started: their first ticks count from the
    // start, not from when they were written.
    let lags: Vec<(i64,)> =
        sqlx::query_as("SELECT started_at - max(due_at, ?) FROM attempts WHERE due_at IS NOT NULL")
            .bind(started_ms)
            .fetch_all(&database)
            .await?;
    let lags: Vec<f64> = lags.into_iter().map(|(lag,)| lag.max(0) as f64).collect();
    let makespan = (last_finish - first_start) as f64;
    print_header(&format!(
        "{runs} runs of a 3-step plugin due at once (steps pass after 1 s, 2 s, 3 s; poll 1 s)"
    ));
    print_row("tick lag", "ms", &lags);
    // The calls alone need this long at the machine's ceiling.
    let calls_ms = calls as f64 * 1e3 / ceiling;
    println!(
        "\nmakespan {makespan:.0} ms = {:.2} × the ideal 3000 ms; {calls} calls at the ceiling \
         ({per_call_us:.1} µs per call, {cores} cores) take {calls_ms:.0} ms: makespan = {:.2} × \
         the larger; {not_passed} runs not passed; peak RSS of the process {:.0} MiB; writing \
         the runs took {:.1} s",
        makespan / 3000.0,
        makespan / calls_ms.max(3000.0),
        crate::stats::peak_resident_mib()?,
        written.as_secs_f64()
    );
    // Under the figures, where a reader of the summary sees them.
    for (status, message, count) in failures {
        println!(
            "not passed: {count} × {status}: {}",
            message.unwrap_or_default()
        );
    }
    drop(server);
    Ok(())
}

/// Trivial steps (three that pass at once per run) against the machine's call ceiling,
/// `cores ÷ one plugin call`, measured in the same invocation: `runs` runs written before the
/// server starts (the engine alone: claim, call, write), then as many triggered over HTTP by
/// 16 clients while they run (from the first trigger to the last step written).
pub async fn trivial_steps(options: &Options) -> anyhow::Result<()> {
    let runs = options.runs.min(20_000);
    let (per_call_us, cores, ceiling) = call_ceiling().await?;

    // Written first, then the server starts: every run is due at once.
    let (dir, settings) = due_runs(runs, &json!({}), None).await?;
    let started = Instant::now();
    let server = BenchServer::start(dir.path()).await?;
    let database = sqlx::SqlitePool::connect(&settings.database_url).await?;
    wait_until_finished(
        &database,
        started,
        Duration::from_secs(600),
        Duration::from_millis(20),
    )
    .await?;
    let engine = (runs * 3) as f64 / started.elapsed().as_secs_f64();
    // The same steps from the first call to the last write, without the server's start.
    let (first_call, last_write): (i64, i64) =
        sqlx::query_as("SELECT (SELECT min(started_at) FROM attempts), max(finished_at) FROM runs")
            .fetch_one(&database)
            .await?;
    let working = (runs * 3) as f64 * 1e3 / (last_write - first_call).max(1) as f64;
    drop(server);

    let (end_to_end, triggered, elapsed) = triggered_steps(runs, Beside::Nothing).await?;
    // The same with a shadow version set: each trigger also runs the shadow beside it. The
    // steps counted are the primaries' (the ones that decide).
    let (shadowed, _, _) = triggered_steps(runs, Beside::Shadow).await?;
    // The same with every attempt recorded (`record = "all"`): the tape, the compression and
    // a recording stored with each attempt.
    let (recorded, _, _) = triggered_steps(runs, Beside::Recording).await?;
    println!(
        "\n## trivial steps (claim, instantiate, call, persist)\n\n\
         one plugin call {per_call_us:.1} µs (median) on {cores} cores: ceiling {ceiling:.0} calls/s\n\
         {runs} runs × 3 steps due at once: {engine:.0} steps/s = {:.0} % of the ceiling \
         (from the first call to the last write, without the server's start: {working:.0} \
         steps/s = {:.0} %)\n\
         {runs} runs × 3 steps triggered over HTTP meanwhile: {end_to_end:.0} steps/s = {:.0} % \
         (triggering took {:.2} s of {:.2} s)\n\
         the same with a shadow version set: {shadowed:.0} primary steps/s = {:.2}× without \
         (each run has a shadow run beside it: twice the calls)\n\
         the same with record = \"all\": {recorded:.0} steps/s = {:.2}× without",
        100.0 * engine / ceiling,
        100.0 * working / ceiling,
        100.0 * end_to_end / ceiling,
        triggered.as_secs_f64(),
        elapsed.as_secs_f64(),
        shadowed / end_to_end,
        recorded / end_to_end,
    );
    Ok(())
}

/// What runs beside a triggered run's own calls in [`triggered_steps`].
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    Nothing,
    /// A shadow version's run.
    Shadow,
    /// The recording of every attempt.
    Recording,
}

/// `runs` runs of misbehave triggered over HTTP from 16 tasks while the server works them
/// off, with a shadow version or a recording beside them or not: primary steps/s, and how
/// long triggering and everything took.
async fn triggered_steps(runs: usize, beside: Beside) -> anyhow::Result<(f64, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start(dir.path()).await?);
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    if beside == Beside::Recording {
        server
            .upload_with_grant("misbehave", bytes, "record = \"all\"\n")
            .await?;
    } else {
        server.upload("misbehave", bytes).await?;
    }
    if beside == Beside::Shadow {
        server
            .upload_shadow("misbehave", std::fs::read(MISBEHAVE_B_WASM)?)
            .await?;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for chunk in 0..16 {
        let server = server.clone();
        let count = runs / 16 + usize::from(chunk < runs % 16);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                server.trigger(&json!({"plugin": "misbehave"})).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("trigger task")??;
    }
    let triggered = started.elapsed();
    let settings = Settings::for_data_dir(dir.path());
    let database = sqlx::SqlitePool::connect(&settings.database_url).await?;
    wait_until_finished(
        &database,
        started,
        Duration::from_secs(600),
        Duration::from_millis(20),
    )
    .await?;
    let elapsed = started.elapsed();
    Ok((
        (runs * 3) as f64 / elapsed.as_secs_f64(),
        triggered,
        elapsed,
    ))
}

/// A data dir whose database holds the misbehave plugin and `runs` runs of it with `params`,
/// all due at once when a server starts on it.
async fn due_runs(
    runs: usize,
    params: &serde_json::Value,
    poll_interval: Option<Duration>,
) -> anyhow::Result<(tempfile::TempDir, Settings)> {
    let dir = tempfile::tempdir()?;
    let mut server = BenchServer::start(dir.path()).await?;
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    server.stop().await?;
    let settings = Settings::for_data_dir(dir.path());
    let store = Store::open(&settings.database_url).await?;
    let plugin = store
        .find_plugin("misbehave")
        .await?
        .context("the uploaded plugin")?;
    write_runs(&store, &plugin, params, poll_interval, &settings, runs).await?;
    Ok((dir, settings))
}

/// Writes `runs` runs of `plugin` through the store, 64 at a time (so they share commits).
pub(crate) async fn write_runs(
    store: &Store,
    plugin: &stepwise_host::storage::PluginRecord,
    params: &serde_json::Value,
    poll_interval: Option<Duration>,
    settings: &Settings,
    runs: usize,
) -> anyhow::Result<()> {
    const WRITERS: usize = 64;
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let count = runs / WRITERS + usize::from(writer < runs % WRITERS);
        let (store, plugin, params, settings) = (
            store.clone(),
            plugin.clone(),
            params.clone(),
            settings.clone(),
        );
        writers.spawn(async move {
            for _ in 0..count {
                let options = RunOptions {
                    poll_interval,
                    ..RunOptions::default()
                };
                let run = plan_run(&plugin, &params, options, &settings, now_millis())
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                store.enqueue_run(&run).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(written) = writers.join_next().await {
        written??;
    }
    Ok(())
}

/// One plugin call's median time in µs, the cores, and the calls per second they allow.
pub(crate) async fn call_ceiling() -> anyhow::Result<(f64, usize, f64)> {
    let runtime = Runtime::new(None, 64, &Limits::default())?;
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    let plugin = runtime
        .load(&PluginVersion::of_bytes(&bytes), bytes.into())
        .await?;
    let mut samples = time_calls(&runtime, &plugin, &crate::server::no_capabilities(), 10).await?;
    samples.sort_by(f64::total_cmp);
    let per_call_us = samples[samples.len() / 2];
    let cores = std::thread::available_parallelism()?.get();
    Ok((per_call_us, cores, cores as f64 * 1e6 / per_call_us))
}

/// Mean time of one call (instantiate + call + drop), in µs, over 200 calls per sample; two
/// rounds first warm caches and the thread pool. Each call is a run's first, so that none
/// takes an instance an earlier one left.
async fn time_calls(
    runtime: &Runtime,
    plugin: &Arc<stepwise_host::runtime::LoadedPlugin>,
    capabilities: &Capabilities,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    const CALLS: u32 = 200;
    let call = StepCall {
        run_id: "bench".into(),
        step: "first".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        run_created_at_ms: 0,
        params: "{}".into(),
        outputs: "{}".into(),
        traceparent: None,
        tape: Default::default(),
    };
    let mut times = Vec::new();
    for round in 0..samples + 2 {
        let started = Instant::now();
        for n in 0..CALLS {
            let call = StepCall {
                run_id: format!("bench-{round}-{n}"),
                ..call.clone()
            };
            let report = runtime
                .run_step(plugin, call, capabilities)
                .await
                .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
            anyhow::ensure!(
                report.message.is_none(),
                "the call failed: {:?}",
                report.message
            );
        }
        if round >= 2 {
            times.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS));
        }
    }
    Ok(times)
}

/// One `run-step` call of a small Rust plugin: a fresh Store and instance from the cached
/// `InstancePre`, the call, and the teardown, with no database.
pub async fn plugin_call(options: &Options) -> anyhow::Result<()> {
    let runtime = Runtime::new(None, 64, &Limits::default())?;
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    let version = PluginVersion::of_bytes(&bytes);
    let plugin = runtime.load(&version, bytes.into()).await?;
    let capabilities = crate::server::no_capabilities();
    // The same calls with three secrets configured: every output, message and log line is
    // then redacted before the host keeps it.
    let secret = |name: &str| Secret {
        name: name.into(),
        value: format!("{name}-0123456789abcdef/+="),
        hosts: Vec::new(),
        place: None,
    };
    let secrets = Arc::new(SecretSet::new(vec![
        secret("crm"),
        secret("warehouse"),
        secret("billing"),
    ])?);
    let with_secrets = Capabilities {
        secrets: secrets.clone(),
        ..capabilities.clone()
    };
    let (mut samples, mut samples_with_secrets) = (Vec::new(), Vec::new());
    // Interleaved, so that a noisy neighbour on the machine hits both alike.
    for _ in 0..options.repeat.max(10) {
        samples.extend(time_calls(&runtime, &plugin, &capabilities, 1).await?);
        samples_with_secrets.extend(time_calls(&runtime, &plugin, &with_secrets, 1).await?);
    }
    // Redaction of a large output: 64 KiB of JSON strings, none of which holds a value.
    let output = serde_json::to_string(&vec!["an ordinary field value"; 2_800])?;
    let mut redacting = Vec::new();
    for _ in 0..options.repeat.max(10) {
        let started = Instant::now();
        let redacted = secrets.redact_json(output.clone());
        redacting.push(started.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(redacted == output, "an ordinary output was changed");
    }
    print_header("one plugin call (misbehave, a step that passes): instantiate + call + drop");
    print_row("per call (mean of 200 calls per sample)", "µs", &samples);
    print_row(
        "per call, 3 secrets configured (outputs and logs redacted)",
        "µs",
        &samples_with_secrets,
    );
    print_row(
        &format!(
            "redacting a {} KiB JSON output (3 secrets)",
            output.len() / 1024
        ),
        "µs",
        &redacting,
    );
    Ok(())
}

/// Polls the database until no run is queued or running, or `limit` after `started`.
async fn wait_until_finished(
    database: &sqlx::SqlitePool,
    started: Instant,
    limit: Duration,
    poll: Duration,
) -> anyhow::Result<()> {
    loop {
        let (unfinished,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
                .fetch_one(database)
                .await?;
        if unfinished == 0 {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < limit, "runs did not finish");
        tokio::time::sleep(poll).await;
    }
}
