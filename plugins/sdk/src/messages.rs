//! What was published on the message sources granted to the plugin, since the run started:
//! `find` asks the host for the messages on a subject (within the grant's `subjects`) that
//! meet every condition, oldest first. The host tests the conditions, so a step never pulls a
//! whole subject. Errors have the same kinds as [`crate::sql`]'s, and one more:
//! `WindowLost`, when the host cannot say what was published since the run started.
//!
//! ```ignore
//! use stepwise_plugin::messages::{self, Filter};
//! let found = messages::find("bus", "events.collected", &Filter::new().json_field("event_id", "evt-1"), 1)?;
//! ```

use crate::bindings::stepwise::plugin::messages as host;

pub use crate::bindings::stepwise::plugin::messages::{
    Condition, FieldEquals, Message, MessagesError,
};

/// The conditions of a `find`, all of which a message must meet.
#[derive(Debug, Clone, Default)]
pub struct Filter(Vec<Condition>);

impl Filter {
    pub fn new() -> Filter {
        Filter::default()
    }

    /// A field of the payload read as JSON, by its dotted path (`user.id`, `items.0.sku`),
    /// equals `equals`: a string field its text, any other its JSON text (`42`, `true`).
    pub fn json_field(mut self, path: &str, equals: &str) -> Filter {
        self.0.push(Condition::JsonField(FieldEquals {
            name: path.to_owned(),
            equals: equals.to_owned(),
        }));
        self
    }

    /// A header equals `equals` (its name without regard to case).
    pub fn header(mut self, name: &str, equals: &str) -> Filter {
        self.0.push(Condition::Header(FieldEquals {
            name: name.to_owned(),
            equals: equals.to_owned(),
        }));
        self
    }
}

/// The messages on `subject` since the run started that meet `filter`, oldest first, at most
/// `limit` (1 to 1000).
pub fn find(
    source: &str,
    subject: &str,
    filter: &Filter,
    limit: u32,
) -> Result<Vec<Message>, MessagesError> {
    host::find(source, subject, &filter.0, limit)
}

impl Message {
    /// The payload as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The payload read as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            format!(
                "message {} on {} is not the JSON expected: {error}",
                self.position, self.subject
            )
        })
    }

    /// A header's value (its name without regard to case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// The error as a step message: its kind, then the host's words.
pub fn error_message(error: &MessagesError) -> String {
    match error {
        MessagesError::Denied(message) => format!("denied: {message}"),
        MessagesError::ReadOnly(message) => format!("read-only: {message}"),
        MessagesError::LimitExceeded(message) => format!("limit exceeded: {message}"),
        MessagesError::QueryFailed(message) => format!("query failed: {message}"),
        MessagesError::WindowLost(message) => format!("window lost: {message}"),
    }
}
