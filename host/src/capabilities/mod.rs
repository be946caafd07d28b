//! Host implementations of the interfaces a plugin may import, one file per WIT interface, each
//! with its own state. Every capability is default-deny: it does only what the plugin's grant
//! lists. Uses `bindings` and `model` only; never storage, never the scheduler.

pub mod grants;
pub mod http;
pub mod log;
pub mod sql;
