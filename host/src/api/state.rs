use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Settings;
use crate::registry::Registry;
use crate::scheduler::Wakeup;
use crate::scheduler::schedules::ScheduleWakeup;
use crate::storage::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub registry: Registry,
    pub settings: Arc<Settings>,
    pub wakeup: Wakeup,
    pub schedule_wakeup: ScheduleWakeup,
    plugins_loaded: Arc<AtomicBool>,
    /// The address the server actually bound (port 0 resolved): what `Host` must name.
    listen: SocketAddr,
}

impl AppState {
    pub fn new(
        store: Store,
        registry: Registry,
        settings: Arc<Settings>,
        wakeup: Wakeup,
        schedule_wakeup: ScheduleWakeup,
        listen: SocketAddr,
    ) -> AppState {
        AppState {
            store,
            registry,
            settings,
            wakeup,
            schedule_wakeup,
            plugins_loaded: Arc::default(),
            listen,
        }
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
