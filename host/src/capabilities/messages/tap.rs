//! A tap: the host's subscription to a source without history (core NATS subjects, MQTT
//! topics), and the window of recent messages it keeps from the moment it subscribes, bounded
//! in age and bytes. A step's `find` reads the window; what the window can no longer answer
//! for is said, never guessed: a run that started before the tap's subscription (the host
//! restarted, or the grant that names the subject is newer) or before a message the window
//! dropped gets `window-lost`.
//!
//! The connection's life (connect, subscribe to every pattern again, read until it breaks,
//! wait, again) is [`Tap`]'s; what is said on the wire is a backend's [`Protocol`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::capabilities::wire::Io;

/// One message as the tap keeps it.
pub(super) struct Kept {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
    pub position: u64,
}

/// What keeping a message costs beyond its bytes (its place in the window, its strings).
const KEPT_OVERHEAD: usize = 64;

impl Kept {
    /// What it takes of the window's bytes.
    fn bytes(&self) -> usize {
        super::message_bytes(&self.subject, &self.headers, &self.payload) + KEPT_OVERHEAD
    }
}

/// A subject pattern the tap subscribes to, on the connection it has now.
struct Subscription {
    pattern: String,
    /// Its subscription id on the live connection; `None` until its subscription is written.
    sid: Option<u64>,
    /// The answer, counted from the connection's first, that says the server has it: the
    /// server answers in the order it was asked.
    confirmed_by: u64,
    /// Since when the server has had it; `None` until then, and again after a disconnect.
    since_ms: Option<i64>,
}

pub(super) struct Window {
    inner: Mutex<Inner>,
    max_bytes: usize,
    max_age: Duration,
    /// Told when the server confirms subscriptions, or the tap cannot connect.
    confirmations: tokio::sync::Notify,
}

struct Inner {
    messages: VecDeque<Arc<Kept>>,
    bytes: usize,
    next_position: u64,
    /// The latest arrival time kept: times never go back in the window, whatever the clock
    /// does, so that it stays sorted.
    latest_ms: i64,
    subscriptions: Vec<Subscription>,
    /// Confirmations asked for on the live connection, and answers read.
    asked: u64,
    answered: u64,
    /// The newest time of a message the window dropped: a run that started at or before it
    /// may have missed that message.
    dropped_until_ms: Option<i64>,
    dropped: u64,
    /// The tap is not connected: no confirmation is coming soon.
    down: bool,
}

/// The tap's figures for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct TapStats {
    pub messages: usize,
    pub bytes: usize,
    pub dropped: u64,
}

impl Window {
    pub(super) fn new(max_bytes: usize, max_age: Duration) -> Window {
        Window {
            inner: Mutex::new(Inner {
                messages: VecDeque::new(),
                bytes: 0,
                next_position: 1,
                latest_ms: i64::MIN,
                subscriptions: Vec::new(),
                asked: 0,
                answered: 0,
                dropped_until_ms: None,
                dropped: 0,
                down: false,
            }),
            max_bytes,
            max_age,
            confirmations: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds `pattern` to the subscriptions unless one that covers it is there already;
    /// returns whether the tap must subscribe to it.
    pub(super) fn add_pattern(&self, pattern: &str, covers: impl Fn(&str, &str) -> bool) -> bool {
        let mut inner = self.lock();
        if inner
            .subscriptions
            .iter()
            .any(|subscription| covers(&subscription.pattern, pattern))
        {
            return false;
        }
        inner.subscriptions.push(Subscription {
            pattern: pattern.to_owned(),
            sid: None,
            confirmed_by: 0,
            since_ms: None,
        });
        true
    }

    /// For a new connection: every pattern with its new subscription id (from `sid`), each
    /// confirmed by an answer of its own, in this order.
    pub(super) fn resubscribe(&self, mut sid: impl FnMut() -> u64) -> Vec<(String, u64)> {
        let mut inner = self.lock();
        inner.answered = 0;
        inner.down = false;
        let mut asked = 0;
        let subscriptions = inner
            .subscriptions
            .iter_mut()
            .map(|subscription| {
                let id = sid();
                asked += 1;
                subscription.sid = Some(id);
                subscription.confirmed_by = asked;
                subscription.since_ms = None;
                (subscription.pattern.clone(), id)
            })
            .collect();
        inner.asked = asked;
        subscriptions
    }

    /// On the live connection, `pattern` gets subscription id `sid` unless its subscription
    /// was written already; returns whether the caller must write it, with its confirmation.
    pub(super) fn subscribe_live(&self, pattern: &str, sid: u64) -> bool {
        let mut inner = self.lock();
        let asked = inner.asked + 1;
        let Some(subscription) = inner
            .subscriptions
            .iter_mut()
            .find(|subscription| subscription.pattern == pattern && subscription.sid.is_none())
        else {
            return false;
        };
        subscription.sid = Some(sid);
        subscription.confirmed_by = asked;
        inner.asked = asked;
        true
    }

    /// The server's next answer: the subscriptions written before what it answers count from
    /// `now_ms`.
    pub(super) fn confirmed(&self, now_ms: i64) {
        let mut inner = self.lock();
        inner.answered += 1;
        let answered = inner.answered;
        for subscription in &mut inner.subscriptions {
            if subscription.sid.is_some() && subscription.confirmed_by <= answered {
                subscription.since_ms.get_or_insert(now_ms);
            }
        }
        drop(inner);
        self.confirmations.notify_waiters();
    }

    /// The pattern of the live subscription whose id `sid` accepts.
    pub(super) fn pattern_of(&self, sid: impl Fn(u64) -> bool) -> Option<String> {
        self.lock()
            .subscriptions
            .iter()
            .find(|subscription| subscription.sid.is_some_and(&sid))
            .map(|subscription| subscription.pattern.clone())
    }

    /// The pattern whose confirmation is the next the server owes.
    pub(super) fn next_unconfirmed(&self) -> Option<String> {
        let inner = self.lock();
        inner
            .subscriptions
            .iter()
            .filter(|subscription| {
                subscription.sid.is_some() && subscription.confirmed_by > inner.answered
            })
            .min_by_key(|subscription| subscription.confirmed_by)
            .map(|subscription| subscription.pattern.clone())
    }

    /// The server refused the subscription to `pattern` (its permissions): it is not tapped.
    pub(super) fn refused(&self, pattern: &str) {
        self.lock()
            .subscriptions
            .retain(|subscription| subscription.pattern != pattern);
        self.confirmations.notify_waiters();
    }

    /// The connection broke, or could not be made: nothing counts as covered until the
    /// next connection's subscriptions are confirmed.
    pub(super) fn disconnected(&self) {
        let mut inner = self.lock();
        inner.down = true;
        for subscription in &mut inner.subscriptions {
            subscription.sid = None;
            subscription.since_ms = None;
        }
        drop(inner);
        self.confirmations.notify_waiters();
    }

    /// Returns once the server has confirmed the subscription to `pattern`, or the tap is
    /// not connected.
    pub(super) async fn until_confirmed(&self, pattern: &str) {
        loop {
            let confirmation = self.confirmations.notified();
            {
                let inner = self.lock();
                let settled = inner.subscriptions.iter().all(|subscription| {
                    subscription.pattern != pattern || subscription.since_ms.is_some()
                });
                if settled || inner.down {
                    return;
                }
            }
            confirmation.await;
        }
    }

    /// Keeps a message that came with subscription `sid`, dropping the oldest ones past the
    /// window's age or bytes. A message that a subscription with a lower id also covers came
    /// twice (a wider pattern was added beside a narrower one): only that one is kept. A
    /// message that names no subscription is kept.
    pub(super) fn keep(
        &self,
        mut message: Kept,
        sid: Option<u64>,
        covers: impl Fn(&str, &str) -> bool,
    ) {
        let mut inner = self.lock();
        let first = inner
            .subscriptions
            .iter()
            .filter(|subscription| covers(&subscription.pattern, &message.subject))
            .filter_map(|subscription| subscription.sid)
            .min();
        if let (Some(first), Some(sid)) = (first, sid)
            && first != sid
        {
            return;
        }
        message.position = inner.next_position;
        inner.next_position += 1;
        message.received_at_ms = message.received_at_ms.max(inner.latest_ms);
        inner.latest_ms = message.received_at_ms;
        let bytes = message.bytes();
        let at = message.received_at_ms;
        inner.bytes += bytes;
        inner.messages.push_back(Arc::new(message));
        self.drop_old(&mut inner, at);
    }

    /// A message arrived that the window could never hold (larger than all of it): it was
    /// skipped unread, and counts as dropped at `now_ms`.
    pub(super) fn skipped(&self, now_ms: i64) {
        let mut inner = self.lock();
        inner.dropped += 1;
        inner.dropped_until_ms = Some(inner.dropped_until_ms.unwrap_or(i64::MIN).max(now_ms));
    }

    /// The most bytes one message may have to be kept.
    pub(super) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn drop_old(&self, inner: &mut Inner, now_ms: i64) {
        let oldest_kept = now_ms - self.max_age.as_millis() as i64;
        while let Some(oldest) = inner.messages.front() {
            if inner.bytes <= self.max_bytes && oldest.received_at_ms >= oldest_kept {
                break;
            }
            let dropped = inner.messages.pop_front().expect("a front message");
            inner.bytes -= dropped.bytes();
            inner.dropped += 1;
            inner.dropped_until_ms = Some(
                inner
                    .dropped_until_ms
                    .unwrap_or(i64::MIN)
                    .max(dropped.received_at_ms),
            );
        }
    }

    /// The messages on `subject` received at or after `since_ms`, oldest first, if the
    /// window holds every one of them: a subscription covering the subject was confirmed by
    /// then and has held since, and no message after it was dropped. `Err` says why not.
    pub(super) fn since(
        &self,
        subject: &str,
        since_ms: i64,
        now_ms: i64,
        covers: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<Arc<Kept>>, String> {
        let mut inner = self.lock();
        self.drop_old(&mut inner, now_ms);
        let subscribed = inner
            .subscriptions
            .iter()
            .filter(|subscription| covers(&subscription.pattern, subject))
            .filter_map(|subscription| subscription.since_ms)
            .min();
        match subscribed {
            None if inner.down => {
                return Err(format!(
                    "the host's tap of this source cannot reach its server; what was published on {subject:?} since this run started at {} is not known",
                    rfc3339(since_ms)
                ));
            }
            None => {
                return Err(format!(
                    "the host's tap is not subscribed to {subject:?} yet; the run started before it could see the subject"
                ));
            }
            Some(since) if since > since_ms => {
                return Err(format!(
                    "the host's tap of this source has kept messages on {subject:?} only since {} (the host restarted or reconnected, or the grant that names the subject is newer), after this run started at {}",
                    rfc3339(since),
                    rfc3339(since_ms)
                ));
            }
            Some(_) => {}
        }
        if let Some(dropped) = inner.dropped_until_ms
            && dropped >= since_ms
        {
            return Err(format!(
                "the host's tap dropped messages received up to {} to stay within its window ({} MiB, {} minutes), after this run started at {}",
                rfc3339(dropped),
                self.max_bytes >> 20,
                self.max_age.as_secs() / 60,
                rfc3339(since_ms)
            ));
        }
        let first = inner
            .messages
            .partition_point(|message| message.received_at_ms < since_ms);
        Ok(inner
            .messages
            .range(first..)
            .filter(|message| covers(subject, &message.subject))
            .cloned()
            .collect())
    }

    pub(super) fn stats(&self) -> TapStats {
        let inner = self.lock();
        TapStats {
            messages: inner.messages.len(),
            bytes: inner.bytes,
            dropped: inner.dropped,
        }
    }
}

/// The writing half of a tap's live connection, if it has one.
pub(super) type TapWriter = tokio::sync::Mutex<Option<WriteHalf<Box<dyn Io>>>>;

/// A new connection: its reading side, as its protocol reads it, and its writing half.
pub(super) type Connected<R> = (R, WriteHalf<Box<dyn Io>>);

/// A tap connection's reading side, buffered.
pub(super) type Reading = BufReader<ReadHalf<Box<dyn Io>>>;

/// A connection split for a tap: its buffered reading side and its writing half.
pub(super) fn split(io: Box<dyn Io>) -> (Reading, WriteHalf<Box<dyn Io>>) {
    let (reader, writer) = tokio::io::split(io);
    (BufReader::new(reader), writer)
}

/// How long a tap waits for its server to accept a connection and the host's login.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// What subscribes a live connection to a pattern, as [`Protocol::subscribe`] writes it.
type Subscribe = Box<dyn Fn(&str, u64) -> Vec<u8> + Send + Sync>;

/// What a backend's tap says on the wire.
pub(super) trait Protocol: Send + Sync + 'static {
    /// The connection's reading side, as [`Protocol::read`] wants it.
    type Reader: Send;

    /// Connects and logs in (within [`CONNECT_WITHIN`], which the tap applies).
    fn connect(&self) -> impl Future<Output = Result<Connected<Self::Reader>, String>> + Send;

    /// The bytes that subscribe a connection to `pattern` as subscription `sid` and ask the
    /// server to confirm it: its answer is passed to [`Window::confirmed`].
    fn subscribe(&self, pattern: &str, sid: u64) -> Vec<u8>;

    /// Reads what the server sends into `window` until the connection fails.
    fn read(
        &self,
        reader: Self::Reader,
        window: &Window,
        writer: &TapWriter,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// A source's tap: one connection, made again a second after it breaks, subscribed to every
/// pattern of the window. Stops when dropped.
pub(super) struct Tap {
    writer: Arc<TapWriter>,
    sids: Arc<AtomicU64>,
    subscribe: Subscribe,
    _stop: DropGuard,
}

/// How long the tap waits before it connects again.
const RECONNECT: Duration = Duration::from_secs(1);

impl Tap {
    pub(super) fn start<P: Protocol>(source: String, protocol: P, window: Arc<Window>) -> Tap {
        let protocol = Arc::new(protocol);
        let subscriber = protocol.clone();
        let writer = Arc::new(tokio::sync::Mutex::new(None));
        let sids = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (task_writer, task_sids, task_stop) = (writer.clone(), sids.clone(), stop.clone());
        let name = format!("stepwise-tap-{source}");
        let tapping = async move {
            let tapping = async {
                loop {
                    if let Err(error) =
                        tap_once(&*protocol, &window, &task_writer, &task_sids).await
                    {
                        tracing::warn!(%source, %error, "message tap disconnected; reconnecting");
                    }
                    *task_writer.lock().await = None;
                    window.disconnected();
                    tokio::time::sleep(RECONNECT).await;
                }
            };
            tokio::select! {
                () = tapping => {}
                () = task_stop.cancelled() => {}
            }
        };
        // A thread of its own, at the priority of plugin calls: what a flood costs to read is
        // not taken from the host's runtime, where ticks start and the API answers. A tap
        // that falls behind its server is cut off and says its window is lost.
        let started = std::thread::Builder::new().name(name).spawn(move || {
            crate::priority::lower_thread_priority();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(tapping),
                Err(error) => tracing::error!(%error, "message tap: no runtime"),
            }
        });
        if let Err(error) = started {
            tracing::error!(%error, "message tap: no thread");
        }
        Tap {
            writer,
            sids,
            subscribe: Box::new(move |pattern, sid| subscriber.subscribe(pattern, sid)),
            _stop: stop.drop_guard(),
        }
    }

    /// Subscribes the live connection to `pattern` (the window has it already, so a
    /// connection made later subscribes to it too).
    pub(super) async fn subscribe(&self, pattern: &str, window: &Window) {
        if let Some(writer) = self.writer.lock().await.as_mut() {
            let sid = self.sids.fetch_add(1, Ordering::Relaxed) + 1;
            // Under the writer's lock: the window counts the confirmations in the order written.
            if !window.subscribe_live(pattern, sid) {
                return;
            }
            if writer
                .write_all(&(self.subscribe)(pattern, sid))
                .await
                .is_ok()
            {
                let _ = writer.flush().await;
            }
        }
    }
}

/// Keeps a tap's quiet connection alive (MQTT's keep-alive, AMQP's heartbeat): between what
/// the server sends, `beat` is written every half `interval`, and a server heard from in
/// none of two intervals is taken as gone.
pub(super) struct KeepAlive {
    interval: Duration,
    beat: Vec<u8>,
    beaten: Instant,
    heard: Instant,
}

impl KeepAlive {
    pub(super) fn new(interval: Duration, beat: Vec<u8>) -> KeepAlive {
        KeepAlive {
            interval,
            beat,
            beaten: Instant::now(),
            heard: Instant::now(),
        }
    }

    /// Returns once the server has sent something to read.
    pub(super) async fn until_readable<R: AsyncBufRead + Unpin>(
        &mut self,
        reader: &mut R,
        writer: &TapWriter,
    ) -> Result<(), String> {
        let every = self.interval / 2;
        loop {
            if self.beaten.elapsed() >= every {
                if self.heard.elapsed() > self.interval * 2 {
                    return Err("the server stopped answering".into());
                }
                if let Some(writer) = writer.lock().await.as_mut() {
                    writer
                        .write_all(&self.beat)
                        .await
                        .map_err(|error| error.to_string())?;
                    writer.flush().await.map_err(|error| error.to_string())?;
                }
                self.beaten = Instant::now();
            }
            // Only the wait is cut short: what a buffered read has read stays in its buffer.
            let wait = every.saturating_sub(self.beaten.elapsed());
            match tokio::time::timeout(wait, reader.fill_buf()).await {
                Err(_) => continue,
                Ok(Err(error)) => return Err(error.to_string()),
                Ok(Ok([])) => return Err("connection closed".into()),
                Ok(Ok(_)) => {
                    self.heard = Instant::now();
                    return Ok(());
                }
            }
        }
    }
}

/// One connection of a tap, until it fails.
async fn tap_once<P: Protocol>(
    protocol: &P,
    window: &Window,
    writer: &TapWriter,
    sids: &AtomicU64,
) -> Result<(), String> {
    let (reader, write_half) = tokio::time::timeout(CONNECT_WITHIN, protocol.connect())
        .await
        .map_err(|_| format!("no answer within {} s", CONNECT_WITHIN.as_secs()))??;
    {
        let mut writer = writer.lock().await;
        let write_half = writer.insert(write_half);
        let mut commands = Vec::new();
        for (pattern, sid) in window.resubscribe(|| sids.fetch_add(1, Ordering::Relaxed) + 1) {
            commands.extend(protocol.subscribe(&pattern, sid));
        }
        write_half
            .write_all(&commands)
            .await
            .map_err(|error| error.to_string())?;
        write_half
            .flush()
            .await
            .map_err(|error| error.to_string())?;
    }
    protocol.read(reader, window, writer).await
}

pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(subject: &str, at: i64, bytes: usize) -> Kept {
        Kept {
            subject: subject.into(),
            headers: Vec::new(),
            payload: vec![b'x'; bytes],
            received_at_ms: at,
            position: 0,
        }
    }

    fn equal(pattern: &str, subject: &str) -> bool {
        pattern == subject
    }

    /// A window subscribed to `events` on a connection, confirmed at `at`.
    fn subscribed(max_bytes: usize, max_age: Duration, at: i64) -> Window {
        let window = Window::new(max_bytes, max_age);
        assert!(window.add_pattern("events", equal));
        assert!(!window.add_pattern("events", equal), "subscribed once");
        assert_eq!(window.resubscribe(|| 1), [("events".to_owned(), 1)]);
        window.confirmed(at);
        window
    }

    #[test]
    fn the_window_drops_the_oldest_past_its_bytes_and_says_so() {
        let window = subscribed(1_000, Duration::from_secs(900), 100);
        for at in 200..210 {
            window.keep(kept("events", at, 200), Some(1), equal);
        }
        let stats = window.stats();
        assert!(stats.bytes <= 1_000, "{stats:?}");
        assert_eq!(stats.messages + stats.dropped as usize, 10);
        assert!(stats.dropped > 0);
        assert!(matches!(
            window.since("events", 150, 210, equal),
            Err(message) if message.contains("dropped")
        ));
        // A run that started after the last drop is answered in full.
        let found = window.since("events", 208, 210, equal).expect("complete");
        let times: Vec<i64> = found.iter().map(|message| message.received_at_ms).collect();
        assert_eq!(times, [208, 209]);
    }

    #[test]
    fn a_run_older_than_the_subscription_the_connection_or_the_age_is_told_the_window_is_lost() {
        let window = Window::new(1 << 20, Duration::from_secs(60));
        assert!(window.since("events", 0, 1, equal).is_err());
        window.add_pattern("events", equal);
        window.resubscribe(|| 1);
        assert!(
            window.since("events", 0, 1, equal).is_err(),
            "not confirmed yet"
        );
        window.confirmed(1_000);
        assert!(matches!(
            window.since("events", 999, 1_000, equal),
            Err(message) if message.contains("restarted")
        ));
        window.keep(kept("events", 2_000, 10), Some(1), equal);
        assert_eq!(
            window
                .since("events", 1_500, 3_000, equal)
                .map(|found| found.len()),
            Ok(1)
        );
        // Past its age the message is dropped, and a run from before it is told.
        assert!(window.since("events", 1_500, 70_000, equal).is_err());
        assert_eq!(window.stats().dropped, 1);
        // While the tap is disconnected nothing is known, and after it, only from the new
        // confirmation on.
        window.disconnected();
        assert!(matches!(
            window.since("events", 80_000, 80_001, equal),
            Err(message) if message.contains("cannot reach")
        ));
        window.resubscribe(|| 2);
        window.confirmed(90_000);
        assert!(window.since("events", 80_000, 90_001, equal).is_err());
        assert!(window.since("events", 90_000, 90_001, equal).is_ok());
    }

    #[test]
    fn an_answer_confirms_only_what_was_asked_before_it() {
        let window = Window::new(1 << 20, Duration::from_secs(60));
        window.add_pattern("a", equal);
        window.resubscribe(|| 1);
        window.add_pattern("b", equal);
        assert!(window.subscribe_live("b", 2));
        assert!(!window.subscribe_live("b", 3), "written once");
        // The PONG of the connection's first PING: "a" only.
        window.confirmed(10);
        assert!(window.since("a", 10, 11, equal).is_ok());
        assert!(window.since("b", 10, 11, equal).is_err());
        window.confirmed(20);
        assert!(window.since("b", 20, 21, equal).is_ok());
        window.refused("b");
        assert!(window.since("b", 20, 21, equal).is_err());
    }

    #[test]
    fn a_message_two_subscriptions_cover_is_kept_once() {
        let prefix = |pattern: &str, subject: &str| subject.starts_with(pattern);
        let window = Window::new(1 << 20, Duration::from_secs(60));
        window.add_pattern("events.a", prefix);
        window.resubscribe(|| 1);
        window.add_pattern("events.", prefix);
        window.subscribe_live("events.", 2);
        window.confirmed(1);
        window.confirmed(2);
        window.keep(kept("events.a", 5, 1), Some(1), prefix);
        window.keep(kept("events.a", 5, 1), Some(2), prefix);
        window.keep(kept("events.b", 6, 1), Some(2), prefix);
        assert_eq!(window.stats().messages, 2);
    }
}
