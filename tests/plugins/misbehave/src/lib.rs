//! `misbehave`: a test plugin that does what its params tell each step to do, from passing to
//! trapping, looping, exhausting memory or calling capabilities it was not granted.
//!
//! Params: `{"steps": {"<step>": {"action": "...", ...}}}`; a step without an entry passes.

use std::hint::black_box;

use serde_json::{Value, json};
use stepwise_plugin::http;
use stepwise_plugin::kv;
use stepwise_plugin::messages;
use stepwise_plugin::sql;
use stepwise_plugin::{
    Check, CheckInfo, StepInfo, StepInput, StepOutcome, export_check, failed, log, passed, pending,
};

struct Misbehave;

fn step(name: &str, timeout_ms: Option<u64>) -> StepInfo {
    StepInfo {
        name: name.into(),
        description: String::new(),
        timeout_ms,
        max_attempts: None,
    }
}

/// Which build this is; passed steps report it, so a test sees which version ran.
const VARIANT: &str = if cfg!(feature = "variant-b") {
    "b"
} else {
    "a"
};

impl Check for Misbehave {
    fn describe() -> CheckInfo {
        if cfg!(feature = "describe-trap") {
            panic!("told to trap in describe");
        }
        if cfg!(feature = "describe-loop") {
            let mut counter = 0u64;
            loop {
                counter = black_box(counter.wrapping_add(1));
            }
        }
        let last = if cfg!(feature = "duplicate-steps") {
            "first"
        } else {
            "third"
        };
        if cfg!(feature = "describe-huge") {
            // Beyond every bound on describe: too many steps, each with an absurd timeout.
            return CheckInfo {
                name: "misbehave".into(),
                version: "huge".into(),
                description: String::new(),
                steps: (0..100)
                    .map(|i| step(&format!("s{i}"), Some(u64::MAX)))
                    .collect(),
                params_schema: None,
            };
        }
        CheckInfo {
            name: "misbehave".into(),
            version: format!("{}-{VARIANT}", env!("CARGO_PKG_VERSION")),
            description: "Test plugin: each step does what the params say.".into(),
            steps: vec![
                step("first", None),
                step("second", Some(1500)),
                step(last, None),
            ],
            params_schema: Some(params_schema().to_string()),
        }
    }

    fn run_step(input: StepInput) -> StepOutcome {
        let params: Value = match input.params() {
            Ok(params) => params,
            Err(error) => return failed(error),
        };
        let action = &params["steps"][input.step.as_str()];
        match action["action"].as_str().unwrap_or("pass") {
            "pass" => {
                passed(&json!({"step": input.step, "attempt": input.attempt, "variant": VARIANT}))
            }
            "fail" => failed(action["message"].as_str().unwrap_or("told to fail")),
            // Fails in the build named by `variant`, passes in the other: one build's
            // behaviour against the other's on the same params.
            "fail_in_variant" => {
                if action["variant"].as_str() == Some(VARIANT) {
                    failed(format!("told to fail in variant {VARIANT}"))
                } else {
                    passed(&json!({"step": input.step, "variant": VARIANT}))
                }
            }
            "pending" => pending("told to stay pending"),
            "pending_until" => {
                if u64::from(input.attempt) >= action["attempt"].as_u64().unwrap_or(1) {
                    passed(
                        &json!({"step": input.step, "attempt": input.attempt, "variant": VARIANT}),
                    )
                } else {
                    pending(format!("attempt {}", input.attempt))
                }
            }
            "pass_after_ms" => {
                if input.elapsed_ms >= action["ms"].as_u64().unwrap_or(0) {
                    passed(&json!({"step": input.step, "elapsed_ms": input.elapsed_ms}))
                } else {
                    pending(format!("{} ms elapsed", input.elapsed_ms))
                }
            }
            "count_calls" => {
                // The calls this instance has served: more than one only when the host kept
                // it for the run's next call.
                static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                log::info(&format!("call {calls} of this instance"));
                passed(&json!({"calls": calls}))
            }
            "trap" => panic!("told to trap"),
            "loop" => {
                let mut counter = 0u64;
                loop {
                    counter = black_box(counter.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "hold" => {
                // Keeps `bytes` of memory until the time limit stops the call.
                let hoard = black_box(vec![1u8; action["bytes"].as_u64().unwrap_or(0) as usize]);
                loop {
                    black_box(&hoard);
                }
            }
            "recurse" => passed(&json!({"depth": recurse(black_box(0))})),
            "big_output" => passed(&"x".repeat(action["bytes"].as_u64().unwrap_or(0) as usize)),
            "big_array" => {
                // A JSON array of `bytes` bytes: `[0,0,…]`, each element a value once parsed.
                let bytes = action["bytes"].as_u64().unwrap_or(0) as usize;
                let mut array = String::with_capacity(bytes + 2);
                array.push('[');
                while array.len() + 2 < bytes {
                    array.push_str("0,");
                }
                array.push_str("0]");
                StepOutcome::Passed(array)
            }
            "log_spam" => {
                // Each line with `bytes` of padding; pending until attempt `pending_until`.
                let padding = "x".repeat(action["bytes"].as_u64().unwrap_or(0) as usize);
                for line in 0..action["count"].as_u64().unwrap_or(0) {
                    log::info(format!("line {line} {padding}").trim_end());
                }
                if u64::from(input.attempt) < action["pending_until"].as_u64().unwrap_or(0) {
                    return pending(format!("attempt {}", input.attempt));
                }
                passed(&json!({"logged": action["count"]}))
            }
            "http_burst" => http_burst(
                action["authority"].as_str().unwrap_or_default(),
                action["count"].as_u64().unwrap_or(1),
            ),
            "http" => {
                let url = action["url"].as_str().unwrap_or_default();
                let expect = action["expect_status"].as_u64().unwrap_or(200);
                let headers: Vec<(&str, &str)> = action["headers"]
                    .as_object()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|(name, value)| {
                                (name.as_str(), value.as_str().unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let method = action["method"].as_str().unwrap_or("GET");
                match http::request(method, url, &headers, None) {
                    // What a reflecting server echoed, handed back every way a plugin can,
                    // and once more transformed, as no redaction of outputs could catch.
                    Ok(response) if action["echo"] == true => {
                        log::info(&response.text());
                        let reversed: String = response.text().chars().rev().collect();
                        passed(&json!({
                            "status": response.status,
                            "body": response.text(),
                            "reversed": reversed,
                            "headers": response.headers,
                        }))
                    }
                    Ok(response) if u64::from(response.status) == expect => {
                        passed(&json!({"status": response.status}))
                    }
                    Ok(response) => pending(format!("status {}", response.status)),
                    Err(error) => failed(error.to_string()),
                }
            }
            "sql" => {
                let source = action["source"].as_str().unwrap_or_default();
                let statement = action["statement"].as_str().unwrap_or_default();
                let values: Vec<sql::Value> = action["params"]
                    .as_array()
                    .map(|values| values.iter().map(sql::value_from_json).collect())
                    .unwrap_or_default();
                match sql::query(source, statement, &values) {
                    Ok(rows) => {
                        let rows: Vec<Vec<Value>> = rows
                            .rows
                            .iter()
                            .map(|row| row.iter().map(sql::value_to_json).collect())
                            .collect();
                        passed(&json!({"rows": rows}))
                    }
                    Err(error) => failed(sql::error_message(&error)),
                }
            }
            "kv" => match kv_call(action) {
                Ok(result) => passed(&json!({"result": result})),
                Err(error) => failed(kv::error_message(&error)),
            },
            "kv_scan_loop" => {
                // Scans over and over, as a plugin that never stops paging would.
                let source = action["source"].as_str().unwrap_or_default();
                let mut cursor = "0".to_owned();
                let mut pages = 0u64;
                loop {
                    match kv::scan(source, &cursor, Some("*"), 1000) {
                        Ok(page) => cursor = page.cursor,
                        Err(error) => {
                            return failed(format!(
                                "after {pages} pages: {}",
                                kv::error_message(&error)
                            ));
                        }
                    }
                    pages += 1;
                }
            }
            "messages" => {
                // {"source", "subject", "where": [["json"|"header", name, value]...], "limit",
                // "expect": n}: pending until n messages are found.
                let source = action["source"].as_str().unwrap_or_default();
                let subject = action["subject"].as_str().unwrap_or_default();
                let mut filter = messages::Filter::new();
                for condition in action["where"].as_array().into_iter().flatten() {
                    let part = |index: usize| condition[index].as_str().unwrap_or_default();
                    filter = match part(0) {
                        "header" => filter.header(part(1), part(2)),
                        _ => filter.json_field(part(1), part(2)),
                    };
                }
                let limit = action["limit"].as_u64().unwrap_or(100) as u32;
                match messages::find(source, subject, &filter, limit) {
                    Ok(found) if (found.len() as u64) < action["expect"].as_u64().unwrap_or(0) => {
                        pending(format!("{} found", found.len()))
                    }
                    Ok(found) => passed(&json!({"messages": found
                        .iter()
                        .map(|message| json!({
                            "subject": message.subject,
                            "text": message.text(),
                            "headers": message.headers,
                            "published_at_ms": message.published_at_ms,
                            "position": message.position,
                        }))
                        .collect::<Vec<_>>()})),
                    Err(error) => failed(messages::error_message(&error)),
                }
            }
            "echo_outputs" => passed(&input.outputs()),
            "fields_flood" => fields_flood(
                action["count"].as_u64().unwrap_or(0),
                action["bytes"].as_u64().unwrap_or(0) as usize,
            ),
            other => failed(format!("unknown action {other:?}")),
        }
    }
}

/// One typed kv call named by `action["call"]`, with `action["args"]` as its arguments after
/// the source; values come back as text.
fn kv_call(action: &Value) -> Result<Value, kv::KvError> {
    let source = action["source"].as_str().unwrap_or_default();
    let args = action["args"].as_array().cloned().unwrap_or_default();
    let text = |index: usize| {
        args.get(index)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let number = |index: usize| args.get(index).and_then(Value::as_i64).unwrap_or_default();
    let texts = |index: usize| -> Vec<String> {
        args.get(index)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .map(|item| item.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let optional =
        |value: Option<Vec<u8>>| value.map_or(Value::Null, |bytes| json!(kv::text(&bytes)));
    let entries = |entries: Vec<kv::StreamEntry>| -> Value {
        entries
            .into_iter()
            .map(|entry| {
                let fields: serde_json::Map<String, Value> = entry
                    .fields
                    .iter()
                    .map(|(field, value)| (kv::text(field), json!(kv::text(value))))
                    .collect();
                json!({"id": entry.id, "fields": fields})
            })
            .collect()
    };
    let call = action["call"].as_str().unwrap_or_default();
    Ok(match call {
        "get" => optional(kv::get(source, &text(0))?),
        "mget" => kv::mget(source, &texts(0))?
            .into_iter()
            .map(optional)
            .collect(),
        "exists" => json!(kv::exists(source, &text(0))?),
        "ttl" => json!(kv::ttl(source, &text(0))?),
        "type" => json!(kv::r#type(source, &text(0))?),
        "hget" => optional(kv::hget(source, &text(0), &text(1))?),
        "hgetall" => {
            let pairs: serde_json::Map<String, Value> = kv::hgetall(source, &text(0))?
                .iter()
                .map(|(field, value)| (kv::text(field), json!(kv::text(value))))
                .collect();
            Value::Object(pairs)
        }
        "hmget" => kv::hmget(source, &text(0), &texts(1))?
            .into_iter()
            .map(optional)
            .collect(),
        "smembers" => {
            let mut members: Vec<String> = kv::smembers(source, &text(0))?
                .iter()
                .map(|member| kv::text(member))
                .collect();
            members.sort();
            json!(members)
        }
        "sismember" => json!(kv::sismember(source, &text(0), &text(1))?),
        "scard" => json!(kv::scard(source, &text(0))?),
        "lrange" => json!(
            kv::lrange(source, &text(0), number(1), number(2))?
                .iter()
                .map(|item| kv::text(item))
                .collect::<Vec<_>>()
        ),
        "llen" => json!(kv::llen(source, &text(0))?),
        "zrange" => kv::zrange(source, &text(0), number(1), number(2))?
            .into_iter()
            .map(|scored| json!([kv::text(&scored.member), scored.score]))
            .collect(),
        "zscore" => json!(kv::zscore(source, &text(0), &text(1))?),
        "zcard" => json!(kv::zcard(source, &text(0))?),
        "xrange" => entries(kv::xrange(
            source,
            &text(0),
            &text(1),
            &text(2),
            number(3) as u32,
        )?),
        "xrevrange" => entries(kv::xrevrange(
            source,
            &text(0),
            &text(1),
            &text(2),
            number(3) as u32,
        )?),
        "scan" => {
            let pattern = args.get(1).and_then(Value::as_str);
            let page = kv::scan(source, &text(0), pattern, number(2) as u32)?;
            let mut keys: Vec<String> = page.keys.iter().map(|key| kv::text(key)).collect();
            keys.sort();
            json!({"cursor": page.cursor, "keys": keys})
        }
        other => json!({"unknown_call": other}),
    })
}

fn params_schema() -> Value {
    let mut properties =
        json!({"steps": {"type": "object"}, "required_number": {"type": "integer"}});
    if cfg!(feature = "params-pattern") {
        // A pattern a backtracking engine takes exponential steps for on "aaa…!" (the word
        // boundary makes fancy-regex run it itself rather than hand it to the regex crate).
        properties["names"] = json!({
            "type": "array",
            "items": {"type": "string", "not": {"pattern": "^(a+)+\\b$"}},
        });
    }
    if cfg!(feature = "params-lookaround") {
        properties["names"] = json!({
            "type": "array",
            "items": {"type": "string", "pattern": "^(?=a)\\w+$"},
        });
    }
    json!({"type": "object", "properties": properties})
}

/// Sends `count` GETs to `http://authority/` at once (all handed to the host before any is
/// awaited) and reports how many were answered and how many refused.
fn http_burst(authority: &str, count: u64) -> StepOutcome {
    use stepwise_plugin::bindings::wasi::http::outgoing_handler;
    use stepwise_plugin::bindings::wasi::http::types::{Fields, OutgoingRequest, Scheme};
    let mut in_flight = Vec::new();
    let mut refused = 0;
    for _ in 0..count {
        let request = OutgoingRequest::new(Fields::new());
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some("/"));
        match outgoing_handler::handle(request, None) {
            Ok(future) => in_flight.push(future),
            Err(_) => refused += 1,
        }
    }
    let mut answered = 0;
    let mut responses = Vec::new();
    for future in in_flight {
        future.subscribe().block();
        match future.get() {
            Some(Ok(Ok(response))) => {
                answered += 1;
                // Kept open until every request is settled, so they overlap.
                responses.push(response);
            }
            _ => refused += 1,
        }
    }
    passed(&json!({"answered": answered, "refused": refused}))
}

/// Keeps `count` sets of headers of `bytes` each alive: memory the host holds for the plugin,
/// outside its linear memory. Reports how many it could make, then holds them until the
/// time limit.
fn fields_flood(count: u64, bytes: usize) -> StepOutcome {
    use stepwise_plugin::bindings::wasi::http::types::Fields;
    let value = vec![b'x'; bytes];
    let mut kept = Vec::new();
    for _ in 0..count {
        let fields = Fields::new();
        // Appended in 1 KiB pieces, as a client adds headers one at a time.
        for piece in value.chunks(1024) {
            if fields.append("x-flood", piece).is_err() {
                break;
            }
        }
        kept.push(fields);
    }
    log::info(&format!("holding {} sets of headers", kept.len()));
    loop {
        black_box(&kept);
    }
}

/// Recursion the optimiser cannot turn into a loop: each frame keeps a live buffer.
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let frame = black_box([depth; 16]);
    black_box(recurse(depth + 1)) + frame[depth as usize % 16]
}

export_check!(Misbehave);
