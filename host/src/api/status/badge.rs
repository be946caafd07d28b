//! Shields-style SVG badges: a grey label and a coloured value, sized from the text (Verdana
//! 11 px widths, as shields.io measures them, approximated per character class).

use std::fmt::Write;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::super::error::ApiError;
use super::html::{duration, escape, percent};
use super::{CheckReport, Report};

pub struct Badge {
    label: String,
    value: String,
    colour: &'static str,
}

const GREEN: &str = "#2e7d32";
const RED: &str = "#c62828";
const AMBER: &str = "#b26a00";
const GREY: &str = "#6b7280";
const BLUE: &str = "#1565c0";

/// The metrics a badge may show besides the status.
const METRICS: &str = "uptime_30d or p95_ms";

pub fn for_page(report: &Report, metric: Option<&str>) -> Result<Badge, ApiError> {
    match metric {
        None => Ok(Badge {
            label: report.title.clone(),
            value: report.state.replace('_', " "),
            colour: match report.state {
                "passing" => GREEN,
                "failing" => RED,
                _ => GREY,
            },
        }),
        Some("uptime_30d") => {
            let lowest = report
                .checks
                .iter()
                .filter_map(|check| check.uptime.last_30d)
                .min_by(f64::total_cmp);
            Ok(uptime_badge(lowest))
        }
        Some("p95_ms") => {
            let highest = report
                .checks
                .iter()
                .filter_map(CheckReport::end_to_end_p95_ms)
                .max();
            Ok(latency_badge(highest))
        }
        Some(other) => Err(unknown_metric(other)),
    }
}

pub fn for_check(check: &CheckReport, metric: Option<&str>) -> Result<Badge, ApiError> {
    match metric {
        None => {
            let state = check.state.unwrap_or("unknown");
            Ok(Badge {
                label: check.name.clone(),
                value: match state {
                    "passed" => "passing".to_owned(),
                    "unknown" => "no runs".to_owned(),
                    other => other.replace('_', " "),
                },
                colour: match state {
                    "passed" => GREEN,
                    "failed" => RED,
                    "timed_out" | "errored" => AMBER,
                    _ => GREY,
                },
            })
        }
        Some("uptime_30d") => Ok(uptime_badge(check.uptime.last_30d)),
        Some("p95_ms") => Ok(latency_badge(check.end_to_end_p95_ms())),
        Some(other) => Err(unknown_metric(other)),
    }
}

fn unknown_metric(metric: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_query",
        format!("metric {metric:?} is not a badge metric: use {METRICS}, or none for the status"),
    )
    .with_field("metric")
}

fn uptime_badge(uptime: Option<f64>) -> Badge {
    Badge {
        label: "uptime 30d".to_owned(),
        value: percent(uptime).replace(' ', ""),
        colour: match uptime {
            Some(share) if share >= 0.99 => GREEN,
            Some(share) if share >= 0.95 => AMBER,
            Some(_) => RED,
            None => GREY,
        },
    }
}

fn latency_badge(p95_ms: Option<i64>) -> Badge {
    Badge {
        label: "p95".to_owned(),
        value: duration(p95_ms),
        colour: if p95_ms.is_some() { BLUE } else { GREY },
    }
}

/// The width of `text` in Verdana 11 px, near enough for a badge.
fn text_width(text: &str) -> usize {
    let tenths: usize = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '!' | '\'' | '|' | ' ' => 35,
            'f' | 'r' | 't' | 'I' | '(' | ')' | '[' | ']' | '-' => 45,
            'm' | 'w' | 'M' | 'W' | '%' => 100,
            c if c.is_ascii_uppercase() => 75,
            c if c.is_ascii_digit() => 70,
            _ => 65,
        })
        .sum();
    tenths.div_ceil(10)
}

pub fn render(badge: &Badge) -> String {
    let label = escape(&badge.label);
    let value = escape(&badge.value);
    let left = text_width(&badge.label) + 12;
    let right = text_width(&badge.value) + 12;
    let width = left + right;
    let mut svg = String::with_capacity(1024);
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"20\" role=\"img\" \
         aria-label=\"{label}: {value}\"><title>{label}: {value}</title>\
         <linearGradient id=\"s\" x2=\"0\" y2=\"100%\"><stop offset=\"0\" stop-color=\"#bbb\" stop-opacity=\".1\"/>\
         <stop offset=\"1\" stop-opacity=\".1\"/></linearGradient>\
         <clipPath id=\"r\"><rect width=\"{width}\" height=\"20\" rx=\"3\" fill=\"#fff\"/></clipPath>\
         <g clip-path=\"url(#r)\"><rect width=\"{left}\" height=\"20\" fill=\"#555\"/>\
         <rect x=\"{left}\" width=\"{right}\" height=\"20\" fill=\"{colour}\"/>\
         <rect width=\"{width}\" height=\"20\" fill=\"url(#s)\"/></g>\
         <g fill=\"#fff\" text-anchor=\"middle\" font-family=\"Verdana,Geneva,DejaVu Sans,sans-serif\" font-size=\"11\">\
         <text x=\"{lx}\" y=\"15\" fill=\"#010101\" fill-opacity=\".3\">{label}</text><text x=\"{lx}\" y=\"14\">{label}</text>\
         <text x=\"{rx}\" y=\"15\" fill=\"#010101\" fill-opacity=\".3\">{value}</text><text x=\"{rx}\" y=\"14\">{value}</text>\
         </g></svg>",
        colour = badge.colour,
        lx = left / 2,
        rx = left + right / 2,
    );
    svg
}

pub fn response(badge: Badge, cache: HeaderValue) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, cache),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        render(&badge),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_badge_escapes_its_text_and_grows_with_it() {
        let short = render(&Badge {
            label: "a".into(),
            value: "b".into(),
            colour: GREEN,
        });
        let long = render(&Badge {
            label: "<Event & pipeline>".into(),
            value: "passing".into(),
            colour: GREEN,
        });
        assert!(long.contains("&lt;Event &amp; pipeline&gt;"), "{long}");
        assert!(!long.contains("<Event"), "{long}");
        let width = |svg: &str| -> usize {
            let rest = &svg[svg.find("width=\"").expect("width") + 7..];
            rest[..rest.find('"').expect("quote")]
                .parse()
                .expect("number")
        };
        assert!(width(&long) > width(&short) + 60);
    }
}
