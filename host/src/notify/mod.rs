//! Delivering notifications (README, "Alerts"). The transaction that ends a run writes its outbox rows
//! (`storage::outbox`); here any node claims due rows with the same leases as runs, POSTs them
//! to the notifier's URL from the operator's config, and records every attempt fenced by the
//! lease. A failed POST is tried again after the notifier's backoff (with ±20 % jitter) until
//! `max_delivery_ms` after the run finished, then the delivery is `failed`.
//!
//! Exactly once: one delivery is in flight on one node at a time (its lease is renewed while
//! the POST runs, and every write is fenced by it), and once one POST is answered 2xx nothing
//! posts it again. A node killed mid-POST may have reached the receiver before dying; the node
//! that takes over posts again with the same `X-Stepwise-Delivery` id, which a receiver can
//! use to drop the repeat. Deliveries run on their own tasks: a receiver that hangs or fails
//! never delays a tick.

mod message;
mod payload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::capabilities::secrets::Secrets;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{Notifier, NotifyEvent, now_millis};
use crate::storage::{ClaimedNotification, DeliveryAttempt, DeliveryNext, Error, Store};

/// POSTs in flight on one node.
const CONCURRENT_DELIVERIES: usize = 16;

/// The delivery worker of one node.
pub struct Deliverer {
    store: Store,
    notifiers: BTreeMap<String, Arc<Notifier>>,
    public_url: Option<String>,
    node: String,
    lease: Duration,
    backstop: Duration,
    client: reqwest::Client,
    metrics: Metrics,
    /// The operator's secrets, read at each POST: a rotated signing key is used at once.
    secrets: Secrets,
}

/// How one POST went.
enum Answer {
    Delivered(u16),
    Refused(Option<u16>, String),
    /// Nothing to post: the notifier or the run is gone.
    Impossible(String),
}

impl Deliverer {
    pub fn new(
        store: Store,
        settings: &Settings,
        node: String,
        metrics: Metrics,
        secrets: Secrets,
    ) -> anyhow::Result<Deliverer> {
        // A webhook that redirects is answered as it answered: following it could carry the
        // body to somewhere the operator never configured.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stepwise/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            store,
            notifiers: settings
                .notifiers
                .iter()
                .map(|notifier| (notifier.name.clone(), notifier.clone()))
                .collect(),
            public_url: settings.public_url.clone(),
            node,
            lease: settings.lease,
            backstop: settings.scheduler_backstop,
            client,
            metrics,
            secrets,
        })
    }

    /// Claims and delivers due notifications until `shutdown`. POSTs still in flight then are
    /// dropped; their leases expire and another node (or this one restarted) posts them.
    pub async fn run(self, shutdown: CancellationToken) {
        let deliverer = Arc::new(self);
        let permits = Arc::new(Semaphore::new(CONCURRENT_DELIVERIES));
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            let free = permits.available_permits();
            if free > 0 {
                let now = now_millis();
                let lease_ms = deliverer.lease.as_millis() as i64;
                match deliverer
                    .store
                    .claim_due_notifications(&deliverer.node, now, lease_ms, free)
                    .await
                {
                    Ok(claims) => {
                        for claim in claims {
                            let Ok(permit) = permits.clone().try_acquire_owned() else {
                                break;
                            };
                            let deliverer = deliverer.clone();
                            in_flight.spawn(async move {
                                deliverer.deliver(claim).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming notifications failed"),
                }
            }
            let now = now_millis();
            let next = deliverer
                .store
                .next_notification_due_after(now)
                .await
                .unwrap_or(None);
            let wait = next
                .map(|at| Duration::from_millis((at - now).max(0) as u64))
                .unwrap_or(deliverer.backstop)
                .min(deliverer.backstop);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
        }
        in_flight.abort_all();
    }

    async fn deliver(&self, claim: ClaimedNotification) {
        let attempt = claim.attempts + 1;
        let started_at = now_millis();
        let notifier = self.notifiers.get(&claim.notifier).cloned();
        let answer = match &notifier {
            None => Answer::Impossible(format!(
                "no notifier {:?} in the config of node {}",
                claim.notifier, self.node
            )),
            Some(notifier) => match self.post(notifier, &claim).await {
                Some(answer) => answer,
                // The lease was lost mid-POST: another node has the delivery now.
                None => return,
            },
        };
        let finished_at = now_millis();
        let (status_code, error, next) = match answer {
            Answer::Delivered(code) => (Some(code), None, DeliveryNext::Delivered),
            Answer::Impossible(error) => (None, Some(error), DeliveryNext::GiveUp),
            Answer::Refused(code, error) => {
                let notifier = notifier.as_ref().expect("a refusal comes from a post");
                let jitter = 0.8 + fastrand::f64() * 0.4;
                let delay = notifier.retry.delay(attempt).as_millis() as f64 * jitter;
                let at = finished_at + delay as i64;
                let give_up_at = claim.created_at + notifier.max_delivery.as_millis() as i64;
                let next = if at > give_up_at {
                    DeliveryNext::GiveUp
                } else {
                    DeliveryNext::RetryAt(at)
                };
                (code, Some(error), next)
            }
        };
        let record = DeliveryAttempt {
            attempt,
            node: self.node.clone(),
            started_at,
            duration_ms: finished_at - started_at,
            status_code,
            error,
        };
        match self
            .store
            .record_delivery_attempt(&claim, &record, next)
            .await
        {
            Ok(()) => {
                let result = match next {
                    DeliveryNext::Delivered => "delivered",
                    DeliveryNext::RetryAt(_) => "retried",
                    DeliveryNext::GiveUp => "failed",
                };
                self.metrics.record_notification(&claim.notifier, result);
                match next {
                    DeliveryNext::Delivered => {}
                    _ => tracing::warn!(
                        notifier = %claim.notifier,
                        run_id = %claim.run_id,
                        attempt,
                        error = record.error.as_deref().unwrap_or_default(),
                        "notification not delivered ({result})"
                    ),
                }
            }
            Err(Error::LeaseLost(_)) => {
                tracing::info!(delivery = %claim.id, "another node took the delivery over; this attempt is not recorded");
            }
            Err(error) => {
                tracing::warn!(%error, delivery = %claim.id, "recording a delivery attempt failed")
            }
        }
    }

    /// POSTs the notification, renewing the lease meanwhile; `None` when the lease was lost.
    async fn post(&self, notifier: &Notifier, claim: &ClaimedNotification) -> Option<Answer> {
        let run = match self.store.find_run(&claim.run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => {
                return Some(Answer::Impossible(
                    "the run no longer exists (retention deleted it)".into(),
                ));
            }
            Err(error) => return Some(Answer::Refused(None, format!("reading the run: {error}"))),
        };
        let public_url = self.public_url.as_deref();
        let body = match claim.event {
            NotifyEvent::ShadowPromoted | NotifyEvent::ShadowDropped => {
                let shadow = match self
                    .store
                    .shadow_of_version(&run.plugin_name, &run.plugin_version)
                    .await
                {
                    Ok(Some(shadow)) => shadow,
                    Ok(None) => {
                        return Some(Answer::Impossible("the shadow no longer exists".into()));
                    }
                    Err(error) => {
                        return Some(Answer::Refused(
                            None,
                            format!("reading the shadow: {error}"),
                        ));
                    }
                };
                message::shadow_body(notifier.format, claim.event, &shadow, &run, public_url)
            }
            _ => message::body(notifier.format, claim.event, &run, public_url),
        };
        let body = body.to_string();
        let mut request = self
            .client
            .post(&notifier.url)
            .timeout(notifier.timeout)
            .header("x-stepwise-delivery", &claim.id)
            .header("x-stepwise-event", claim.event.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &notifier.secret {
            let secrets = self.secrets.current();
            let Some(key) = secrets.value_of(secret) else {
                return Some(Answer::Impossible(format!(
                    "secret {secret:?} is not loaded"
                )));
            };
            let signature = message::signature(key, now_millis() / 1000, &body);
            request = request.header(message::SIGNATURE_HEADER, signature);
        }
        let send = request.body(body).send();
        let lease_ms = self.lease.as_millis() as i64;
        let keep_lease = async {
            let mut every = tokio::time::interval(self.lease / 3);
            every.tick().await;
            loop {
                every.tick().await;
                match self
                    .store
                    .renew_notification_lease(&claim.id, claim.lease_token, lease_ms)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(error) => tracing::warn!(%error, "renewing a delivery's lease failed"),
                }
            }
        };
        let response = tokio::select! {
            response = send => response,
            _ = keep_lease => return None,
        };
        Some(match response {
            Ok(response) if response.status().is_success() => {
                Answer::Delivered(response.status().as_u16())
            }
            Ok(response) => Answer::Refused(
                Some(response.status().as_u16()),
                format!("the receiver answered {}", response.status()),
            ),
            // Without the URL: a webhook's path is often its secret, and attempts are shown
            // to every viewer.
            Err(error) => Answer::Refused(None, describe(error.without_url())),
        })
    }
}

/// An error with its causes, as one line.
fn describe(error: reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
