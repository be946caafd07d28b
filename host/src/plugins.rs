//! Loading plugins from `<data>/plugins` at start: each `<name>.wasm`, with the grant from
//! `<name>.toml` beside it (no manifest, no capabilities), is compiled, described, stored by
//! content hash and activated. A file that fails is logged with the reason and skipped; the
//! version already active for that name keeps serving.

use std::path::Path;

use anyhow::Context;

use crate::config::{Settings, parse_grant};
use crate::model::{PluginName, PluginVersion, now_millis};
use crate::runtime::Runtime;
use crate::storage::Store;

/// Loads every plugin file in the plugins directory; returns how many were activated.
pub async fn load_directory(
    store: &Store,
    runtime: &Runtime,
    settings: &Settings,
) -> anyhow::Result<usize> {
    let dir = settings.plugins_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "wasm")
        })
        .collect();
    paths.sort();
    let mut activated = 0;
    for path in paths {
        match load_file(store, runtime, settings, &path).await {
            Ok((name, version)) => {
                activated += 1;
                tracing::info!(plugin = %name, %version, file = %path.display(), "plugin activated");
            }
            Err(error) => tracing::error!(file = %path.display(), "plugin rejected: {error:#}"),
        }
    }
    Ok(activated)
}

async fn load_file(
    store: &Store,
    runtime: &Runtime,
    settings: &Settings,
    path: &Path,
) -> anyhow::Result<(PluginName, PluginVersion)> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default();
    let name = PluginName::parse(stem).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let manifest = path.with_extension("toml");
    let grant_toml = match std::fs::read_to_string(&manifest) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", manifest.display())),
    };
    let grant = parse_grant(&grant_toml).with_context(|| format!("in {}", manifest.display()))?;
    for source in &grant.sql_sources {
        anyhow::ensure!(
            settings.sources.contains_key(source),
            "the grant names sql source {source:?}, which the host config does not define"
        );
    }
    let version = PluginVersion::of_bytes(&bytes);
    let loaded = runtime.load(&version, bytes.clone()).await?;
    let check_info = runtime.describe(&loaded, &settings.limits).await?;
    let now = now_millis();
    store
        .save_plugin_version(&name, &version, &bytes, &check_info, now)
        .await?;
    store
        .activate_plugin(&name, &version, &grant_toml, now)
        .await?;
    Ok((name, version))
}
