//! Containment: well-behaved runs keep their tick lag while hostile plugins run beside them;
//! the host's memory stays flat over many hostile attempts of every kind (sandbox, SQL and
//! HTTP escapes); a runaway call is stopped and recorded soon after its deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let source = dir.path().join("warehouse.db");
    create_source(&source).await?;
    let mut sources: std::collections::BTreeMap<_, _> = [(
        "warehouse".to_owned(),
        stepwise_host::config::SourceConfig::new(format!("sqlite://{}", source.display())),
    )]
    .into();
    let reach = reach_sources(options).await?;
    sources.extend(reach.iter().map(|(name, url)| {
        (
            (*name).to_owned(),
            stepwise_host::config::SourceConfig::new(url.clone()),
        )
    }));
    if let Some(url) = &options.rabbitmq {
        // The exchanges the grant's routes name exist before the host's tap binds to them.
        let (_connection, channel) = crate::messages::rabbitmq(url).await?;
        for exchange in ["stepwise-bench", "stepwise-bench.flood"] {
            channel
                .exchange_declare(amqprs::channel::ExchangeDeclareArguments::new(
                    exchange, "topic",
                ))
                .await?;
        }
    }
    for (name, kind, url) in buses(options) {
        sources.insert(
            name.to_owned(),
            stepwise_host::config::SourceConfig {
                kind: Some(kind.to_owned()),
                window_bytes: TAP_WINDOW_MIB << 20,
                ..stepwise_host::config::SourceConfig::new(url.clone())
            },
        );
    }
    let granted: Vec<String> = sources.keys().map(|name| format!("{name:?}")).collect();
    // A secret configured: every output and message is then redacted, which once parsed a
    // huge output before its size was judged.
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, "a-bench-secret-value-0123456789")?;
    let server = BenchServer::start_tuned(&dir.path().join("data"), |settings| {
        settings.sources = sources;
        settings.secrets.insert(
            "tok".to_owned(),
            stepwise_host::config::SecretDeclaration {
                from: stepwise_host::config::SecretFrom::File(secret_file),
                hosts: Vec::new(),
                place: None,
            },
        );
        if let Some(mib) = options.plugin_memory_mib {
            settings.plugin_memory_bytes = mib << 20;
        }
    })
    .await?;
    println!(
        "plugin_memory_mib = {} (memory all calls hold at once beyond 4 MiB each)",
        options
            .plugin_memory_mib
            .unwrap_or(stepwise_host::config::DEFAULT_PLUGIN_MEMORY_MIB)
    );
    let bytes = std::fs::read(MISBEHAVE_WASM)?;
    server.upload("good", bytes.clone()).await?;
    let grant = format!(
        "allowed_hosts = [\"{}\"]\nsql_sources = [{}]\nsubjects = [\"stepwise-bench.>\", \"stepwise-bench/#\", \"stepwise-bench.flood/#\"]\n[limits]\ncall_timeout_ms = {HOSTILE_STEP_TIMEOUT_MS}\nmemory_mib = 32\nmax_errors = 100000\n",
        server.host_port(),
        granted.join(", ")
    );
    server
        .upload_with_grant("hostile", bytes.clone(), &grant)
        .await?;
    // The same, its every call recorded: attacks marked `"recorded": true` run as this one,
    // to fill the runs' recordings (bounded by run_recording_bytes) with what they read.
    server
        .upload_with_grant(
            "hostile-recorded",
            bytes,
            &grant.replace("[limits]", "record = \"all\"\n[limits]"),
        )
        .await?;
    let runs = options.repeat.max(10);

    let (alone_lag, alone_total) = good_runs(&server, runs, Duration::from_millis(1)).await?;
    let hostile = start_hostile(&server, 2).await?;
    let (beside_lag, beside_total) = good_runs(&server, runs, Duration::from_millis(1)).await?;
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
    // The baseline of the attack below: as many rounds alone as run beside the attacks, so
    // that both p99s rest on about as many ticks (one round's 300 give a noisy p99), with the
    // same client: one that looks at each run every 50 ms, not at a thousand requests a
    // second, whose own load on the host would be most of what is measured.
    let mut alone_lag = Vec::new();
    for _ in 0..6 {
        alone_lag.extend(good_runs(&server, runs, CLIENT_POLL).await?.0);
    }
    let server = Arc::new(server);
    let mut attacks = attacks(&server);
    attacks.extend(reach_attacks(&reach));
    for (name, _, _) in buses(options) {
        let find = |subject: &str| json!({"action": "messages", "source": name, "subject": subject, "where": [["json", "never", "1"]], "expect": 1});
        attacks.extend(match name {
            "nats" => [find(">"), find(FLOOD_NATS)],
            "mqtt" => [find("#"), find(FLOOD_MQTT)],
            _ => [find("stepwise-bench.flood/#"), find(FLOOD_RABBITMQ)],
        });
    }
    if let Some(only) = &options.attacks {
        attacks.retain(|attack| attack.to_string().contains(only.as_str()));
        anyhow::ensure!(!attacks.is_empty(), "no attack contains {only:?}");
    }
    let floods: Vec<_> = buses(options)
        .into_iter()
        .map(|(name, _, url)| tokio::spawn(flood(name, url.clone())))
        .collect();
    let windows_mib = (buses(options).len() * TAP_WINDOW_MIB) as f64;
    every_kind_of_attack(&server, runs, &alone_lag, &attacks, 1_000, windows_mib).await?;
    if !floods.is_empty() {
        for flood in &floods {
            flood.abort();
        }
        println!(
            "message floods ({}): {} MiB window per tap; 256 KiB messages, 40 a second each",
            buses(options)
                .iter()
                .map(|(name, _, _)| *name)
                .collect::<Vec<_>>()
                .join(", "),
            TAP_WINDOW_MIB
        );
    }
    Ok(())
}

/// The tap window of the bench's message sources.
const TAP_WINDOW_MIB: usize = 8;

/// Where each flood publishes: a subject, a topic, an exchange's route that the hostile
/// plugin may read and the host's tap keeps.
const FLOOD_NATS: &str = "stepwise-bench.flood";
const FLOOD_MQTT: &str = "stepwise-bench/flood";
const FLOOD_RABBITMQ: &str = "stepwise-bench.flood/big";

/// The message sources of the floods the bench was given (`--nats`, `--mqtt`,
/// `--rabbitmq`): source name (its kind too) and URL.
fn buses(options: &Options) -> Vec<(&'static str, &'static str, &String)> {
    [
        ("nats", &options.nats),
        ("mqtt", &options.mqtt),
        ("rabbitmq", &options.rabbitmq),
    ]
    .into_iter()
    .filter_map(|(kind, url)| Some((kind, kind, url.as_ref()?)))
    .collect()
}

/// Publishes 256 KiB messages where the hostile plugin may read (and the host's tap keeps),
/// 40 a second, until aborted.
async fn flood(kind: &'static str, url: String) -> anyhow::Result<()> {
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(256 << 10));
    let mut every = tokio::time::interval(Duration::from_millis(25));
    match kind {
        "nats" => {
            let mut publisher = stepwise_demo::nats::Publisher::connect(&url)
                .await
                .context("connecting to --nats")?;
            loop {
                every.tick().await;
                publisher
                    .publish(FLOOD_NATS, &[], payload.as_bytes())
                    .await?;
            }
        }
        "mqtt" => {
            let mut publisher = stepwise_demo::mqtt::Publisher::connect(&url)
                .await
                .context("connecting to --mqtt")?;
            loop {
                every.tick().await;
                publisher
                    .publish(FLOOD_MQTT, &[], payload.as_bytes(), false)
                    .await?;
            }
        }
        _ => {
            let (_connection, channel) = crate::messages::rabbitmq(&url).await?;
            let (exchange, key) = FLOOD_RABBITMQ.split_once('/').expect("exchange/key");
            loop {
                every.tick().await;
                channel
                    .basic_publish(
                        amqprs::BasicProperties::default(),
                        payload.clone().into_bytes(),
                        amqprs::channel::BasicPublishArguments::new(exchange, key),
                    )
                    .await?;
            }
        }
    }
}

/// The MySQL and Redis sources of their attackers, by name, when the bench was given servers
/// (`--mysql`, `--redis`): a reader account on the MySQL server (an administrator's URL
/// creates it), and a value on the Redis server past the result limit.
async fn reach_sources(options: &Options) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut sources = Vec::new();
    if let Some(url) = &options.mysql {
        use sqlx::{ConnectOptions, Connection, Executor};
        let admin: sqlx::mysql::MySqlConnectOptions = url.parse()?;
        let database = admin.get_database().unwrap_or("test").to_owned();
        let mut connection = admin.connect().await.context("connecting to --mysql")?;
        for statement in [
            "CREATE USER IF NOT EXISTS 'stepwise_bench'@'%' IDENTIFIED BY 'stepwise-bench-reader'"
                .to_owned(),
            format!("GRANT SELECT ON `{database}`.* TO 'stepwise_bench'@'%'"),
        ] {
            connection.execute(statement.as_str()).await?;
        }
        connection.close().await?;
        sources.push((
            "ledger",
            format!(
                "mysql://stepwise_bench:stepwise-bench-reader@{}:{}/{database}",
                admin.get_host(),
                admin.get_port()
            ),
        ));
    }
    if let Some(url) = &options.redis {
        let value = "x".repeat(8_000_000);
        let reply =
            stepwise_demo::redis::command(url, &[b"SET", b"stepwise-bench:big", value.as_bytes()])
                .await
                .context("connecting to --redis")?;
        anyhow::ensure!(reply == "+OK", "--redis: SET answered {reply:?}");
        sources.push(("counters", url.clone()));
    }
    Ok(sources)
}

/// The MySQL attacker (results past the limit, a statement past its time, two statements) and
/// the Redis attacker (a value past the limit, a `SCAN` that never stops) for the sources of
/// [`reach_sources`].
fn reach_attacks(sources: &[(&str, String)]) -> Vec<Value> {
    let mut attacks = Vec::new();
    for (name, _) in sources {
        match *name {
            "ledger" => {
                let sql = |statement: &str| {
                    json!({"action": "sql", "source": "ledger", "statement": statement})
                };
                attacks.extend([
                    sql("SELECT REPEAT('x', 8000000)"),
                    sql("WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) SELECT REPEAT('x', 100000) FROM n"),
                    sql("SELECT SLEEP(5)"),
                    sql("SELECT 1; SELECT 2"),
                ]);
            }
            _ => attacks.extend([
                json!({"action": "kv", "source": "counters", "call": "get", "args": ["stepwise-bench:big"]}),
                json!({"action": "kv_scan_loop", "source": "counters"}),
            ]),
        }
    }
    attacks
}

async fn create_source(path: &std::path::Path) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .connect()
        .await?;
    sqlx::query("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&mut connection)
        .await?;
    sqlx::query("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
        .execute(&mut connection)
        .await?;
    Ok(())
}

/// Every attack the hostile suites know, as `misbehave` steps: the sandbox's, and the
/// capability escapes of SQL and HTTP.
fn attacks(server: &BenchServer) -> Vec<Value> {
    let sql =
        |statement: &str| json!({"action": "sql", "source": "warehouse", "statement": statement});
    let mut attacks: Vec<Value> = HOSTILE_ACTIONS
        .iter()
        .map(|action| json!({"action": action, "bytes": 1_000_000, "count": 1_000_000}))
        .collect();
    attacks.extend([
        sql("SELECT zeroblob(400000000)"),
        sql("SELECT randomblob(300000000)"),
        sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000) SELECT zeroblob(100000) FROM c"),
        sql("ATTACH DATABASE 'stepwise.db' AS h"),
        sql("VACUUM INTO '/tmp/stepwise-bench-vacuum.db'"),
        sql("CREATE TEMP VIEW items AS SELECT 'poisoned' AS name"),
        sql("SELECT 1; SELECT 2"),
        json!({"action": "http_burst", "authority": server.host_port(), "count": 100}),
        json!({"action": "http", "url": "http://stepwise-bench.invalid/"}),
        // Host memory outside the guest's: headers kept in `wasi:http` resources (sets past
        // the 16 KiB bound, and many just below it), and an output far past output_bytes
        // that would be parsed for redaction if its size were not judged first.
        json!({"action": "fields_flood", "count": 20_000, "bytes": 100_000}),
        json!({"action": "fields_flood", "count": 20_000, "bytes": 12_000}),
        json!({"action": "big_array", "bytes": 24_000_000}),
        // Recordings filled: the largest rows, responses, log lines and outputs the limits
        // allow, every attempt recorded.
        json!({"recorded": true, "action": "sql", "source": "warehouse", "statement": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000) SELECT randomblob(100000) FROM c"}),
        json!({"recorded": true, "action": "http_burst", "authority": server.host_port(), "count": 100}),
        json!({"recorded": true, "action": "log_spam", "bytes": 1_000_000, "count": 1_000_000}),
        json!({"recorded": true, "action": "big_output", "bytes": 1_000_000}),
    ]);
    attacks
}

/// 20 hostile runs at once, every kind of attack among them, each replaced when it ends,
/// until `target` hostile attempts were made; well-behaved runs go on beside them. Prints the
/// host's resident memory against its value before the attacks (the target allowing what the
/// message taps' windows may hold, `windows_mib`), and the well-behaved tick lag against
/// running alone.
async fn every_kind_of_attack(
    server: &Arc<BenchServer>,
    runs: usize,
    alone_lag: &[f64],
    attacks: &[Value],
    target: u64,
    windows_mib: f64,
) -> anyhow::Result<()> {
    const CONCURRENT: usize = 20;
    let rss_before = crate::stats::resident_mib()?;
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            let mut lags = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                lags.extend(good_runs(&server, runs, CLIENT_POLL).await?.0);
            }
            anyhow::Ok(lags)
        })
    };
    let trigger = |index: usize| {
        let step = attacks[index % attacks.len()].clone();
        let plugin = match step["recorded"] == true {
            true => "hostile-recorded",
            false => "hostile",
        };
        let server = server.clone();
        async move {
            server
                .trigger(&json!({"plugin": plugin, "params": {"steps": {"first": step}}, "poll_interval_ms": 100}))
                .await
                .map(|id| (index, id))
        }
    };
    let mut live = Vec::new();
    for index in 0..CONCURRENT {
        live.push(trigger(index).await?);
    }
    let mut next = CONCURRENT;
    let (mut finished_attempts, mut rss_peak) = (0u64, rss_before);
    let started = Instant::now();
    let attempts = loop {
        let mut live_attempts = 0;
        for slot in live.iter_mut() {
            let run = server.run(&slot.1).await?;
            let attempts = run["steps"][0]["attempts"].as_u64().unwrap_or(0);
            if finished(&run) {
                finished_attempts += attempts;
                *slot = trigger(next).await?;
                next += 1;
            } else {
                live_attempts += attempts;
            }
        }
        rss_peak = rss_peak.max(crate::stats::resident_mib()?);
        let attempts = finished_attempts + live_attempts;
        if attempts >= target {
            break attempts;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "hostile attempts too slow: {attempts} in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let ids: Vec<String> = live.into_iter().map(|(_, id)| id).collect();
    cancel_all(server, &ids).await?;
    let beside = good.await.context("well-behaved runs")??;
    let rss_after = crate::stats::resident_mib()?;
    print_header(&format!(
        "{attempts} hostile attempts from {CONCURRENT} concurrent runs ({} kinds of attack, {next} runs), well-behaved runs beside them",
        attacks.len()
    ));
    print_row("well-behaved tick lag, alone", "ms", alone_lag);
    print_row("well-behaved tick lag, under attack", "ms", &beside);
    let p99 = |samples: &[f64]| {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[((sorted.len() as f64 * 0.99) as usize).min(sorted.len() - 1)]
    };
    println!(
        "\ntick lag p99: {:.1} ms alone, {:.1} ms under attack ({:.2}×)",
        p99(alone_lag),
        p99(&beside),
        p99(&beside) / p99(alone_lag).max(1.0)
    );
    println!(
        "host RSS: {rss_before:.1} MiB before, {rss_peak:.1} MiB at the peak (+{:.1} MiB), {rss_after:.1} MiB after",
        rss_peak - rss_before
    );
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let ratio = p99(&beside) / p99(alone_lag).max(1.0);
    let rss_target = RSS_TARGET_MIB + windows_mib;
    println!(
        "targets: RSS growth <= {rss_target} MiB: {}; tick lag p99 under attack <= {LAG_TARGET_RATIO}x alone: {}",
        verdict(rss_peak - rss_before <= rss_target),
        verdict(ratio <= LAG_TARGET_RATIO)
    );
    Ok(())
}

/// The host's resident memory may grow by this much under every kind of attack at once,
/// beyond the message taps' windows (which the README counts beyond `plugin_memory_mib`).
const RSS_TARGET_MIB: f64 = 64.0;
/// Well-behaved runs' tick lag p99 under attack, against running alone.
const LAG_TARGET_RATIO: f64 = 2.0;

/// How often the attack scenario's client looks at a run.
const CLIENT_POLL: Duration = Duration::from_millis(50);

/// Starts `runs` well-behaved runs at once, waits for each (looking every `poll`), and returns
/// every tick's lag and each run's duration.
async fn good_runs(
    server: &BenchServer,
    runs: usize,
    poll: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
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
        let run = server.wait_for_every(id, poll, finished).await?;
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

fn finished(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running"))
}
