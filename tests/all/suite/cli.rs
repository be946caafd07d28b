//! The client commands against a live server: `runs list|show|cancel`, `plugins list`,
//! `schedules list`, each as a table or `--json`, with their exit codes.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer};

/// Runs the `stepwise` program with `args`; its exit code, stdout and stderr.
pub(super) async fn stepwise(args: &[&str]) -> (i32, String, String) {
    // Async, so that the server on this test's runtime keeps answering meanwhile.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args(args)
        .env_remove("STEPWISE_SERVER")
        .env_remove("STEPWISE_TOKEN")
        .output()
        .await
        .expect("running the stepwise program");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn runs_plugins_and_schedules_from_the_command_line() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let base = server.base.clone();
    let passed = server.trigger(json!({"plugin": "misbehave"})).await;
    server.wait_until_finished(&passed).await;
    let pending = server
        .trigger(json!({"plugin": "misbehave", "params": {"steps": {"first": {"action": "pending_until", "attempt": 1000000}}}, "poll_interval_ms": 60000}))
        .await;

    let (code, out, err) = stepwise(&["runs", "list", "--server", &base]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains(&passed) && out.contains(&pending), "{out}");

    let (code, out, err) = stepwise(&[
        "runs", "list", "--status", "passed", "--json", "--server", &base,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let ids: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [passed.as_str()], "{out}");

    let (code, out, err) = stepwise(&["runs", "show", &passed, "--server", &base]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("passed"), "{out}");
    for step in ["first", "second", "third"] {
        assert!(
            out.lines()
                .any(|line| line.starts_with(step) && line.contains("passed")),
            "{out}"
        );
    }

    let (code, out, err) = stepwise(&["runs", "cancel", &pending, "--server", &base]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(server.run(&pending).await["status"], "cancelled");

    let unknown = "01a22a72-b2f5-70f9-a9a7-c649c8da6e9f";
    let (code, _, err) = stepwise(&["runs", "show", unknown, "--server", &base]).await;
    assert_eq!(code, 1, "an unknown run is the server's refusal: {err}");
    assert!(err.contains("404"), "{err}");

    let (code, out, err) = stepwise(&["plugins", "list", "--server", &base]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|line| line.starts_with("misbehave")),
        "{out}"
    );

    let (code, out, err) = stepwise(&["schedules", "list", "--json", "--server", &base]).await;
    assert_eq!(code, 0, "{err}");
    let schedules: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(schedules["schedules"], json!([]), "{out}");

    let (code, _, err) = stepwise(&["runs", "list", "--server", "127.0.0.1:1"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a scheme"), "{err}");
}

#[tokio::test]
async fn stepwise_run_sets_the_budgets_labels_and_idempotency_key() {
    let server = TestServer::start(Setup::default().with_plugin(PluginFile::misbehave(""))).await;
    let base = server.base.clone();
    let args = [
        "run",
        "misbehave",
        "--params",
        r#"{"steps": {"first": {"action": "pending"}}}"#,
        "--step-timeout",
        "first=200",
        "--poll-interval",
        "50",
        "--timeout",
        "60000",
        "--label",
        "team=qa",
        "--idempotency-key",
        "nightly-1",
        "--wait",
        "--server",
        &base,
    ];
    let (code, out, err) = stepwise(&args).await;
    assert_eq!(code, 1, "timed_out exits 1: {out}{err}");
    assert!(out.contains("timed_out"), "{out}");
    let id = out
        .split_whitespace()
        .nth(1)
        .expect("run <id> queued")
        .to_owned();
    let run = server.run(&id).await;
    assert_eq!(run["steps"][0]["timeout_ms"], 200, "{run:#}");
    assert_eq!(run["poll_interval_ms"], 50, "{run:#}");
    assert_eq!(run["labels"], json!({"team": "qa"}), "{run:#}");
    let deadline = run["deadline_at"].as_str().unwrap().to_owned();
    assert_ne!(deadline, run["created_at"].as_str().unwrap());

    // The same key and request: the same run, not a second one.
    let (code, out, err) = stepwise(
        &args[..args.len() - 3]
            .iter()
            .chain(["--server", base.as_str()].iter())
            .copied()
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");

    let (code, _, err) = stepwise(&[
        "run",
        "misbehave",
        "--step-timeout",
        "first",
        "--server",
        &base,
    ])
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("NAME=VALUE"), "{err}");
}

/// A token given as `--token` shows in the process list: it works, with a warning that names
/// the variable to use instead; from the variable, no warning.
#[tokio::test]
async fn a_token_on_the_command_line_is_warned_about() {
    let server = TestServer::start(Setup::default()).await;
    let (code, _, err) =
        stepwise(&["runs", "list", "--server", &server.base, "--token", "x"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("set STEPWISE_TOKEN instead"), "{err}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .args(["runs", "list", "--server", &server.base])
        .env("STEPWISE_TOKEN", "x")
        .output()
        .await
        .expect("running the stepwise program");
    assert!(output.status.success());
    assert!(!String::from_utf8_lossy(&output.stderr).contains("warning"));
}
