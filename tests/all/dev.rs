//! `stepwise dev`: a plugin file run locally to the end, without a server.

use serde_json::json;
use stepwise_host::config::Settings;
use stepwise_host::dev::{DevOutcome, exit_code, run_file};

use stepwise_host::scaffold::Lang;

use crate::support::{MISBEHAVE_WASM, PluginFile, Setup, TestServer, toolchain_installed};

/// Copies the plugin into a temp dir with `manifest` beside it and runs it with `params`.
async fn dev(manifest: &str, params: serde_json::Value) -> (DevOutcome, String) {
    dev_with_secrets(manifest, params, &[]).await
}

async fn dev_with_secrets(
    manifest: &str,
    params: serde_json::Value,
    secrets: &[(String, String)],
) -> (DevOutcome, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    std::fs::write(dir.path().join("misbehave.toml"), manifest).expect("writing the manifest");
    let settings = Settings::for_data_dir(dir.path());
    let mut out = Vec::new();
    let outcome = run_file(
        &file, &params, &settings, None, secrets, None, None, &mut out,
    )
    .await
    .expect("a local run");
    (outcome, String::from_utf8(out).expect("utf-8 output"))
}

#[tokio::test]
async fn a_local_run_fills_a_secret_from_the_command_line_and_prints_only_its_placeholder() {
    let reflector = crate::support::Reflector::start().await;
    let value = "dev-secret-value-1234".to_owned();
    let params = json!({"steps": {"first": {
        "action": "http",
        "url": format!("http://{}/echo", reflector.host_port),
        "headers": {"authorization": "Bearer {{secret:crm}}"},
        "echo": true,
    }}});
    let manifest = format!("allowed_hosts = [\"{}\"]\n", reflector.host_port);
    let (outcome, out) =
        dev_with_secrets(&manifest, params, &[("crm".to_owned(), value.clone())]).await;
    assert_eq!(outcome, DevOutcome::Passed, "{out}");
    assert_eq!(reflector.received()[0], format!("Bearer {value}"));
    assert!(out.contains("{{secret:crm}}"), "{out}");
    assert!(!out.contains(&value), "{out}");
}

#[tokio::test]
async fn a_local_run_prints_every_call_and_passes() {
    let params = json!({"steps": {"second": {"action": "pending_until", "attempt": 3}}});
    let (outcome, out) = dev("poll_interval_ms = 50\n", params).await;
    assert_eq!(outcome, DevOutcome::Passed, "{out}");
    assert_eq!(exit_code(outcome), 0);
    let calls: Vec<&str> = out
        .lines()
        .filter(|line| line.starts_with("tick"))
        .collect();
    assert_eq!(calls.len(), 5, "{out}");
    assert!(
        calls[2].contains("second") && calls[2].contains("pending"),
        "{out}"
    );
    assert!(
        calls[3].contains("second") && calls[3].contains("passed"),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap_or_default()
            .starts_with("passed in"),
        "{out}"
    );
}

#[tokio::test]
async fn a_local_run_of_a_trapping_plugin_ends_errored() {
    let params = json!({"steps": {"first": {"action": "trap"}}});
    let (outcome, out) = dev("poll_interval_ms = 50\n[limits]\nmax_errors = 2\n", params).await;
    assert_eq!(outcome, DevOutcome::Errored, "{out}");
    assert_eq!(exit_code(outcome), 2);
    assert!(
        out.contains("step \"first\" errored 2 times (max_errors 2); last error:")
            && out.trim_end().ends_with(": errored"),
        "{out}"
    );
}

#[tokio::test]
async fn a_scaffolded_plugin_builds_as_is_and_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let crate_dir = dir.path().join("fresh-check");
    let name = stepwise_host::model::PluginName::parse("fresh-check").expect("a valid name");
    stepwise_host::scaffold::new_plugin(&crate_dir, &name, stepwise_host::scaffold::Lang::Rust)
        .expect("scaffolding");

    // The toolchain running this test (its cargo, and the rustc beside it), with the crate's
    // own target dir and flags: nothing of this build's configuration may leak into it. The
    // rustup settings (RUSTUP_*) stay: without them rustup may start installing toolchains.
    let cargo = std::path::PathBuf::from(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let mut build = tokio::process::Command::new(&cargo);
    build.current_dir(&crate_dir).args(["build", "--release"]);
    if cargo.is_absolute() {
        build.env("RUSTC", cargo.with_file_name("rustc"));
    }
    for (variable, _) in std::env::vars() {
        let build_setting = variable.starts_with("CARGO_")
            || matches!(
                variable.as_str(),
                "RUSTFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTDOCFLAGS"
            );
        if build_setting {
            build.env_remove(variable);
        }
    }
    let output = build.output().await.expect("running cargo");
    assert!(
        output.status.success(),
        "the scaffold does not build:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let wasm = crate_dir.join("target/wasm32-wasip2/release/fresh_check.wasm");
    let settings = Settings::for_data_dir(dir.path());
    let mut out = Vec::new();
    let outcome = run_file(
        &wasm,
        &json!({"expect": "hello"}),
        &settings,
        None,
        &[],
        None,
        None,
        &mut out,
    )
    .await
    .expect("a local run");
    let out = String::from_utf8(out).expect("utf-8 output");
    assert_eq!(outcome, DevOutcome::Passed, "{out}");
    assert!(out.contains(r#"{"expect":"hello"}"#), "{out}");
}

/// The README's path for a Python or JavaScript check, through the `stepwise` program, from
/// the directory that will hold it: `stepwise plugin new fresh-check --lang LANG`, `stepwise
/// plugin build fresh-check`, then a local run of what it printed last.
async fn a_scaffolded_check_builds_and_passes(lang: Lang, lang_name: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    if !toolchain_installed(lang, &dir.path().join("fresh-check")) {
        return;
    }
    let stepwise = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"));
        command.current_dir(dir.path()).args(args);
        command
    };
    let created = stepwise(&["plugin", "new", "fresh-check", "--lang", lang_name])
        .output()
        .await
        .expect("running stepwise plugin new");
    assert!(created.status.success(), "{created:?}");
    let built = stepwise(&["plugin", "build", "fresh-check"])
        .output()
        .await
        .expect("running stepwise plugin build");
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wasm = std::path::PathBuf::from(stdout.lines().last().expect("a last line"));
    assert_eq!(wasm, dir.path().join("fresh-check/dist/fresh-check.wasm"));

    let settings = Settings::for_data_dir(dir.path());
    for (params, verdict) in [
        (json!({"expect": "hello"}), DevOutcome::Passed),
        (json!({}), DevOutcome::TimedOut),
    ] {
        let mut out = Vec::new();
        let outcome = run_file(
            &wasm,
            &params,
            &settings,
            Some(std::time::Duration::from_millis(1_500)),
            &[],
            None,
            None,
            &mut out,
        )
        .await
        .expect("a local run");
        let out = String::from_utf8(out).expect("utf-8 output");
        assert_eq!(outcome, verdict, "{out}");
        match verdict {
            DevOutcome::Passed => assert!(out.contains(r#"{"expect":"hello"}"#), "{out}"),
            _ => assert!(out.contains("params.expect is not set yet"), "{out}"),
        }
        // The helper's log line reaches the host.
        assert!(out.contains("step expect attempt 1"), "{out}");
    }
}

#[tokio::test]
async fn a_scaffolded_python_check_builds_as_is_and_passes() {
    a_scaffolded_check_builds_and_passes(Lang::Python, "python").await;
}

#[tokio::test]
async fn a_scaffolded_javascript_check_builds_as_is_and_passes() {
    a_scaffolded_check_builds_and_passes(Lang::Javascript, "javascript").await;
}

#[tokio::test]
async fn a_local_run_ends_with_its_verdict_and_keeps_its_deadline() {
    let (outcome, out) = dev("", json!({"steps": {"first": {"action": "fail"}}})).await;
    assert_eq!(outcome, DevOutcome::Failed, "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("step \"first\" failed: ") && last.ends_with(": failed"),
        "{out}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    std::fs::write(dir.path().join("misbehave.toml"), "poll_interval_ms = 50\n")
        .expect("writing the manifest");
    let settings = Settings::for_data_dir(dir.path());
    let mut out = Vec::new();
    let params = json!({"steps": {"first": {"action": "pending"}}});
    let timeout = std::time::Duration::from_millis(300);
    let outcome = run_file(
        &file,
        &params,
        &settings,
        Some(timeout),
        &[],
        None,
        None,
        &mut out,
    )
    .await
    .expect("a local run");
    let out = String::from_utf8(out).expect("utf-8 output");
    assert_eq!(outcome, DevOutcome::TimedOut, "{out}");
    assert!(
        out.lines()
            .last()
            .is_some_and(|line| line.ends_with("timed_out")),
        "{out}"
    );
}

#[tokio::test]
async fn plugin_check_prints_the_steps_and_what_the_plugin_costs() {
    let check = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
            .args(["plugin", "check"])
            .arg(file)
            .output()
            .expect("running stepwise plugin check")
    };
    let output = check(std::path::Path::new(MISBEHAVE_WASM));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let size = std::fs::metadata(MISBEHAVE_WASM).unwrap().len();
    assert!(stdout.contains(&format!("size: {size} bytes")), "{stdout}");
    assert!(stdout.contains(" ms; first call (describe): "), "{stdout}");
    assert!(stdout.contains("compile: "), "{stdout}");
    for step in ["1. first", "2. second (timeout 1500 ms)", "3. third"] {
        assert!(stdout.contains(step), "{step}: {stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"\0asm not really").unwrap();
    let output = check(&broken);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains("invalid"));
}

/// Runs `stepwise dev` on `misbehave` with `action` as its first step and a secret configured
/// (so that everything the plugin returns is redacted), and returns what it printed. A
/// process of its own: a plugin that escaped its bounds would take this one down, not the
/// test's. (The host's memory under these attacks is measured by the bench's `containment`.)
fn dev_process(action: serde_json::Value) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    std::fs::write(
        dir.path().join("misbehave.toml"),
        "[limits]\nmax_errors = 1\n",
    )
    .expect("writing the manifest");
    let params = json!({"steps": {"first": action}}).to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .current_dir(dir.path())
        // Its compiled code is kept in the temp dir, not in the user's cache.
        .env("XDG_CACHE_HOME", dir.path())
        .args([
            "dev",
            "misbehave.wasm",
            "--params",
            &params,
            "--timeout",
            "20000",
        ])
        .args(["--secret", "crm=a-secret-value-of-some-length"])
        .output()
        .expect("running stepwise dev");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a plugin makes the host hold outside its linear memory is bounded: headers kept in
/// `wasi:http` resources end the call at a limit (before the bound, 20,000 sets of 100 KB
/// headers grew the host by 1.9 GiB), and a huge output is refused before the host copies or
/// parses it (before, a 40 MB JSON array was parsed for redaction into 800 MiB first).
#[test]
fn host_memory_a_plugin_can_fill_is_bounded() {
    // One set of headers holds 16 KiB at most: the plugin's next header fails its call.
    let out = dev_process(json!({"action": "fields_flood", "count": 20_000, "bytes": 100_000}));
    assert!(out.contains("total size of fields exceeds limit"), "{out}");
    // Sets just below that are limited in number, and count against the call's memory.
    let out = dev_process(json!({"action": "fields_flood", "count": 20_000, "bytes": 12_000}));
    assert!(
        out.contains("wasi resource limit of 1000 exceeded")
            || out.contains("memory limit of 64 MiB exceeded"),
        "{out}"
    );
    // Past twice output_bytes the copy out of the guest stops; a smaller excess is refused by
    // its size.
    let out = dev_process(json!({"action": "big_array", "bytes": 40_000_000}));
    assert!(
        out.contains("copy limit of 1048576 bytes exceeded"),
        "{out}"
    );
    let out = dev_process(json!({"action": "big_array", "bytes": 200_000}));
    assert!(
        out.contains("output size limit of 65536 bytes exceeded"),
        "{out}"
    );
}

/// `stepwise dev` follows the server's rules: a step's budget ends its wait for the next poll,
/// whatever the poll interval, and both make the same calls before `timed_out`.
#[tokio::test]
async fn dev_and_the_server_end_a_step_at_its_budget_alike() {
    // A poll far longer than anything else here (compiling the plugin takes seconds on a
    // loaded machine): a run that waited for it could not end within the bound below.
    let manifest = "poll_interval_ms = 600000\n[steps.first]\ntimeout_ms = 300\n";
    let params = json!({"steps": {"first": {"action": "pending"}}});
    let started = std::time::Instant::now();
    let (outcome, out) = dev(manifest, params.clone()).await;
    assert_eq!(outcome, DevOutcome::TimedOut, "{out}");
    // Not after the 10 min poll: at the 300 ms budget, as the server does.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(300),
        "{:?}: {out}",
        started.elapsed()
    );
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "step \"first\" was still pending after its timeout of 300 ms: timed_out"
    );
    let dev_calls = out.lines().filter(|line| line.starts_with("tick ")).count();

    let server =
        TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(manifest))).await;
    let id = server
        .trigger(json!({"plugin": "misbehave", "params": params}))
        .await;
    let run = server.wait_until_finished(&id).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(
        run["message"],
        "step \"first\" was still pending after its timeout of 300 ms"
    );
    assert_eq!(server.attempts(&id).await.len(), dev_calls, "{out}");
}

#[tokio::test]
async fn a_local_run_reads_a_mysql_and_a_redis_source() {
    let (Some(mysql), Some(redis)) = (crate::support::mysql_url(), crate::support::redis_url())
    else {
        return;
    };
    let fixture = crate::support::MysqlFixture::create(&mysql, "sw_dev").await;
    let prefix = crate::support::redis_prefix("dev");
    let counter = format!("{prefix}counter");
    crate::support::redis_command(&redis, &[b"SET", counter.as_bytes(), b"3"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    std::fs::write(
        dir.path().join("misbehave.toml"),
        "sql_sources = [\"warehouse\", \"cache\"]\n",
    )
    .expect("writing the manifest");
    let mut settings = Settings::for_data_dir(dir.path());
    for (name, url) in [("warehouse", fixture.reader_url().await), ("cache", redis)] {
        settings
            .sources
            .insert(name.into(), stepwise_host::config::SourceConfig::new(url));
    }
    let params = json!({"steps": {
        "first": {"action": "sql", "source": "warehouse", "statement": "SELECT name FROM items"},
        "second": {"action": "kv", "source": "cache", "call": "get", "args": [counter]},
    }});
    let mut out = Vec::new();
    let outcome = run_file(&file, &params, &settings, None, &[], None, None, &mut out)
        .await
        .expect("a local run");
    let out = String::from_utf8(out).expect("utf-8 output");
    assert_eq!(outcome, DevOutcome::Passed, "{out}");
    assert!(
        out.contains("[[\"one\"]]") && out.contains("\"result\":\"3\""),
        "{out}"
    );
    fixture.drop_all().await;
}

#[tokio::test]
async fn a_local_run_reads_a_nats_source_through_its_tap_and_a_stream() {
    let Some(url) = crate::support::nats_url() else {
        return;
    };
    let id = format!("dev_{}", std::process::id());
    let (prefix, stream) = (format!("stepwise_test.{id}"), format!("STEPWISE_{id}"));
    let mut nats = stepwise_demo::nats::Publisher::connect(&url)
        .await
        .expect("connecting to NATS");
    nats.request(
        &format!("$JS.API.STREAM.CREATE.{stream}"),
        &json!({"name": stream, "subjects": [format!("{prefix}.kept.>")], "storage": "memory"}),
    )
    .await
    .expect("creating a stream");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    std::fs::write(
        dir.path().join("misbehave.toml"),
        format!("sql_sources = [\"bus\"]\nsubjects = [\"{prefix}.>\"]\npoll_interval_ms = 50\n"),
    )
    .expect("writing the manifest");
    let mut settings = Settings::for_data_dir(dir.path());
    settings.sources.insert(
        "bus".into(),
        stepwise_host::config::SourceConfig {
            kind: Some("nats".into()),
            ..stepwise_host::config::SourceConfig::new(url.clone())
        },
    );
    let find = |subject: String| json!({"action": "messages", "source": "bus", "subject": subject, "where": [["json", "event_id", "evt-dev"]], "expect": 1});
    let params = json!({"steps": {
        "first": find(format!("{prefix}.core.collected")),
        "second": find(format!("{prefix}.kept.collected")),
    }});
    let run = tokio::spawn(async move {
        let mut out = Vec::new();
        let outcome = run_file(&file, &params, &settings, None, &[], None, None, &mut out).await;
        (outcome, String::from_utf8(out).expect("utf-8 output"))
    });
    // The run starts at a moment the test cannot see: publish until it has found both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !run.is_finished() && std::time::Instant::now() < deadline {
        for subject in ["core", "kept"] {
            nats.publish(
                &format!("{prefix}.{subject}.collected"),
                &[],
                br#"{"event_id":"evt-dev"}"#,
            )
            .await
            .expect("publishing");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (outcome, out) = run.await.expect("the local run");
    assert_eq!(outcome.expect("a local run"), DevOutcome::Passed, "{out}");
    assert!(out.contains("evt-dev"), "{out}");
    let _ = nats
        .request(&format!("$JS.API.STREAM.DELETE.{stream}"), &json!({}))
        .await;
}

#[tokio::test]
async fn a_local_run_keeps_the_compiled_plugin_for_the_next_and_few_others() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(MISBEHAVE_WASM, &file).expect("copying the plugin");
    let settings = Settings::for_data_dir(dir.path());
    let artifacts = dir.path().join("compiled");
    // Older builds already in the cache: all but the newest few leave.
    std::fs::create_dir_all(&artifacts).expect("cache dir");
    for old in 0..9 {
        std::fs::write(artifacts.join(format!("old-{old}.cwasm")), b"stale").expect("an old build");
    }
    let params = json!({"steps": {}});
    let run = || async {
        let mut out = Vec::new();
        let outcome = run_file(
            &file,
            &params,
            &settings,
            None,
            &[],
            Some(&artifacts),
            None,
            &mut out,
        )
        .await
        .expect("a local run");
        assert_eq!(
            outcome,
            DevOutcome::Passed,
            "{}",
            String::from_utf8_lossy(&out)
        );
    };
    run().await;
    let kept: Vec<_> = std::fs::read_dir(&artifacts)
        .expect("the cache")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "cwasm")
        })
        .collect();
    assert_eq!(kept.len(), 8, "{kept:?}");
    let functions = std::fs::metadata(artifacts.join("functions.cache"))
        .expect("the compiled functions are kept beside the builds, and outlive their pruning");
    assert!(functions.len() > 0);
    let version = stepwise_host::model::PluginVersion::of_bytes(
        &std::fs::read(MISBEHAVE_WASM).expect("the plugin"),
    );
    let artifact = kept
        .iter()
        .find(|path| path.to_string_lossy().contains(&version.to_string()))
        .expect("this plugin's compiled code is kept")
        .clone();

    // The next run loads it; a damaged one is compiled again, not trusted.
    run().await;
    std::fs::write(&artifact, b"not compiled code").expect("damaging the artifact");
    run().await;
    assert!(
        std::fs::read(&artifact).expect("rewritten").len() > 1_000,
        "the damaged artifact is replaced"
    );
}
