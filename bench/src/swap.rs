//! Hot swap: how soon after an upload's response new runs use the new version, while other
//! runs keep arriving; and how long a large component takes to become active.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM, epoch_millis, now_millis, with_custom_section};
use crate::stats::{millis, print_header, print_row};

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start(dir.path()).await?);
    let a = std::fs::read(MISBEHAVE_WASM)?;
    server.upload("misbehave", a.clone()).await?;

    // Background load: a run every 5 ms, each passing its three steps at once.
    let stop = Arc::new(AtomicBool::new(false));
    let triggered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (server, stop, triggered) = (server.clone(), stop.clone(), triggered.clone());
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                ids.push(server.trigger(&json!({"plugin": "misbehave"})).await?);
                triggered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(ids)
        })
    };

    let mut upload_ms = Vec::new();
    let mut to_first_call_ms = Vec::new();
    for round in 0..options.repeat {
        let bytes = with_custom_section(&a, &format!("round {round}"));
        let started = Instant::now();
        let plugin = server.upload("misbehave", bytes).await?;
        let responded = now_millis();
        upload_ms.push(millis(started.elapsed()));
        let id = server.trigger(&json!({"plugin": "misbehave"})).await?;
        let run = server
            .wait_for(&id, |run| !run["steps"][0]["first_attempt_at"].is_null())
            .await?;
        anyhow::ensure!(
            run["plugin_version"] == plugin["active_version"],
            "a run after the upload is on {}",
            run["plugin_version"]
        );
        to_first_call_ms.push(epoch_millis(&run["steps"][0]["first_attempt_at"])? - responded);
    }
    stop.store(true, Ordering::Relaxed);
    let ids = load.await.context("load task")??;
    let mut not_passed = 0;
    for id in &ids {
        let run = server
            .wait_for(id, |run| {
                !matches!(run["status"].as_str(), Some("queued" | "running"))
            })
            .await?;
        if run["status"] != "passed" {
            not_passed += 1;
        }
    }

    print_header("hot swap of a small Rust plugin (misbehave, 300 KB) under load");
    print_row(
        "upload → response (inspect, compile, store, activate)",
        "ms",
        &upload_ms,
    );
    print_row(
        "upload response → first step call on the new version",
        "ms",
        &to_first_call_ms,
    );
    println!(
        "\nbackground runs during the swaps: {} triggered, {not_passed} not passed",
        ids.len()
    );
    anyhow::ensure!(not_passed == 0, "{not_passed} background runs did not pass");

    if let Some(path) = &options.large {
        large_component(path, options.repeat.min(5)).await?;
    }
    Ok(())
}

/// Upload of a large component (compiled on upload) and the first run after a restart
/// (loaded from the precompiled artifact), each on a fresh data dir.
async fn large_component(path: &std::path::Path, rounds: usize) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut upload_ms = Vec::new();
    let mut restart_ms = Vec::new();
    let mut first_call_ms = Vec::new();
    let mut healthz_p99_ms = Vec::new();
    let mut healthz_max_ms = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::tempdir()?;
        let server = BenchServer::start(dir.path()).await?;
        // One client asks for /healthz back to back while the upload compiles: the API must
        // stay responsive (compiling runs on a blocking thread, not on the async workers).
        let uploading = CancellationToken::new();
        let probe = tokio::spawn({
            let client = server.client.clone();
            let url = server.url("/healthz");
            let uploading = uploading.clone();
            async move {
                let mut latencies = Vec::new();
                while !uploading.is_cancelled() {
                    let started = Instant::now();
                    let answer = client.get(&url).send().await;
                    anyhow::ensure!(
                        answer.is_ok_and(|answer| answer.status().is_success()),
                        "/healthz failed during the upload"
                    );
                    latencies.push(millis(started.elapsed()));
                }
                anyhow::Ok(latencies)
            }
        });
        let started = Instant::now();
        server.upload("large", bytes.clone()).await?;
        upload_ms.push(millis(started.elapsed()));
        uploading.cancel();
        let mut latencies = probe.await??;
        latencies.sort_by(f64::total_cmp);
        anyhow::ensure!(
            !latencies.is_empty(),
            "no /healthz answer during the upload"
        );
        healthz_p99_ms.push(latencies[(latencies.len() * 99).div_ceil(100) - 1]);
        healthz_max_ms.push(latencies[latencies.len() - 1]);

        let started = Instant::now();
        let server = server.restart().await?;
        let id = server.trigger(&json!({"plugin": "large"})).await?;
        let run = server
            .wait_for(&id, |run| !run["steps"][0]["first_attempt_at"].is_null())
            .await?;
        restart_ms.push(millis(started.elapsed()));
        let triggered = epoch_millis(&run["created_at"])?;
        first_call_ms.push(epoch_millis(&run["steps"][0]["first_attempt_at"])? - triggered);
    }
    print_header(&format!(
        "large component ({}, {:.1} MB), fresh data dir each round",
        path.file_name().unwrap_or_default().to_string_lossy(),
        bytes.len() as f64 / 1e6
    ));
    print_row(
        "upload → response (inspect, compile, store, activate)",
        "ms",
        &upload_ms,
    );
    print_row(
        "GET /healthz back to back during the upload: p99",
        "ms",
        &healthz_p99_ms,
    );
    print_row(
        "GET /healthz back to back during the upload: max",
        "ms",
        &healthz_max_ms,
    );
    print_row(
        "restart → first step call (precompiled artifact)",
        "ms",
        &restart_ms,
    );
    print_row(
        "  of which: run created → first step call",
        "ms",
        &first_call_ms,
    );
    Ok(())
}
