//! The plugin registry: every version kept by content hash, exactly one active per name, and
//! the only way a version becomes active. A candidate is inspected (a component, compiles,
//! links, exports the world, `describe` answers within the limits) before anything is stored,
//! so a bad upload never replaces the version that is serving. The API and the plugins
//! directory (`directory`) both install through here.

mod directory;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::capabilities::messages::MessageSources;
use crate::config::Settings;
use crate::grant::Grant;
use crate::grant::parse_grant;
use crate::model::{Actor, CheckInfo, PluginName, PluginVersion, now_millis};
use crate::runtime::Runtime;
use crate::storage::{self, AuditEntry, Review, Store};

/// How often compiled versions that nothing needs any more are dropped from memory.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Whether a stored grant lets the plugin reach outside its sandbox, which makes new code for
/// it wait for an admin's review. A grant that no longer parses counts as reaching out.
fn reaches_out(grant_toml: &str) -> bool {
    parse_grant(grant_toml).map_or(true, |grant| grant.grants_capabilities())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The component failed inspection; the text says why.
    #[error("{0}")]
    InvalidComponent(String),
    #[error("{0}")]
    InvalidGrant(String),
    /// The grant goes beyond the operator's `[policy]`; `key` names the offending entry.
    #[error("{message}")]
    GrantBeyondPolicy { key: String, message: String },
    #[error("no plugin named {0:?}")]
    UnknownPlugin(String),
    #[error("plugin {name:?} has no version {version}")]
    UnknownVersion { name: String, version: String },
    /// A publisher asked to activate code no admin has reviewed, for a plugin whose grant
    /// reaches outside the sandbox.
    #[error(
        "version {version} of plugin {name:?} has not been reviewed, and the plugin's grant \
         reaches outside the sandbox (hosts, sources or secrets): an admin must activate it"
    )]
    Unreviewed { name: String, version: String },
    /// A shadow must differ from the active version, which it runs beside.
    #[error("version {version} is the active version of plugin {name:?}; a shadow runs beside it")]
    ShadowIsActive { name: String, version: String },
    /// Nothing to run a shadow beside, or no shadow to stop.
    #[error("{0}")]
    NoShadow(String),
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an install or activation did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub version: PluginVersion,
    pub check_info: CheckInfo,
    /// The plugin name did not exist before.
    pub created: bool,
    /// The bytes were new for this plugin name (a re-upload of a known version is not).
    pub new_version: bool,
    /// Stored but not active: it waits for an admin's review.
    pub pending: bool,
}

/// What an upload or activation makes of a version: the one that decides, or a shadow that
/// runs beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Active,
    Shadow,
}

/// How long storing a grant waits for the message taps to confirm its subjects.
const TAP_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Registry {
    store: Store,
    runtime: Runtime,
    settings: Arc<Settings>,
    /// Subscribed to the subjects of every grant the registry accepts, before runs use it.
    taps: MessageSources,
}

impl Registry {
    pub fn new(
        store: Store,
        runtime: Runtime,
        settings: Arc<Settings>,
        taps: MessageSources,
    ) -> Registry {
        Registry {
            store,
            runtime,
            settings,
            taps,
        }
    }

    /// Inspects `bytes` and, if they pass, stores them and makes them the active version of
    /// `name`. `grant_toml` replaces the plugin's grant; `None` keeps the current one (no
    /// capabilities for a new plugin): new bytes never change a grant by themselves.
    /// Installing the active version again changes nothing but the grant. New bytes from an
    /// `actor` who does not review, for a plugin whose grant reaches outside the sandbox, are
    /// stored but stay inactive (`pending`) until an admin activates them.
    pub async fn install(
        &self,
        name: &PluginName,
        bytes: Bytes,
        grant_toml: Option<String>,
        mode: Mode,
        actor: Actor<'_>,
    ) -> Result<Installed> {
        // Hashing a 20 MB Python component takes milliseconds: not on an async worker (the
        // fallback runs only if the blocking pool is shutting down).
        let version = tokio::task::spawn_blocking({
            let bytes = bytes.clone();
            move || PluginVersion::of_bytes(&bytes)
        })
        .await
        .unwrap_or_else(|_| PluginVersion::of_bytes(&bytes));
        self.install_hashed(name, version, bytes, grant_toml, mode, actor)
            .await
    }

    /// [`Registry::install`] for a caller that has hashed `bytes` already (`version`).
    pub(super) async fn install_hashed(
        &self,
        name: &PluginName,
        version: PluginVersion,
        bytes: Bytes,
        grant_toml: Option<String>,
        mode: Mode,
        actor: Actor<'_>,
    ) -> Result<Installed> {
        let existing = self.store.find_plugin(name.as_str()).await?;
        if mode == Mode::Shadow && existing.is_none() {
            return Err(Error::NoShadow(format!(
                "plugin {name:?} has no active version for a shadow to run beside: upload it first"
            )));
        }
        // The grant the candidate is inspected under; the one stored is decided when it is
        // activated (see `activate_plugin`), not from this read.
        let inspect_grant = match &grant_toml {
            Some(text) => text.clone(),
            None => existing
                .as_ref()
                .map(|plugin| plugin.grant_toml.clone())
                .unwrap_or_default(),
        };
        let grant = match &grant_toml {
            Some(text) => self.check_grant(text)?,
            None => parse_grant(&inspect_grant).unwrap_or_default(),
        };
        self.tap(&grant).await;
        let (_, limits) = self.settings.policy.confine(grant, &self.settings.limits);
        let inspected = match self.runtime.inspect(&version, bytes.clone(), &limits).await {
            Ok(inspected) => inspected,
            Err(error) => {
                if !self.store.component_exists(&version).await? {
                    self.runtime.discard(&version);
                }
                return Err(Error::InvalidComponent(format!("{error:#}")));
            }
        };
        if mode == Mode::Shadow
            && let Some(plugin) = &existing
            && plugin.active_version == version
        {
            return Err(Error::ShadowIsActive {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        if let Some(plugin) = &existing
            && plugin.active_version == version
            && grant_toml
                .as_ref()
                .is_none_or(|text| *text == plugin.grant_toml)
        {
            // Nothing would change: no write, and no audit entry for a restart that reads
            // the plugins directory again.
            return Ok(Installed {
                version,
                check_info: inspected.check_info,
                created: false,
                new_version: false,
                pending: false,
            });
        }
        let now = now_millis();
        let new_version = self
            .store
            .save_plugin_version(name, &version, &bytes, &inspected.check_info, now, actor)
            .await?;
        let audit = AuditEntry::new(actor.name, "plugin.upload", name.as_str(), now)
            .with("new_version", new_version.to_string());
        let review = self.review(actor, &reaches_out);
        let activated = match mode {
            Mode::Active => {
                self.store
                    .activate_plugin(name, &version, grant_toml.as_deref(), audit.clone(), review)
                    .await
            }
            Mode::Shadow => {
                // Not the active version: checked above, before anything was stored.
                let shadow = audit.clone().with("mode", "shadow");
                self.store
                    .start_shadow(name, &version, shadow, review)
                    .await
            }
        };
        let pending = match activated {
            Ok(()) => false,
            Err(storage::Error::Unreviewed) => {
                self.store
                    .record_audit(&audit.with("pending", "true"))
                    .await?;
                true
            }
            Err(error) => return Err(error.into()),
        };
        if pending {
            tracing::info!(plugin = %name, %version, actor = actor.name, "plugin uploaded; it waits for an admin's review");
        } else if mode == Mode::Shadow {
            tracing::info!(plugin = %name, %version, actor = actor.name, "plugin uploaded as the shadow version");
        } else {
            tracing::info!(plugin = %name, %version, actor = actor.name, new_version, grant_changed = grant_toml.is_some(), "plugin uploaded and active");
        }
        self.release_unused().await;
        Ok(Installed {
            version,
            check_info: inspected.check_info,
            created: existing.is_none(),
            new_version,
            pending,
        })
    }

    /// What an activation by `actor` needs, under the operator's policy.
    fn review<'a>(
        &self,
        actor: Actor<'a>,
        reaches_out: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Review<'a> {
        if actor.reviews {
            Review::By(actor.name)
        } else if self.settings.policy.publishers_activate_granted {
            Review::NotNeeded
        } else {
            Review::Required(reaches_out)
        }
    }

    /// Makes a stored version of `name` active again (roll back or forward), keeping the grant.
    pub async fn activate(
        &self,
        name: &str,
        version: &PluginVersion,
        actor: Actor<'_>,
    ) -> Result<Installed> {
        let plugin = self
            .store
            .find_plugin(name)
            .await?
            .ok_or_else(|| Error::UnknownPlugin(name.to_owned()))?;
        let record = self
            .store
            .find_plugin_version(name, version)
            .await?
            .ok_or_else(|| Error::UnknownVersion {
                name: name.to_owned(),
                version: version.to_string(),
            })?;
        // Compiled before the switch, so the first run on it does not pay for compiling.
        self.prepare(version).await?;
        let audit = AuditEntry::new(actor.name, "plugin.activate", name, now_millis());
        let activated = self
            .store
            .activate_plugin(
                &plugin.name,
                version,
                None,
                audit,
                self.review(actor, &reaches_out),
            )
            .await;
        if let Err(storage::Error::Unreviewed) = activated {
            return Err(Error::Unreviewed {
                name: name.to_owned(),
                version: version.to_string(),
            });
        }
        activated?;
        tracing::info!(plugin = %name, %version, actor = actor.name, "plugin version activated");
        self.release_unused().await;
        Ok(Installed {
            version: record.version,
            check_info: record.check_info,
            created: false,
            new_version: false,
            pending: false,
        })
    }

    /// Makes a stored version of `name` its shadow: new runs of the plugin run it beside the
    /// active version, under the same grant, and it decides nothing. Who may is judged as
    /// for an activation.
    pub async fn shadow(
        &self,
        name: &str,
        version: &PluginVersion,
        actor: Actor<'_>,
    ) -> Result<()> {
        let plugin = self
            .store
            .find_plugin(name)
            .await?
            .ok_or_else(|| Error::UnknownPlugin(name.to_owned()))?;
        if plugin.active_version == *version {
            return Err(Error::ShadowIsActive {
                name: name.to_owned(),
                version: version.to_string(),
            });
        }
        if self
            .store
            .find_plugin_version(name, version)
            .await?
            .is_none()
        {
            return Err(Error::UnknownVersion {
                name: name.to_owned(),
                version: version.to_string(),
            });
        }
        self.prepare(version).await?;
        let audit = AuditEntry::new(actor.name, "plugin.shadow", name, now_millis());
        match self
            .store
            .start_shadow(
                &plugin.name,
                version,
                audit,
                self.review(actor, &reaches_out),
            )
            .await
        {
            Err(storage::Error::Unreviewed) => Err(Error::Unreviewed {
                name: name.to_owned(),
                version: version.to_string(),
            }),
            Err(storage::Error::Conflict { .. }) => Err(Error::ShadowIsActive {
                name: name.to_owned(),
                version: version.to_string(),
            }),
            other => {
                other?;
                tracing::info!(plugin = %name, %version, actor = actor.name, "shadow version set");
                Ok(())
            }
        }
    }

    /// Ends the shadow of `name` without promoting it.
    pub async fn stop_shadow(&self, name: &str, actor: &str) -> Result<()> {
        let audit = AuditEntry::new(actor, "plugin.shadow_stop", name, now_millis());
        if !self.store.stop_shadow(name, audit).await? {
            return Err(Error::NoShadow(format!(
                "plugin {name:?} has no shadow version"
            )));
        }
        tracing::info!(plugin = %name, actor, "shadow version stopped");
        self.release_unused().await;
        Ok(())
    }

    /// Makes sure this node has `version` compiled: another node activated it, and the first
    /// run here should not wait for the compiler.
    pub async fn prepare(&self, version: &PluginVersion) -> Result<()> {
        let _turn = self.runtime.loading_turn(version).await;
        if self.runtime.cached(version).is_some()
            || self.runtime.load_precompiled(version).await.is_some()
        {
            return Ok(());
        }
        let bytes = self.store.load_component(version).await?;
        self.runtime
            .load(version, bytes.into())
            .await
            .map_err(|error| Error::InvalidComponent(format!("{error:#}")))?;
        Ok(())
    }

    /// Replaces the grant of an existing plugin; its versions stay as they are.
    pub async fn set_grant(&self, name: &str, grant_toml: &str, actor: &str) -> Result<()> {
        let grant = self.check_grant(grant_toml)?;
        self.tap(&grant).await;
        let audit = AuditEntry::new(actor, "plugin.grant", name, now_millis());
        match self.store.update_grant(name, grant_toml, audit).await {
            Err(storage::Error::NotFound) => Err(Error::UnknownPlugin(name.to_owned())),
            other => {
                other?;
                tracing::info!(plugin = %name, actor, "plugin grant changed");
                Ok(())
            }
        }
    }

    /// Loads the plugins directory, then follows it for new files and keeps the compiled cache
    /// small, until `shutdown`. `loaded` is called once the directory has been read and the
    /// watcher is running.
    pub async fn run(self, loaded: impl FnOnce(), shutdown: CancellationToken) {
        let watcher = directory::Watcher::start(&self.settings.plugins_dir());
        let mut directory = directory::Directory::default();
        let activated = directory.load_at_start(&self).await;
        tracing::info!(activated, dir = %self.settings.plugins_dir().display(), "plugins loaded");
        loaded();
        let mut watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::error!("not watching the plugins directory: {error:#}");
                None
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sweep.tick() => self.release_unused().await,
                Some(names) = async {
                    match watcher.as_mut() {
                        Some(watcher) => watcher.changed().await,
                        None => std::future::pending().await,
                    }
                } => directory.reload(&self, names).await,
            }
        }
    }

    /// Parses a grant and checks it against the host's sources and the operator's policy.
    fn check_grant(&self, grant_toml: &str) -> Result<Grant> {
        let grant =
            parse_grant(grant_toml).map_err(|error| Error::InvalidGrant(format!("{error:#}")))?;
        for source in &grant.sql_sources {
            if !self.settings.sources.contains_key(source) {
                return Err(Error::InvalidGrant(format!(
                    "the grant names sql source {source:?}, which the host config does not define"
                )));
            }
        }
        for secret in &grant.secrets {
            if !self.settings.secrets.contains_key(secret) {
                return Err(Error::InvalidGrant(format!(
                    "the grant names secret {secret:?}, which the host config does not declare ([secrets.{secret}])"
                )));
            }
        }
        if let Some((key, message)) = self
            .settings
            .policy
            .violation(&grant, &self.settings.limits)
        {
            return Err(Error::GrantBeyondPolicy { key, message });
        }
        Ok(grant)
    }

    /// Subscribes the message taps to the subjects `grant` names, before the grant is
    /// stored: runs under it then find what is published from their start. A grant that is
    /// not stored after all only made a tap keep a little more.
    async fn tap(&self, grant: &Grant) {
        let (grant, _) = self
            .settings
            .policy
            .confine(grant.clone(), &self.settings.limits);
        self.taps
            .tap_now(&grant.sql_sources, &grant.subjects, TAP_WAIT)
            .await;
    }

    /// Drops compiled versions that are neither active nor pinned by an unfinished run.
    async fn release_unused(&self) {
        match self.store.versions_in_use().await {
            Ok(in_use) => {
                let dropped = self.runtime.retain_compiled(&in_use);
                if dropped > 0 {
                    tracing::debug!(dropped, "released compiled plugin versions");
                }
            }
            Err(error) => tracing::warn!("could not list plugin versions in use: {error}"),
        }
    }
}
