//! The operator's data sources (`[sources.*]` in `stepwise.toml`), each served by the
//! capability of its kind: a source with a `kind` (a message bus) by `messages`; otherwise by
//! its URL's scheme, SQL databases by `sql` and Redis by `kv`. One grant key, `sql_sources`,
//! names sources of every kind; a call of one kind on a source of another is denied like an
//! unknown source.

use std::collections::BTreeMap;

use super::kv::{self, KvSources};
use super::messages::{self, MessageSources};
use super::sql::{self, SqlSources};
use crate::config::SourceConfig;

/// Every configured source, connected lazily, shared by all step calls.
#[derive(Clone, Default)]
pub struct DataSources {
    pub sql: SqlSources,
    pub kv: KvSources,
    pub messages: MessageSources,
}

impl DataSources {
    /// Reads every source's config, by its kind or scheme, without connecting.
    pub fn connect_lazy(configs: &BTreeMap<String, SourceConfig>) -> anyhow::Result<DataSources> {
        let (buses, stores): (BTreeMap<_, _>, BTreeMap<_, _>) = configs
            .iter()
            .map(|(name, config)| (name.clone(), config.clone()))
            .partition(|(_, config)| messages::is_message_source(config));
        for (name, config) in &stores {
            anyhow::ensure!(
                sql::is_sql_url(&config.url) || kv::is_url(&config.url),
                "source {name}: url must start with sqlite:, postgres:, mysql:, redis: or rediss: (or the source names a kind of message bus: kind = \"nats\")"
            );
        }
        Ok(DataSources {
            sql: SqlSources::connect_lazy(&stores)?,
            kv: KvSources::from_configs(
                stores.iter().filter(|(_, config)| kv::is_url(&config.url)),
            )?,
            messages: MessageSources::from_configs(&buses)?,
        })
    }

    /// The checks of every source at start: see [`SqlSources::check_at_start`],
    /// [`KvSources::check_at_start`] and [`MessageSources::check_at_start`].
    pub async fn check_at_start(
        &self,
        configs: &BTreeMap<String, SourceConfig>,
        host_database_url: &str,
    ) -> anyhow::Result<()> {
        let stores = configs
            .iter()
            .filter(|(_, config)| !messages::is_message_source(config))
            .map(|(name, config)| (name.clone(), config.clone()))
            .collect();
        self.sql.check_at_start(&stores, host_database_url).await?;
        self.kv.check_at_start().await;
        self.messages.check_at_start().await;
        Ok(())
    }
}
