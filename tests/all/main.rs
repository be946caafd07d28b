//! The integration suite: the real server on 127.0.0.1:0 over a temp data dir, real plugins
//! compiled to wasm32-wasip2 by `build.rs`, and local HTTP servers as the systems under check.
//! Every server test runs against both storage backends.

// Deliberate: `suite/` is compiled once per backend.
#![allow(clippy::duplicate_mod)]

mod dashboard;
mod dev;
mod runtime;
mod support;
mod traces;

/// The server tests on SQLite, the embedded default.
#[path = "suite/mod.rs"]
mod sqlite;

/// The same tests on PostgreSQL, each test in a database of its own.
#[cfg(postgres_suite)]
#[path = "suite/mod.rs"]
mod postgres;

/// Several nodes on one PostgreSQL database.
#[cfg(postgres_suite)]
mod cluster;

#[cfg(not(postgres_suite))]
#[test]
fn postgres_suite_skipped_as_stepwise_test_postgres_url_is_unset() {
    eprintln!(
        "SKIPPED: the suite on PostgreSQL and the cluster tests; set STEPWISE_TEST_POSTGRES_URL \
         (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run them"
    );
}
