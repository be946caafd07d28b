//! Host implementations of the interfaces a plugin may import, one file per WIT interface, each
//! with its own state. Every capability is default-deny: it does only what the plugin's grant
//! lists. Uses `bindings` and `model` only; never storage, never the scheduler.

pub mod grants;
pub mod http;
pub mod kv;
pub mod log;
pub mod messages;
pub mod recording;
pub mod secrets;
pub mod sources;
pub mod sql;
mod wire;

use std::sync::{Arc, Mutex};

/// The first resource limit a capability saw the plugin exceed during one call (an HTTP
/// response too large, a query too slow, ...). The capability still answers the guest with an
/// error, but whatever the guest makes of it, the attempt ends `errored` with this text: a
/// limit is the host's verdict, not the check's.
#[derive(Clone, Default)]
pub struct Violation {
    first: Arc<Mutex<Option<String>>>,
}

impl Violation {
    /// Records `limit` unless an earlier one was recorded.
    pub fn record(&self, limit: String) {
        let mut first = self
            .first
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        first.get_or_insert(limit);
    }

    pub fn take(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
    }
}

/// A failure on the host's side during a call (a data source's pool exhausted or down): not
/// the plugin's fault. A capability returns it as the call's trap; the runtime reports the
/// call as a host fault, the tick is retried later, and the run is not charged.
#[derive(Debug)]
pub struct HostFault(pub String);

impl std::fmt::Display for HostFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostFault {}
