//! A status page as HTML: whole on the server, so it reads without JavaScript; the script
//! only fetches the page again now and then and swaps its content in. The daily bars are an
//! inline SVG whose `<title>`s are the hover detail.

use std::fmt::Write;

use super::{CheckReport, DayReport, Report};

pub const STYLE: &str = include_str!("status.css");
pub const SCRIPT: &str = include_str!("status.js");

/// Width of one day's bar and the gap after it, in the SVG's units.
const BAR: usize = 4;
const GAP: usize = 2;

pub fn render(report: &Report) -> String {
    let mut html = String::with_capacity(8 * 1024 + report.checks.len() * 16 * 1024);
    let title = escape(&report.title);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · status</title><link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"/assets/status.css\">\
         <script type=\"module\" src=\"/assets/status.js\"></script></head>\n<body>\
         <main id=\"status\">\n<header class=\"page-head\"><h1>{title}</h1>"
    );
    if let Some(description) = &report.description {
        let _ = write!(html, "<p class=\"description\">{}</p>", escape(description));
    }
    let failing = report
        .checks
        .iter()
        .filter(|check| check.is_failing())
        .count();
    let banner = match report.state {
        "failing" if failing == 1 => "1 check is failing".to_owned(),
        "failing" => format!("{failing} checks are failing"),
        "passing" => "All checks are passing".to_owned(),
        _ => "No check has finished a run yet".to_owned(),
    };
    let _ = writeln!(
        html,
        "<p class=\"banner state-{}\"><span class=\"dot\" aria-hidden=\"true\"></span>{banner}</p></header>",
        report.state
    );
    html.push_str("<section class=\"checks\" aria-label=\"Checks\">\n");
    for check in &report.checks {
        render_check(&mut html, report, check);
    }
    html.push_str("</section>\n");
    render_incidents(&mut html, report);
    let _ = write!(
        html,
        "<footer>Updated {at}. Days begin at midnight in {zone}. \
         <a href=\"/status/{slug}.json\">JSON</a> · <a href=\"/badge/{slug}.svg\">badge</a> · \
         served by Stepwise</footer>\n</main></body></html>\n",
        at = time(&report.generated_at, &report.time_zone),
        zone = escape(&report.time_zone),
        slug = escape(&report.slug),
    );
    html
}

fn render_check(html: &mut String, report: &Report, check: &CheckReport) {
    let state = check.state.unwrap_or("unknown");
    let _ = write!(
        html,
        "<article class=\"check\" id=\"check-{id}\"><div class=\"check-head\"><h2>{name}</h2>\
         <span class=\"pill state-{state}\">{label}</span></div>",
        id = escape(&check.id),
        name = escape(&check.name),
        label = state_label(state),
    );
    if let Some(at) = &check.last_run_at {
        let _ = write!(
            html,
            "<p class=\"last\">Last run finished {}</p>",
            time(at, &report.time_zone)
        );
    }
    html.push_str("<dl class=\"uptime\">");
    for (label, value) in [
        ("24 hours", check.uptime.last_24h),
        ("7 days", check.uptime.last_7d),
        ("30 days", check.uptime.last_30d),
    ] {
        let _ = write!(
            html,
            "<div><dt>{label}</dt><dd>{}</dd></div>",
            percent(value)
        );
    }
    html.push_str("</dl>");
    render_bars(html, report, check);
    render_steps(html, check);
    html.push_str("</article>\n");
}

/// One bar per day of the page, oldest on the left, in the colour of the day's worst run
/// with the share that passed in green; days without runs are grey.
fn render_bars(html: &mut String, report: &Report, check: &CheckReport) {
    let days = report.days as usize;
    let width = days * (BAR + GAP) - GAP;
    let _ = write!(
        html,
        "<figure class=\"history\"><svg class=\"bars\" viewBox=\"0 0 {width} 30\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"Daily results over the last {days} days\">"
    );
    let today = chrono::NaiveDate::parse_from_str(&report.today, "%Y-%m-%d").ok();
    let by_day: std::collections::HashMap<&str, &DayReport> = check
        .history
        .iter()
        .map(|day| (day.day.as_str(), day))
        .collect();
    for index in 0..days {
        let x = index * (BAR + GAP);
        let day = today
            .map(|today| today - chrono::Duration::days((days - 1 - index) as i64))
            .map(crate::model::day_text)
            .unwrap_or_default();
        match by_day.get(day.as_str()) {
            Some(figures) => {
                let worst = figures.worst.unwrap_or("none");
                let _ = write!(
                    html,
                    "<rect x=\"{x}\" y=\"0\" width=\"{BAR}\" height=\"30\" rx=\"1\" class=\"day state-{worst}\">\
                     <title>{day}: {detail}</title></rect>",
                    detail = day_detail(figures)
                );
                // A day that did not all pass: the worst colour above, the share that passed
                // in green below it.
                if let Some(share) = figures.uptime.filter(|share| *share > 0.0 && *share < 1.0) {
                    let height = (share * 30.0).clamp(1.0, 29.0);
                    let _ = write!(
                        html,
                        "<rect x=\"{x}\" y=\"{y:.1}\" width=\"{BAR}\" height=\"{height:.1}\" class=\"share\"/>",
                        y = 30.0 - height
                    );
                }
            }
            None => {
                let _ = write!(
                    html,
                    "<rect x=\"{x}\" y=\"0\" width=\"{BAR}\" height=\"30\" rx=\"1\" class=\"day state-none\">\
                     <title>{day}: no runs</title></rect>"
                );
            }
        }
    }
    let _ = write!(
        html,
        "</svg><figcaption><span>{days} days ago</span><span>today</span></figcaption></figure>"
    );
}

fn day_detail(day: &DayReport) -> String {
    let mut parts = Vec::new();
    for (count, what) in [
        (day.passed, "passed"),
        (day.failed, "failed"),
        (day.timed_out, "timed out"),
        (day.errored, "errored"),
        (day.cancelled, "cancelled"),
    ] {
        if count > 0 {
            parts.push(format!("{count} {what}"));
        }
    }
    format!("{} ({})", parts.join(", "), percent(day.uptime))
}

fn render_steps(html: &mut String, check: &CheckReport) {
    if check.steps.is_empty() {
        return;
    }
    html.push_str(
        "<div class=\"steps-wrap\"><table class=\"steps\"><caption>Each step, from the run's \
         start to its passing</caption><thead><tr><th scope=\"col\">Step</th>\
         <th scope=\"col\">Median</th><th scope=\"col\">p95</th><th scope=\"col\">Passed</th>\
         <th scope=\"col\">Stopped the run</th></tr></thead><tbody>",
    );
    for step in &check.steps {
        let _ = write!(
            html,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&step.name),
            duration(step.median_ms),
            duration(step.p95_ms),
            step.passed,
            step.ended_run
        );
    }
    html.push_str("</tbody></table></div>");
}

fn render_incidents(html: &mut String, report: &Report) {
    html.push_str("<section class=\"incidents\"><h2>Incidents</h2>");
    if report.incidents.is_empty() {
        html.push_str("<p class=\"none\">No incidents.</p></section>\n");
        return;
    }
    html.push_str("<ol>");
    for incident in &report.incidents {
        let ended = match &incident.ended_at {
            Some(at) => format!("ended {}", time(at, &report.time_zone)),
            None => "<strong>ongoing</strong>".to_owned(),
        };
        let step = incident
            .failing_step
            .as_deref()
            .map(|step| format!(" at step <em>{}</em>", escape(step)))
            .unwrap_or_default();
        let _ = write!(
            html,
            "<li class=\"incident state-{status}\"><span class=\"pill state-{status}\">{label}</span> \
             <b>{check}</b>{step}: {runs} run{plural}, began {start}, {ended}",
            status = incident.status,
            label = incident.status.replace('_', " "),
            check = escape(&incident.check_name),
            runs = incident.runs,
            plural = if incident.runs == 1 { "" } else { "s" },
            start = time(&incident.started_at, &report.time_zone),
        );
        if let Some(message) = &incident.message {
            let _ = write!(html, "<p class=\"message\">{}</p>", escape(message));
        }
        html.push_str("</li>");
    }
    html.push_str("</ol></section>\n");
}

/// An RFC 3339 time as a `<time>` element that reads in the page's zone: `7 Dec 2026, 22:22 CET`.
fn time(rfc3339: &str, zone: &str) -> String {
    let local = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .zip(zone.parse::<chrono_tz::Tz>().ok())
        .map(|(at, zone)| {
            at.with_timezone(&zone)
                .format("%-d %b %Y, %H:%M %Z")
                .to_string()
        })
        .unwrap_or_else(|| rfc3339.to_owned());
    format!(
        "<time datetime=\"{}\">{}</time>",
        escape(rfc3339),
        escape(&local)
    )
}

fn state_label(state: &str) -> &'static str {
    match state {
        "passed" => "passing",
        "failed" => "failing",
        "timed_out" => "timed out",
        "errored" => "errored",
        "cancelled" => "cancelled",
        _ => "no runs",
    }
}

/// `0.99931` → `99.93 %`; none → an em dash.
pub fn percent(value: Option<f64>) -> String {
    match value {
        Some(share) => {
            let percent = share * 100.0;
            // Never round a failure up to 100 %.
            let percent = if share < 1.0 {
                (percent * 100.0).floor() / 100.0
            } else {
                percent
            };
            format!("{percent:.2} %").replace(".00 %", " %")
        }
        None => "—".to_owned(),
    }
}

/// `850` → `850 ms`, `3030` → `3.0 s`, `125000` → `2 min 5 s`.
pub fn duration(ms: Option<i64>) -> String {
    match ms {
        None => "—".to_owned(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) if ms < 3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        Some(ms) => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// Text for HTML content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(percent(Some(1.0)), "100 %");
        assert_eq!(percent(Some(0.99999)), "99.99 %");
        assert_eq!(percent(Some(0.5)), "50 %");
        assert_eq!(percent(None), "—");
        assert_eq!(duration(Some(850)), "850 ms");
        assert_eq!(duration(Some(3030)), "3.0 s");
        assert_eq!(duration(Some(125_000)), "2 min 5 s");
        assert_eq!(duration(Some(3_780_000)), "1 h 3 min");
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
