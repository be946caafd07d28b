//! `stepwise run --junit FILE`: a finished run as a JUnit XML report, one test case per step,
//! for CI systems that show test reports. Works on the run as `GET /v1/runs/{id}` returns it.
//! Also `stepwise dev --replay DIR --junit FILE`: one test case per replayed recording.

use serde_json::Value;

/// Renders the finished `run` (the API's JSON) as JUnit XML.
pub fn render(run: &Value) -> String {
    let plugin = run["plugin"].as_str().unwrap_or("run");
    let steps = run["steps"].as_array().cloned().unwrap_or_default();
    let mut cases = String::new();
    let (mut failures, mut errors, mut skipped) = (0, 0, 0);
    for step in &steps {
        let name = step["name"].as_str().unwrap_or("step");
        let seconds = match (
            millis(&step["first_attempt_at"]),
            millis(&step["finished_at"]).or(millis(&step["last_attempt_at"])),
        ) {
            (Some(first), Some(last)) => (last - first).max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        let message = step["message"].as_str().unwrap_or_default();
        let attempts = step["attempts"].as_u64().unwrap_or(0);
        let status = step["status"].as_str().unwrap_or_default();
        let detail = format!("{status} after {attempts} attempts: {message}");
        let body = match status {
            "passed" => String::new(),
            "failed" | "timed_out" => {
                failures += 1;
                format!(
                    "<failure type=\"{status}\" message=\"{}\">{}</failure>",
                    escape(message),
                    escape(&detail)
                )
            }
            "errored" => {
                errors += 1;
                format!(
                    "<error type=\"errored\" message=\"{}\">{}</error>",
                    escape(message),
                    escape(&detail)
                )
            }
            _ => {
                skipped += 1;
                format!(
                    "<skipped message=\"{}\"/>",
                    escape(&format!("step {status}"))
                )
            }
        };
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{seconds:.3}\">{body}</testcase>\n",
            escape(plugin),
            escape(name)
        ));
    }
    let total = match (millis(&run["created_at"]), millis(&run["finished_at"])) {
        (Some(created), Some(finished)) => (finished - created).max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    let count = steps.len();
    let id = run["id"].as_str().unwrap_or_default();
    let properties = ["id", "plugin_version", "status", "message"]
        .iter()
        .filter_map(|key| {
            run[*key].as_str().map(|value| {
                format!(
                    "      <property name=\"{key}\" value=\"{}\"/>\n",
                    escape(value)
                )
            })
        })
        .collect::<String>();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"stepwise\" tests=\"{count}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">\n\
         \x20 <testsuite name=\"{}\" id=\"{}\" tests=\"{count}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\" timestamp=\"{}\">\n\
         \x20   <properties>\n{properties}    </properties>\n\
         {cases}\
         \x20 </testsuite>\n\
         </testsuites>\n",
        escape(plugin),
        escape(id),
        escape(run["created_at"].as_str().unwrap_or_default()),
    )
}

/// One replayed recording, for [`render_replays`].
pub struct ReplayCase<'a> {
    pub name: &'a str,
    pub recorded: &'a str,
    /// `passed`, or how the replay failed (`failed`, `timed_out`, `errored`, `mismatch`, ...).
    pub status: &'a str,
    pub detail: &'a str,
}

/// The replays of `plugin`'s recordings as JUnit XML: a replay that did not pass is a failure
/// (`failed`, `timed_out`: the check's verdict) or an error (a mismatch, an errored call).
pub fn render_replays(plugin: &str, cases: &[ReplayCase<'_>]) -> String {
    let (mut failures, mut errors) = (0, 0);
    let mut body = String::new();
    for case in cases {
        let message = format!(
            "replayed {} {} (recorded: {})",
            case.status, case.detail, case.recorded
        );
        let verdict = match case.status {
            "passed" => String::new(),
            "failed" | "timed_out" => {
                failures += 1;
                format!(
                    "<failure type=\"{}\" message=\"{}\"/>",
                    escape(case.status),
                    escape(&message)
                )
            }
            _ => {
                errors += 1;
                format!(
                    "<error type=\"{}\" message=\"{}\"/>",
                    escape(case.status),
                    escape(&message)
                )
            }
        };
        body.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\">{verdict}</testcase>\n",
            escape(plugin),
            escape(case.name)
        ));
    }
    let count = cases.len();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"stepwise replay\" tests=\"{count}\" failures=\"{failures}\" errors=\"{errors}\">\n\
         \x20 <testsuite name=\"{}\" tests=\"{count}\" failures=\"{failures}\" errors=\"{errors}\">\n\
         {body}\
         \x20 </testsuite>\n\
         </testsuites>\n",
        escape(plugin)
    )
}

/// Unix milliseconds of an RFC 3339 timestamp from the API.
fn millis(value: &Value) -> Option<i64> {
    let text = value.as_str()?;
    let time = humantime::parse_rfc3339(text).ok()?;
    Some(time.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_run_reports_a_failure_and_a_skip() {
        let run = serde_json::json!({
            "id": "01a2", "plugin": "event-pipeline", "plugin_version": "abc", "status": "timed_out",
            "message": "step \"warehouse\" was still pending",
            "created_at": "2026-11-24T10:00:00.000Z", "finished_at": "2026-11-24T10:00:15.005Z",
            "steps": [
                {"name": "collector", "status": "passed", "attempts": 1, "message": null,
                 "first_attempt_at": "2026-11-24T10:00:00.001Z", "finished_at": "2026-11-24T10:00:00.004Z"},
                {"name": "warehouse", "status": "timed_out", "attempts": 16, "message": "no row <yet> & \"none\"",
                 "first_attempt_at": "2026-11-24T10:00:00.004Z", "finished_at": "2026-11-24T10:00:15.005Z"},
                {"name": "report", "status": "skipped", "attempts": 0, "message": null}
            ]
        });
        let xml = render(&run);
        assert!(
            xml.contains(r#"tests="3" failures="1" errors="0" skipped="1" time="15.005""#),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<testcase classname="event-pipeline" name="collector" time="0.003"></testcase>"#
            ),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<failure type="timed_out" message="no row &lt;yet&gt; &amp; &quot;none&quot;">"#
            ),
            "{xml}"
        );
        assert!(
            xml.contains(r#"name="report" time="0.000"><skipped message="step skipped"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<property name="plugin_version" value="abc"/>"#),
            "{xml}"
        );
    }
}
