//! `GET /openapi.json` and `stepwise openapi`: the same document, describing every route with
//! its access rule; and schemathesis, a tool no one here wrote, driving the live server from it.

use std::path::Path;

use serde_json::Value;
use stepwise_host::config::AuthMode;
use stepwise_host::model::Role;

use crate::support::{EVENT_PIPELINE_WASM, PluginFile, Setup, TestServer};

#[tokio::test]
async fn the_document_is_served_without_a_token_and_printed_by_the_cli() {
    let server = TestServer::start(Setup::default().with_auth(AuthMode::Tokens)).await;
    let response = reqwest::get(server.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stepwise-node"))
        .arg("openapi")
        .output()
        .await
        .expect("running stepwise openapi");
    assert!(output.status.success());
    let printed: Value = serde_json::from_slice(&output.stdout).expect("it prints JSON");
    assert_eq!(served, printed);

    assert_eq!(served["openapi"], "3.1.0");
    let paths = served["paths"].as_object().unwrap();
    for route in [
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/attempts",
        "/v1/runs/{id}/cancel",
        "/v1/plugins",
        "/v1/plugins/{name}",
        "/v1/plugins/{name}/activate",
        "/v1/plugins/{name}/grant",
        "/v1/schedules",
        "/v1/schedules/{id}",
        "/v1/tokens",
        "/v1/tokens/{name}",
        "/v1/audit",
        "/v1/secrets",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(route), "{route} is not described");
    }
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = &operation["responses"];
            assert_eq!(
                responses["default"]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path}"
            );
            let guarded = path.starts_with("/v1/");
            assert_eq!(
                operation.get("security").is_some(),
                guarded,
                "{method} {path}: a token exactly on /v1"
            );
            if guarded {
                assert!(responses.get("401").is_some(), "{method} {path}");
                let description = operation["description"].as_str().unwrap();
                assert!(description.contains("role"), "{method} {path}");
            }
        }
    }
    let upload = &paths["/v1/plugins/{name}"]["put"]["requestBody"]["content"];
    assert!(upload.get("multipart/form-data").is_some(), "{upload}");
    assert!(upload.get("application/wasm").is_some(), "{upload}");
    let trigger = &paths["/v1/runs"]["post"];
    let description = trigger["description"].as_str().unwrap();
    assert!(description.contains("`runner` role"), "{description}");
    assert_eq!(
        trigger["responses"]["202"]["links"]["show"]["operationId"],
        "runs_show"
    );
    let run_status = &served["components"]["schemas"]["RunDto"]["properties"]["status"]["enum"];
    assert_eq!(
        run_status,
        &serde_json::json!([
            "queued",
            "running",
            "passed",
            "failed",
            "errored",
            "timed_out",
            "cancelled"
        ])
    );
}

/// Schemathesis (`STEPWISE_SCHEMATHESIS`, the program; `.ci/run` installs it) against a server
/// with tokens and the demo plugin, as admin: every operation, with examples, boundary values,
/// random and invalid data, and the document's links for sequences of calls. Every check but
/// `positive_data_acceptance` (the API checks more than a schema can say: that a plugin
/// exists, params against its own schema, that a cursor is one it gave out).
///
/// A failure is returned, not panicked: libtest then prints it last, after the server's log
/// and without a backtrace, where a CI excerpt that keeps only the ends of the output shows it.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document()
-> Result<(), String> {
    let Ok(schemathesis) = std::env::var("STEPWISE_SCHEMATHESIS") else {
        eprintln!(
            "SKIPPED: schemathesis against the live API; set STEPWISE_SCHEMATHESIS to the \
             schemathesis program (.ci/run installs it into a virtual environment)"
        );
        return Ok(());
    };
    let server = TestServer::start(
        Setup::default()
            .with_auth(AuthMode::Tokens)
            .with_plugin(PluginFile::new("event-pipeline", EVENT_PIPELINE_WASM, "")),
    )
    .await;
    let token = server.create_token(Role::Admin).await;
    let reports = tempfile::tempdir().unwrap();
    // Revoking tokens gets a pass of its own, without links: with them, a sequence could
    // revoke the token the run itself uses.
    // The event streams never end, which a request-per-case fuzzer cannot read
    // (tests/all/suite/events.rs checks them).
    let passes: [&[&str]; 2] = [
        &[
            "--exclude-path",
            "/v1/tokens/{name}",
            "--exclude-path-regex",
            "/events$",
        ],
        &[
            "--include-path",
            "/v1/tokens/{name}",
            "--phases",
            "examples,coverage,fuzzing",
        ],
    ];
    for (pass, filter) in passes.iter().enumerate() {
        let output = tokio::process::Command::new(&schemathesis)
            // It keeps a cache of found failures in its working directory.
            .current_dir(reports.path())
            .arg("run")
            .arg(server.url("/openapi.json"))
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--max-examples", "25", "--workers", "1"])
            .args(["--generation-database", "none", "--no-color"])
            .args(["--report", "junit", "--report-dir"])
            .arg(reports.path().join(pass.to_string()))
            .args(*filter)
            .output()
            .await
            .expect("running schemathesis");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout
            .lines()
            .filter(|line| line.contains("generated") || line.contains("Tested"))
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!("schemathesis pass {pass}: {summary}");
        if !output.status.success() {
            eprintln!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
            return Err(format!("schemathesis pass {pass}: {}", failures(&stdout)));
        }
        assert!(stdout.contains(" passed"), "{stdout}");
        assert_no_failures(&reports.path().join(pass.to_string()));
    }
    Ok(())
}

/// What schemathesis found, on one line: its report between the FAILURES (or ERRORS) heading
/// and the SUMMARY, and the seed that reproduces it (`--seed`).
fn failures(stdout: &str) -> String {
    let found = stdout
        .lines()
        .skip_while(|line| !(line.contains(" FAILURES ") || line.contains(" ERRORS ")))
        .take_while(|line| !line.contains(" SUMMARY "))
        .chain(stdout.lines().filter(|line| line.starts_with("Seed:")))
        .map(|line| line.trim_matches(|c| c == '=' || c == '_' || c == ' '))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if found.is_empty() {
        let lines = stdout.lines().collect::<Vec<_>>();
        lines[lines.len().saturating_sub(20)..].join(" | ")
    } else {
        found
    }
}

/// The JUnit report agrees: test cases ran, none failed.
fn assert_no_failures(dir: &Path) {
    let report = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(report.contains("<testcase"), "{report}");
    assert!(!report.contains("<failure"), "{report}");
}
