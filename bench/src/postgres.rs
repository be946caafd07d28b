//! Several nodes on one PostgreSQL database (`--postgres URL`): `steps` and `triggers` with 1,
//! 2 and 3 nodes, each node a server of its own in this process, on a fresh database per
//! measurement. On one machine this shows what a step and a trigger cost each side — CPU of
//! the database's processes and of the nodes — not how far nodes scale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use stepwise_host::config::Settings;
use stepwise_host::storage::Store;

use crate::server::{BenchServer, MISBEHAVE_WASM};
use crate::{Options, load};

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let url = options
        .postgres
        .clone()
        .context("the postgres scenario needs --postgres URL (a role that may CREATE DATABASE)")?;
    let runs = options.runs.min(5_000);
    println!(
        "\n## PostgreSQL, 1–3 nodes on one database ({runs} runs × 3 trivial steps; POST /v1/runs \
         from 64 connections spread over the nodes for 10 s)\n"
    );
    println!(
        "| nodes | steps/s | CPU per step: database | nodes | triggers/s | p99 ms | CPU per trigger: database | nodes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for nodes in 1..=3 {
        let steps = steps(&url, nodes, runs).await?;
        let triggers = triggers(&url, nodes).await?;
        println!(
            "| {nodes} | {:.0} | {:.0} µs | {:.0} µs | {:.0} | {:.1} | {:.0} µs | {:.0} µs |",
            steps.per_second,
            steps.database_us,
            steps.nodes_us,
            triggers.per_second,
            triggers.p99_ms,
            triggers.database_us,
            triggers.nodes_us,
        );
    }
    Ok(())
}

/// Work per second, and the CPU time each side spent per item.
struct Cost {
    per_second: f64,
    database_us: f64,
    nodes_us: f64,
    p99_ms: f64,
}

/// `runs` runs written before the nodes start, all due at once; from the start to the last
/// step written.
async fn steps(url: &str, nodes: usize, runs: usize) -> anyhow::Result<Cost> {
    let database = FreshDatabase::create(url).await?;
    let dirs: Vec<tempfile::TempDir> = (0..nodes)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    {
        let mut first = start(&dirs[0], &database.url).await?;
        first
            .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
            .await?;
        first.stop().await?;
    }
    let settings = node_settings(&dirs[0], &database.url);
    let store = Store::open(&database.url).await?;
    let plugin = store
        .find_plugin("misbehave")
        .await?
        .context("the uploaded plugin")?;
    crate::throughput::write_runs(&store, &plugin, &json!({}), None, &settings, runs).await?;
    let cpu = CpuClock::start()?;
    let started = Instant::now();
    let mut servers = Vec::new();
    for dir in &dirs {
        servers.push(start(dir, &database.url).await?);
    }
    let reader = sqlx::PgPool::connect(&database.url).await?;
    loop {
        let (unfinished,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
                .fetch_one(&reader)
                .await?;
        if unfinished == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "runs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let (database_cpu, nodes_cpu) = cpu.stop()?;
    for mut server in servers {
        server.stop().await?;
    }
    let steps = (runs * 3) as f64;
    Ok(Cost {
        per_second: steps / elapsed.as_secs_f64(),
        database_us: database_cpu.as_secs_f64() * 1e6 / steps,
        nodes_us: nodes_cpu.as_secs_f64() * 1e6 / steps,
        p99_ms: 0.0,
    })
}

async fn triggers(url: &str, nodes: usize) -> anyhow::Result<Cost> {
    let database = FreshDatabase::create(url).await?;
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..nodes {
        let dir = tempfile::tempdir()?;
        servers.push(Arc::new(start(&dir, &database.url).await?));
        dirs.push(dir);
    }
    servers[0]
        .upload("misbehave", std::fs::read(MISBEHAVE_WASM)?)
        .await?;
    let body = crate::throughput::pending_run().to_string();
    let targets: Vec<_> = servers
        .iter()
        .map(|server| {
            (
                server.addr(),
                load::post_json(server.host_port(), "/v1/runs", None, &body),
            )
        })
        .collect();
    let cpu = CpuClock::start()?;
    let mut loads = Vec::new();
    for (addr, request) in targets {
        let connections = 64 / nodes;
        loads.push(tokio::task::spawn_blocking(move || {
            load::hammer(addr, request, connections, Duration::from_secs(10))
        }));
    }
    let mut latencies = Vec::new();
    let mut elapsed = Duration::ZERO;
    for load in loads {
        let load = load.await??;
        elapsed = elapsed.max(load.elapsed);
        latencies.extend(load.latencies_ms);
    }
    let (database_cpu, nodes_cpu) = cpu.stop()?;
    for server in servers {
        if let Ok(mut server) = Arc::try_unwrap(server) {
            server.stop().await?;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let count = latencies.len() as f64;
    Ok(Cost {
        per_second: count / elapsed.as_secs_f64(),
        database_us: database_cpu.as_secs_f64() * 1e6 / count,
        nodes_us: nodes_cpu.as_secs_f64() * 1e6 / count,
        p99_ms: latencies[(latencies.len() * 99).div_ceil(100) - 1],
    })
}

fn node_settings(dir: &tempfile::TempDir, url: &str) -> Settings {
    let mut settings = Settings::for_data_dir(dir.path());
    settings.database_url = url.to_owned();
    settings
}

async fn start(dir: &tempfile::TempDir, url: &str) -> anyhow::Result<BenchServer> {
    let url = url.to_owned();
    BenchServer::start_tuned(dir.path(), move |settings| settings.database_url = url).await
}

/// A database made for one measurement and dropped after it.
struct FreshDatabase {
    admin: String,
    name: String,
    url: String,
}

impl FreshDatabase {
    async fn create(admin: &str) -> anyhow::Result<FreshDatabase> {
        let name = format!("stepwise_bench_{}", uuid_like());
        run_admin(admin, &format!("CREATE DATABASE {name}")).await?;
        let (base, _) = admin
            .rsplit_once('/')
            .context("a database URL ends in /NAME")?;
        Ok(FreshDatabase {
            admin: admin.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Dropped on the bench's runtime: the statement runs on a thread of its own.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = runtime.block_on(run_admin(&admin, &sql));
            }
        })
        .join()
        .ok();
    }
}

async fn run_admin(url: &str, sql: &str) -> anyhow::Result<()> {
    use sqlx::{Connection, Executor};
    let mut connection = sqlx::PgConnection::connect(url).await?;
    connection.execute(sql).await?;
    Ok(())
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos())
    )
}

/// CPU time of PostgreSQL's processes and of this process, between `start` and `stop`.
struct CpuClock {
    database: Duration,
    nodes: Duration,
}

impl CpuClock {
    fn start() -> anyhow::Result<CpuClock> {
        Ok(CpuClock {
            database: postgres_cpu()?,
            nodes: process_cpu("self")?,
        })
    }

    fn stop(self) -> anyhow::Result<(Duration, Duration)> {
        Ok((
            postgres_cpu()?.saturating_sub(self.database),
            process_cpu("self")?.saturating_sub(self.nodes),
        ))
    }
}

/// utime + stime of `/proc/<pid>/stat`, clock ticks of 10 ms.
fn process_cpu(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// Every `postgres` process's CPU time, exited backends not counted (each measurement keeps
/// its connections open until it has read the clock).
fn postgres_cpu() -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let is_postgres = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "postgres");
        if is_postgres && let Ok(cpu) = process_cpu(pid) {
            total += cpu;
        }
    }
    Ok(total)
}
