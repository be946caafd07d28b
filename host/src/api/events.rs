//! Live events (SPEC §14): `GET /v1/runs/{id}/events` and `GET /v1/events` are Server-Sent
//! Events streams that send `event: step` (the step a tick wrote, as the run's `steps[]` show
//! it, with `run_id`) and `event: run` (the run as `GET /v1/runs/{id}` shows it) after each
//! change. The run event of a change carries its `id:`; sent back as `Last-Event-ID`, the
//! stream resumes after it without a gap, from the change log in the database.
//!
//! Each node has one [`EventHub`]: it follows the change log (woken by this node's writes and,
//! on PostgreSQL, other nodes' through `LISTEN`), renders each change once, and broadcasts it
//! to the node's streams through a bounded buffer. Nothing waits for a stream: one that falls
//! further behind than the buffer gets `event: reset` and is closed, and reconnects.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::dto::{RunDto, StepDto};
use super::error::{ApiError, Problem};
use super::openapi::EventsQuery;
use super::state::AppState;
use crate::model::{RunId, RunStatus};
use crate::storage::{EventRecord, RunRecord, Store};

/// Changes one resume may replay; a client further behind is told to `reset`.
const MAX_REPLAY: usize = 10_000;

/// Change log rows read per query.
const READ_BATCH: usize = 500;

/// One change, rendered once for every stream of the node.
#[derive(Debug)]
struct Published {
    seq: i64,
    run_id: String,
    plugin: String,
    schedule_id: Option<String>,
    status: RunStatus,
    /// The step's JSON, for a change a tick made.
    step: Option<String>,
    run: String,
}

/// The node's fan-out of changes to its event streams.
#[derive(Clone)]
pub struct EventHub {
    sender: broadcast::Sender<Arc<Published>>,
    /// How far the hub has read the change log: `None` while nobody listens, when it reads
    /// nothing (after every commit, that read was 3.5 % of a busy node's CPU), and set to
    /// the log's end by the first stream to subscribe. The hub holds it while it reads and
    /// broadcasts, and `subscribe` while it sets it, so that a stream misses no change
    /// committed after it subscribed and is sent none from before.
    cursor: Arc<tokio::sync::Mutex<Option<i64>>>,
}

impl EventHub {
    /// A hub whose streams may fall `capacity` changes behind before they are reset.
    pub fn new(capacity: usize) -> EventHub {
        EventHub {
            sender: broadcast::channel(capacity.max(1)).0,
            cursor: Arc::default(),
        }
    }

    /// A receiver of every change committed from now on.
    async fn subscribe(
        &self,
        store: &Store,
    ) -> crate::storage::Result<broadcast::Receiver<Arc<Published>>> {
        let mut cursor = self.cursor.lock().await;
        if cursor.is_none() {
            *cursor = Some(store.newest_event().await?.unwrap_or(0));
        }
        Ok(self.sender.subscribe())
    }

    /// Follows the change log until `shutdown`, broadcasting each change while anyone
    /// listens.
    pub async fn follow(self, store: Store, backstop: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = store.event_signal().notified() => {}
                _ = tokio::time::sleep(backstop) => {}
            }
            let mut held = self.cursor.lock().await;
            if self.sender.receiver_count() == 0 {
                *held = None;
                continue;
            }
            let Some(mut cursor) = *held else {
                // Every receiver comes from `subscribe`, which sets the cursor.
                continue;
            };
            loop {
                let batch = match store.events_after(cursor, READ_BATCH).await {
                    Ok(batch) => batch,
                    Err(error) => {
                        tracing::warn!(%error, "reading the change log failed");
                        break;
                    }
                };
                let Some(last) = batch.last() else {
                    break;
                };
                cursor = last.seq;
                match render(&store, &batch).await {
                    Ok(published) => {
                        for change in published {
                            let _ = self.sender.send(Arc::new(change));
                        }
                    }
                    Err(error) => tracing::warn!(%error, "rendering events failed"),
                }
                if batch.len() < READ_BATCH {
                    break;
                }
            }
            *held = Some(cursor);
        }
    }
}

/// The changes with each run's and step's JSON as they are now (a run deleted since is
/// skipped). Each run is read once per batch.
async fn render(store: &Store, batch: &[EventRecord]) -> crate::storage::Result<Vec<Published>> {
    let mut runs: BTreeMap<&RunId, Option<(RunRecord, String)>> = BTreeMap::new();
    for event in batch {
        if !runs.contains_key(&event.run_id) {
            let run = store.find_run(&event.run_id).await?;
            let rendered = run.map(|run| {
                let json = serde_json::to_string(&RunDto::new(&run, true)).unwrap_or_default();
                (run, json)
            });
            runs.insert(&event.run_id, rendered);
        }
    }
    Ok(batch
        .iter()
        .filter_map(|event| {
            let (run, json) = runs.get(&event.run_id)?.as_ref()?;
            let step = event.position.and_then(|position| {
                let step = run.steps.get(position)?;
                let mut value = serde_json::to_value(StepDto::new(step)).ok()?;
                value["run_id"] = json!(run.id.as_str());
                value["position"] = json!(position);
                Some(value.to_string())
            });
            Some(Published {
                seq: event.seq,
                run_id: run.id.to_string(),
                plugin: run.plugin_name.clone(),
                schedule_id: run.schedule_id.clone(),
                status: run.status,
                step,
                run: json.clone(),
            })
        })
        .collect())
}

/// Which changes a stream sends.
#[derive(Debug, Clone)]
enum Filter {
    Run(String),
    Runs {
        plugin: Option<String>,
        schedule: Option<String>,
        status: Option<RunStatus>,
    },
}

impl Filter {
    fn matches(&self, change: &Published) -> bool {
        match self {
            Filter::Run(id) => &change.run_id == id,
            Filter::Runs {
                plugin,
                schedule,
                status,
            } => {
                plugin
                    .as_ref()
                    .is_none_or(|plugin| plugin == &change.plugin)
                    && schedule
                        .as_ref()
                        .is_none_or(|schedule| change.schedule_id.as_ref() == Some(schedule))
                    && status.is_none_or(|status| status == change.status)
            }
        }
    }
}

/// The frames of one change: the step, then the run with the change's id.
fn frames(change: &Published) -> impl Iterator<Item = Event> {
    let step = change
        .step
        .as_ref()
        .map(|step| Event::default().event("step").data(step));
    let run = Event::default()
        .event("run")
        .id(change.seq.to_string())
        .data(&change.run);
    step.into_iter().chain(std::iter::once(run))
}

fn reset(reason: &str) -> Event {
    Event::default()
        .event("reset")
        .data(json!({"reason": reason}).to_string())
}

/// One client's stream: what it is owed from the log first, then the hub's changes.
struct Subscription {
    receiver: broadcast::Receiver<Arc<Published>>,
    filter: Filter,
    /// The last change sent (or skipped by the filter).
    last: i64,
    queue: VecDeque<Event>,
    done: bool,
}

impl Subscription {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Subscription)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            match self.receiver.recv().await {
                Ok(change) => {
                    if change.seq <= self.last {
                        continue;
                    }
                    self.last = change.seq;
                    if self.filter.matches(&change) {
                        self.queue.extend(frames(&change));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.queue.push_back(reset(&format!(
                        "this stream fell {missed} changes behind; read the state again and reconnect"
                    )));
                    self.done = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Opens a stream: subscribes to the hub first, so that nothing falls between the replay
/// from the log (after `Last-Event-ID`) and the live changes.
async fn open(
    state: &AppState,
    headers: &HeaderMap,
    filter: Filter,
    snapshot_of: Option<&RunId>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let resume = last_event_id(headers)?;
    let receiver = state.events.subscribe(&state.store).await?;
    let mut subscription = Subscription {
        receiver,
        filter,
        last: 0,
        queue: VecDeque::new(),
        done: false,
    };
    match (resume, snapshot_of) {
        (Some(after), _) => replay(&state.store, after, &mut subscription).await?,
        // Read after subscribing: a change made meanwhile is in the snapshot or on its way.
        (None, Some(id)) => {
            if let Some(run) = state.store.find_run(id).await? {
                let json = serde_json::to_string(&RunDto::new(&run, true)).unwrap_or_default();
                subscription
                    .queue
                    .push_back(Event::default().event("run").data(json));
            }
        }
        // `open` says the stream is listening, so a client may read a list now and miss
        // nothing after it; its id is where a reconnect resumes.
        (None, None) => {
            let (_, newest) = state.store.event_bounds().await?;
            let head = newest.unwrap_or(0);
            subscription.last = head;
            subscription.queue.push_back(
                Event::default()
                    .event("open")
                    .id(head.to_string())
                    .data(json!({"id": head}).to_string()),
            );
        }
    }
    let stream = futures::stream::unfold(subscription, Subscription::next);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Queues the changes after `after` from the log, or a `reset` when they are no longer all
/// there (retention) or too many.
async fn replay(
    store: &Store,
    after: i64,
    subscription: &mut Subscription,
) -> Result<(), ApiError> {
    let (oldest, newest) = store.event_bounds().await?;
    let newest = newest.unwrap_or(0);
    subscription.last = after.max(0);
    if after == newest {
        return Ok(());
    }
    if after > newest {
        // An id this log never gave (another database, or one recreated): waiting for the
        // log to pass it would skip every change until then.
        subscription.queue.push_back(reset(
            "Last-Event-ID is not an id of this server's changes; read the state again and reconnect without it",
        ));
        subscription.last = newest;
        return Ok(());
    }
    if oldest.is_some_and(|oldest| oldest > after + 1) {
        subscription.queue.push_back(reset(
            "the changes after Last-Event-ID are no longer kept; read the state again and reconnect without it",
        ));
        subscription.last = newest;
        return Ok(());
    }
    let mut pending = Vec::new();
    let mut cursor = after;
    while pending.len() <= MAX_REPLAY {
        let batch = store.events_after(cursor, READ_BATCH).await?;
        let Some(last) = batch.last() else {
            break;
        };
        cursor = last.seq;
        let short = batch.len() < READ_BATCH;
        pending.extend(
            batch
                .into_iter()
                .filter(|event| match &subscription.filter {
                    Filter::Run(id) => event.run_id.as_str() == id,
                    Filter::Runs { .. } => true,
                }),
        );
        if short {
            break;
        }
    }
    if pending.len() > MAX_REPLAY {
        subscription.queue.push_back(reset(
            "more changes happened since Last-Event-ID than one resume replays; read the state again and reconnect without it",
        ));
        subscription.last = cursor;
        return Ok(());
    }
    for change in render(store, &pending).await? {
        if subscription.filter.matches(&change) {
            subscription.queue.extend(frames(&change));
        }
    }
    subscription.last = cursor;
    Ok(())
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                "Last-Event-ID",
                "Last-Event-ID must be the id of an event this API sent (a non-negative integer)",
            )
        })
}

/// `GET /v1/runs/{id}/events`
#[utoipa::path(
    get, path = "/v1/runs/{id}/events", tag = "runs",
    summary = "A run's changes, live (Server-Sent Events)",
    description = "`event: run` (the run as GET /v1/runs/{id} shows it; the current state first, \
                   without an id) and `event: step` (a step the run's tick wrote, with `run_id` and \
                   `position`) after each change. Send the last `id:` back as `Last-Event-ID` to \
                   resume without a gap. `event: reset`: read the state again and reconnect.",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "The event stream", body = String, content_type = "text/event-stream"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid Last-Event-ID", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn run_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let run_id = super::runs::parse_run_id(&id)?;
    super::runs::existing_run(&state, &run_id).await?;
    open(
        &state,
        &headers,
        Filter::Run(run_id.to_string()),
        Some(&run_id),
    )
    .await
}

/// The query parameters of `GET /v1/events`.
pub const EVENTS_QUERY: &[&str] = &["plugin", "schedule", "status"];

/// `GET /v1/events?plugin=&schedule=&status=`
#[utoipa::path(
    get, path = "/v1/events", tag = "runs",
    summary = "Changes of all runs, live (Server-Sent Events)",
    description = "`event: open` once listening (its id is the latest change), then `event: step` \
                   and `event: run` after each change of a run that matches the \
                   filters (`status` is the run's status after the change). Send the last `id:` \
                   back as `Last-Event-ID` to resume without a gap. `event: reset`: read the \
                   state again and reconnect.",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "The event stream", body = String, content_type = "text/event-stream"),
        (status = 422, description = "Invalid filter or Last-Event-ID", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events_index(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let query = super::query::parse(raw.as_deref(), EVENTS_QUERY)?;
    let status = super::runs::status_filter(&query)?;
    let filter = Filter::Runs {
        plugin: query.get("plugin").cloned(),
        schedule: query.get("schedule").cloned(),
        status,
    };
    open(&state, &headers, filter, None).await
}
