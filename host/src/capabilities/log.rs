//! `stepwise:plugin/log`: lines are kept (bounded) for the attempt record and emitted as tracing
//! events inside the run's span.

use std::sync::{Arc, Mutex};

use wasmtime::component::HasData;

use super::secrets::SecretSet;
use crate::bindings::log::{Host, Level};
use crate::model::{LogLevel, LogLine};

/// Most lines kept per step call; a plugin that logs in a loop must not fill the database.
const MAX_LINES: usize = 200;
/// Longest line kept, in bytes.
const MAX_LINE_BYTES: usize = 2048;

/// The lines of one step call, shared by every capability that records something on the
/// plugin's behalf (a denied request, for instance).
#[derive(Clone, Default)]
pub struct LogBuffer {
    inner: Arc<Mutex<LogLines>>,
    /// Every line is redacted before it is kept, so no secret's value reaches the attempt
    /// record or the host's log.
    secrets: Arc<SecretSet>,
}

#[derive(Default)]
struct LogLines {
    lines: Vec<LogLine>,
    dropped: u64,
}

impl LogBuffer {
    pub fn redacting(secrets: Arc<SecretSet>) -> LogBuffer {
        LogBuffer {
            inner: Arc::default(),
            secrets,
        }
    }

    /// Records a line, or counts it as dropped once the buffer is full; returns the line as
    /// kept (redacted, then cut to length).
    pub fn push(&self, level: LogLevel, message: &str) -> Option<String> {
        // A poisoned lock only means another capability panicked mid-push; the lines are
        // still usable.
        let mut lines = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if lines.lines.len() >= MAX_LINES {
            // Counted without copying: a plugin may log millions of lines in a loop.
            lines.dropped += 1;
            return None;
        }
        // Redacted whole, before it is cut: a cut value would no longer match.
        let mut message = storable(self.secrets.redact(message).into_owned());
        if message.len() > MAX_LINE_BYTES {
            truncate_utf8(&mut message, MAX_LINE_BYTES);
            message.push_str("… (truncated)");
        }
        lines.lines.push(LogLine {
            level,
            message: message.clone(),
        });
        Some(message)
    }

    /// The recorded lines, with a final line saying how many were dropped.
    pub fn take(&self) -> Vec<LogLine> {
        let mut lines = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut taken = std::mem::take(&mut lines.lines);
        if lines.dropped > 0 {
            taken.push(LogLine {
                level: LogLevel::Warn,
                message: format!(
                    "{} more log lines dropped (limit {MAX_LINES} per step call)",
                    lines.dropped
                ),
            });
            lines.dropped = 0;
        }
        taken
    }
}

/// Cuts `text` to at most `max_bytes`, at a character's boundary.
pub fn truncate_utf8(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// State of the `log` interface for one step call.
pub struct LogState {
    pub buffer: LogBuffer,
    pub tape: super::recording::Tape,
}

/// `HasData` marker so the generated `add_to_linker` hands the host `&mut LogState`.
pub struct LogCapability;

impl HasData for LogCapability {
    type Data<'a> = &'a mut LogState;
}

impl Host for LogState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        // Only kept lines reach the host's log too: a plugin logging in a loop must not flood it.
        let Some(kept) = self.buffer.push(level, &message) else {
            return Ok(());
        };
        self.tape.log(level.as_str(), &kept);
        // One field, escaped and bounded: a plugin's newlines, terminal escapes or fake
        // `key=value` text can never pass for a line or a field of the host's own.
        let line = host_log_field(&kept);
        match level {
            LogLevel::Trace => tracing::trace!(target: "plugin", line, "plugin log"),
            LogLevel::Debug => tracing::debug!(target: "plugin", line, "plugin log"),
            LogLevel::Info => tracing::info!(target: "plugin", line, "plugin log"),
            LogLevel::Warn => tracing::warn!(target: "plugin", line, "plugin log"),
            LogLevel::Error => tracing::error!(target: "plugin", line, "plugin log"),
        }
        Ok(())
    }
}

/// A plugin's line as the host logs it: quoted, with every control character, quote and
/// backslash escaped, and cut to `MAX_LINE_BYTES`.
fn host_log_field(message: &str) -> String {
    let mut cut = message.len().min(MAX_LINE_BYTES);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut field = format!("{:?}", &message[..cut]);
    if cut < message.len() {
        field.push('…');
    }
    field
}

/// `text` as the database can keep it: PostgreSQL's text cannot hold NUL, which a plugin may
/// put anywhere; it becomes U+FFFD, every other character stays.
pub fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_line_cannot_forge_a_host_line() {
        let forged = "ok\n2026-11-29T00:00:00Z  INFO stepwise_host: admin token created \u{1b}[2J";
        let field = host_log_field(forged);
        assert!(
            !field.contains('\n') && !field.contains('\u{1b}'),
            "{field}"
        );
        assert!(field.starts_with('"') && field.contains("\\n"), "{field}");
        let long = host_log_field(&"é".repeat(MAX_LINE_BYTES));
        assert!(
            long.len() < MAX_LINE_BYTES + 16 && long.ends_with('…'),
            "{long}"
        );
    }
}
