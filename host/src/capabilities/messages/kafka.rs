//! Kafka sources, read with `rskafka`, a client with no consumer groups at all: the host
//! never joins a group or commits an offset, so the application's consumers see no change.
//! A subject is one topic. `find` asks each of its partitions for the first offset at or
//! after the run's creation (`ListOffsets` by timestamp) and for its end as it is now, fetches
//! what lies between, and hands the records to the filter oldest first, merged across
//! partitions by their timestamps. Nothing lives in the host: a restart changes nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::RecordAndOffset;

use super::ReplayError;
use crate::capabilities::wire;

/// Brokers as the URL names them: `kafka://[user:password@]host:port[,host:port…]`, or
/// `kafka+tls://` for TLS; a user and password log in with SASL PLAIN.
#[derive(Clone, Debug)]
pub(super) struct Target {
    brokers: Vec<String>,
    tls: bool,
    credentials: Option<(String, String)>,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        let invalid = |why: &str| {
            format!(
                "url must be kafka://[user:password@]host:port[,host:port…] or kafka+tls://…: {why}"
            )
        };
        let (tls, rest) = wire::after_scheme(url, "kafka", "kafka+tls")
            .ok_or_else(|| invalid("unknown scheme"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['?', '#', '/']) {
            return Err(invalid("no path, query or fragment"));
        }
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, rest),
        };
        let mut credentials = None;
        let mut brokers = Vec::new();
        for (index, host) in hosts.split(',').enumerate() {
            let authority = match (index, userinfo) {
                (0, Some(userinfo)) => format!("{userinfo}@{host}"),
                _ => host.to_owned(),
            };
            let authority = wire::Authority::parse(&authority).map_err(invalid)?;
            if let Some((user, password)) = authority.userinfo {
                credentials = Some((user, password.unwrap_or_default()));
            }
            let port = authority.port.unwrap_or(9092);
            brokers.push(if authority.host.contains(':') {
                format!("[{}]:{port}", authority.host)
            } else {
                format!("{}:{port}", authority.host)
            });
        }
        Ok(Target {
            brokers,
            tls,
            credentials,
        })
    }
}

/// Whether `pattern` is a topic, or in a grant a prefix of topics ending in `*`.
pub(super) fn check_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    if pattern.is_empty()
        || pattern.len() > 249
        || !name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{pattern:?} is not a Kafka topic (letters, digits, '.', '_' and '-'; a grant may end one in '*')"
        ));
    }
    Ok(())
}

/// Whether every topic `inner` names is named by `outer`: the same topic, or a prefix `*`
/// that covers it.
pub(super) fn covers(outer: &str, inner: &str) -> bool {
    match outer.strip_suffix('*') {
        Some(prefix) => inner.starts_with(prefix),
        None => outer == inner,
    }
}

/// The largest record batch the host reads, whatever the broker's own limit.
const MAX_MESSAGE: usize = 16 << 20;
/// How many bytes one fetch asks of a partition (a record batch larger than this comes whole,
/// within [`MAX_MESSAGE`]).
const FETCH_BYTES: i32 = 1 << 20;

/// The client of one source, made at its first call and again after a failure.
#[derive(Default)]
pub(super) struct Clients {
    client: Mutex<Option<Arc<Client>>>,
}

impl Clients {
    async fn get(&self, target: &Target) -> Result<Arc<Client>, String> {
        if let Some(client) = self
            .client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
        {
            return Ok(client);
        }
        let mut builder = ClientBuilder::new(target.brokers.clone())
            .client_id("stepwise")
            .max_message_size(MAX_MESSAGE)
            .backoff_config(rskafka::BackoffConfig {
                deadline: Some(Duration::from_secs(2)),
                ..Default::default()
            });
        if target.tls {
            builder = builder.tls_config(Arc::clone(&crate::capabilities::http::connect::TLS));
        }
        if let Some((user, password)) = &target.credentials {
            builder = builder.sasl_config(SaslConfig::Plain(Credentials::new(
                user.clone(),
                password.clone(),
            )));
        }
        let client = Arc::new(builder.build().await.map_err(|error| error.to_string())?);
        *self
            .client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// Forgets a client that failed: the next call makes another.
    fn failed(&self) {
        *self
            .client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = None;
    }

    /// Whether the brokers can be reached (for the warning at start).
    pub(super) async fn check(&self, target: &Target, within: Duration) -> Result<(), String> {
        tokio::time::timeout(within, self.get(target))
            .await
            .map_err(|_| format!("no answer within {} ms", within.as_millis()))?
            .map(drop)
    }
}

/// One record of a replay, for `each`.
pub(super) struct Replayed<'a> {
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
    pub published_at_ms: u64,
    pub offset: u64,
}

/// One partition's part of a replay: the records fetched and not yet handed on, and where
/// the next fetch starts and the replay ends.
struct Partition {
    client: PartitionClient,
    number: i32,
    next: i64,
    end: i64,
    /// The run's creation: a record stamped before it is passed over, whatever offset the
    /// broker gave for that time (brokers differ on a time past their last record).
    since: chrono::DateTime<chrono::Utc>,
    fetched: VecDeque<RecordAndOffset>,
}

impl Partition {
    /// Fetches until a record is at hand or the end is reached.
    async fn fill(&mut self) -> Result<(), ReplayError> {
        while self.fetched.is_empty() && self.next < self.end {
            let (records, _) = self
                .client
                .fetch_records(self.next, 1..FETCH_BYTES, 0)
                .await
                .map_err(|error| ReplayError::Connection(error.to_string()))?;
            let Some(last) = records.last().map(|record| record.offset) else {
                // Nothing more (compaction or deletion left a gap up to the end).
                self.next = self.end;
                break;
            };
            let (next, end, since) = (self.next, self.end, self.since);
            self.fetched.extend(records.into_iter().filter(|record| {
                record.offset >= next && record.offset < end && record.record.timestamp >= since
            }));
            self.next = last + 1;
        }
        Ok(())
    }
}

/// Reads topic `topic` from `since_ms`, oldest first across its partitions, handing each
/// record to `each` until it returns `false` or every partition reaches where it ended when
/// asked.
pub(super) async fn replay(
    clients: &Clients,
    target: &Target,
    topic: &str,
    since_ms: i64,
    mut each: impl FnMut(Replayed<'_>) -> bool,
) -> Result<(), ReplayError> {
    let replayed = async {
        let client = clients.get(target).await?;
        let topics = client
            .list_topics()
            .await
            .map_err(|error| ReplayError::Connection(error.to_string()))?;
        let Some(found) = topics.into_iter().find(|found| found.name == topic) else {
            return Err(ReplayError::Refused(format!("no topic {topic:?}")));
        };
        let since = chrono::DateTime::from_timestamp_millis(since_ms).unwrap_or_default();
        let mut partitions = Vec::new();
        for number in found.partitions {
            let client = client
                .partition_client(topic, number, UnknownTopicHandling::Error)
                .await
                .map_err(|error| ReplayError::Connection(error.to_string()))?;
            let client_ref = &client;
            let offset = |at| async move {
                client_ref
                    .get_offset(at)
                    .await
                    .map_err(|error| ReplayError::Connection(error.to_string()))
            };
            let end = offset(OffsetAt::Latest).await?;
            // No record at or after the time: the broker answers -1.
            let next = match offset(OffsetAt::Timestamp(since)).await? {
                -1 => end,
                next => next,
            };
            partitions.push(Partition {
                client,
                number,
                next,
                end,
                since,
                fetched: VecDeque::new(),
            });
        }
        loop {
            for partition in &mut partitions {
                partition.fill().await?;
            }
            let oldest = partitions
                .iter_mut()
                .filter(|partition| !partition.fetched.is_empty())
                .min_by_key(|partition| {
                    let head = &partition.fetched[0];
                    (head.record.timestamp, partition.number)
                });
            let Some(partition) = oldest else {
                return Ok(());
            };
            let record = partition.fetched.pop_front().expect("a fetched record");
            let mut headers: Vec<(String, String)> = record
                .record
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
                .collect();
            if let Some(key) = &record.record.key {
                headers.push((
                    "kafka-key".into(),
                    String::from_utf8_lossy(key).into_owned(),
                ));
            }
            headers.push(("kafka-partition".into(), partition.number.to_string()));
            let go_on = each(Replayed {
                headers: &headers,
                payload: record.record.value.as_deref().unwrap_or_default(),
                published_at_ms: record.record.timestamp.timestamp_millis().max(0) as u64,
                offset: record.offset.max(0) as u64,
            });
            if !go_on {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(ReplayError::Connection(_)) = &replayed {
        clients.failed();
    }
    replayed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_brokers_and_credentials() {
        let target = Target::parse("kafka://reader:s%40cret@k1:9093,k2").expect("valid");
        assert_eq!(target.brokers, ["k1:9093", "k2:9092"]);
        assert_eq!(
            target.credentials,
            Some(("reader".to_owned(), "s@cret".to_owned()))
        );
        assert!(!target.tls);
        assert!(Target::parse("kafka+tls://k1:9093").expect("valid").tls);
        for invalid in ["nats://k", "kafka://", "kafka://k/topic", "kafka://k:x"] {
            assert!(Target::parse(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn a_grant_names_topics_or_a_prefix() {
        assert!(check_pattern("events.collected").is_ok());
        assert!(check_pattern("events.*").is_ok());
        for invalid in ["", "events collected", "ev*nts", "a\r\nb"] {
            assert!(check_pattern(invalid).is_err(), "{invalid:?}");
        }
        assert!(covers("events.*", "events.collected"));
        assert!(covers("events.collected", "events.collected"));
        assert!(!covers("events.collected", "events.other"));
        assert!(!covers("events.*", "orders.collected"));
    }
}
