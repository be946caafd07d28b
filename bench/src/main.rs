//! Whole-service benchmarks: each scenario starts the real server in-process on 127.0.0.1:0
//! over a temp SQLite database, drives it through its HTTP API, and prints medians and spread
//! over repeated measurements. Run `cargo run --release -p stepwise-bench -- --help`.

mod containment;
mod fanout;
mod floor;
mod languages;
mod load;
mod messages;
mod postgres;
mod server;
mod soak;
mod stats;
mod status;
mod swap;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: stepwise-bench [SCENARIO...] [--large FILE.wasm] [--repeat N] [--runs N]
                      [--minutes N] [--rate N] [--postgres URL] [--attacks TEXT]
                      [--plugin-memory-mib N] [--mysql URL] [--redis URL] [--nats URL]
                      [--mqtt URL] [--rabbitmq URL] [--kafka URL] [--lang LANG]

scenarios (default: all but soak, languages, postgres, floor, messages and status):
  swap    upload a new version of a small Rust plugin while runs keep arriving: time from
          the upload's response to the first step call on the new version, and the upload
          itself (inspect + compile); with --large FILE.wasm also a large component (e.g. a
          componentize-py one): upload time, GET /healthz p99 and max while it uploads, and
          activation after a restart (precompiled)
  containment
          tick lag and duration of well-behaved runs alone and beside hostile ones (loop,
          memory bomb, trap, recursion, huge output, a million log calls); deadline → errored
          latency of a runaway call; resident memory over 1,000 hostile attempts of every
          kind (also SQL and HTTP escapes, headers kept in wasi:http resources, a 24 MB
          output; with --mysql, --redis, --nats, --mqtt and --rabbitmq, a MySQL, a Redis and a
          message flood on each bus too), with a secret
          configured; targets: RSS growth <= 64 MiB (plus the taps' windows), well-behaved
          tick lag p99 <= 2x of running alone

  triggers
          POST /v1/runs from 64 connections for 10 s: requests/s and latency, without
          authentication and with a bearer token, three interleaved rounds each; GET
          /healthz on the same servers, and the ratio
  due-at-once
          --runs runs of a 3-step plugin (steps pass after 1, 2, 3 s; poll 1 s) all due at
          the same moment: makespan against the ideal 3 s, tick lag, peak RSS
  steps   trivial steps end to end (up to 5,000 runs × 3 steps): steps/s, and over HTTP
          with a shadow version set, and with every attempt recorded, against without
  plugin-call
          one instantiate + call + drop of a small Rust plugin, without the database
  floor   the trivial steps of `steps` with nothing but the calls, then with the calls and
          the least a durable result needs (one row per step, group commits): the bound
          that any durable engine on this machine stays under, against the same ceiling
  languages
          the scaffold's example step in Rust, Python and JavaScript, built by `stepwise
          plugin build` (Python and JavaScript need STEPWISE_COMPONENTIZE_PY / _JS or
          python3 / npm): size, compile, first call, per-call time
  events  Server-Sent Events clients (10, 100, 1,000) held on one node while 25 runs/s change:
          events delivered per second, clients reset for falling behind, RSS
  postgres
          --postgres URL: steps and triggers with 1, 2 and 3 nodes on one PostgreSQL
          database (a fresh one per measurement, made and dropped through URL): throughput
          and the CPU time per step and per trigger of the database and of the nodes
  messages
          --nats, --mqtt, --rabbitmq, --kafka URL (one or more): publish → found for a step
          polling every 200 ms, per backend and mode (a JetStream replay and the tap of a core
          NATS subject; MQTT's tap; a RabbitMQ stream replay and the tap of an exchange; a
          Kafka topic replay)
  status  a status page of 50 checks over 90 days from a year of daily rollups: time to
          build it and to render its HTML, and its bytes
  soak    --rate runs/min for --minutes with retention shortened to minutes (attempts 2 min,
          finished runs 5 min, a sweep every 30 s): database size, RSS and tick lag each
          minute, and the lag of ticks during sweeps against the rest

--repeat N  measurements per row (default 30)
--runs N    runs for due-at-once and steps (default 10000)
--minutes N length of the soak (default 30)
--rate N    runs per minute in the soak (default 1000)
--postgres URL  the database server of the postgres scenario
--attacks TEXT  containment's attack phase with only the attacks whose JSON contains TEXT
                (for example oom, zeroblob, http_burst), to see what each costs
--lang LANG     languages: only the scaffold in LANG (rust, python or javascript)
--plugin-memory-mib N  the containment server's plugin_memory_mib (default: the host's)
--mysql URL     containment's MySQL attacker: a server and an account that may create a
                reader (e.g. mysql://root@127.0.0.1:3306/test)
--redis URL     containment's Redis attacker: a server it may write a large value to
                (e.g. redis://127.0.0.1:6379)
--nats URL, --mqtt URL, --rabbitmq URL, --kafka URL
                buses of messages (nats://127.0.0.1:4222, mqtt://127.0.0.1:1883,
                amqp://127.0.0.1:5672 as guest, kafka://127.0.0.1:9092); containment floods
                each but Kafka with large messages on a route a tap keeps
";

pub struct Options {
    pub repeat: usize,
    pub runs: usize,
    pub large: Option<PathBuf>,
    pub minutes: usize,
    pub rate: usize,
    pub postgres: Option<String>,
    pub attacks: Option<String>,
    pub plugin_memory_mib: Option<u64>,
    pub mysql: Option<String>,
    pub redis: Option<String>,
    pub nats: Option<String>,
    pub mqtt: Option<String>,
    pub rabbitmq: Option<String>,
    pub kafka: Option<String>,
    pub lang: Option<stepwise_host::scaffold::Lang>,
}

fn main() -> ExitCode {
    // As the `stepwise` binary does: the host's threads (in this process) before plugin calls.
    stepwise_host::runtime::favour_host_threads();
    let mut scenarios = Vec::new();
    let mut options = Options {
        repeat: 30,
        runs: 10_000,
        large: None,
        minutes: 30,
        rate: 1000,
        postgres: None,
        attacks: None,
        plugin_memory_mib: None,
        mysql: None,
        redis: None,
        nats: None,
        mqtt: None,
        rabbitmq: None,
        kafka: None,
        lang: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--large" => options.large = args.next().map(PathBuf::from),
            "--postgres" => options.postgres = args.next(),
            "--attacks" => options.attacks = args.next(),
            "--mysql" => options.mysql = args.next(),
            "--redis" => options.redis = args.next(),
            "--nats" => options.nats = args.next(),
            "--mqtt" => options.mqtt = args.next(),
            "--rabbitmq" => options.rabbitmq = args.next(),
            "--kafka" => options.kafka = args.next(),
            "--lang" => {
                use stepwise_host::scaffold::Lang;
                options.lang = Some(match args.next().as_deref() {
                    Some("rust") => Lang::Rust,
                    Some("python") => Lang::Python,
                    Some("javascript") => Lang::Javascript,
                    _ => return usage("--lang needs rust, python or javascript"),
                })
            }
            "--plugin-memory-mib" => match args.next().and_then(|n| n.parse().ok()) {
                Some(mib) if mib > 0 => options.plugin_memory_mib = Some(mib),
                _ => return usage("--plugin-memory-mib needs a positive number"),
            },
            "--repeat" => match args.next().and_then(|n| n.parse().ok()) {
                Some(repeat) => options.repeat = repeat,
                None => return usage("--repeat needs a number"),
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--runs" => match args.next().and_then(|n| n.parse().ok()) {
                Some(runs) => options.runs = runs,
                None => return usage("--runs needs a number"),
            },
            "--minutes" => match args.next().and_then(|n| n.parse().ok()) {
                Some(minutes) if minutes > 0 => options.minutes = minutes,
                _ => return usage("--minutes needs a positive number"),
            },
            "--rate" => match args.next().and_then(|n| n.parse().ok()) {
                Some(rate) if rate > 0 => options.rate = rate,
                _ => return usage("--rate needs a positive number"),
            },
            "swap" | "containment" | "triggers" | "due-at-once" | "steps" | "plugin-call"
            | "languages" | "events" | "soak" | "postgres" | "floor" | "messages" | "status" => {
                scenarios.push(arg)
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if scenarios.is_empty() {
        scenarios = [
            "plugin-call",
            "steps",
            "triggers",
            "due-at-once",
            "swap",
            "containment",
            "events",
        ]
        .map(str::to_owned)
        .to_vec();
    }
    let runtime = tokio::runtime::Runtime::new().expect("starting tokio");
    for scenario in scenarios {
        let result = runtime.block_on(async {
            match scenario.as_str() {
                "swap" => swap::run(&options).await,
                "containment" => containment::run(&options).await,
                "triggers" => throughput::triggers(&options).await,
                "due-at-once" => throughput::due_at_once(&options).await,
                "steps" => throughput::trivial_steps(&options).await,
                "plugin-call" => throughput::plugin_call(&options).await,
                "languages" => languages::run(&options).await,
                "events" => fanout::run(&options).await,
                "soak" => soak::run(&options).await,
                "postgres" => postgres::run(&options).await,
                "floor" => floor::run(&options).await,
                "messages" => messages::run(&options).await,
                "status" => status::run(&options).await,
                _ => unreachable!("scenarios are checked above"),
            }
        });
        if let Err(error) = result {
            eprintln!("scenario {scenario} failed: {error:#}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn usage(problem: &str) -> ExitCode {
    eprint!("{problem}\n\n{USAGE}");
    ExitCode::from(2)
}
