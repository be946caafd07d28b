//! Ids, enums and plain records shared by every layer. No I/O, no serde, no sqlx: the wire
//! formats belong to `api` (JSON), `storage` (SQL) and `bindings` (WIT).
//! Split by concept: `ids`, `run` (statuses and what `describe` reports), `access` (roles and
//! actors), `notify`, `ranges` (of every number an operator sets), `retention`, `schedule`, `secret` (where a secret may go),
//! `shadow` (a shadow version against the active one), `status` (status pages and their daily aggregates).

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mod access;
mod ids;
mod notify;
mod ranges;
mod retention;
mod run;
mod schedule;
mod secret;
mod shadow;
mod status;
#[cfg(test)]
mod tests;

pub use access::*;
pub use ids::*;
pub use notify::*;
pub use ranges::*;
pub use retention::*;
pub use run::*;
pub use schedule::*;
pub use secret::*;
pub use shadow::*;
pub use status::*;

/// Milliseconds since the Unix epoch: the one time representation stored and compared.
pub type UnixMillis = i64;

/// A time as the API and notifications show it: RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(millis: UnixMillis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}
