//! Status pages and badges (README, "Status pages"): `GET /status/{slug}` (HTML, readable
//! without JavaScript), `GET /status/{slug}.json`, `GET /status/{slug}/events` (the live
//! events, saying only that the page changed), `GET /badge/{slug}.svg` and
//! `GET /badge/{slug}/{check}.svg`. The operator configures the pages; nobody else can. A page
//! is built from the daily rollups (and the last 24 hours of runs) only, shows no params,
//! outputs, logs or hosts, and failure messages only when the page says so. Public pages are
//! read without a token, at a rate per client address; the others need a viewer token.

mod badge;
mod html;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::auth::authenticate;
use super::error::ApiError;
use super::server::Peer;
use super::state::AppState;
use crate::config::AuthMode;
use crate::model::{
    CheckKey, DayRollup, Outcomes, Role, RunStatus, StatusPage, UnixMillis, day_of, day_text,
    now_millis, percentile, rfc3339,
};
use crate::storage::{ScheduleFilter, Store};

/// A page is computed at most this often; readers in between get the same figures.
const FRESH_FOR: Duration = Duration::from_secs(5);

/// Anonymous readers: a bucket of this many requests per client address…
const BURST: f64 = 120.0;
/// …refilled at this many a second.
const REFILL_PER_SECOND: f64 = 20.0;
/// Client addresses remembered; beyond them, the full buckets are forgotten.
const MAX_CLIENTS: usize = 10_000;

/// Incidents a page lists.
const INCIDENTS_SHOWN: u32 = 10;

/// The routes; they sit beside the dashboard's, outside `/v1` and its guard, and check access
/// themselves.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/status/{page}", get(page))
        .route("/status/{page}/events", get(page_events))
        .route("/badge/{file}", get(page_badge))
        .route("/badge/{page}/{file}", get(check_badge))
        .route(
            "/assets/status.css",
            get(|| async { asset("text/css; charset=utf-8", html::STYLE) }),
        )
        .route(
            "/assets/status.js",
            get(|| async { asset("text/javascript; charset=utf-8", html::SCRIPT) }),
        )
        // A page of 50 checks is over 600 KB of HTML, a tenth of that gzipped. (Event streams
        // and images are left as they are.)
        .layer(tower_http::compression::CompressionLayer::new())
}

/// What pages share on one node: their last figures, and the anonymous readers' buckets.
#[derive(Default)]
pub struct StatusPages {
    reports: Mutex<HashMap<String, (Instant, Arc<Report>)>>,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl StatusPages {
    /// Takes one request from `client`'s bucket; the seconds until one is back if empty.
    fn admit(&self, client: IpAddr, now: Instant) -> Result<(), u64> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if buckets.len() >= MAX_CLIENTS {
            buckets.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * REFILL_PER_SECOND < BURST
            });
        }
        let (tokens, at) = buckets.entry(client).or_insert((BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * REFILL_PER_SECOND).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / REFILL_PER_SECOND).ceil() as u64)
        }
    }
}

#[derive(Debug, Deserialize)]
struct BadgeQuery {
    metric: Option<String>,
}

/// The address a reader is counted by: an IPv6 client by its /64, which one host may hold
/// whole.
fn reader_address(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Who asks: their headers (a token), and the address they connect from.
struct Reader {
    headers: HeaderMap,
    client: Option<IpAddr>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Reader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Reader, Self::Rejection> {
        Ok(Reader {
            headers: parts.headers.clone(),
            client: parts
                .extensions
                .get::<Peer>()
                .map(|peer| reader_address(peer.0.ip())),
        })
    }
}

async fn page(
    State(state): State<AppState>,
    Path(page): Path<String>,
    request: Reader,
) -> Result<Response, ApiError> {
    let (slug, json) = match page.strip_suffix(".json") {
        Some(slug) => (slug, true),
        None => (page.as_str(), false),
    };
    let (page, report) = read(&state, slug, &request).await?;
    let cache = cache_control(page);
    Ok(if json {
        (
            [(header::CACHE_CONTROL, cache)],
            axum::Json(report.as_ref().clone()),
        )
            .into_response()
    } else {
        let mut response = asset("text/html; charset=utf-8", &html::render(&report));
        response.headers_mut().insert(header::CACHE_CONTROL, cache);
        response
    })
}

/// `GET /status/{slug}/events`: Server-Sent Events saying only `changed` when a run of the
/// page finishes; the page's script then reads the page again.
async fn page_events(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    request: Reader,
) -> Result<Response, ApiError> {
    let page = find_page(&state, &slug)?;
    check_access(&state, page, &request).await?;
    let schedules = checks_of(&state.store, page)
        .await?
        .into_iter()
        .filter_map(|(key, _)| key.schedule)
        .collect();
    let reader = match request.client {
        Some(client) => format!("status page reader {client}"),
        None => "status page reader".to_owned(),
    };
    // A private page's stream checks its token again at each keep-alive, as the API's do.
    let credentials =
        (!page.public && state.settings.auth == AuthMode::Tokens).then(|| request.headers.clone());
    let stream = super::events::page_changes(
        &state,
        page.checks.plugins.clone(),
        schedules,
        reader,
        credentials,
    )
    .await?;
    Ok(stream.into_response())
}

async fn page_badge(
    State(state): State<AppState>,
    Path(file): Path<String>,
    Query(query): Query<BadgeQuery>,
    request: Reader,
) -> Result<Response, ApiError> {
    let slug = svg_name(&file)?;
    let (page, report) = read(&state, slug, &request).await?;
    let badge = badge::for_page(&report, query.metric.as_deref())?;
    Ok(badge::response(badge, cache_control(page)))
}

async fn check_badge(
    State(state): State<AppState>,
    Path((slug, file)): Path<(String, String)>,
    Query(query): Query<BadgeQuery>,
    request: Reader,
) -> Result<Response, ApiError> {
    let check = svg_name(&file)?;
    let (page, report) = read(&state, &slug, &request).await?;
    let check = report
        .checks
        .iter()
        .find(|candidate| candidate.id == check)
        .ok_or_else(|| {
            ApiError::not_found(
                "check_not_found",
                format!("status page {slug:?} has no check {check:?}"),
            )
        })?;
    let badge = badge::for_check(check, query.metric.as_deref())?;
    Ok(badge::response(badge, cache_control(page)))
}

fn svg_name(file: &str) -> Result<&str, ApiError> {
    file.strip_suffix(".svg")
        .ok_or_else(|| ApiError::not_found("badge_not_found", "a badge's address ends in .svg"))
}

/// Public pages may be kept by shared caches for a minute; the others only by the reader.
fn cache_control(page: &StatusPage) -> HeaderValue {
    HeaderValue::from_static(if page.public {
        "public, max-age=60"
    } else {
        "private, max-age=60"
    })
}

/// The page `slug` and its figures, if the request may read them.
async fn read<'s>(
    state: &'s AppState,
    slug: &str,
    request: &Reader,
) -> Result<(&'s StatusPage, Arc<Report>), ApiError> {
    let page = find_page(state, slug)?;
    check_access(state, page, request).await?;
    Ok((page, report(state, page).await?))
}

fn find_page<'s>(state: &'s AppState, slug: &str) -> Result<&'s StatusPage, ApiError> {
    state
        .settings
        .status_pages
        .iter()
        .find(|page| page.slug == slug)
        .ok_or_else(|| {
            ApiError::not_found("status_page_not_found", format!("no status page {slug:?}"))
        })
}

/// Public pages: anyone, at [`REFILL_PER_SECOND`] per client address without a token. The
/// others: a viewer token whose scope covers every plugin the page names.
async fn check_access(
    state: &AppState,
    page: &StatusPage,
    reader: &Reader,
) -> Result<(), ApiError> {
    let headers = &reader.headers;
    let anonymous = !headers.contains_key(header::AUTHORIZATION);
    if page.public && anonymous {
        if let Some(client) = reader.client
            && let Err(wait) = state.status.admit(client, Instant::now())
        {
            return Err(ApiError::too_many_requests(
                "too_many_requests",
                format!(
                    "anonymous readers may make {REFILL_PER_SECOND} requests a second (bursts of \
                     {BURST}); try again in {wait} s"
                ),
            ));
        }
        return Ok(());
    }
    if page.public && state.settings.auth == AuthMode::None {
        return Ok(());
    }
    let caller = authenticate(state, headers).await?;
    caller.require(Role::Viewer, &format!("status page {:?}", page.slug))?;
    for plugin in &page.checks.plugins {
        caller.require_plugin(plugin)?;
    }
    if caller.plugins.is_some()
        && !(page.checks.schedules.is_empty() && page.checks.labels.is_empty())
    {
        return Err(ApiError::forbidden_code(
            "outside_token_scope",
            format!(
                "status page {:?} shows schedules, which a token scoped to plugins may not read",
                page.slug
            ),
        ));
    }
    Ok(())
}

/// The page's figures: computed at most every [`FRESH_FOR`].
async fn report(state: &AppState, page: &StatusPage) -> Result<Arc<Report>, ApiError> {
    if let Some((at, report)) = state
        .status
        .reports
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .get(&page.slug)
        && at.elapsed() < FRESH_FOR
    {
        return Ok(report.clone());
    }
    let report = Arc::new(build(&state.store, page, now_millis()).await?);
    state
        .status
        .reports
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(page.slug.clone(), (Instant::now(), report.clone()));
    Ok(report)
}

/// A status page's figures, as `GET /status/{slug}.json` serves them.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub slug: String,
    pub title: String,
    pub description: Option<String>,
    pub time_zone: String,
    pub generated_at: String,
    /// The day it is in the page's time zone.
    pub today: String,
    /// Days of history, today included.
    pub days: u32,
    /// `passing` when every check's last run passed, `failing` when one's did not,
    /// `unknown` before any has run.
    pub state: &'static str,
    pub checks: Vec<CheckReport>,
    /// Every check's newest incidents, newest first.
    pub incidents: Vec<IncidentReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The schedule's id, or the plugin's name: badges name the check by it.
    pub id: String,
    pub name: String,
    pub plugin: String,
    pub schedule: Option<String>,
    /// The status of the run that finished last; `None` before any.
    pub state: Option<&'static str>,
    pub last_run_at: Option<String>,
    pub uptime: Uptime,
    /// Days with runs, oldest first (days without are left out).
    pub history: Vec<DayReport>,
    pub steps: Vec<StepReport>,
}

/// The share of decided runs that passed (cancelled runs left out); `None` without runs.
#[derive(Debug, Clone, Serialize)]
pub struct Uptime {
    /// The runs created in the last 24 hours.
    #[serde(rename = "24h")]
    pub last_24h: Option<f64>,
    /// Today and the 6 days before, in the page's time zone.
    #[serde(rename = "7d")]
    pub last_7d: Option<f64>,
    #[serde(rename = "30d")]
    pub last_30d: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayReport {
    pub day: String,
    pub passed: i64,
    pub failed: i64,
    pub errored: i64,
    pub timed_out: i64,
    pub cancelled: i64,
    pub uptime: Option<f64>,
    pub worst: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub position: usize,
    pub name: String,
    /// Runs that passed the step, over the page's days.
    pub passed: i64,
    /// Runs that ended on it without passing it.
    pub ended_run: i64,
    pub attempts: i64,
    /// Of `passed_after_ms`: from the run's start to the step passing (within 2 %).
    pub median_ms: Option<i64>,
    pub p95_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IncidentReport {
    pub check: String,
    pub check_name: String,
    pub started_at: String,
    /// `None` while it goes on.
    pub ended_at: Option<String>,
    pub runs: i64,
    pub failing_step: Option<String>,
    pub status: &'static str,
    /// Only on pages that show messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl CheckReport {
    /// Whether the run that finished last failed, errored or timed out.
    pub fn is_failing(&self) -> bool {
        self.state
            .and_then(RunStatus::parse)
            .is_some_and(RunStatus::is_failure)
    }

    /// The p95 of the run's last step: how long the whole pipeline took.
    pub fn end_to_end_p95_ms(&self) -> Option<i64> {
        self.steps.last().and_then(|step| step.p95_ms)
    }
}

/// The checks `page` selects, in the order its settings name them.
async fn checks_of(store: &Store, page: &StatusPage) -> Result<Vec<(CheckKey, String)>, ApiError> {
    let mut checks: Vec<(CheckKey, String)> = Vec::new();
    let schedule_name = |plugin: &str, id: &str, labels: &BTreeMap<String, String>| {
        labels
            .get("name")
            .cloned()
            .unwrap_or_else(|| format!("{plugin} ({})", &id[..id.len().min(8)]))
    };
    for id in &page.checks.schedules {
        let (plugin, name) = match store.find_schedule(id).await? {
            Some(schedule) => {
                let name = schedule_name(&schedule.plugin_name, id, &schedule.labels);
                (schedule.plugin_name, name)
            }
            None => (String::new(), format!("schedule {id}")),
        };
        checks.push((
            CheckKey {
                plugin,
                schedule: Some(id.clone()),
            },
            name,
        ));
    }
    if !page.checks.labels.is_empty() {
        let mut after: Option<String> = None;
        loop {
            let batch = store
                .list_schedules(&ScheduleFilter::default(), after.as_deref(), 500)
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.id.clone());
            for schedule in batch {
                let matches = page
                    .checks
                    .labels
                    .iter()
                    .all(|(key, value)| schedule.labels.get(key) == Some(value));
                if matches
                    && !checks
                        .iter()
                        .any(|(key, _)| key.schedule.as_ref() == Some(&schedule.id))
                {
                    let name = schedule_name(&schedule.plugin_name, &schedule.id, &schedule.labels);
                    checks.push((
                        CheckKey {
                            plugin: schedule.plugin_name,
                            schedule: Some(schedule.id),
                        },
                        name,
                    ));
                }
            }
        }
    }
    for plugin in &page.checks.plugins {
        checks.push((
            CheckKey {
                plugin: plugin.clone(),
                schedule: None,
            },
            plugin.clone(),
        ));
    }
    Ok(checks)
}

/// Builds `page`'s figures as of `now` from the rollups (and the last 24 hours of runs).
pub async fn build(store: &Store, page: &StatusPage, now: UnixMillis) -> Result<Report, ApiError> {
    let zone = page.time_zone;
    let (today, _) = day_of(now, zone);
    // The checks' reads go out together: the database's connections serve them at once.
    let read = checks_of(store, page)
        .await?
        .into_iter()
        .map(|(key, name)| check_report(store, page, key, name, now));
    let mut checks = Vec::new();
    let mut incidents = Vec::new();
    for (check, check_incidents) in futures::future::try_join_all(read).await? {
        checks.push(check);
        incidents.extend(check_incidents);
    }
    // RFC 3339 in UTC sorts as text.
    incidents.sort_by(|a, b| b.started_at.cmp(&a.started_at));
    incidents.truncate(INCIDENTS_SHOWN as usize);
    let state = if checks.iter().any(CheckReport::is_failing) {
        "failing"
    } else if checks.iter().any(|check| check.state == Some("passed")) {
        "passing"
    } else {
        "unknown"
    };
    Ok(Report {
        slug: page.slug.clone(),
        title: page.title.clone(),
        description: page.description.clone(),
        time_zone: zone.name().to_owned(),
        generated_at: rfc3339(now),
        today: day_text(today),
        days: page.days,
        state,
        checks,
        incidents,
    })
}

/// One check's figures, and its newest incidents.
async fn check_report(
    store: &Store,
    page: &StatusPage,
    key: CheckKey,
    name: String,
    now: UnixMillis,
) -> Result<(CheckReport, Vec<IncidentReport>), ApiError> {
    let zone = page.time_zone;
    let (today, _) = day_of(now, zone);
    let first_day = |days: u32| today - chrono::Duration::days(i64::from(days.max(1)) - 1);
    let window = page.days.max(30);
    let days = store.rollup_days(zone, &key, first_day(window)).await?;
    let since = |count: u32| {
        let from = today - chrono::Duration::days(i64::from(count) - 1);
        let mut outcomes = Outcomes::default();
        for day in days.iter().filter(|day| day.day >= from) {
            outcomes.merge(&day.outcomes);
        }
        outcomes.uptime()
    };
    let uptime = Uptime {
        last_24h: store
            .recent_outcomes(&key, now - 24 * 3600 * 1000)
            .await?
            .uptime(),
        last_7d: since(7),
        last_30d: since(30),
    };
    let last = days.iter().max_by_key(|day| day.last_finished_at);
    let shown_from = today - chrono::Duration::days(i64::from(page.days) - 1);
    let history = days
        .iter()
        .filter(|day| day.day >= shown_from)
        .map(day_report)
        .collect();
    let steps = store
        .rollup_steps(zone, &key, first_day(page.days))
        .await?
        .into_iter()
        .map(|step| StepReport {
            median_ms: percentile(&step.latency, 0.5),
            p95_ms: percentile(&step.latency, 0.95),
            position: step.position,
            name: step.name,
            passed: step.passed,
            ended_run: step.ended_run,
            attempts: step.attempts,
        })
        .collect();
    let mut incidents = Vec::new();
    for incident in store.incidents(&key, INCIDENTS_SHOWN).await? {
        incidents.push(IncidentReport {
            check: key.id().to_owned(),
            check_name: name.clone(),
            started_at: rfc3339(incident.started_at),
            ended_at: incident.ended_at.map(rfc3339),
            runs: incident.runs,
            failing_step: incident.failing_step,
            status: incident.status.as_str(),
            message: incident.message.filter(|_| page.show_messages),
        });
    }
    let check = CheckReport {
        id: key.id().to_owned(),
        plugin: key.plugin.clone(),
        schedule: key.schedule.clone(),
        name,
        state: last.map(|day| day.last_status.as_str()),
        last_run_at: last.map(|day| rfc3339(day.last_finished_at)),
        uptime,
        history,
        steps,
    };
    Ok((check, incidents))
}

fn day_report(day: &DayRollup) -> DayReport {
    let outcomes = &day.outcomes;
    DayReport {
        day: day_text(day.day),
        passed: outcomes.passed,
        failed: outcomes.failed,
        errored: outcomes.errored,
        timed_out: outcomes.timed_out,
        cancelled: outcomes.cancelled,
        uptime: outcomes.uptime(),
        worst: outcomes.worst().map(RunStatus::as_str),
    }
}

/// A page's figures as HTML, as `GET /status/{slug}` serves them.
pub fn render(report: &Report) -> String {
    html::render(report)
}

/// Status pages carry no script or style of another origin, and no inline ones.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &str) -> Response {
    super::dashboard::served(POLICY, content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_are_counted_by_address_and_ipv6_by_its_64() {
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(reader_address(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(reader_address(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(reader_address(a), reader_address(b));
        assert_ne!(reader_address(a), reader_address(other));
        let pages = StatusPages::default();
        let now = Instant::now();
        for _ in 0..BURST as usize {
            assert!(pages.admit(v4, now).is_ok());
        }
        assert!(pages.admit(v4, now).is_err(), "past the burst");
        assert!(
            pages.admit(reader_address(a), now).is_ok(),
            "another reader"
        );
        let later = now + Duration::from_secs(1);
        assert!(pages.admit(v4, later).is_ok(), "refilled");
    }
}
