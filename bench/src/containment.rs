//! Containment: well-behaved runs keep their tick lag while hostile plugins run beside them;
//! the host's memory stays flat over many hostile attempts; a runaway call is stopped and
//! recorded soon after its deadline.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM, epoch_millis, now_millis};
use crate::stats::{print_header, print_row};

/// Step wall-clock limit of the hostile plugin: the loop and the memory bomb run this long.
const HOSTILE_STEP_TIMEOUT_MS: u64 = 500;
/// Attempts each well-behaved run makes (its third step passes at the 10th).
const GOOD_ATTEMPTS: u64 = 10;
const GOOD_POLL_MS: u64 = 100;
const HOSTILE_ACTIONS: [&str; 6] = ["loop", "oom", "trap", "recurse", "big_output", "log_spam"];

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start(dir.path()).await?;
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    server.upload("good", bytes.clone()).await?;
    let grant = format!(
        "[limits]\nstep_timeout_ms = {HOSTILE_STEP_TIMEOUT_MS}\nmemory_mib = 32\nmax_errors = 100000\n"
    );
    server.upload_with_grant("hostile", bytes, &grant).await?;
    let runs = options.repeat.max(10);

    let (alone_lag, alone_total) = good_runs(&server, runs).await?;
    let hostile = start_hostile(&server, 2).await?;
    let (beside_lag, beside_total) = good_runs(&server, runs).await?;
    let hostile_attempts = cancel_all(&server, &hostile).await?;

    print_header(&format!(
        "containment: {runs} well-behaved runs ({GOOD_ATTEMPTS} attempts, {GOOD_POLL_MS} ms poll) alone, then beside {} hostile runs ({})",
        hostile.len(),
        HOSTILE_ACTIONS.join(", ")
    ));
    print_row("tick lag, alone", "ms", &alone_lag);
    print_row("tick lag, with hostile neighbours", "ms", &beside_lag);
    print_row("run duration, alone", "ms", &alone_total);
    print_row("run duration, with hostile neighbours", "ms", &beside_total);
    println!("\nhostile attempts during the second phase: {hostile_attempts}");

    runaway_latency(&server, options.repeat.clamp(5, 20)).await?;
    memory_over_hostile_attempts(&server, 1_000).await?;
    Ok(())
}

/// Starts `runs` well-behaved runs at once and returns every tick's lag and each run's duration.
async fn good_runs(server: &BenchServer, runs: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let params = json!({"steps": {"third": {"action": "pending_until", "attempt": GOOD_ATTEMPTS}}});
    let mut ids = Vec::new();
    for _ in 0..runs {
        ids.push(
            server
                .trigger(
                    &json!({"plugin": "good", "params": params, "poll_interval_ms": GOOD_POLL_MS}),
                )
                .await?,
        );
    }
    let mut lags = Vec::new();
    let mut durations = Vec::new();
    for id in &ids {
        let run = server.wait_for(id, finished).await?;
        anyhow::ensure!(
            run["status"] == "passed",
            "a well-behaved run ended {}: {}",
            run["status"],
            run["message"]
        );
        let attempts = server.attempts(id).await?;
        for attempt in &attempts {
            anyhow::ensure!(
                attempt["outcome"] != "errored",
                "a well-behaved attempt errored: {attempt}"
            );
            if let Some(lag) = attempt["lag_ms"].as_f64() {
                lags.push(lag);
            }
        }
        durations.push(epoch_millis(&run["finished_at"])? - epoch_millis(&run["created_at"])?);
    }
    Ok((lags, durations))
}

async fn start_hostile(server: &BenchServer, each: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for action in HOSTILE_ACTIONS {
        for _ in 0..each {
            let step = json!({"action": action, "bytes": 1_000_000, "count": 1_000_000});
            let params = json!({"steps": {"first": step}});
            ids.push(
                server
                    .trigger(
                        &json!({"plugin": "hostile", "params": params, "poll_interval_ms": 100}),
                    )
                    .await?,
            );
        }
    }
    Ok(ids)
}

/// Cancels the runs and returns how many attempts they made.
async fn cancel_all(server: &BenchServer, ids: &[String]) -> anyhow::Result<u64> {
    let mut attempts = 0;
    for id in ids {
        server.cancel(id).await?;
        let run = server.wait_for(id, finished).await?;
        attempts += run["error_count"].as_u64().unwrap_or(0);
    }
    Ok(attempts)
}

/// For runaway calls (an infinite loop), how long after its deadline the call returned, and
/// how long until the `errored` attempt could be read through the API.
async fn runaway_latency(server: &BenchServer, rounds: usize) -> anyhow::Result<()> {
    let mut returned = Vec::new();
    let mut visible = Vec::new();
    for _ in 0..rounds {
        let params = json!({"steps": {"first": {"action": "loop"}}});
        let id = server
            .trigger(&json!({"plugin": "hostile", "params": params, "poll_interval_ms": 60_000}))
            .await?;
        let started = Instant::now();
        let attempt = loop {
            let attempts = server.attempts(&id).await?;
            if let Some(attempt) = attempts.into_iter().next() {
                break attempt;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no attempt recorded"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let seen = now_millis();
        anyhow::ensure!(
            attempt["outcome"] == "errored",
            "the loop was not stopped: {attempt}"
        );
        let deadline = epoch_millis(&attempt["started_at"])? + HOSTILE_STEP_TIMEOUT_MS as f64;
        let duration = attempt["duration_ms"].as_f64().context("duration")?;
        returned.push(duration - HOSTILE_STEP_TIMEOUT_MS as f64);
        visible.push(seen - deadline);
        server.cancel(&id).await?;
    }
    print_header(&format!(
        "runaway plugin (infinite loop, {HOSTILE_STEP_TIMEOUT_MS} ms limit): deadline → errored"
    ));
    print_row("deadline → call returned errored", "ms", &returned);
    print_row(
        "deadline → errored attempt readable via API (1 ms polling)",
        "ms",
        &visible,
    );
    Ok(())
}

/// The process's resident memory while hostile attempts pile up.
async fn memory_over_hostile_attempts(server: &BenchServer, target: u64) -> anyhow::Result<()> {
    let ids = start_hostile(server, 2).await?;
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut next_sample = 0;
    loop {
        let mut attempts = 0;
        for id in &ids {
            attempts += server.run(id).await?["error_count"].as_u64().unwrap_or(0);
        }
        if attempts >= next_sample {
            samples.push((attempts, resident_mib()?));
            next_sample += target / 5;
        }
        if attempts >= target {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "hostile attempts too slow"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel_all(server, &ids).await?;
    println!("\n## resident memory of the host process over {target} hostile attempts\n");
    println!("| errored attempts so far | RSS |");
    println!("|---|---|");
    for (attempts, mib) in &samples {
        println!("| {attempts} | {mib:.1} MiB |");
    }
    Ok(())
}

fn finished(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running"))
}

fn resident_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/self/status")?;
    Ok(kib / 1024.0)
}
