//! Whole-service benchmarks: each scenario starts the real server in-process on 127.0.0.1:0
//! over a temp SQLite database, drives it through its HTTP API, and prints medians and spread
//! over repeated measurements. Run `cargo run --release -p stepwise-bench -- --help`.

mod containment;
mod server;
mod stats;
mod swap;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: stepwise-bench [SCENARIO...] [--large FILE.wasm] [--repeat N]

scenarios (default: all):
  swap    upload a new version of a small Rust plugin while runs keep arriving: time from
          the upload's response to the first step call on the new version, and the upload
          itself (inspect + compile); with --large FILE.wasm also a large component (e.g. a
          componentize-py one): upload time, and activation after a restart (precompiled)
  containment
          tick lag and duration of well-behaved runs alone and beside hostile ones (loop,
          memory bomb, trap, recursion, huge output, a million log calls); deadline → errored
          latency of a runaway call; resident memory over 1,000 hostile attempts

--repeat N  measurements per row (default 30)
";

pub struct Options {
    pub repeat: usize,
    pub large: Option<PathBuf>,
}

fn main() -> ExitCode {
    let mut scenarios = Vec::new();
    let mut options = Options {
        repeat: 30,
        large: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--large" => options.large = args.next().map(PathBuf::from),
            "--repeat" => match args.next().and_then(|n| n.parse().ok()) {
                Some(repeat) => options.repeat = repeat,
                None => return usage("--repeat needs a number"),
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "swap" | "containment" => scenarios.push(arg),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if scenarios.is_empty() {
        scenarios = vec!["swap".to_owned(), "containment".to_owned()];
    }
    let runtime = tokio::runtime::Runtime::new().expect("starting tokio");
    for scenario in scenarios {
        let result = runtime.block_on(async {
            match scenario.as_str() {
                "swap" => swap::run(&options).await,
                "containment" => containment::run(&options).await,
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
