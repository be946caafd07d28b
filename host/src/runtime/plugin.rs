//! Compiling a plugin version once, caching it by content hash in memory and as a precompiled
//! artifact on disk, and inspecting a candidate component before it may be activated.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::engine::Runtime;
use super::instance::StepState;
use crate::bindings::CheckPre;
use crate::grant::Limits;
use crate::model::{CheckInfo, PluginVersion};

/// The 8-byte preamble of a component (magic, version 0x0d, layer 1) and of a core module.
const COMPONENT_PREAMBLE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
const WASM_MAGIC: [u8; 4] = [0x00, 0x61, 0x73, 0x6d];

/// A compiled plugin version, ready to instantiate cheaply for each call.
pub struct LoadedPlugin {
    pub version: PluginVersion,
    /// The interfaces the component imports, e.g. `wasi:http/outgoing-handler@0.2.12`.
    pub imports: Vec<String>,
    pub(super) pre: CheckPre<StepState>,
}

/// A turn at loading one version ([`Runtime::loading_turn`]). Its lock leaves the map of turns
/// with the last turn that used it, so that the map holds only versions being loaded, not
/// every version (or forged name) ever asked for.
pub struct LoadingTurn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    version: PluginVersion,
    loading: Arc<std::sync::Mutex<HashMap<PluginVersion, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Drop for LoadingTurn {
    fn drop(&mut self) {
        let mut loading = self
            .loading
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(guard) = self.guard.take() else {
            return;
        };
        // Every waiter took its clone of the lock under the map's lock, which is held here:
        // the map's clone and this turn's are the only ones when no one else waits.
        if Arc::strong_count(tokio::sync::OwnedMutexGuard::mutex(&guard)) == 2 {
            loading.remove(&self.version);
        }
    }
}

/// A candidate component that compiled, links against the host and answered `describe`.
pub struct Inspected {
    pub plugin: Arc<LoadedPlugin>,
    pub check_info: CheckInfo,
    /// Compiling and linking (or loading the precompiled artifact), and the first call,
    /// `describe`: what a plugin costs before its first step.
    pub compile_time: std::time::Duration,
    pub describe_time: std::time::Duration,
}

impl Runtime {
    /// Checks that `bytes` are a `stepwise:plugin/check` component that compiles, links and
    /// answers `describe` within `limits`; the error says which of these failed.
    pub async fn inspect(
        &self,
        version: &PluginVersion,
        bytes: Bytes,
        limits: &Limits,
    ) -> anyhow::Result<Inspected> {
        check_preamble(&bytes)?;
        let started = std::time::Instant::now();
        let plugin = self.load(version, bytes).await?;
        let compile_time = started.elapsed();
        let started = std::time::Instant::now();
        let check_info = self.describe(&plugin, limits).await?;
        Ok(Inspected {
            plugin,
            check_info,
            compile_time,
            describe_time: started.elapsed(),
        })
    }

    /// Compiles `bytes` (off the async threads: it is CPU-heavy, seconds for a large
    /// component) and links it against the capabilities, or returns this version from the
    /// memory cache or from a precompiled artifact in the data dir.
    ///
    /// Fails when the bytes are not a component, do not compile, or do not fit the
    /// `stepwise:plugin/check` world.
    pub async fn load(
        &self,
        version: &PluginVersion,
        bytes: Bytes,
    ) -> anyhow::Result<Arc<LoadedPlugin>> {
        if let Some(loaded) = self.cached(version) {
            return Ok(loaded);
        }
        let artifact = self.artifact_path(version);
        let compiling = match &artifact {
            Some(path) if path.exists() => None,
            _ => Some(self.compiles.clone().acquire_owned().await?),
        };
        let runtime = self.clone();
        let plugin_version = version.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let _compiling = compiling;
            let component = match artifact
                .as_deref()
                .and_then(|path| runtime.deserialize(path))
            {
                Some(component) => component,
                None => {
                    let component = Component::new(&runtime.engine, &bytes)
                        .map_err(anyhow::Error::from)
                        .context("the component does not compile")?;
                    if let Some(path) = &artifact {
                        write_artifact(&component, path);
                    }
                    component
                }
            };
            runtime.link(plugin_version, &component)
        })
        .await
        .context("compile task panicked")??;
        Ok(self.remember(loaded))
    }

    /// Loads `version` from its precompiled artifact alone, if the data dir has one for this
    /// engine: it spares the caller reading the component bytes from the database.
    pub async fn load_precompiled(&self, version: &PluginVersion) -> Option<Arc<LoadedPlugin>> {
        if let Some(loaded) = self.cached(version) {
            return Some(loaded);
        }
        let runtime = self.clone();
        let plugin_version = version.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let path = runtime.artifact_path(&plugin_version)?;
            let component = runtime.deserialize(&path)?;
            runtime.link(plugin_version, &component).ok()
        })
        .await
        .ok()??;
        Some(self.remember(loaded))
    }

    /// Waits for this process's turn to load `version`. A node that meets a version first
    /// through its runs (activated on another node) gets many ticks of it at once; without
    /// this each would deserialize or compile it, dozens of compilations in parallel. With
    /// it the first loads and the others find it cached. The turn ends when the returned
    /// guard is dropped.
    pub async fn loading_turn(&self, version: &PluginVersion) -> LoadingTurn {
        let turn = self
            .loading
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry(version.clone())
            .or_default()
            .clone();
        LoadingTurn {
            guard: Some(turn.lock_owned().await),
            version: version.clone(),
            loading: self.loading.clone(),
        }
    }

    /// The compiled plugin for `version`, if this process holds it in memory.
    pub fn cached(&self, version: &PluginVersion) -> Option<Arc<LoadedPlugin>> {
        self.compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(version)
            .cloned()
    }

    /// Drops compiled versions not in `keep` from memory (their artifacts stay on disk, so
    /// a later run of one of them deserializes instead of compiling); returns how many.
    pub fn retain_compiled(&self, keep: &HashSet<PluginVersion>) -> usize {
        let mut compiled = self
            .compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let before = compiled.len();
        compiled.retain(|version, _| keep.contains(version));
        before - compiled.len()
    }

    /// Forgets a version that was rejected, in memory and on disk.
    pub fn discard(&self, version: &PluginVersion) {
        self.compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(version);
        if let Some(path) = self.artifact_path(version) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn remember(&self, loaded: LoadedPlugin) -> Arc<LoadedPlugin> {
        let loaded = Arc::new(loaded);
        self.compiled
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(loaded.version.clone(), loaded.clone());
        loaded
    }

    fn link(&self, version: PluginVersion, component: &Component) -> anyhow::Result<LoadedPlugin> {
        let imports = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let instance_pre = self
            .linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)
            .context(
                "the component imports something the stepwise:plugin/check world does not provide",
            )?;
        let pre = CheckPre::new(instance_pre)
            .map_err(anyhow::Error::from)
            .context("the component does not export the stepwise:plugin/check world")?;
        Ok(LoadedPlugin {
            version,
            imports,
            pre,
        })
    }

    /// `<artifacts>/<sha256>-<engine key>.cwasm`: keyed by the engine's configuration too,
    /// so that an upgraded or reconfigured host compiles afresh instead of loading code built
    /// for another engine. Only a [`PluginVersion`], which is 64 hex digits by construction,
    /// names the file: no text from elsewhere is ever joined into the path.
    fn artifact_path(&self, version: &PluginVersion) -> Option<PathBuf> {
        let dir = self.artifacts.as_ref()?;
        Some(dir.join(format!("{version}-{}.cwasm", self.engine_key)))
    }

    fn deserialize(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: wasmtime requires that deserialized bytes come from `Component::serialize`
        // of a compatible engine. Artifacts are only ever written by `write_artifact` below,
        // into the host's own data dir (or, for `stepwise dev`, the user's own cache dir),
        // under a name carrying the content hash and the engine key; bytes received from the
        // API are always compiled, never deserialized.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), "ignoring unusable precompiled artifact: {error}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }
}

/// A key for everything in the engine's configuration that precompiled code depends on.
pub(super) fn engine_key(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Writes the artifact next to its final name and renames it into place, so that a crash
/// never leaves a half-written artifact under the name `deserialize` trusts. A failure only
/// costs a recompile later, so it is logged, not returned.
fn write_artifact(component: &Component, path: &Path) {
    let result = (|| -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(anyhow::Error::from)?;
        let temporary = path.with_extension(format!("tmp-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, path)?;
        Ok(())
    })();
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), "could not keep the precompiled artifact: {error:#}");
    }
}

fn check_preamble(bytes: &[u8]) -> anyhow::Result<()> {
    if bytes.len() < 8 || bytes[..4] != WASM_MAGIC {
        anyhow::bail!("not a WebAssembly binary (it does not start with the \\0asm magic)");
    }
    if bytes[..8] != COMPONENT_PREAMBLE {
        anyhow::ensure!(
            bytes[4..8] != [0x01, 0x00, 0x00, 0x00],
            "a core WebAssembly module, not a component: build for wasm32-wasip2 or wrap it with `wasm-tools component new`"
        );
        anyhow::bail!("an unsupported WebAssembly binary version or layer");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_version_leaves_the_loading_turns_with_its_last_turn() {
        let runtime = Runtime::new(None, 1, &Limits::default()).expect("a runtime");
        let version = PluginVersion::of_bytes(b"component");
        // How many hold the version's lock (the map, then the turns), without another clone.
        let holders = |runtime: &Runtime, version: &PluginVersion| {
            let turns = runtime.loading.lock().expect("the turns");
            turns.get(version).map_or(0, Arc::strong_count)
        };
        let first = runtime.loading_turn(&version).await;
        let second = tokio::spawn({
            let (runtime, version) = (runtime.clone(), version.clone());
            async move { drop(runtime.loading_turn(&version).await) }
        });
        // The map, the first turn and the second, which waits.
        while holders(&runtime, &version) != 3 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert_ne!(
            holders(&runtime, &version),
            0,
            "the second turn still needs it"
        );
        second.await.expect("the second turn");
        assert!(runtime.loading.lock().expect("the turns").is_empty());
    }

    #[test]
    fn preamble_tells_components_from_modules_and_junk() {
        assert!(check_preamble(b"\0asm\x0d\0\x01\0rest").is_ok());
        let module = check_preamble(b"\0asm\x01\0\0\0").unwrap_err().to_string();
        assert!(module.contains("core WebAssembly module"), "{module}");
        let junk = check_preamble(b"hello world").unwrap_err().to_string();
        assert!(junk.contains("not a WebAssembly binary"), "{junk}");
        assert!(check_preamble(b"\0asm").is_err());
    }
}
