//! The operator's data sources (`[sources.*]` in `stepwise.toml`), each served by the
//! capability of its kind: SQL databases by `sql`, Redis by `kv`. One grant key,
//! `sql_sources`, names sources of both kinds; a call of one kind on a source of the other is
//! denied like an unknown source.

use std::collections::BTreeMap;

use super::kv::{self, KvSources};
use super::sql::{self, SqlSources};
use crate::config::SourceConfig;

/// Every configured source, connected lazily, shared by all step calls.
#[derive(Clone, Default)]
pub struct DataSources {
    pub sql: SqlSources,
    pub kv: KvSources,
}

impl DataSources {
    /// Reads every source's URL, by its scheme, without connecting.
    pub fn connect_lazy(configs: &BTreeMap<String, SourceConfig>) -> anyhow::Result<DataSources> {
        for (name, config) in configs {
            anyhow::ensure!(
                sql::is_sql_url(&config.url) || kv::is_url(&config.url),
                "source {name}: url must start with sqlite:, postgres:, mysql:, redis: or rediss:"
            );
        }
        Ok(DataSources {
            sql: SqlSources::connect_lazy(configs)?,
            kv: KvSources::from_configs(
                configs.iter().filter(|(_, config)| kv::is_url(&config.url)),
            )?,
        })
    }

    /// The checks of every source at start: see [`SqlSources::check_at_start`] and
    /// [`KvSources::check_at_start`].
    pub async fn check_at_start(
        &self,
        configs: &BTreeMap<String, SourceConfig>,
        host_database_url: &str,
    ) -> anyhow::Result<()> {
        self.sql.check_at_start(configs, host_database_url).await?;
        self.kv.check_at_start().await;
        Ok(())
    }
}
