//! The retention soak: runs arrive at a steady rate for a long time while retention,
//! shortened to minutes, deletes behind them. Every minute it prints the database's size on
//! disk, the process's resident memory and the tick lag; at the end, the lag of ticks that
//! started while a sweep held the retention lease against those that started outside one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM, now_millis};
use crate::stats::Summary;

/// Sweep windows: (start, end) in Unix milliseconds, as seen by polling the job's lease.
type Windows = Arc<Mutex<Vec<(f64, f64)>>>;

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let minutes = options.minutes;
    let per_minute = options.rate;
    let dir = tempfile::tempdir()?;
    let attempts_kept = Duration::from_secs(120);
    let runs_kept = Duration::from_secs(300);
    let server = BenchServer::start_tuned(dir.path(), |settings| {
        settings.retention.attempts = attempts_kept;
        settings.retention.finished_runs = runs_kept;
        settings.retention.interval = Duration::from_secs(30);
    })
    .await?;
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    let database_url = stepwise_host::config::Settings::for_data_dir(dir.path()).database_url;
    let database = sqlx::SqlitePool::connect(&database_url).await?;
    // Each run polls its first step five times (200 ms apart), then passes all three: seven
    // attempt rows with log lines per run.
    let body = json!({
        "plugin": "misbehave",
        "params": {"steps": {"first": {"action": "pending_until", "attempt": 5}}},
        "poll_interval_ms": 200,
    });
    println!(
        "\n## Soak: {per_minute} runs/min for {minutes} min (7 attempts each); retention keeps \
         attempts {} s and finished runs {} s, sweeping every 30 s\n",
        attempts_kept.as_secs(),
        runs_kept.as_secs()
    );
    println!(
        "| minute | runs triggered | database (file + WAL) | RSS | attempt rows | run rows | tick lag p50 | tick lag p99 | sweeps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    let windows: Windows = Arc::default();
    let watcher = tokio::spawn(watch_sweeps(database.clone(), windows.clone()));
    let server = Arc::new(server);
    let started = Instant::now();
    let gap = Duration::from_secs(60) / per_minute as u32;
    let mut next = tokio::time::Instant::now();
    let mut triggered = 0_u64;
    let mut lags: Vec<(f64, f64)> = Vec::new();
    let mut minute_started = now_millis();
    for minute in 1..=minutes {
        let minute_end = started + Duration::from_secs(60 * minute as u64);
        while Instant::now() < minute_end {
            next += gap;
            tokio::time::sleep_until(next).await;
            let server = server.clone();
            let body = body.clone();
            tokio::spawn(async move {
                if let Err(error) = server.trigger(&body).await {
                    eprintln!("trigger failed: {error:#}");
                }
            });
            triggered += 1;
        }
        let now = now_millis();
        // First calls of ticks that started this minute: (started_at, lag).
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT started_at, started_at - due_at FROM attempts \
             WHERE due_at IS NOT NULL AND started_at >= ? AND started_at < ?",
        )
        .bind(minute_started as i64)
        .bind(now as i64)
        .fetch_all(&database)
        .await?;
        minute_started = now;
        let minute_lags: Vec<f64> = rows.iter().map(|(_, lag)| (*lag).max(0) as f64).collect();
        lags.extend(
            rows.iter()
                .map(|(at, lag)| (*at as f64, (*lag).max(0) as f64)),
        );
        let (attempt_rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM attempts")
            .fetch_one(&database)
            .await?;
        let (run_rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
            .fetch_one(&database)
            .await?;
        let lag = if minute_lags.is_empty() {
            (0.0, 0.0)
        } else {
            let summary = Summary::of(&minute_lags);
            (summary.median, summary.p99)
        };
        println!(
            "| {minute} | {triggered} | {:.1} MiB | {:.0} MiB | {attempt_rows} | {run_rows} | {:.0} ms | {:.0} ms | {} |",
            database_mib(dir.path())?,
            crate::stats::resident_mib()?,
            lag.0,
            lag.1,
            windows.lock().unwrap().len(),
        );
    }
    watcher.abort();
    let windows = windows.lock().unwrap().clone();
    let during: Vec<f64> = lags
        .iter()
        .filter(|(at, _)| windows.iter().any(|(from, to)| at >= from && at <= to))
        .map(|(_, lag)| *lag)
        .collect();
    let outside: Vec<f64> = lags
        .iter()
        .filter(|(at, _)| !windows.iter().any(|(from, to)| at >= from && at <= to))
        .map(|(_, lag)| *lag)
        .collect();
    let sweep_ms: Vec<f64> = windows.iter().map(|(from, to)| to - from).collect();
    println!();
    println!("| ticks | n | lag p50 | lag p99 | lag max |");
    println!("|---|---|---|---|---|");
    for (what, samples) in [
        ("while a sweep held the lease", &during),
        ("outside sweeps", &outside),
    ] {
        if samples.is_empty() {
            println!("| {what} | 0 | | | |");
            continue;
        }
        let summary = Summary::of(samples);
        println!(
            "| {what} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            summary.count, summary.median, summary.p99, summary.max
        );
    }
    // A p99 of a few dozen ticks is their maximum, and one slow fsync decides it; the share
    // of them above the other ticks' p99 (1 % if sweeps change nothing) uses them all.
    if !during.is_empty() && !outside.is_empty() {
        let bound = Summary::of(&outside).p99;
        let above = during.iter().filter(|lag| **lag > bound).count();
        println!(
            "
ticks during sweeps above the p99 of the others ({bound:.0} ms): {above} of {} ({:.1} %; 1 % if sweeps change nothing)",
            during.len(),
            100.0 * above as f64 / during.len() as f64
        );
    }
    if !sweep_ms.is_empty() {
        let summary = Summary::of(&sweep_ms);
        println!(
            "\n{} sweeps, each holding the lease for a median {:.0} ms (max {:.0} ms); {:.0} s in all",
            summary.count,
            summary.median,
            summary.max,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Records when the retention job's lease is held, polling every 20 ms.
async fn watch_sweeps(database: sqlx::SqlitePool, windows: Windows) {
    let mut since: Option<f64> = None;
    loop {
        let held: Option<(Option<String>,)> =
            sqlx::query_as("SELECT lease_owner FROM jobs WHERE id = 'retention'")
                .fetch_optional(&database)
                .await
                .unwrap_or(None);
        let held = held.is_some_and(|(owner,)| owner.is_some());
        let now = now_millis();
        match (held, since) {
            (true, None) => since = Some(now),
            (false, Some(from)) => {
                windows.lock().unwrap().push((from, now));
                since = None;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn database_mib(dir: &Path) -> anyhow::Result<f64> {
    let mut bytes = 0;
    for name in ["stepwise.db", "stepwise.db-wal"] {
        if let Ok(metadata) = std::fs::metadata(dir.join(name)) {
            bytes += metadata.len();
        }
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}
