//! Every test that runs a server. `main.rs` compiles this directory twice: as `sqlite` and, when
//! `STEPWISE_TEST_POSTGRES_URL` is set at build time, as `postgres`; `TestServer` picks the
//! database from the module its test is in.

mod api;
mod attempts;
mod auth;
mod budgets;
mod cli;
mod connections;
mod demo;
mod escapes;
mod events;
mod hostile;
mod http_status;
mod kafka_sources;
mod leases;
mod metrics;
mod mqtt_sources;
mod mysql_sources;
mod nats_sources;
mod notify;
mod openapi;
mod publishers;
mod rabbitmq_sources;
mod recordings;
mod redis_sources;
mod registry;
mod retention;
mod sandbox;
mod schedules;
mod secrets;
mod shadows;
mod status_pages;
mod steps;
mod validation;
