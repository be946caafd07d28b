//! Compiling a plugin version once and caching it by content hash.

use std::sync::Arc;

use anyhow::Context;
use wasmtime::component::Component;

use super::engine::Runtime;
use super::instance::StepState;
use crate::bindings::CheckPre;
use crate::model::PluginVersion;

/// A compiled plugin version, ready to instantiate cheaply for each call.
pub struct LoadedPlugin {
    pub version: PluginVersion,
    pub(super) pre: CheckPre<StepState>,
}

impl Runtime {
    /// Compiles `bytes` (off the async threads: it is CPU-heavy) and links it against the
    /// capabilities, or returns the cached result for this version.
    ///
    /// Fails when the bytes are not a component, do not compile, or do not fit the
    /// `stepwise:plugin/check` world.
    pub async fn load(
        &self,
        version: &PluginVersion,
        bytes: Vec<u8>,
    ) -> anyhow::Result<Arc<LoadedPlugin>> {
        if let Some(loaded) = self.cached(version) {
            return Ok(loaded);
        }
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let plugin_version = version.clone();
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<LoadedPlugin> {
            let component = Component::new(&engine, &bytes)
                .map_err(anyhow::Error::from)
                .context("compiling the component")?;
            let instance_pre = linker
                .instantiate_pre(&component)
                .map_err(anyhow::Error::from)
                .context("linking the component against the stepwise:plugin/check world")?;
            let pre = CheckPre::new(instance_pre)
                .map_err(anyhow::Error::from)
                .context("the component does not export the stepwise:plugin/check world")?;
            Ok(LoadedPlugin {
                version: plugin_version,
                pre,
            })
        })
        .await
        .context("compile task panicked")??;
        let loaded = Arc::new(loaded);
        self.compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(version.clone(), loaded.clone());
        Ok(loaded)
    }

    /// The compiled plugin for `version`, if this process compiled it already.
    pub fn cached(&self, version: &PluginVersion) -> Option<Arc<LoadedPlugin>> {
        self.compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(version)
            .cloned()
    }
}
