//! What a check costs in each language: the scaffold's example step (the same logic in Rust,
//! Python and JavaScript), built by `stepwise plugin build`, then its size, compile time, first
//! call and steady per-call time (a run's first call, which instantiates, and its later ones,
//! which take the instance the run left), with no database.

use std::time::{Duration, Instant};

use anyhow::Context;
use stepwise_host::grant::Limits;
use stepwise_host::model::{PluginName, PluginVersion};
use stepwise_host::runtime::{Runtime, StepCall};
use stepwise_host::scaffold::Lang;

use crate::Options;
use crate::stats::{print_header, print_row};

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let name = PluginName::parse("probe").map_err(anyhow::Error::msg)?;
    let capabilities = crate::server::no_capabilities();
    let call = StepCall {
        run_id: "bench".into(),
        step: "expect".into(),
        attempt: 1,
        elapsed: Duration::ZERO,
        run_created_at_ms: 0,
        params: r#"{"expect": "hello"}"#.into(),
        outputs: "{}".into(),
        traceparent: None,
    };
    let langs = match options.lang {
        Some(lang) => vec![lang],
        None => vec![Lang::Rust, Lang::Python, Lang::Javascript],
    };
    for lang in langs {
        let project = dir.path().join(format!("{lang:?}").to_lowercase());
        stepwise_host::scaffold::new_plugin(&project, &name, lang)?;
        let started = Instant::now();
        let wasm =
            tokio::task::spawn_blocking(move || stepwise_host::plugin_build::build(&project))
                .await?
                .with_context(|| format!("building the {lang:?} scaffold"))?;
        let build = started.elapsed();
        let bytes = std::fs::read(&wasm)?;
        let size = bytes.len();
        let version = PluginVersion::of_bytes(&bytes);

        // Compile and first call on a fresh runtime each round (no artifact cache).
        let rounds = options.repeat.clamp(3, 5);
        let (mut compile_ms, mut first_call_ms) = (Vec::new(), Vec::new());
        let mut plugin = None;
        for _ in 0..rounds {
            let runtime = Runtime::new(None, 64, &Limits::default())?;
            let started = Instant::now();
            let loaded = runtime.load(&version, bytes.clone().into()).await?;
            compile_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let report = runtime
                .run_step(&loaded, call.clone(), &capabilities)
                .await
                .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
            first_call_ms.push(started.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                report.message.is_none(),
                "the {lang:?} step did not pass: {:?}",
                report.message
            );
            plugin = Some((runtime, loaded));
        }
        let (runtime, loaded) = plugin.context("no round ran")?;
        // A run's first call instantiates; its later calls (a step polled again, the next
        // step) take the instance the run left.
        let (mut first_us, mut later_us) = (Vec::new(), Vec::new());
        let mut runs = 0u64;
        for round in 0..options.repeat.max(10) + 2 {
            const CALLS: u32 = 50;
            for (same_run, samples) in [(false, &mut first_us), (true, &mut later_us)] {
                let started = Instant::now();
                for _ in 0..CALLS {
                    if !same_run {
                        runs += 1;
                    }
                    let call = StepCall {
                        run_id: format!("run-{runs}"),
                        ..call.clone()
                    };
                    let report = runtime
                        .run_step(&loaded, call, &capabilities)
                        .await
                        .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
                    anyhow::ensure!(
                        report.message.is_none(),
                        "a {lang:?} step call did not pass: {:?}",
                        report.message
                    );
                }
                if round >= 2 {
                    samples.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS));
                }
            }
        }
        print_header(&format!(
            "{lang:?} scaffold (`plugin new --lang {}`): {:.1} MB, built in {:.1} s",
            format!("{lang:?}").to_lowercase(),
            size as f64 / 1e6,
            build.as_secs_f64()
        ));
        print_row("compile (cold, no artifact cache)", "ms", &compile_ms);
        print_row("first step call after compiling", "ms", &first_call_ms);
        print_row(
            "per step call, a run's first: instantiate + call (mean of 50)",
            "µs",
            &first_us,
        );
        print_row(
            "per step call, the same run's next: its instance kept (mean of 50)",
            "µs",
            &later_us,
        );
    }
    Ok(())
}
