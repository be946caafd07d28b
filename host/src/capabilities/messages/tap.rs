//! The window of a tap: the recent messages of a source without history (core NATS subjects),
//! which the host keeps from the moment it subscribes, bounded in age and bytes. A step's
//! `find` reads it; what the window can no longer answer for is said, never guessed: a run
//! that started before the tap's subscription (the host restarted, or the grant that names
//! the subject is newer) or before a message the window dropped gets `window-lost`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Its subscription id on the live connection; `None` until its `SUB` is written.
    sid: Option<u64>,
    /// The `PING` after its `SUB`, whose `PONG` says the server has it.
    confirmed_by_ping: u64,
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
    /// `PING`s written on the live connection, and `PONG`s read: the server answers in order.
    pings: u64,
    pongs: u64,
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
                pings: 0,
                pongs: 0,
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
            confirmed_by_ping: 0,
            since_ms: None,
        });
        true
    }

    /// For a new connection: every pattern with its new subscription id (from `sid`), all
    /// confirmed by the one `PING` the caller writes after their `SUB`s.
    pub(super) fn resubscribe(&self, mut sid: impl FnMut() -> u64) -> Vec<(String, u64)> {
        let mut inner = self.lock();
        inner.pings = 1;
        inner.pongs = 0;
        inner.down = false;
        inner
            .subscriptions
            .iter_mut()
            .map(|subscription| {
                let id = sid();
                subscription.sid = Some(id);
                subscription.confirmed_by_ping = 1;
                subscription.since_ms = None;
                (subscription.pattern.clone(), id)
            })
            .collect()
    }

    /// On the live connection, `pattern` gets subscription id `sid` unless its `SUB` was
    /// written already; returns whether the caller must write its `SUB` and a `PING`.
    pub(super) fn subscribe_live(&self, pattern: &str, sid: u64) -> bool {
        let mut inner = self.lock();
        let ping = inner.pings + 1;
        let Some(subscription) = inner
            .subscriptions
            .iter_mut()
            .find(|subscription| subscription.pattern == pattern && subscription.sid.is_none())
        else {
            return false;
        };
        subscription.sid = Some(sid);
        subscription.confirmed_by_ping = ping;
        inner.pings = ping;
        true
    }

    /// A `PONG`: the subscriptions written before its `PING` count from `now_ms`.
    pub(super) fn pong(&self, now_ms: i64) {
        let mut inner = self.lock();
        inner.pongs += 1;
        let pongs = inner.pongs;
        for subscription in &mut inner.subscriptions {
            if subscription.sid.is_some() && subscription.confirmed_by_ping <= pongs {
                subscription.since_ms.get_or_insert(now_ms);
            }
        }
        drop(inner);
        self.confirmations.notify_waiters();
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
    /// twice (a wider pattern was added beside a narrower one): only that one is kept.
    pub(super) fn keep(&self, mut message: Kept, sid: u64, covers: impl Fn(&str, &str) -> bool) {
        let mut inner = self.lock();
        let first = inner
            .subscriptions
            .iter()
            .filter(|subscription| covers(&subscription.pattern, &message.subject))
            .filter_map(|subscription| subscription.sid)
            .min();
        if first.is_some_and(|first| first != sid) {
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
        window.pong(at);
        window
    }

    #[test]
    fn the_window_drops_the_oldest_past_its_bytes_and_says_so() {
        let window = subscribed(1_000, Duration::from_secs(900), 100);
        for at in 200..210 {
            window.keep(kept("events", at, 200), 1, equal);
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
        window.pong(1_000);
        assert!(matches!(
            window.since("events", 999, 1_000, equal),
            Err(message) if message.contains("restarted")
        ));
        window.keep(kept("events", 2_000, 10), 1, equal);
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
        window.pong(90_000);
        assert!(window.since("events", 80_000, 90_001, equal).is_err());
        assert!(window.since("events", 90_000, 90_001, equal).is_ok());
    }

    #[test]
    fn a_pong_confirms_only_what_was_written_before_its_ping() {
        let window = Window::new(1 << 20, Duration::from_secs(60));
        window.add_pattern("a", equal);
        window.resubscribe(|| 1);
        window.add_pattern("b", equal);
        assert!(window.subscribe_live("b", 2));
        assert!(!window.subscribe_live("b", 3), "written once");
        // The PONG of the connection's first PING: "a" only.
        window.pong(10);
        assert!(window.since("a", 10, 11, equal).is_ok());
        assert!(window.since("b", 10, 11, equal).is_err());
        window.pong(20);
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
        window.pong(1);
        window.pong(2);
        window.keep(kept("events.a", 5, 1), 1, prefix);
        window.keep(kept("events.a", 5, 1), 2, prefix);
        window.keep(kept("events.b", 6, 1), 2, prefix);
        assert_eq!(window.stats().messages, 2);
    }
}
