//! The window of a tap: the recent messages of a source without history (core NATS subjects),
//! which the host keeps from the moment it subscribes, bounded in age and bytes. A step's
//! `find` reads it; what the window can no longer answer for is said, never guessed: a run
//! that started before the tap's subscription (the host restarted, or the grant that names
//! the subject is newer) or before a message the window dropped gets `window-lost`.

use std::collections::VecDeque;
use std::sync::Mutex;
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

/// A subject pattern the tap subscribes to, and since when the server confirmed it (`None`
/// until then).
struct Subscription {
    pattern: String,
    since_ms: Option<i64>,
}

pub(super) struct Window {
    inner: Mutex<Inner>,
    max_bytes: usize,
    max_age: Duration,
    /// Told when the server confirms subscriptions.
    confirmations: tokio::sync::Notify,
}

struct Inner {
    messages: VecDeque<Kept>,
    bytes: usize,
    next_position: u64,
    subscriptions: Vec<Subscription>,
    /// The newest time of a message the window dropped: a run that started at or before it
    /// may have missed that message.
    dropped_until_ms: Option<i64>,
    dropped: u64,
    /// The tap's last connection attempt failed: no confirmation is coming soon.
    down: bool,
}

/// The tap's figures for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct TapStats {
    pub messages: usize,
    pub bytes: usize,
    pub dropped: u64,
}

/// Whether the window can answer for `since_ms`.
pub(super) enum Coverage {
    Complete,
    Lost(String),
}

impl Window {
    pub(super) fn new(max_bytes: usize, max_age: Duration) -> Window {
        Window {
            inner: Mutex::new(Inner {
                messages: VecDeque::new(),
                bytes: 0,
                next_position: 1,
                subscriptions: Vec::new(),
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
            since_ms: None,
        });
        true
    }

    /// Every pattern, for a new connection to subscribe to; each counts from its
    /// confirmation again.
    pub(super) fn resubscribe(&self) -> Vec<String> {
        let mut inner = self.lock();
        inner
            .subscriptions
            .iter_mut()
            .map(|subscription| {
                subscription.since_ms = None;
                subscription.pattern.clone()
            })
            .collect()
    }

    /// The server confirmed every subscription asked for until now: they count from `now_ms`.
    pub(super) fn confirmed(&self, now_ms: i64) {
        for subscription in &mut self.lock().subscriptions {
            subscription.since_ms.get_or_insert(now_ms);
        }
        self.confirmations.notify_waiters();
    }

    /// Returns once the server has confirmed the subscription to `pattern`, or the tap
    /// could not connect.
    pub(super) async fn until_confirmed(&self, pattern: &str) {
        loop {
            let confirmation = self.confirmations.notified();
            {
                let inner = self.lock();
                let confirmed = inner.subscriptions.iter().any(|subscription| {
                    subscription.pattern == pattern && subscription.since_ms.is_some()
                });
                if confirmed || inner.down {
                    return;
                }
            }
            confirmation.await;
        }
    }

    /// Whether the tap's last connection attempt failed.
    pub(super) fn set_down(&self, down: bool) {
        self.lock().down = down;
        self.confirmations.notify_waiters();
    }

    /// Keeps a message, dropping the oldest ones past the window's age or bytes.
    pub(super) fn keep(&self, mut message: Kept) {
        let mut inner = self.lock();
        message.position = inner.next_position;
        inner.next_position += 1;
        let bytes = message.bytes();
        let at = message.received_at_ms;
        inner.bytes += bytes;
        inner.messages.push_back(message);
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

    /// Whether the window holds every message on `subject` since `since_ms`: a subscription
    /// covering it was confirmed by then, and no message after it was dropped.
    pub(super) fn coverage(
        &self,
        subject: &str,
        since_ms: i64,
        now_ms: i64,
        covers: impl Fn(&str, &str) -> bool,
    ) -> Coverage {
        let mut inner = self.lock();
        self.drop_old(&mut inner, now_ms);
        let subscribed = inner
            .subscriptions
            .iter()
            .filter(|subscription| covers(&subscription.pattern, subject))
            .filter_map(|subscription| subscription.since_ms)
            .min();
        match subscribed {
            None => {
                return Coverage::Lost(format!(
                    "the host's tap is not subscribed to {subject:?} yet; the run started before it could see the subject"
                ));
            }
            Some(since) if since > since_ms => {
                return Coverage::Lost(format!(
                    "the host's tap of this source has kept messages on {subject:?} only since {} (the host restarted, or the grant that names the subject is newer), after this run started at {}",
                    rfc3339(since),
                    rfc3339(since_ms)
                ));
            }
            Some(_) => {}
        }
        if let Some(dropped) = inner.dropped_until_ms
            && dropped >= since_ms
        {
            return Coverage::Lost(format!(
                "the host's tap dropped messages received up to {} to stay within its window ({} MiB, {} minutes), after this run started at {}",
                rfc3339(dropped),
                self.max_bytes >> 20,
                self.max_age.as_secs() / 60,
                rfc3339(since_ms)
            ));
        }
        Coverage::Complete
    }

    /// Calls `each` with the messages received at or after `since_ms`, oldest first, until it
    /// returns `false`.
    pub(super) fn scan(&self, since_ms: i64, mut each: impl FnMut(&Kept) -> bool) {
        let inner = self.lock();
        let first = inner
            .messages
            .partition_point(|message| message.received_at_ms < since_ms);
        for message in inner.messages.range(first..) {
            if !each(message) {
                break;
            }
        }
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

fn rfc3339(ms: i64) -> String {
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

    #[test]
    fn the_window_drops_the_oldest_past_its_bytes_and_says_so() {
        let window = Window::new(1_000, Duration::from_secs(900));
        assert!(window.add_pattern("events", equal));
        assert!(!window.add_pattern("events", equal), "subscribed once");
        window.confirmed(100);
        for at in 200..210 {
            window.keep(kept("events", at, 200));
        }
        let stats = window.stats();
        assert!(stats.bytes <= 1_000, "{stats:?}");
        assert_eq!(stats.messages + stats.dropped as usize, 10);
        assert!(stats.dropped > 0);
        assert!(matches!(
            window.coverage("events", 150, 210, equal),
            Coverage::Lost(message) if message.contains("dropped")
        ));
        // A run that started after the last drop is answered in full.
        assert!(matches!(
            window.coverage("events", 209, 210, equal),
            Coverage::Complete
        ));
        let mut seen = Vec::new();
        window.scan(208, |message| {
            seen.push(message.received_at_ms);
            true
        });
        assert_eq!(seen, [208, 209]);
    }

    #[test]
    fn a_run_older_than_the_subscription_or_the_age_is_told_the_window_is_lost() {
        let window = Window::new(1 << 20, Duration::from_secs(60));
        assert!(matches!(
            window.coverage("events", 0, 1, equal),
            Coverage::Lost(_)
        ));
        window.add_pattern("events", equal);
        window.confirmed(1_000);
        assert!(matches!(
            window.coverage("events", 999, 1_000, equal),
            Coverage::Lost(message) if message.contains("restarted")
        ));
        window.keep(kept("events", 2_000, 10));
        assert!(matches!(
            window.coverage("events", 1_500, 3_000, equal),
            Coverage::Complete
        ));
        // Past its age the message is dropped, and a run from before it is told.
        assert!(matches!(
            window.coverage("events", 1_500, 70_000, equal),
            Coverage::Lost(_)
        ));
        assert_eq!(window.stats().dropped, 1);
    }
}
