//! Throughput: triggers per second, runs all due at once, trivial steps end to end, and one
//! plugin call on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use stepwise_host::capabilities::secrets::{Secret, SecretSet};
use stepwise_host::config::{AuthMode, Settings};
use stepwise_host::model::{Limits, PluginVersion, now_millis};
use stepwise_host::runtime::{Capabilities, Runtime, StepCall};
use stepwise_host::scheduler::planning::{RunOptions, plan_run};
use stepwise_host::storage::Store;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM};
use crate::stats::{millis, print_header, print_row};

/// `POST /v1/runs` from 64 connections for 10 s, without authentication and then with a
/// bearer token checked on every request, on fresh servers. Each run's first step stays
/// pending with an hour's poll, so every run costs its trigger and one tick.
pub async fn triggers(_options: &Options) -> anyhow::Result<()> {
    // Interleaved rounds, so that a noisy neighbour on the machine hits both modes alike.
    const ROUNDS: usize = 3;
    let (mut open, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        open.push(triggers_with(AuthMode::None).await?);
        tokens.push(triggers_with(AuthMode::Tokens).await?);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (open, tokens) = (median(&mut open), median(&mut tokens));
    println!(
        "\ntoken check, median over {ROUNDS} rounds of each round's median request latency: \
         {open:.3} ms with --auth none, {tokens:.3} ms with --auth tokens ({:+.3} ms)",
        tokens - open
    );
    Ok(())
}

async fn triggers_with(auth: AuthMode) -> anyhow::Result<f64> {
    const CONNECTIONS: usize = 64;
    const SECONDS: u64 = 10;
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start_with_auth(dir.path(), auth).await?);
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    let body = json!({
        "plugin": "misbehave",
        "poll_interval_ms": 3_600_000,
        "params": {"steps": {"first": {"action": "pending"}}},
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (server, stop, body) = (server.clone(), stop.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                server.trigger(&body).await?;
                latencies.push(millis(started.elapsed()));
            }
            anyhow::Ok(latencies)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("trigger task")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let auth_name = match auth {
        AuthMode::None => "--auth none",
        AuthMode::Tokens => "--auth tokens",
    };
    print_header(&format!(
        "POST /v1/runs, durable (SQLite WAL, synchronous FULL), {CONNECTIONS} connections, {SECONDS} s, {auth_name}"
    ));
    print_row("request latency", "ms", &latencies);
    println!(
        "\nthroughput: {:.0} requests/s ({} accepted in {elapsed:.1} s)",
        latencies.len() as f64 / elapsed,
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    Ok(latencies[latencies.len() / 2])
}

/// `runs` runs of a 3-step plugin, made due at the same moment: they are written while the
/// server is down, and the server starts. Steps pass 1 s, 2 s and 3 s after the run started;
/// the poll interval is 1 s, so the ideal makespan is 3 s.
pub async fn due_at_once(options: &Options) -> anyhow::Result<()> {
    let runs = options.runs;
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
    let params = json!({"steps": {
        "first": {"action": "pass_after_ms", "ms": 1000},
        "second": {"action": "pass_after_ms", "ms": 2000},
        "third": {"action": "pass_after_ms", "ms": 3000},
    }});
    let written = Instant::now();
    for _ in 0..runs {
        let options = RunOptions {
            poll_interval: Some(Duration::from_secs(1)),
            ..RunOptions::default()
        };
        let run = plan_run(&plugin, &params, options, &settings, now_millis())
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        store.enqueue_run(&run).await?;
    }
    let written = written.elapsed();
    drop(store);

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
    println!(
        "\nmakespan {makespan:.0} ms = {:.2} × the ideal 3000 ms; {not_passed} runs not passed; \
         peak RSS of the process {:.0} MiB; writing the runs took {:.1} s",
        makespan / 3000.0,
        crate::stats::peak_resident_mib()?,
        written.as_secs_f64()
    );
    drop(server);
    Ok(())
}

/// `runs` runs whose three steps pass at once: steps per second from the first trigger to the
/// last step written.
pub async fn trivial_steps(options: &Options) -> anyhow::Result<()> {
    let runs = options.runs.min(5_000);
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start(dir.path()).await?);
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
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
    println!(
        "\n## trivial steps end to end (trigger, claim, instantiate, call, persist)\n\n\
         {runs} runs × 3 steps in {:.2} s: {:.0} steps/s (triggering took {:.2} s of it)",
        elapsed.as_secs_f64(),
        (runs * 3) as f64 / elapsed.as_secs_f64(),
        triggered.as_secs_f64()
    );
    Ok(())
}

/// One `run-step` call of a small Rust plugin: a fresh Store and instance from the cached
/// `InstancePre`, the call, and the teardown, with no database.
pub async fn plugin_call(options: &Options) -> anyhow::Result<()> {
    let runtime = Runtime::new(None, 64, &Limits::default())?;
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    let version = PluginVersion::of_bytes(&bytes);
    let plugin = runtime.load(&version, bytes.into()).await?;
    let capabilities = crate::server::no_capabilities();
    let call = StepCall {
        run_id: "bench".into(),
        step: "first".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        params: "{}".into(),
        outputs: "{}".into(),
        traceparent: None,
    };
    // The same calls with three secrets configured: every output, message and log line is
    // then redacted before the host keeps it.
    let secret = |name: &str| Secret {
        name: name.into(),
        value: format!("{name}-0123456789abcdef/+="),
        hosts: Vec::new(),
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
    let mut samples = Vec::new();
    let mut samples_with_secrets = Vec::new();
    for round in 0..options.repeat.max(10) + 2 {
        for (capabilities, samples) in [
            (&capabilities, &mut samples),
            (&with_secrets, &mut samples_with_secrets),
        ] {
            const CALLS: u32 = 200;
            let started = Instant::now();
            for _ in 0..CALLS {
                let report = runtime
                    .run_step(&plugin, call.clone(), capabilities)
                    .await
                    .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
                anyhow::ensure!(
                    report.message.is_none(),
                    "the call failed: {:?}",
                    report.message
                );
            }
            // The first rounds warm caches and the thread pool.
            if round >= 2 {
                samples.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS));
            }
        }
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
