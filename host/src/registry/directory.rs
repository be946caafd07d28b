//! The plugins directory as an upload channel: `<name>.wasm` with its grant in `<name>.toml`
//! (no manifest, no capabilities). At start every file is read once; afterwards a debounced
//! watcher reinstalls a name whenever its `.wasm` or `.toml` changes. Removing a file deletes
//! nothing: history lives in the database.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::mpsc;

use super::{Error, Registry};
use crate::model::DIRECTORY_ACTOR;
use crate::model::{PluginName, PluginVersion};

/// Quiet time after the last event on a file before it is read: a copy in progress keeps
/// producing events, so it is read once it has settled.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// What the directory held when this process last read each plugin's files, so that an
/// event that changed nothing (a `touch`, a `chmod`, a rewrite with the same bytes) never
/// re-activates a file's version over a later upload or rollback through the API.
#[derive(Default)]
pub(super) struct Directory {
    seen: HashMap<PluginName, (PluginVersion, String)>,
    /// The metadata of each plugin's two files when they were last read. Reading a file fires
    /// the watcher again (inotify reports opens), so a name whose files still have this
    /// metadata is skipped without opening them: otherwise every read would schedule the next
    /// one, hashing a large component four times a second forever.
    stamps: HashMap<PluginName, [Option<Stamp>; 2]>,
}

/// What a file's metadata says about its content: size, modification time and inode (a file
/// renamed into place has a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            inode: metadata.ino(),
        })
    }
}

impl Directory {
    /// Reads every plugin in the directory. A file whose version this plugin already had is
    /// not re-activated (an API upload or rollback since then must survive a restart); its
    /// manifest still applies when that version is the active one. Returns how many versions
    /// were activated.
    pub(super) async fn load_at_start(&mut self, registry: &Registry) -> usize {
        let dir = registry.settings.plugins_dir();
        let mut names = BTreeSet::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    if let Some(name) = plugin_name_of(&entry.path(), "wasm") {
                        names.insert(name);
                    }
                }
            }
            Err(error) => {
                tracing::error!(dir = %dir.display(), "cannot read the plugins directory: {error}")
            }
        }
        let mut activated = 0;
        for name in names {
            if self.install(registry, &name, &dir, true).await {
                activated += 1;
            }
        }
        activated
    }

    /// Reinstalls the plugins whose files changed.
    pub(super) async fn reload(&mut self, registry: &Registry, names: BTreeSet<PluginName>) {
        let dir = registry.settings.plugins_dir();
        for name in names {
            self.install(registry, &name, &dir, false).await;
        }
    }

    /// Returns whether a new version became active.
    async fn install(
        &mut self,
        registry: &Registry,
        name: &PluginName,
        dir: &Path,
        at_start: bool,
    ) -> bool {
        let wasm = dir.join(format!("{name}.wasm"));
        let manifest = dir.join(format!("{name}.toml"));
        let stamps = [Stamp::of(&wasm), Stamp::of(&manifest)];
        if self.stamps.get(name) == Some(&stamps) {
            return false;
        }
        // Reading and hashing a large component takes long enough to stall an async worker.
        let read = tokio::task::spawn_blocking({
            let (wasm, manifest) = (wasm.clone(), manifest.clone());
            move || {
                read_plugin_files(&wasm, &manifest).map(|files| {
                    files.map(|(bytes, grant_toml)| {
                        (PluginVersion::of_bytes(&bytes), bytes, grant_toml)
                    })
                })
            }
        })
        .await
        .unwrap_or_else(|panic| {
            Err(anyhow::anyhow!(
                "reading the plugin files panicked: {panic}"
            ))
        });
        let (version, bytes, grant_toml) = match read {
            Ok(Some(files)) => files,
            Ok(None) => {
                tracing::debug!(file = %wasm.display(), "plugin file still changing; waiting for it to settle");
                return false;
            }
            Err(error) => {
                // A manifest edited for a plugin whose .wasm was removed lands here too.
                tracing::debug!(file = %wasm.display(), "plugin not loaded: {error:#}");
                return false;
            }
        };
        self.stamps.insert(name.clone(), stamps);
        let files = (version.clone(), grant_toml.clone());
        if self.seen.get(name) == Some(&files) {
            tracing::debug!(plugin = %name, "plugin files unchanged");
            return false;
        }
        self.seen.insert(name.clone(), files);
        if at_start {
            match superseded(registry, name, &version).await {
                Ok(true) => {
                    tracing::info!(plugin = %name, %version, file = %wasm.display(),
                        "plugin file holds an older version; not re-activated (activate it through the API)");
                    return false;
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(plugin = %name, "plugin not loaded: {error}");
                    return false;
                }
            }
        }
        match registry
            .install_hashed(
                name,
                version,
                bytes.into(),
                Some(grant_toml),
                super::Mode::Active,
                crate::model::Actor {
                    name: DIRECTORY_ACTOR,
                    reviews: true,
                },
            )
            .await
        {
            Ok(installed) if installed.new_version || installed.created => {
                tracing::info!(plugin = %name, version = %installed.version, file = %wasm.display(), "plugin activated");
                true
            }
            Ok(installed) => {
                tracing::info!(plugin = %name, version = %installed.version, file = %wasm.display(), "plugin active; grant reloaded");
                false
            }
            Err(
                error @ (Error::InvalidComponent(_)
                | Error::InvalidGrant(_)
                | Error::GrantBeyondPolicy { .. }),
            ) => {
                let file = match error {
                    Error::InvalidComponent(_) => &wasm,
                    _ => &manifest,
                };
                tracing::error!(plugin = %name, file = %file.display(), "plugin rejected, the active version keeps serving: {error}");
                false
            }
            Err(error) => {
                // Not remembered as seen: the next event on these files tries again.
                self.seen.remove(name);
                self.stamps.remove(name);
                tracing::error!(plugin = %name, file = %wasm.display(), "plugin not loaded: {error}");
                false
            }
        }
    }
}

/// Whether `version` is a version `name` had before but is not the active one.
async fn superseded(
    registry: &Registry,
    name: &PluginName,
    version: &PluginVersion,
) -> Result<bool, Error> {
    let known = registry
        .store
        .find_plugin_version(name.as_str(), version)
        .await?;
    let active = registry.store.find_plugin(name.as_str()).await?;
    Ok(known.is_some() && active.is_some_and(|plugin| plugin.active_version != *version))
}

/// The component bytes and manifest text, or `None` while the `.wasm` is still being written
/// (its size or modification time changed while it was read).
fn read_plugin_files(wasm: &Path, manifest: &Path) -> anyhow::Result<Option<(Vec<u8>, String)>> {
    let before = std::fs::metadata(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let after = std::fs::metadata(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let settled = before.len() == after.len()
        && bytes.len() as u64 == after.len()
        && before.modified().ok() == after.modified().ok();
    if !settled {
        return Ok(None);
    }
    let grant_toml = match std::fs::read_to_string(manifest) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", manifest.display()));
        }
    };
    Ok(Some((bytes, grant_toml)))
}

/// The plugin a file in the directory belongs to, if it is `<name>.<extension>`.
/// The plugin a `.wasm` or `.toml` file in the directory is for. A file whose name is not a
/// valid plugin name is skipped with a warning saying why, never silently.
fn plugin_name_of(path: &Path, extension: &str) -> Option<PluginName> {
    if path.extension()? != extension {
        return None;
    }
    let stem = path.file_stem()?.to_string_lossy();
    match PluginName::parse(&stem) {
        Ok(name) => Some(name),
        Err(message) => {
            tracing::warn!(file = %path.display(), "plugin file ignored: {message}; rename it");
            None
        }
    }
}

/// A debounced watch on the plugins directory.
pub(super) struct Watcher {
    _debouncer: Debouncer<RecommendedWatcher>,
    events: mpsc::UnboundedReceiver<Vec<PathBuf>>,
}

impl Watcher {
    pub(super) fn start(dir: &Path) -> anyhow::Result<Watcher> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (sender, events) = mpsc::unbounded_channel();
        let mut debouncer =
            new_debouncer(DEBOUNCE, move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let _ = sender.send(events.into_iter().map(|event| event.path).collect());
                }
                Err(error) => tracing::warn!("watching the plugins directory: {error}"),
            })
            .context("starting the plugins directory watcher")?;
        debouncer
            .watcher()
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Watcher {
            _debouncer: debouncer,
            events,
        })
    }

    /// The plugins whose `.wasm` or `.toml` changed since the last call.
    pub(super) async fn changed(&mut self) -> Option<BTreeSet<PluginName>> {
        let mut paths = self.events.recv().await?;
        while let Ok(more) = self.events.try_recv() {
            paths.extend(more);
        }
        Some(
            paths
                .iter()
                .filter_map(|path| {
                    plugin_name_of(path, "wasm").or_else(|| plugin_name_of(path, "toml"))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_file_keeps_its_stamp_and_replacing_it_changes_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("check.wasm");
        std::fs::write(&path, b"version one").unwrap();
        let first = Stamp::of(&path).expect("a stamp");
        // What the directory does with a file: read it (this fires the watcher again).
        let _ = std::fs::read(&path).unwrap();
        assert_eq!(Stamp::of(&path), Some(first.clone()));
        // A same-sized copy renamed into place, as an editor or `cp` + `mv` leaves it.
        let staged = dir.path().join("check.wasm.tmp");
        std::fs::write(&staged, b"version two").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert_ne!(Stamp::of(&path), Some(first));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Stamp::of(&path), None);
    }
}
