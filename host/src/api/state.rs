use crate::capabilities::messages::MessageSources;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::events::EventHub;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::scheduler::Wakeup;
use crate::scheduler::schedules::ScheduleWakeup;
use crate::storage::Store;

/// What every handler can reach. axum clones the state for every extractor and middleware
/// that takes it, several times a request: behind one `Arc`, a clone is one reference count
/// where the fields' own clones were about thirty, and three strings copied (measured: 8 % of
/// all CPU samples of `POST /v1/runs` under load went to cloning and dropping them).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl From<Shared> for AppState {
    fn from(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Store,
    pub registry: Registry,
    pub settings: Arc<Settings>,
    pub wakeup: Wakeup,
    pub schedule_wakeup: ScheduleWakeup,
    plugins_loaded: Arc<AtomicBool>,
    /// The address the server actually bound (port 0 resolved): what `Host` must name.
    listen: SocketAddr,
    pub metrics: Metrics,
    /// This node's id, whose leases `/metrics` counts.
    pub node_id: String,
    /// Live changes for the event streams.
    pub events: EventHub,
    /// The message sources, whose taps `/metrics` reports.
    pub message_sources: MessageSources,
    /// The status pages' last figures and anonymous readers.
    pub status: super::status::StatusPages,
}

impl Shared {
    pub fn new(
        store: Store,
        registry: Registry,
        settings: Arc<Settings>,
        wakeup: Wakeup,
        schedule_wakeup: ScheduleWakeup,
        listen: SocketAddr,
    ) -> Shared {
        Shared {
            message_sources: MessageSources::default(),
            events: EventHub::new(&settings),
            store,
            registry,
            settings,
            wakeup,
            schedule_wakeup,
            plugins_loaded: Arc::default(),
            listen,
            metrics: Metrics::default(),
            node_id: String::new(),
            status: Default::default(),
        }
    }

    pub fn with_metrics(mut self, metrics: Metrics, node_id: String) -> Shared {
        self.metrics = metrics;
        self.node_id = node_id;
        self
    }

    pub fn with_message_sources(mut self, sources: MessageSources) -> Shared {
        self.message_sources = sources;
        self
    }

    pub fn listen_address(&self) -> SocketAddr {
        self.listen
    }

    /// Called once the plugins directory has been loaded; `/readyz` waits for it.
    pub fn mark_plugins_loaded(&self) {
        self.plugins_loaded.store(true, Ordering::Release);
    }

    pub fn plugins_loaded(&self) -> bool {
        self.plugins_loaded.load(Ordering::Acquire)
    }
}
