//! The client commands against a live server: `runs list|show|cancel`, `plugins list`,
//! `schedules list`, each as a table or `--json`, with their exit codes.

use serde_json::{Value, json};

use crate::support::{PluginFile, Setup, TestServer};

/// Runs the `stepwise` program with `args`; its exit code, stdout and stderr.
async fn stepwise(args: &[&str]) -> (i32, String, String) {
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
