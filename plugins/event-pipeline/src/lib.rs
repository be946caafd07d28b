//! `event-pipeline`: the demo check (README, "The demo, step by step"). Follows one analytics event through the
//! collector (HTTP), the warehouse (SQL) and the report (HTTP), comparing its fields at every
//! stage with what the test sent and with what the previous stage saw.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use stepwise_plugin::http::{self, HttpError};
use stepwise_plugin::sql::{self, SqlError};
use stepwise_plugin::{
    Check, CheckInfo, StepInfo, StepInput, StepOutcome, export_check, failed, log, passed, pending,
};

#[derive(Deserialize)]
struct Params {
    event_id: String,
    name: Option<String>,
    amount_cents: Option<i64>,
    user_id: Option<String>,
    #[serde(default = "default_collector")]
    collector_url: String,
    #[serde(default = "default_source")]
    source: String,
}

fn default_collector() -> String {
    "http://127.0.0.1:9000".into()
}

fn default_source() -> String {
    "warehouse".into()
}

impl Params {
    /// The fields the caller asked to verify, as JSON.
    fn expected(&self) -> Map<String, Value> {
        let mut expected = Map::new();
        if let Some(name) = &self.name {
            expected.insert("name".into(), json!(name));
        }
        if let Some(amount) = self.amount_cents {
            expected.insert("amount_cents".into(), json!(amount));
        }
        if let Some(user) = &self.user_id {
            expected.insert("user_id".into(), json!(user));
        }
        expected
    }
}

/// The first field of `expected` that `record` holds differently, as a failure message.
fn mismatch(
    stage: &str,
    record: &Map<String, Value>,
    expected: &Map<String, Value>,
) -> Option<String> {
    expected.iter().find_map(|(field, want)| {
        let got = record.get(field).unwrap_or(&Value::Null);
        (got != want).then(|| format!("{stage}: {field} is {got}, expected {want}"))
    })
}

fn step(name: &str, description: &str, timeout_ms: u64) -> StepInfo {
    StepInfo {
        name: name.into(),
        description: description.into(),
        timeout_ms: Some(timeout_ms),
        max_attempts: None,
    }
}

fn http_problem(error: HttpError) -> StepOutcome {
    if error.is_denied() {
        failed(error.to_string())
    } else {
        pending(error.to_string())
    }
}

struct EventPipeline;

impl Check for EventPipeline {
    fn describe() -> CheckInfo {
        CheckInfo {
            name: "event-pipeline".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Verifies one event in the collector, the warehouse and the report, with consistent fields.".into(),
            steps: vec![
                step("collector", "the collector received the event", 10_000),
                step("warehouse", "the warehouse table has the event with the same fields", 15_000),
                step("report", "the report counts the event once with the same amount", 15_000),
            ],
            params_schema: Some(
                json!({
                    "type": "object",
                    "required": ["event_id"],
                    "properties": {
                        "event_id": {"type": "string", "minLength": 1},
                        "name": {"type": "string"},
                        "amount_cents": {"type": "integer"},
                        "user_id": {"type": "string"},
                        "collector_url": {"type": "string"},
                        "source": {"type": "string"}
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
        match input.step.as_str() {
            "collector" => check_collector(&params),
            "warehouse" => check_warehouse(&params, &input),
            "report" => check_report(&params),
            other => failed(format!("unknown step {other:?}")),
        }
    }
}

fn check_collector(params: &Params) -> StepOutcome {
    let url = format!(
        "{}/events/{}",
        params.collector_url.trim_end_matches('/'),
        params.event_id
    );
    let response = match http::get(&url) {
        Ok(response) => response,
        Err(error) => return http_problem(error),
    };
    match response.status {
        200 => {}
        404 => return pending("event not in the collector yet"),
        status => return pending(format!("collector answered {status}")),
    }
    let record: Map<String, Value> = match response.json() {
        Ok(record) => record,
        Err(error) => return failed(format!("collector: {error}")),
    };
    if let Some(message) = mismatch("collector", &record, &params.expected()) {
        return failed(message);
    }
    log::info(&format!("collector has event {}", params.event_id));
    passed(&record)
}

fn check_warehouse(params: &Params, input: &StepInput) -> StepOutcome {
    let statement = "SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ?";
    let rows = match sql::query(
        &params.source,
        statement,
        &[sql::Value::Text(params.event_id.clone())],
    ) {
        Ok(rows) => rows,
        Err(error @ (SqlError::Denied(_) | SqlError::ReadOnly(_))) => {
            return failed(sql::error_message(&error));
        }
        Err(error) => return pending(sql::error_message(&error)),
    };
    let Some(row) = sql::rows_as_objects(&rows).into_iter().next() else {
        return pending("event not in the warehouse yet");
    };
    if let Some(message) = mismatch("warehouse", &row, &params.expected()) {
        return failed(message);
    }
    // The warehouse must agree with what the collector saw, not only with the caller.
    if let Some(collected) = input.output_of::<Map<String, Value>>("collector") {
        let seen: Map<String, Value> = ["name", "amount_cents", "user_id"]
            .into_iter()
            .filter_map(|field| {
                collected
                    .get(field)
                    .map(|value| (field.to_owned(), value.clone()))
            })
            .collect();
        if let Some(message) = mismatch("warehouse vs collector", &row, &seen) {
            return failed(message);
        }
    }
    log::info(&format!("warehouse has event {}", params.event_id));
    passed(&row)
}

fn check_report(params: &Params) -> StepOutcome {
    let url = format!(
        "{}/report/events/{}",
        params.collector_url.trim_end_matches('/'),
        params.event_id
    );
    let response = match http::get(&url) {
        Ok(response) => response,
        Err(error) => return http_problem(error),
    };
    match response.status {
        200 => {}
        404 => return pending("event not in the report yet"),
        status => return pending(format!("report answered {status}")),
    }
    let report: Map<String, Value> = match response.json() {
        Ok(report) => report,
        Err(error) => return failed(format!("report: {error}")),
    };
    let count = report.get("count").and_then(Value::as_i64).unwrap_or(0);
    if count != 1 {
        return failed(format!(
            "report counts the event {count} times, expected once"
        ));
    }
    let mut expected = Map::new();
    if let Some(amount) = params.amount_cents {
        expected.insert("amount_cents".into(), json!(amount));
    }
    if let Some(message) = mismatch("report", &report, &expected) {
        return failed(message);
    }
    log::info(&format!("report counts event {}", params.event_id));
    passed(&report)
}

export_check!(EventPipeline);
