//! `http-status`: passes when a GET of `url` answers `expect_status` (default 200),
//! stays pending while it answers otherwise or not at all.

use serde::Deserialize;
use serde_json::json;
use stepwise_plugin::http::{self, HttpError};
use stepwise_plugin::{
    Check, CheckInfo, StepInfo, StepInput, StepOutcome, export_check, failed, passed, pending,
};

#[derive(Deserialize)]
struct Params {
    url: String,
    #[serde(default = "default_status")]
    expect_status: u16,
}

fn default_status() -> u16 {
    200
}

struct HttpStatus;

impl Check for HttpStatus {
    fn describe() -> CheckInfo {
        CheckInfo {
            name: "http-status".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Waits until a GET of `url` answers with `expect_status` (default 200)."
                .into(),
            steps: vec![StepInfo {
                name: "status".into(),
                description: "GET the URL and compare the status code".into(),
                timeout_ms: None,
                max_attempts: None,
            }],
            params_schema: Some(
                json!({
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {"type": "string"},
                        "expect_status": {"type": "integer", "minimum": 100, "maximum": 599}
                    }
                })
                .to_string(),
            ),
        }
    }

    fn run_step(input: StepInput) -> StepOutcome {
        let params: Params = match input.params() {
            Ok(params) => params,
            Err(error) => return failed(error),
        };
        match http::get(&params.url) {
            Ok(response) if response.status == params.expect_status => {
                passed(&json!({"status": response.status, "elapsed_ms": input.elapsed_ms}))
            }
            Ok(response) => pending(format!(
                "got {}, want {}",
                response.status, params.expect_status
            )),
            // A denial will not go away by waiting.
            Err(error @ HttpError::Denied(_)) | Err(error @ HttpError::InvalidUrl(_)) => {
                failed(error.to_string())
            }
            Err(error) => pending(error.to_string()),
        }
    }
}

export_check!(HttpStatus);
