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
        tape: Default::default(),
    };
    let langs = match options.lang {
        Some(lang) => vec![lang],
        None => vec![Lang::Rust, Lang::Python, Lang::Javascript],
    };
    for lang in langs {
        let project = dir.path().join(format!("{lang:?}").to_lowercase());
        stepwise_host::scaffold::new_plugin(&project, &name, lang)?;
        let started = Instant::now();
        let bytes = build(&project, lang).await?;
        let build = started.elapsed();
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
        let edited = match edit_line(lang) {
            Some(line) => Some(
                edited_check(
                    &project,
                    lang,
                    &bytes,
                    line,
                    rounds,
                    &dir.path().join("artifacts"),
                    &call,
                )
                .await?,
            ),
            None => None,
        };
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
        if let Some(edited) = &edited {
            print_row(
                "compile, the function cache empty (fills it)",
                "ms",
                &edited.filling,
            );
            print_row(
                "compile, another check in the language compiled before",
                "ms",
                &edited.another,
            );
            print_row(
                "compile after an edit, its functions cached",
                "ms",
                &edited.compile,
            );
            print_row(
                "an edited check: compile + its first step call",
                "ms",
                &edited.serving,
            );
        }
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

async fn build(project: &std::path::Path, lang: Lang) -> anyhow::Result<Vec<u8>> {
    let project = project.to_path_buf();
    let wasm = tokio::task::spawn_blocking(move || stepwise_host::plugin_build::build(&project))
        .await?
        .with_context(|| format!("building the {lang:?} scaffold"))?;
    Ok(std::fs::read(wasm)?)
}

/// A line that changes a check's source, not its code: the source is data in the component's
/// memory image, as it is for every edit of a Python or JavaScript check. `{}` is the edit's
/// number. Rust has none: an edit there changes code, and it compiles in a tenth of a second.
fn edit_line(lang: Lang) -> Option<(&'static str, &'static str)> {
    match lang {
        Lang::Rust => None,
        Lang::Python => Some(("app.py", "\nEDIT = {}\n")),
        Lang::Javascript => Some(("app.js", "\nglobalThis.edit = {};\n")),
    }
}

struct Edited {
    filling: Vec<f64>,
    another: Vec<f64>,
    compile: Vec<f64>,
    serving: Vec<f64>,
}

/// What an author waits for after editing a check, on a host that compiled it, or another
/// check in its language, before. Each round, on hosts started afresh over one artifacts
/// directory: the scaffold compiled with an empty function cache; the scaffold compiled after
/// the repository's example check in the same language; the scaffold edited, built again,
/// compiled after its previous build, and its first call.
async fn edited_check(
    project: &std::path::Path,
    lang: Lang,
    bytes: &[u8],
    (file, line): (&str, &str),
    rounds: usize,
    artifacts: &std::path::Path,
    call: &StepCall,
) -> anyhow::Result<Edited> {
    let capabilities = crate::server::no_capabilities();
    let example = example_check(lang, &project.with_extension("example")).await?;
    let compile = |bytes: Vec<u8>| async move {
        let runtime = Runtime::new(Some(artifacts.to_path_buf()), 64, &Limits::default())?;
        let started = Instant::now();
        let loaded = runtime
            .load(&PluginVersion::of_bytes(&bytes), bytes.into())
            .await?;
        anyhow::Ok((started, runtime, loaded))
    };
    let mut edited = Edited {
        filling: Vec::new(),
        another: Vec::new(),
        compile: Vec::new(),
        serving: Vec::new(),
    };
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(artifacts);
        let (started, _, _) = compile(bytes.to_vec()).await?;
        edited.filling.push(started.elapsed().as_secs_f64() * 1e3);

        let _ = std::fs::remove_dir_all(artifacts);
        compile(example.clone()).await?;
        let (started, _, _) = compile(bytes.to_vec()).await?;
        edited.another.push(started.elapsed().as_secs_f64() * 1e3);

        let source = project.join(file);
        let mut text = std::fs::read_to_string(&source)?;
        text.push_str(&line.replace("{}", &round.to_string()));
        std::fs::write(&source, text)?;
        let changed = build(project, lang).await?;
        anyhow::ensure!(
            changed != bytes,
            "the edit did not change the {lang:?} build"
        );
        let (started, runtime, loaded) = compile(changed).await?;
        edited.compile.push(started.elapsed().as_secs_f64() * 1e3);
        let report = runtime
            .run_step(&loaded, call.clone(), &capabilities)
            .await
            .map_err(|fault| anyhow::anyhow!("host fault: {fault}"))?;
        edited.serving.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            report.message.is_none(),
            "the edited {lang:?} step did not pass: {:?}",
            report.message
        );
    }
    Ok(edited)
}

/// The repository's example check in `lang` (`plugins/event-pipeline-py` or `-js`), built in
/// a copy at `dir`.
async fn example_check(lang: Lang, dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let name = match lang {
        Lang::Python => "event-pipeline-py",
        _ => "event-pipeline-js",
    };
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name);
    copy_dir(&source, dir)?;
    build(dir, lang).await
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        // What a build left there, not the check's source.
        if ["node_modules", ".venv", "dist", "target"]
            .contains(&&*entry.file_name().to_string_lossy())
        {
            continue;
        }
        // `wit` links to the repository's contract: copied as a directory.
        if std::fs::metadata(entry.path())?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}
