//! The tracing subscriber on stderr, filtered by `STEPWISE_LOG` (default `info`): one line per
//! record, plain text (coloured only on a terminal, so log files hold no escape codes), or one
//! JSON object per line with `STEPWISE_LOG_FORMAT=json` for log shippers.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("STEPWISE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("STEPWISE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            eprintln!("warning: STEPWISE_LOG_FORMAT={other:?} is not text or json; using text");
            false
        }
    };
    // A second init (tests start several servers in one process) is harmless; ignore it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
}
