//! The integration suite: the real server on 127.0.0.1:0, SQLite in a temp dir, real plugins
//! compiled to wasm32-wasip2 by `build.rs`, and local HTTP servers as the systems under check.

mod api;
mod demo;
mod dev;
mod hostile;
mod http_status;
mod registry;
mod sandbox;
mod schedules;
mod steps;
mod support;
