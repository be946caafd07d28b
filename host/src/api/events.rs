//! Live events (README, "Live events"): `GET /v1/runs/{id}/events` and `GET /v1/events` are
//! Server-Sent Events streams that send `event: step` (the step a tick wrote, as the run's
//! `steps[]` show it, with `run_id`) and `event: run` (the run as `GET /v1/runs/{id}` shows it)
//! after each change. The run event of a change carries its `id:`; sent back as
//! `Last-Event-ID`, the stream resumes after it without a gap, from the change log.
//!
//! Each node has one [`EventHub`]: it follows the change log (woken by this node's writes and,
//! on PostgreSQL, other nodes' through `LISTEN`), renders each change once, and hands it to
//! every stream whose filter it matches, into that stream's own bounded queue. Nothing waits
//! for a stream: one that falls further behind than its queue holds gets `event: reset` and is
//! closed, and one that stops reading is disconnected by the server's write timeout
//! (`server.rs`), so a client pins at most its queue. A resume is read from the log lazily, a
//! batch at a time while the client reads, and sends each changed run once, as it is now,
//! within a byte budget. Streams are capped per token and per node, and each keep-alive checks
//! the stream's token again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use futures::Stream;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::auth::Caller;
use super::dto::{EventsQuery, RunDto, StepDto};
use super::error::{ApiError, Problem};
use super::state::AppState;
use crate::config::{AuthMode, Settings};
use crate::model::{RunId, RunStatus};
use crate::storage::{EventRecord, RunRecord, Store};

/// Changes one resume of `GET /v1/events` may read from the log; a client further behind is
/// told to `reset`. A run's own stream reads only its run's changes, through an index, and
/// has no such limit.
const MAX_REPLAY: i64 = 10_000;

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
    /// The run is a shadow version's.
    shadow: bool,
    /// The step's JSON, for a change a tick made.
    step: Option<String>,
    /// Shared by the changes of one run read in one batch.
    run: Arc<str>,
}

impl Published {
    /// The bytes it holds, which a stream's queue is bounded by.
    fn size(&self) -> usize {
        self.run.len() + self.step.as_ref().map_or(0, String::len)
    }
}

/// The node's fan-out of changes to its event streams.
#[derive(Clone)]
pub struct EventHub {
    hub: Arc<Hub>,
}

struct Hub {
    /// How far the hub has read the change log: `None` while nobody listens, when it reads
    /// nothing (after every commit, that read was 3.5 % of a busy node's CPU), and set to
    /// the log's end by the first stream to subscribe. The hub holds it while it reads and
    /// hands changes out, and `subscribe` while it registers a stream, so that a stream
    /// misses no change committed after it subscribed and is sent none from before.
    cursor: tokio::sync::Mutex<Option<i64>>,
    streams: Mutex<Streams>,
    /// What one stream may fall behind: changes, and their bytes.
    queue_changes: usize,
    queue_bytes: usize,
    /// Streams open at once: on the node, and per token.
    max_streams: usize,
    max_streams_per_token: usize,
}

/// The open streams.
#[derive(Default)]
struct Streams {
    next_id: u64,
    queues: HashMap<u64, Arc<Queue>>,
    per_token: HashMap<String, usize>,
}

/// One stream's changes, waiting for it to read them.
struct Queue {
    filter: Filter,
    waiting: Mutex<Waiting>,
    ready: Notify,
}

#[derive(Default)]
struct Waiting {
    changes: VecDeque<Arc<Published>>,
    bytes: usize,
    /// It fell too far behind: its changes were let go, and it ends with a reset.
    overflowed: bool,
}

impl Queue {
    /// Queues `change`, or, when the stream is already as far behind as it may be, drops
    /// everything it holds: a client that does not keep up costs the node nothing more.
    fn push(&self, change: &Arc<Published>, max_changes: usize, max_bytes: usize) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.overflowed {
            return;
        }
        let size = change.size();
        let full = waiting.changes.len() >= max_changes
            || (!waiting.changes.is_empty() && waiting.bytes + size > max_bytes);
        if full {
            *waiting = Waiting {
                overflowed: true,
                ..Waiting::default()
            };
        } else {
            waiting.bytes += size;
            waiting.changes.push_back(change.clone());
        }
        drop(waiting);
        self.ready.notify_one();
    }

    /// What is waiting, and whether the stream fell too far behind.
    fn take(&self) -> (VecDeque<Arc<Published>>, bool) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.bytes = 0;
        (std::mem::take(&mut waiting.changes), waiting.overflowed)
    }
}

/// A stream's place in the hub: while it exists, the hub queues the stream's changes and
/// counts it against the caps.
struct Subscriber {
    hub: Arc<Hub>,
    id: u64,
    token: Option<String>,
    queue: Arc<Queue>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut streams = self
            .hub
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.queues.remove(&self.id);
        if let Some(token) = &self.token
            && let Some(open) = streams.per_token.get_mut(token)
        {
            *open -= 1;
            if *open == 0 {
                streams.per_token.remove(token);
            }
        }
    }
}

impl EventHub {
    pub fn new(settings: &Settings) -> EventHub {
        EventHub {
            hub: Arc::new(Hub {
                cursor: tokio::sync::Mutex::default(),
                streams: Mutex::default(),
                queue_changes: settings.events_buffer.max(1),
                queue_bytes: settings.events_buffer_bytes,
                max_streams: settings.max_event_streams,
                max_streams_per_token: settings.max_event_streams_per_token,
            }),
        }
    }

    /// A new stream that is sent every change matching `filter` committed from now on, or a
    /// 429 when the node, or `token`, has as many streams open as it may.
    async fn subscribe(
        &self,
        store: &Store,
        filter: Filter,
        token: Option<String>,
    ) -> Result<Subscriber, ApiError> {
        let mut cursor = self.hub.cursor.lock().await;
        if cursor.is_none() {
            *cursor = Some(store.newest_event().await?.unwrap_or(0));
        }
        let mut streams = self
            .hub
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if streams.queues.len() >= self.hub.max_streams {
            return Err(ApiError::too_many_requests(
                "too_many_streams",
                format!(
                    "this server has {} event streams open, as many as max_event_streams allows; \
                     try again once one has closed",
                    streams.queues.len()
                ),
            ));
        }
        if let Some(token) = &token {
            let open = streams.per_token.get(token).copied().unwrap_or(0);
            if open >= self.hub.max_streams_per_token {
                return Err(ApiError::too_many_requests(
                    "too_many_streams",
                    format!(
                        "token {token:?} has {open} event streams open, as many as \
                         max_event_streams_per_token allows; close one first"
                    ),
                ));
            }
            *streams.per_token.entry(token.clone()).or_default() += 1;
        }
        let id = streams.next_id;
        streams.next_id += 1;
        let queue = Arc::new(Queue {
            filter,
            waiting: Mutex::default(),
            ready: Notify::new(),
        });
        streams.queues.insert(id, queue.clone());
        Ok(Subscriber {
            hub: self.hub.clone(),
            id,
            token,
            queue,
        })
    }

    /// Queues `change` for every stream whose filter it matches.
    fn publish(&self, change: Published) {
        let change = Arc::new(change);
        let streams = self
            .hub
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for queue in streams.queues.values() {
            if queue.filter.matches(&change) {
                queue.push(&change, self.hub.queue_changes, self.hub.queue_bytes);
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.hub
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queues
            .is_empty()
    }

    /// Follows the change log until `shutdown`, handing each change to the streams while
    /// any are open.
    pub async fn follow(self, store: Store, backstop: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = store.event_signal().notified() => {}
                _ = tokio::time::sleep(backstop) => {}
            }
            let mut held = self.hub.cursor.lock().await;
            if self.is_idle() {
                *held = None;
                continue;
            }
            let Some(mut cursor) = *held else {
                // Every stream comes from `subscribe`, which sets the cursor.
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
                    Ok(published) => published
                        .into_iter()
                        .for_each(|change| self.publish(change)),
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
    let mut runs: HashMap<&RunId, Option<(RunRecord, Arc<str>)>> = HashMap::new();
    for event in batch {
        if !runs.contains_key(&event.run_id) {
            let run = store.find_run(&event.run_id).await?;
            let rendered = run.map(|run| {
                let json = run_json(&run);
                (run, Arc::from(json))
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
                shadow: run.shadow_of.is_some(),
                step,
                run: json.clone(),
            })
        })
        .collect())
}

fn run_json(run: &RunRecord) -> String {
    serde_json::to_string(&RunDto::new(run, true)).unwrap_or_default()
}

/// Which changes a stream sends.
#[derive(Debug, Clone)]
enum Filter {
    Run(String),
    Runs {
        plugin: Option<String>,
        schedule: Option<String>,
        status: Option<RunStatus>,
        /// Shadow runs too (else only the runs that decide).
        shadow: bool,
    },
    /// A status page's runs that finished: those of its plugins and schedules. Its stream
    /// says only that the page changed, never what a run holds.
    Page {
        plugins: Vec<String>,
        schedules: Vec<String>,
    },
}

impl Filter {
    fn matches(&self, change: &Published) -> bool {
        self.admits(
            &change.run_id,
            &change.plugin,
            change.schedule_id.as_deref(),
            change.status,
            change.shadow,
        )
    }

    fn matches_run(&self, run: &RunRecord) -> bool {
        self.admits(
            run.id.as_str(),
            &run.plugin_name,
            run.schedule_id.as_deref(),
            run.status,
            run.shadow_of.is_some(),
        )
    }

    fn admits(
        &self,
        run_id: &str,
        plugin_name: &str,
        schedule_id: Option<&str>,
        run_status: RunStatus,
        is_shadow: bool,
    ) -> bool {
        match self {
            Filter::Run(id) => id == run_id,
            Filter::Runs {
                plugin,
                schedule,
                status,
                shadow,
            } => {
                (*shadow || !is_shadow)
                    && plugin.as_deref().is_none_or(|plugin| plugin == plugin_name)
                    && schedule
                        .as_deref()
                        .is_none_or(|schedule| schedule_id == Some(schedule))
                    && status.is_none_or(|status| status == run_status)
            }
            Filter::Page { plugins, schedules } => {
                !is_shadow
                    && run_status.is_terminal()
                    && (plugins.iter().any(|plugin| plugin == plugin_name)
                        || schedule_id.is_some_and(|id| schedules.iter().any(|s| s == id)))
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
        .data(&*change.run);
    step.into_iter().chain(std::iter::once(run))
}

fn reset(reason: &str) -> Event {
    Event::default()
        .event("reset")
        .data(json!({"reason": reason}).to_string())
}

/// A resume of `GET /v1/events` under way: the log after `Last-Event-ID`, read a batch at a
/// time as the client takes what was sent, each run in it sent once.
struct Replay {
    /// The log has been read up to this id...
    cursor: i64,
    /// ...and is read up to this one, its newest when the stream subscribed: later changes
    /// come from the hub.
    until: i64,
    /// Runs first seen in the batch read last, to send, each with the id its event carries.
    pending: VecDeque<(RunId, i64)>,
    /// Runs seen so far. Each is sent once, as it is when sent, which is after every change
    /// up to `until` was made.
    seen: HashSet<RunId>,
    /// Bytes of runs sent so far.
    sent_bytes: usize,
}

/// One client's stream: what it is owed from the log first, then the hub's changes.
struct Subscription {
    state: AppState,
    subscriber: Subscriber,
    /// The last change sent, or covered by what was sent.
    last: i64,
    frames: VecDeque<Event>,
    replay: Option<Replay>,
    keep_alive: tokio::time::Interval,
    /// The request's `Authorization`, checked again at each keep-alive; `None` without tokens.
    credentials: Option<HeaderMap>,
    done: bool,
}

impl Subscription {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Subscription)> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Some((Ok(frame), self));
            }
            if self.done {
                return None;
            }
            if self.replay.is_some() {
                self.replay_step().await;
                continue;
            }
            tokio::select! {
                () = self.subscriber.queue.ready.notified() => self.take_changes(),
                _ = self.keep_alive.tick() => self.keep_alive().await,
            }
        }
    }

    fn end(&mut self, reason: &str) {
        self.frames.push_back(reset(reason));
        self.replay = None;
        self.done = true;
    }

    fn take_changes(&mut self) {
        let (changes, overflowed) = self.subscriber.queue.take();
        if overflowed {
            self.end("this stream fell further behind than the server keeps for it; read the state again and reconnect");
            return;
        }
        let page = matches!(self.subscriber.queue.filter, Filter::Page { .. });
        let mut changed = false;
        for change in changes {
            if change.seq <= self.last {
                continue;
            }
            self.last = change.seq;
            if page {
                changed = true;
            } else {
                self.frames.extend(frames(&change));
            }
        }
        if changed {
            self.frames
                .push_back(Event::default().event("changed").data("{}"));
        }
    }

    /// A comment that keeps proxies from closing an idle stream; first, the token is checked
    /// again, so that a revoked or expired token's stream ends within one interval.
    async fn keep_alive(&mut self) {
        if let Some(credentials) = &self.credentials {
            match super::auth::authenticate(&self.state, credentials).await {
                Ok(_) => {}
                Err(refusal) if refusal.status_code() == StatusCode::UNAUTHORIZED => {
                    let reason = format!("{}; this stream is closed", refusal.detail());
                    self.end(&reason);
                    return;
                }
                // The database may be down for a moment: that is not a refusal.
                Err(error) => {
                    tracing::warn!(detail = error.detail(), "checking a stream's token failed")
                }
            }
        }
        self.frames.push_back(Event::default().comment(""));
    }

    /// Sends the next run of the resume, or reads the next batch of the log.
    async fn replay_step(&mut self) {
        let Some(replay) = self.replay.as_mut() else {
            return;
        };
        let budget = self.state.settings.events_replay_bytes;
        if let Some((run_id, id)) = replay.pending.pop_front() {
            if replay.sent_bytes >= budget {
                self.end(&format!(
                    "the runs changed since Last-Event-ID are more than one resume sends \
                     ({budget} bytes, events_replay_bytes); read the state again and reconnect without it"
                ));
                return;
            }
            match self.state.store.find_run(&run_id).await {
                Ok(Some(run)) if self.subscriber.queue.filter.matches_run(&run) => {
                    let json = run_json(&run);
                    replay.sent_bytes += json.len();
                    self.frames
                        .push_back(Event::default().event("run").id(id.to_string()).data(json));
                }
                // Deleted since, or not one this stream sends.
                Ok(_) => {}
                Err(error) => self.replay_failed(&error),
            }
            return;
        }
        if replay.cursor >= replay.until {
            self.last = replay.until;
            self.replay = None;
            return;
        }
        let batch = match self
            .state
            .store
            .events_after(replay.cursor, READ_BATCH)
            .await
        {
            Ok(batch) => batch,
            Err(error) => return self.replay_failed(&error),
        };
        let until = replay.until;
        let complete =
            batch.len() < READ_BATCH || batch.last().is_none_or(|event| event.seq >= until);
        let end = match batch.last() {
            Some(last) if !complete => last.seq,
            _ => until,
        };
        let mut firsts: Vec<(RunId, i64)> = batch
            .into_iter()
            .take_while(|event| event.seq <= until)
            .filter(|event| replay.seen.insert(event.run_id.clone()))
            .map(|event| (event.run_id, event.seq))
            .collect();
        // A run's event carries the id just before the next run's first change (the last
        // one, the batch's end): every run changed up to there has been sent by then, so a
        // client that resumes after it misses nothing.
        for index in 0..firsts.len() {
            firsts[index].1 = firsts.get(index + 1).map_or(end, |next| next.1 - 1);
        }
        replay.pending = firsts.into();
        replay.cursor = end;
    }

    fn replay_failed(&mut self, error: &crate::storage::Error) {
        tracing::warn!(%error, "reading the change log for a resume failed");
        self.end("the server could not read its change log; read the state again and reconnect");
    }
}

/// Opens a stream: subscribes to the hub first, so that nothing falls between what is read
/// from the log (after `Last-Event-ID`) and the live changes.
async fn open(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    filter: Filter,
    snapshot_of: Option<&RunId>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let resume = last_event_id(headers)?;
    let tokens = state.settings.auth == AuthMode::Tokens;
    let token = tokens.then(|| caller.name.clone());
    let subscriber = state.events.subscribe(&state.store, filter, token).await?;
    let credentials = tokens.then(|| {
        headers
            .iter()
            .filter(|(name, _)| *name == header::AUTHORIZATION)
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    });
    let every = state.settings.events_keep_alive;
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut subscription = Subscription {
        state: state.clone(),
        subscriber,
        last: 0,
        frames: VecDeque::new(),
        replay: None,
        keep_alive,
        credentials,
        done: false,
    };
    match (resume, snapshot_of) {
        (Some(after), _) => {
            resume_after(&state.store, after, snapshot_of, &mut subscription).await?
        }
        // Read after subscribing: a change made meanwhile is in the snapshot or on its way.
        (None, Some(id)) => {
            if let Some(run) = state.store.find_run(id).await? {
                subscription
                    .frames
                    .push_back(Event::default().event("run").data(run_json(&run)));
            }
        }
        // `open` says the stream is listening, so a client may read a list now and miss
        // nothing after it; its id is where a reconnect resumes.
        (None, None) => {
            let (_, newest) = state.store.event_bounds().await?;
            let head = newest.unwrap_or(0);
            subscription.last = head;
            subscription.frames.push_back(
                Event::default()
                    .event("open")
                    .id(head.to_string())
                    .data(json!({"id": head}).to_string()),
            );
        }
    }
    let stream = futures::stream::unfold(subscription, Subscription::next);
    Ok(Sse::new(stream))
}

/// A status page's stream: `event: changed` (with nothing else) soon after a run of the page's
/// `plugins` or `schedules` finishes. `reader` counts against `max_event_streams_per_token`
/// as a token would: an anonymous reader's address. `credentials`, if any, are checked again
/// at each keep-alive.
pub(super) async fn page_changes(
    state: &AppState,
    plugins: Vec<String>,
    schedules: Vec<String>,
    reader: String,
    credentials: Option<HeaderMap>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let filter = Filter::Page { plugins, schedules };
    let subscriber = state
        .events
        .subscribe(&state.store, filter, Some(reader))
        .await?;
    let every = state.settings.events_keep_alive;
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (_, newest) = state.store.event_bounds().await?;
    let subscription = Subscription {
        state: state.clone(),
        subscriber,
        last: newest.unwrap_or(0),
        frames: VecDeque::from([Event::default().event("open").data("{}")]),
        replay: None,
        keep_alive,
        credentials,
        done: false,
    };
    Ok(Sse::new(futures::stream::unfold(
        subscription,
        Subscription::next,
    )))
}

/// Sets the stream up to send what changed after `after`: a run's own stream its run, once,
/// if it changed; `/v1/events` each changed run once, read lazily ([`Replay`]). A `reset`
/// instead when those changes are no longer all there (retention) or too many.
async fn resume_after(
    store: &Store,
    after: i64,
    run: Option<&RunId>,
    subscription: &mut Subscription,
) -> Result<(), ApiError> {
    let (oldest, newest) = store.event_bounds().await?;
    let until = newest.unwrap_or(0);
    subscription.last = until;
    if after == until {
        return Ok(());
    }
    if after > until {
        // An id this log never gave (another database, or one recreated): waiting for the
        // log to pass it would skip every change until then.
        subscription.end(
            "Last-Event-ID is not an id of this server's changes; read the state again and reconnect without it",
        );
        return Ok(());
    }
    if oldest.is_some_and(|oldest| oldest > after + 1) {
        subscription.end(
            "the changes after Last-Event-ID are no longer kept; read the state again and reconnect without it",
        );
        return Ok(());
    }
    match run {
        Some(run_id) => {
            if store.newest_change_of_run(run_id, after, until).await?.is_some()
                && let Some(run) = store.find_run(run_id).await?
            {
                subscription.frames.push_back(
                    Event::default()
                        .event("run")
                        .id(until.to_string())
                        .data(run_json(&run)),
                );
            }
        }
        // Ids are dense (PostgreSQL numbers them one by one; SQLite's row ids have gaps only
        // where a transaction rolled back), so their difference bounds the changes to read.
        None if until - after > MAX_REPLAY => subscription.end(
            "more changes happened since Last-Event-ID than one resume reads; read the state again and reconnect without it",
        ),
        None => {
            subscription.last = after;
            subscription.replay = Some(Replay {
                cursor: after,
                until,
                pending: VecDeque::new(),
                seen: HashSet::new(),
                sent_bytes: 0,
            });
        }
    }
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
                   resume without a gap: the run is sent once, as it is now, if it changed since. \
                   `event: reset`: read the state again and reconnect; it also ends the stream of \
                   a token revoked or expired since (checked at every keep-alive comment, \
                   `events_keep_alive_ms`). At most `max_event_streams_per_token` streams per \
                   token and `max_event_streams` in all are open at once (429 beyond).",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "The event stream", body = String, content_type = "text/event-stream"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "As many streams are open as the token or the server may have (`too_many_streams`; the detail names the cap)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let run_id = super::runs::parse_run_id(&id)?;
    super::runs::existing_run(&state, &run_id).await?;
    open(
        &state,
        &caller,
        &headers,
        Filter::Run(run_id.to_string()),
        Some(&run_id),
    )
    .await
}

/// `GET /v1/events?plugin=&schedule=&status=`
#[utoipa::path(
    get, path = "/v1/events", tag = "runs",
    summary = "Changes of all runs, live (Server-Sent Events)",
    description = "`event: open` once listening (its id is the latest change), then `event: step` \
                   and `event: run` after each change of a run that matches the \
                   filters (`status` is the run's status after the change). Send the last `id:` \
                   back as `Last-Event-ID` to resume without a gap: each run changed since is sent \
                   once, as it is now (no step events), read from the log while the client reads, \
                   up to `events_replay_bytes` and 10,000 changes. `event: reset`: read the state \
                   again and reconnect; it also ends a resume past those bounds, a stream that \
                   fell behind, and the stream of a token revoked or expired since (checked at \
                   every keep-alive comment, `events_keep_alive_ms`). At most \
                   `max_event_streams_per_token` streams per token and `max_event_streams` in all \
                   are open at once (429 beyond).",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "The event stream", body = String, content_type = "text/event-stream"),
        (status = 422, description = "Invalid filter or Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "As many streams are open as the token or the server may have (`too_many_streams`; the detail names the cap)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events_index(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let query: EventsQuery = super::query::read(raw.as_deref())?;
    let status = super::query::run_status(query.status.as_deref())?;
    let filter = Filter::Runs {
        plugin: query.plugin,
        schedule: query.schedule,
        status,
        shadow: super::query::flag(query.shadow.as_deref(), "shadow")?.unwrap_or(false),
    };
    open(&state, &caller, &headers, filter, None).await
}
