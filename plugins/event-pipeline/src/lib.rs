//! `event-pipeline`: the demo check (README, "The demo, step by step"). Follows one analytics event through the
//! collector (HTTP), the warehouse (SQL) and the report (HTTP), comparing its fields at every
//! stage with what the test sent and with what the previous stage saw. Built with the `stores`
//! feature, it also checks the event's Redis counter and its row in a MariaDB ledger; with
//! `bus`, that the collector published it on NATS (`events.collected`) with the same fields.

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
    #[cfg(feature = "stores")]
    #[serde(default = "default_counter_source")]
    counter_source: String,
    #[cfg(feature = "stores")]
    #[serde(default = "default_ledger_source")]
    ledger_source: String,
    #[cfg(feature = "bus")]
    #[serde(default = "default_bus_source")]
    bus_source: String,
}

#[cfg(feature = "bus")]
fn default_bus_source() -> String {
    "bus".into()
}

fn default_collector() -> String {
    "http://127.0.0.1:9000".into()
}

fn default_source() -> String {
    "warehouse".into()
}

#[cfg(feature = "stores")]
fn default_counter_source() -> String {
    "counters".into()
}

#[cfg(feature = "stores")]
fn default_ledger_source() -> String {
    "ledger".into()
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
        #[allow(unused_mut)]
        let mut steps = vec![step(
            "collector",
            "the collector received the event",
            10_000,
        )];
        #[cfg(feature = "bus")]
        steps.push(step(
            "bus",
            "the collector published the event on events.collected with the same fields",
            10_000,
        ));
        steps.extend([
            step(
                "warehouse",
                "the warehouse table has the event with the same fields",
                15_000,
            ),
            step(
                "report",
                "the report counts the event once with the same amount",
                15_000,
            ),
        ]);
        #[cfg(feature = "stores")]
        steps.extend([
            step(
                "counter",
                "the Redis counter counted the event once",
                15_000,
            ),
            step(
                "ledger",
                "the MariaDB ledger booked the event with the same amount",
                15_000,
            ),
        ]);
        let mut properties = json!({
            "event_id": {"type": "string", "minLength": 1},
            "name": {"type": "string"},
            "amount_cents": {"type": "integer"},
            "user_id": {"type": "string"},
            "collector_url": {"type": "string"},
            "source": {"type": "string"}
        });
        #[cfg(feature = "stores")]
        for source in ["counter_source", "ledger_source"] {
            properties[source] = json!({"type": "string"});
        }
        #[cfg(feature = "bus")]
        {
            properties["bus_source"] = json!({"type": "string"});
        }
        CheckInfo {
            name: "event-pipeline".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Verifies one event in the collector, the warehouse and the report, with consistent fields.".into(),
            steps,
            params_schema: Some(
                json!({"type": "object", "required": ["event_id"], "properties": properties})
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
            #[cfg(feature = "bus")]
            "bus" => bus::check_bus(&params),
            "warehouse" => check_warehouse(&params, &input),
            "report" => check_report(&params),
            #[cfg(feature = "stores")]
            "counter" => stores::check_counter(&params),
            #[cfg(feature = "stores")]
            "ledger" => stores::check_ledger(&params, &input),
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

/// The first row `statement` finds for the event in `source`, or the step's outcome when
/// there is none yet or the source refuses.
fn event_row(
    source: &str,
    statement: &str,
    params: &Params,
) -> Result<Map<String, Value>, StepOutcome> {
    let rows = match sql::query(
        source,
        statement,
        &[sql::Value::Text(params.event_id.clone())],
    ) {
        Ok(rows) => rows,
        Err(error @ (SqlError::Denied(_) | SqlError::ReadOnly(_))) => {
            return Err(failed(sql::error_message(&error)));
        }
        Err(error) => return Err(pending(sql::error_message(&error))),
    };
    sql::rows_as_objects(&rows)
        .into_iter()
        .next()
        .ok_or_else(|| pending(format!("event not in {source} yet")))
}

fn check_warehouse(params: &Params, input: &StepInput) -> StepOutcome {
    #[cfg(not(feature = "replay-changed-query"))]
    let statement = "SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ?";
    #[cfg(feature = "replay-changed-query")]
    let statement =
        "SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ? LIMIT 1";
    #[allow(unused_mut)]
    let mut row = match event_row(&params.source, statement, params) {
        Ok(row) => row,
        Err(outcome) => return outcome,
    };
    // The bug a test fixes by replaying: the amount read as if the warehouse kept whole units.
    #[cfg(feature = "replay-bug")]
    if let Some(cents) = row.get("amount_cents").and_then(Value::as_i64) {
        row.insert("amount_cents".into(), json!(cents / 100));
    }
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

/// The demo's Redis counter and MariaDB ledger (README, "The demo, step by step").
#[cfg(feature = "stores")]
mod stores {
    use serde_json::{Map, Value, json};
    use stepwise_plugin::kv::{self, KvError};
    use stepwise_plugin::{StepInput, StepOutcome, failed, log, passed, pending};

    use crate::{Params, event_row, mismatch};

    pub fn check_counter(params: &Params) -> StepOutcome {
        let key = format!("stepwise-demo:seen:{}", params.event_id);
        let seen = match kv::get_text(&params.counter_source, &key) {
            Ok(seen) => seen,
            Err(error @ KvError::Denied(_)) => return failed(kv::error_message(&error)),
            Err(error) => return pending(kv::error_message(&error)),
        };
        match seen.as_deref() {
            None => pending("event not counted yet"),
            Some("1") => {
                log::info(&format!("counter counts event {} once", params.event_id));
                passed(&json!({"key": key, "count": 1}))
            }
            Some(count) => failed(format!(
                "counter counts the event {count} times, expected once"
            )),
        }
    }

    pub fn check_ledger(params: &Params, input: &StepInput) -> StepOutcome {
        let statement =
            "SELECT event_id, amount_cents, booked_at FROM stepwise_demo_ledger WHERE event_id = ?";
        let row = match event_row(&params.ledger_source, statement, params) {
            Ok(row) => row,
            Err(outcome) => return outcome,
        };
        // The ledger must book what the warehouse holds, whatever the caller asked for.
        let mut expected = Map::new();
        if let Some(amount) = params.amount_cents {
            expected.insert("amount_cents".into(), json!(amount));
        }
        if let Some(amount) = input
            .output_of::<Map<String, Value>>("warehouse")
            .and_then(|warehouse| warehouse.get("amount_cents").cloned())
        {
            expected.insert("amount_cents".into(), amount);
        }
        if let Some(message) = mismatch("ledger", &row, &expected) {
            return failed(message);
        }
        log::info(&format!("ledger booked event {}", params.event_id));
        passed(&row)
    }
}

export_check!(EventPipeline);

/// The collector's message on NATS (README, "The demo, step by step").
#[cfg(feature = "bus")]
mod bus {
    use serde_json::{Map, Value, json};
    use stepwise_plugin::messages::{self, Filter, MessagesError};
    use stepwise_plugin::{StepOutcome, failed, log, passed, pending};

    use crate::{Params, mismatch};

    /// The subject the demo's collector publishes each event on.
    const SUBJECT: &str = "events.collected";

    pub fn check_bus(params: &Params) -> StepOutcome {
        let filter = Filter::new().json_field("event_id", &params.event_id);
        let found = match messages::find(&params.bus_source, SUBJECT, &filter, 1) {
            Ok(found) => found,
            Err(error @ MessagesError::LimitExceeded(_)) => {
                return pending(messages::error_message(&error));
            }
            Err(error) => return failed(messages::error_message(&error)),
        };
        let Some(message) = found.first() else {
            return pending(format!("event not on {SUBJECT} yet"));
        };
        let event: Map<String, Value> = match message.json() {
            Ok(event) => event,
            Err(error) => return failed(error),
        };
        if let Some(problem) = mismatch("bus", &event, &params.expected()) {
            return failed(problem);
        }
        log::info(&format!(
            "event {} is on {SUBJECT} (position {})",
            params.event_id, message.position
        ));
        passed(&json!({
            "subject": message.subject,
            "position": message.position,
            "published_at_ms": message.published_at_ms,
        }))
    }
}
