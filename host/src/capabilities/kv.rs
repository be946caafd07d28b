//! `stepwise:plugin/kv`: typed reads of the Redis sources named in the host's config
//! (`[sources.*]` with a `redis://` or `rediss://` URL) and granted to the plugin. Each call is
//! one read command that the host builds itself (`resp.rs`): there is no raw command, so no
//! write, `EVAL`, `KEYS`, `CONFIG`, `MONITOR`, `SUBSCRIBE`, `FLUSH*` or `DEBUG` can be sent.
//! A call's reply is read within the result byte budget (`sql_result_bytes`, refused before a
//! value past it is read) and its time (`sql_timeout_ms`); one step call makes at most
//! [`MAX_COMMANDS_PER_CALL`] commands, so a `SCAN` loop ends. Passing a limit is a
//! [`Violation`]. Waiting for a connection, or a source that is down, is the host's problem.

mod resp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::HasData;

use super::recording::Tape;
use super::{HostFault, Violation};
use crate::bindings::kv::{Host, KvError, ScanPage, ScoredMember, StreamEntry};
use crate::config::SourceConfig;
use resp::{Connection, ReadError, Reply, Target};

pub use resp::is_url;

/// How many commands one step call may send to key-value sources, all together.
pub const MAX_COMMANDS_PER_CALL: u32 = 1_000;
/// The most keys one `SCAN` may ask for.
const MAX_SCAN_COUNT: u32 = 1_000;
/// The most entries one `XRANGE` or `XREVRANGE` may ask for.
const MAX_STREAM_COUNT: u32 = 10_000;
/// Connections to one source at once.
const CONNECTIONS: usize = 4;
/// How long a call waits for a connection of a busy source; like the SQL sources' pool wait,
/// the host's time, not the plugin's.
const POOL_WAIT: Duration = Duration::from_secs(2);

/// Every configured Redis source, connected lazily, shared by all step calls.
#[derive(Clone, Default)]
pub struct KvSources {
    sources: Arc<HashMap<String, KvSource>>,
}

struct KvSource {
    target: Target,
    /// Connections that finished their last command cleanly.
    idle: Mutex<Vec<Connection>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl KvSources {
    /// Reads every Redis source's URL without connecting. A Redis source is read-only by
    /// construction, so `read_only = false` is a mistake to say, not a setting to ignore.
    pub fn from_configs<'a>(
        configs: impl IntoIterator<Item = (&'a String, &'a SourceConfig)>,
    ) -> anyhow::Result<KvSources> {
        let mut sources = HashMap::new();
        for (name, config) in configs {
            anyhow::ensure!(
                config.read_only,
                "source {name}: a Redis source is read-only (a plugin may only read it); remove read_only = false"
            );
            let target = Target::parse(&config.url)
                .map_err(|error| anyhow::anyhow!("source {name}: {error}"))?;
            sources.insert(
                name.clone(),
                KvSource {
                    target,
                    idle: Mutex::new(Vec::new()),
                    slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS)),
                },
            );
        }
        Ok(KvSources {
            sources: Arc::new(sources),
        })
    }

    /// Warns, naming the source and the recipe, about a source whose ACL user may write: the
    /// host sends it only reads, but a credential that can write is more than it needs. A
    /// source that cannot be reached is only logged.
    pub async fn check_at_start(&self) {
        for (name, source) in self.sources.iter() {
            let mut connection =
                match Connection::open(&source.target, Duration::from_secs(5)).await {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(source = %name, %error, "kv source unreachable at start");
                        continue;
                    }
                };
            // `EXPIRE` of a key that does not exist changes nothing, but the server checks
            // the user's right to write before it looks for the key.
            let probe = format!("stepwise:write-probe:{}", uuid::Uuid::now_v7());
            if let Ok(Reply::Integer(_)) = connection
                .call(&[b"EXPIRE", probe.as_bytes(), b"1"], 1024)
                .await
            {
                tracing::warn!(
                    source = %name,
                    "kv source {name:?} connects as ACL user {:?}, which may write. Plugins only \
                     read through it, but give it a user that may only read: ACL SETUSER \
                     stepwise_reader on >PASSWORD ~* resetchannels -@all +@read (and +select \
                     for a database other than 0)",
                    source.target.user()
                );
            }
        }
    }
}

/// State of the `kv` interface for one step call.
pub struct KvState {
    pub sources: KvSources,
    /// Source names from the plugin's grant.
    pub granted: Vec<String>,
    pub max_result_bytes: usize,
    pub timeout: Duration,
    /// Commands this call may still send.
    pub commands_left: u32,
    pub violation: Violation,
    pub tape: Tape,
}

/// `HasData` marker so the generated `add_to_linker` hands the host `&mut KvState`.
pub struct KvCapability;

impl HasData for KvCapability {
    type Data<'a> = &'a mut KvState;
}

type CallResult<T> = wasmtime::Result<Result<T, KvError>>;

/// Field-value pairs (a hash, a stream entry), as Redis keeps them.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

impl KvState {
    /// Sends one command to `source` and returns its reply, or the error the guest gets;
    /// through the call's tape, so that every typed call is recorded and replayed as the one
    /// command it sends.
    async fn call(&mut self, source: &str, command: &[&[u8]]) -> CallResult<Reply> {
        let tape = self.tape.clone();
        let request = || {
            let command: Vec<String> = command
                .iter()
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect();
            serde_json::json!({ "source": source, "command": command })
        };
        tape.exchange("kv", request, self.call_live(source, command))
            .await
    }

    async fn call_live(&mut self, source: &str, command: &[&[u8]]) -> CallResult<Reply> {
        if !self.granted.iter().any(|granted| granted == source) {
            return Ok(Err(KvError::Denied(format!(
                "kv source {source:?} is not granted to this plugin"
            ))));
        }
        let Some(target) = self.sources.sources.get(source) else {
            return Ok(Err(KvError::Denied(format!(
                "kv source {source:?} is not a Redis source configured on this host"
            ))));
        };
        if self.commands_left == 0 {
            return Ok(Err(self.limit(format!(
                "kv command limit of {MAX_COMMANDS_PER_CALL} per call exceeded"
            ))));
        }
        self.commands_left -= 1;
        let unavailable = |error: &dyn std::fmt::Display| {
            wasmtime::Error::new(HostFault(format!(
                "kv source {source:?} unavailable: {error}"
            )))
        };
        let slot = tokio::time::timeout(POOL_WAIT, target.slots.clone().acquire_owned())
            .await
            .map_err(|_| unavailable(&"no connection free within 2 s"))?
            .map_err(|error| unavailable(&error))?;
        let idle = target
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .pop();
        let mut connection = match idle {
            Some(connection) => connection,
            None => Connection::open(&target.target, POOL_WAIT)
                .await
                .map_err(|error| unavailable(&error))?,
        };
        let reply = tokio::time::timeout(
            self.timeout,
            connection.call(command, self.max_result_bytes),
        )
        .await;
        let reply = match reply {
            Err(_elapsed) => {
                return Ok(Err(self.limit(format!(
                    "kv time limit of {} ms exceeded",
                    self.timeout.as_millis()
                ))));
            }
            Ok(Err(ReadError::TooBig)) => {
                return Ok(Err(self.limit(format!(
                    "kv result size limit of {} bytes exceeded",
                    self.max_result_bytes
                ))));
            }
            Ok(Err(ReadError::Io(error))) => return Err(unavailable(&error)),
            Ok(Err(ReadError::Protocol(error))) => return Err(unavailable(&error)),
            Ok(Ok(reply)) => reply,
        };
        // Only a connection whose reply was read whole can take the next command.
        target
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(connection);
        drop(slot);
        Ok(match reply {
            Reply::Error(message) if message.starts_with("NOPERM") => Err(KvError::Denied(
                format!("kv source {source:?} refused the command: {message}"),
            )),
            Reply::Error(message) => Err(KvError::QueryFailed(message)),
            reply => Ok(reply),
        })
    }

    fn limit(&self, limit: String) -> KvError {
        self.violation.record(limit.clone());
        KvError::LimitExceeded(limit)
    }
}

/// A reply of another shape than the command's.
fn unexpected(reply: &Reply) -> KvError {
    KvError::QueryFailed(format!("unexpected reply from the server: {reply:?}"))
}

fn optional_bytes(reply: Reply) -> Result<Option<Vec<u8>>, KvError> {
    match reply {
        Reply::Bulk(value) => Ok(value),
        other => Err(unexpected(&other)),
    }
}

fn elements(reply: Reply) -> Result<Vec<Reply>, KvError> {
    match reply {
        Reply::Array(Some(elements)) => Ok(elements),
        Reply::Array(None) => Ok(Vec::new()),
        other => Err(unexpected(&other)),
    }
}

fn bytes_list(reply: Reply) -> Result<Vec<Vec<u8>>, KvError> {
    elements(reply)?
        .into_iter()
        .map(|element| optional_bytes(element)?.ok_or_else(|| unexpected(&Reply::Bulk(None))))
        .collect()
}

fn optional_bytes_list(reply: Reply) -> Result<Vec<Option<Vec<u8>>>, KvError> {
    elements(reply)?.into_iter().map(optional_bytes).collect()
}

fn pairs(reply: Reply) -> Result<Pairs, KvError> {
    let flat = bytes_list(reply)?;
    if flat.len() % 2 != 0 {
        return Err(KvError::QueryFailed(
            "unexpected reply from the server: an odd number of elements".into(),
        ));
    }
    let mut flat = flat.into_iter();
    let mut pairs = Vec::new();
    while let (Some(first), Some(second)) = (flat.next(), flat.next()) {
        pairs.push((first, second));
    }
    Ok(pairs)
}

fn integer(reply: Reply) -> Result<i64, KvError> {
    match reply {
        Reply::Integer(value) => Ok(value),
        other => Err(unexpected(&other)),
    }
}

fn count(reply: Reply) -> Result<u64, KvError> {
    let value = integer(reply)?;
    u64::try_from(value).map_err(|_| unexpected(&Reply::Integer(value)))
}

/// A score as Redis writes it (`1.5`, `inf`, `-inf`).
fn score(bytes: &[u8]) -> Result<f64, KvError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| unexpected(&Reply::Bulk(Some(bytes.to_vec()))))
}

fn stream_entries(reply: Reply) -> Result<Vec<StreamEntry>, KvError> {
    elements(reply)?
        .into_iter()
        .map(|entry| {
            let mut parts = elements(entry)?.into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                return Err(KvError::QueryFailed(
                    "unexpected reply from the server: a stream entry without id and fields".into(),
                ));
            };
            let id = optional_bytes(id)?.unwrap_or_default();
            Ok(StreamEntry {
                id: String::from_utf8_lossy(&id).into_owned(),
                fields: pairs(fields)?,
            })
        })
        .collect()
}

/// Runs one command and converts its reply, passing the guest's errors through.
macro_rules! read {
    ($state:expr, $source:expr, [$($argument:expr),+ $(,)?], $convert:expr) => {{
        let command: Vec<&[u8]> = vec![$(AsRef::<[u8]>::as_ref(&$argument)),+];
        Ok(match $state.call(&$source, &command).await? {
            Ok(reply) => $convert(reply),
            Err(error) => Err(error),
        })
    }};
}

fn within(name: &str, value: u32, max: u32) -> Result<(), KvError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(KvError::QueryFailed(format!(
            "{name} must be between 1 and {max}, not {value}"
        )))
    }
}

fn some_names(what: &str, names: &[String]) -> Result<(), KvError> {
    if names.is_empty() {
        return Err(KvError::QueryFailed(format!("name at least one {what}")));
    }
    Ok(())
}

impl Host for KvState {
    async fn get(&mut self, source: String, key: String) -> CallResult<Option<Vec<u8>>> {
        read!(self, source, [b"GET", key], optional_bytes)
    }

    async fn mget(
        &mut self,
        source: String,
        keys: Vec<String>,
    ) -> CallResult<Vec<Option<Vec<u8>>>> {
        if let Err(error) = some_names("key", &keys) {
            return Ok(Err(error));
        }
        let mut command: Vec<&[u8]> = vec![b"MGET"];
        command.extend(keys.iter().map(|key| key.as_bytes()));
        Ok(self
            .call(&source, &command)
            .await?
            .and_then(optional_bytes_list))
    }

    async fn exists(&mut self, source: String, key: String) -> CallResult<bool> {
        read!(self, source, [b"EXISTS", key], |reply| integer(reply)
            .map(|count| count > 0))
    }

    async fn ttl(&mut self, source: String, key: String) -> CallResult<i64> {
        read!(self, source, [b"TTL", key], integer)
    }

    async fn type_(&mut self, source: String, key: String) -> CallResult<String> {
        read!(self, source, [b"TYPE", key], |reply| match reply {
            Reply::Simple(kind) => Ok(kind),
            other => Err(unexpected(&other)),
        })
    }

    async fn hget(
        &mut self,
        source: String,
        key: String,
        field: String,
    ) -> CallResult<Option<Vec<u8>>> {
        read!(self, source, [b"HGET", key, field], optional_bytes)
    }

    async fn hgetall(&mut self, source: String, key: String) -> CallResult<Pairs> {
        read!(self, source, [b"HGETALL", key], pairs)
    }

    async fn hmget(
        &mut self,
        source: String,
        key: String,
        fields: Vec<String>,
    ) -> CallResult<Vec<Option<Vec<u8>>>> {
        if let Err(error) = some_names("field", &fields) {
            return Ok(Err(error));
        }
        let mut command: Vec<&[u8]> = vec![b"HMGET", key.as_bytes()];
        command.extend(fields.iter().map(|field| field.as_bytes()));
        Ok(self
            .call(&source, &command)
            .await?
            .and_then(optional_bytes_list))
    }

    async fn smembers(&mut self, source: String, key: String) -> CallResult<Vec<Vec<u8>>> {
        read!(self, source, [b"SMEMBERS", key], bytes_list)
    }

    async fn sismember(&mut self, source: String, key: String, member: String) -> CallResult<bool> {
        read!(self, source, [b"SISMEMBER", key, member], |reply| integer(
            reply
        )
        .map(|found| found == 1))
    }

    async fn scard(&mut self, source: String, key: String) -> CallResult<u64> {
        read!(self, source, [b"SCARD", key], count)
    }

    async fn lrange(
        &mut self,
        source: String,
        key: String,
        start: i64,
        stop: i64,
    ) -> CallResult<Vec<Vec<u8>>> {
        let (start, stop) = (start.to_string(), stop.to_string());
        read!(self, source, [b"LRANGE", key, start, stop], bytes_list)
    }

    async fn llen(&mut self, source: String, key: String) -> CallResult<u64> {
        read!(self, source, [b"LLEN", key], count)
    }

    async fn zrange(
        &mut self,
        source: String,
        key: String,
        start: i64,
        stop: i64,
    ) -> CallResult<Vec<ScoredMember>> {
        let (start, stop) = (start.to_string(), stop.to_string());
        read!(
            self,
            source,
            [b"ZRANGE", key, start, stop, b"WITHSCORES"],
            |reply| -> Result<Vec<ScoredMember>, KvError> {
                pairs(reply)?
                    .into_iter()
                    .map(|(member, score_text)| {
                        Ok(ScoredMember {
                            member,
                            score: score(&score_text)?,
                        })
                    })
                    .collect()
            }
        )
    }

    async fn zscore(
        &mut self,
        source: String,
        key: String,
        member: String,
    ) -> CallResult<Option<f64>> {
        read!(self, source, [b"ZSCORE", key, member], |reply| -> Result<
            Option<f64>,
            KvError,
        > {
            optional_bytes(reply)?.map(|text| score(&text)).transpose()
        })
    }

    async fn zcard(&mut self, source: String, key: String) -> CallResult<u64> {
        read!(self, source, [b"ZCARD", key], count)
    }

    async fn xrange(
        &mut self,
        source: String,
        key: String,
        start: String,
        end: String,
        count: u32,
    ) -> CallResult<Vec<StreamEntry>> {
        if let Err(error) = within("count", count, MAX_STREAM_COUNT) {
            return Ok(Err(error));
        }
        let count = count.to_string();
        read!(
            self,
            source,
            [b"XRANGE", key, start, end, b"COUNT", count],
            stream_entries
        )
    }

    async fn xrevrange(
        &mut self,
        source: String,
        key: String,
        end: String,
        start: String,
        count: u32,
    ) -> CallResult<Vec<StreamEntry>> {
        if let Err(error) = within("count", count, MAX_STREAM_COUNT) {
            return Ok(Err(error));
        }
        let count = count.to_string();
        read!(
            self,
            source,
            [b"XREVRANGE", key, end, start, b"COUNT", count],
            stream_entries
        )
    }

    async fn scan(
        &mut self,
        source: String,
        cursor: String,
        pattern: Option<String>,
        count: u32,
    ) -> CallResult<ScanPage> {
        if let Err(error) = within("count", count, MAX_SCAN_COUNT) {
            return Ok(Err(error));
        }
        let count = count.to_string();
        let mut command: Vec<&[u8]> = vec![b"SCAN", cursor.as_bytes()];
        if let Some(pattern) = &pattern {
            command.extend([b"MATCH".as_slice(), pattern.as_bytes()]);
        }
        command.extend([b"COUNT".as_slice(), count.as_bytes()]);
        Ok(self.call(&source, &command).await?.and_then(|reply| {
            let mut parts = elements(reply)?.into_iter();
            let (Some(cursor), Some(keys)) = (parts.next(), parts.next()) else {
                return Err(KvError::QueryFailed(
                    "unexpected reply from the server: a scan without cursor and keys".into(),
                ));
            };
            let cursor = optional_bytes(cursor)?.unwrap_or_default();
            Ok(ScanPage {
                cursor: String::from_utf8_lossy(&cursor).into_owned(),
                keys: bytes_list(keys)?,
            })
        }))
    }
}
