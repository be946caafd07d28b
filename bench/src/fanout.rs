//! Live-event fan-out: how many Server-Sent Events clients one node holds while runs
//! change at a steady rate, and how many events per second it delivers to them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::Options;
use crate::server::{BenchServer, MISBEHAVE_WASM};

/// Runs triggered per second; each makes four changes (queued, then three steps).
const RUNS_PER_SECOND: u32 = 25;
const MEASURE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counts {
    /// `event: run` frames received, over all clients.
    events: AtomicU64,
    /// Clients told to reset (they fell behind the node's buffer).
    resets: AtomicU64,
    /// Clients whose stream ended or failed otherwise.
    dropped: AtomicU64,
}

pub async fn run(_options: &Options) -> anyhow::Result<()> {
    println!(
        "\n## Live events: SSE clients on one node, {RUNS_PER_SECOND} runs/s (4 changes each) for {} s\n",
        MEASURE.as_secs()
    );
    println!(
        "| clients | changes/s | events delivered/s | per client/s | delivered of sent | clients reset | RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    for clients in [10, 100, 1000] {
        one(clients).await?;
    }
    Ok(())
}

async fn one(clients: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Arc::new(BenchServer::start(dir.path()).await?);
    server
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    let counts = Arc::new(Counts::default());
    let mut readers = Vec::new();
    for _ in 0..clients {
        // A connection of its own per client, as browsers would hold.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let url = server.url("/v1/events");
        let counts = counts.clone();
        readers.push(tokio::spawn(async move {
            let Ok(mut response) = client
                .get(url)
                .header("accept", "text/event-stream")
                .send()
                .await
            else {
                counts.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut carry = String::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        carry.push_str(&String::from_utf8_lossy(&chunk));
                        let events = carry.matches("event: run\n").count() as u64;
                        counts.events.fetch_add(events, Ordering::Relaxed);
                        if carry.contains("event: reset") {
                            counts.resets.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        // Keep a tail in case a marker is split between chunks.
                        let keep = carry.len().saturating_sub(16);
                        let cut = (keep..carry.len())
                            .find(|index| carry.is_char_boundary(*index))
                            .unwrap_or(carry.len());
                        carry.drain(..cut);
                    }
                    _ => {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    // Let every client connect and subscribe.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = counts.events.load(Ordering::Relaxed);
    let started = Instant::now();
    let gap = Duration::from_secs(1) / RUNS_PER_SECOND;
    let mut next = tokio::time::Instant::now();
    let mut triggered = 0_u64;
    while started.elapsed() < MEASURE {
        next += gap;
        tokio::time::sleep_until(next).await;
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server
                .trigger(&json!({"plugin": "misbehave", "params": {}}))
                .await;
        });
        triggered += 1;
    }
    // The changes of the last runs still arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = counts.events.load(Ordering::Relaxed) - before;
    let changes = triggered * 4;
    let sent = changes * clients as u64;
    println!(
        "| {clients} | {:.0} | {:.0} | {:.0} | {:.1} % | {} | {:.0} MiB |",
        changes as f64 / elapsed,
        delivered as f64 / elapsed,
        delivered as f64 / elapsed / clients as f64,
        100.0 * delivered as f64 / sent.max(1) as f64,
        counts.resets.load(Ordering::Relaxed),
        crate::stats::resident_mib()?,
    );
    for reader in readers {
        reader.abort();
    }
    Ok(())
}
