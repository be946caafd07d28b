//! Stepwise host: runs multi-step asynchronous checks whose logic lives in sandboxed WebAssembly
//! plugins. Modules in reading order; calls go down this list and never back up:
//! `api` → `registry` | `scheduler` → `runner` → `runtime` → `capabilities`, with `storage`
//! behind narrow methods that only `api`, `registry`, `scheduler`, `runner` and the two
//! background jobs, `notify` (deliveries) and `retention`, call.

pub mod api;
pub mod auth;
pub mod bindings;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod dev;
pub mod grant;
pub mod junit;
mod memo;
pub mod metrics;
pub mod model;
pub mod notify;
mod params_schema;
pub mod plugin_build;
pub mod priority;
pub mod registry;
pub mod retention;
pub mod rollups;
pub mod runner;
pub mod runtime;
pub mod scaffold;
pub mod scheduler;
pub mod shadows;
pub mod storage;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, Shared};
use crate::capabilities::secrets::{Secret, SecretSet, Secrets};
use crate::capabilities::sources::DataSources;
use crate::config::{AuthMode, Settings};
use crate::notify::Deliverer;
use crate::registry::Registry;
use crate::retention::Retention;
use crate::runner::Runner;
use crate::runtime::Runtime;
use crate::scheduler::schedules::{Firer, ScheduleWakeup};
use crate::scheduler::{Scheduler, Wakeup};
use crate::storage::{Change, Changes, Store};

/// Serves the API on `listener` and runs the scheduler until `shutdown` is cancelled, then
/// stops accepting requests, lets ticks in flight finish and releases this node's leases.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let address = listener.local_addr().context("reading the bound address")?;
    // Checked again here with the address actually bound: `Settings` may not come from flags.
    AuthMode::resolve(Some(settings.auth), address)?;
    let settings = Arc::new(settings);
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
    let store = Store::open(&settings.database_url)
        .await
        .with_context(|| format!("opening database {}", settings.database_url))?;
    let node_id = node_id(&settings)?;
    // Leases this node held before a restart belong to ticks that died with it.
    store
        .release_leases(&node_id)
        .await
        .context("releasing leases of the previous process")?;
    let runtime = Runtime::new(
        Some(settings.artifacts_dir()),
        settings.max_concurrent_ticks,
        &settings.limits,
    )
    .context("starting the wasm runtime")?
    .with_plugin_memory(settings.plugin_memory_bytes);
    let secrets = Secrets::new(SecretSet::new(load_secrets(&settings)?)?);
    // Source URLs may hold placeholders; the filled URLs stay in memory, and any error that
    // could quote one is redacted.
    let set = secrets.current();
    let source_configs = set.fill_source_urls(&settings.sources)?;
    let sources =
        DataSources::connect_lazy(&source_configs).map_err(|error| set.redact_error(error))?;
    sources
        .check_at_start(&source_configs, &settings.database_url)
        .await
        .map_err(|error| set.redact_error(error))?;
    tap_every_grant(&store, &settings, &sources).await?;
    #[cfg(unix)]
    {
        // Listened for before the server answers: a SIGHUP that came first would end the
        // process.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP (which reloads secrets)")?;
        tokio::spawn(reload_secrets_on_hangup(
            hangups,
            secrets.clone(),
            settings.clone(),
            shutdown.clone(),
        ));
    }
    let wakeup = Wakeup::default();
    let schedule_wakeup = ScheduleWakeup::default();
    let registry = Registry::new(
        store.clone(),
        runtime.clone(),
        settings.clone(),
        sources.messages.clone(),
    );
    let metrics = metrics::Metrics::default();
    let state = AppState::from(
        Shared::new(
            store.clone(),
            registry.clone(),
            settings.clone(),
            wakeup.clone(),
            schedule_wakeup.clone(),
            address,
        )
        .with_metrics(metrics.clone(), node_id.clone())
        .with_message_sources(sources.messages.clone()),
    );

    let connections = api::Connections::from_settings(&settings)?;
    let scheme = if connections.is_tls() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%address, node = %node_id, data_dir = %settings.data_dir.display(), auth = ?settings.auth, "stepwise listening on {scheme}://{address}");
    let http =
        tokio::spawn(connections.serve(listener, api::router(state.clone()), shutdown.clone()));

    let (loaded_sender, loaded) = tokio::sync::oneshot::channel();
    let registry_handle = registry.clone();
    let registry = tokio::spawn(registry.run(
        move || {
            let _ = loaded_sender.send(());
        },
        shutdown.clone(),
    ));
    // Runs triggered before the directory is loaded would find no plugin; /readyz says when.
    let _ = loaded.await;
    state.mark_plugins_loaded();

    // Other nodes on the same database tell this one about their changes at once.
    if let Some(changes) = store.listen().await.context("listening for changes")? {
        tokio::spawn(follow_changes(
            changes,
            store.clone(),
            wakeup.clone(),
            schedule_wakeup.clone(),
            registry_handle,
            shutdown.clone(),
        ));
    }

    let firer = Firer::new(
        store.clone(),
        settings.clone(),
        node_id.clone(),
        wakeup.clone(),
        schedule_wakeup,
    );
    let firer = tokio::spawn(firer.run(shutdown.clone()));
    let events = tokio::spawn(state.events.clone().follow(
        store.clone(),
        settings.scheduler_backstop,
        shutdown.clone(),
    ));
    // Without notifiers nothing is written to the outbox, so nothing needs delivering.
    let deliverer = if settings.notifiers.is_empty() {
        None
    } else {
        let deliverer = Deliverer::new(
            store.clone(),
            &settings,
            node_id.clone(),
            metrics.clone(),
            secrets.clone(),
        )
        .context("starting the notification deliverer")?;
        Some(tokio::spawn(deliverer.run(shutdown.clone())))
    };
    let retention = Retention::new(
        store.clone(),
        settings.retention,
        node_id.clone(),
        settings.lease,
    );
    let retention = tokio::spawn(retention.run(shutdown.clone()));
    let rollups = crate::rollups::Rollups::new(
        store.clone(),
        settings.rollup_zones(),
        node_id.clone(),
        settings.lease,
    );
    let rollups = tokio::spawn(rollups.run(shutdown.clone()));
    let shadows = crate::shadows::Shadows::new(store.clone(), settings.clone());
    let shadows = tokio::spawn(shadows.run(shutdown.clone()));
    let runner = Runner::new(store.clone(), runtime, sources, secrets, settings.clone())
        .with_metrics(metrics);
    let scheduler = Scheduler::new(store, runner, settings.clone(), node_id, wakeup);
    let scheduler = tokio::spawn(scheduler.run(shutdown.clone()));

    http.await.context("http server task")?;
    scheduler.await.context("scheduler task")?;
    firer.await.context("schedule firer task")?;
    if let Some(deliverer) = deliverer {
        deliverer.await.context("notification deliverer task")?;
    }
    retention.await.context("retention task")?;
    rollups.await.context("status rollups task")?;
    shadows.await.context("shadow decisions task")?;
    events.await.context("event hub task")?;
    registry.await.context("plugin registry task")?;
    Ok(())
}

/// Reads the value of every secret the settings declare.
pub fn load_secrets(settings: &Settings) -> anyhow::Result<Vec<Secret>> {
    settings
        .secrets
        .iter()
        .map(|(name, declaration)| {
            Ok(Secret {
                name: name.clone(),
                value: config::read_secret(name, declaration)?,
                hosts: declaration.hosts.clone(),
                place: declaration.place.clone(),
            })
        })
        .collect()
}

/// Subscribes the message sources' taps to the subjects of every stored grant, before the
/// host takes runs: a run triggered after the start then finds what is published from its
/// creation.
async fn tap_every_grant(
    store: &Store,
    settings: &Settings,
    sources: &DataSources,
) -> anyhow::Result<()> {
    if sources.messages.is_empty() {
        return Ok(());
    }
    let plugins = store
        .list_plugins()
        .await
        .context("listing plugins for the message taps")?;
    let taps = plugins.iter().filter_map(|plugin| {
        let grant = crate::grant::parse_stored_grant(&plugin.grant_toml).ok()?;
        let (grant, _) = settings.policy.confine(grant, &settings.limits);
        Some(async move {
            sources
                .messages
                .tap_now(
                    &grant.sql_sources,
                    &grant.subjects,
                    std::time::Duration::from_secs(5),
                )
                .await;
        })
    });
    futures::future::join_all(taps).await;
    Ok(())
}

/// On SIGHUP, reads every secret's value again (a rotated file, say); if one cannot be read,
/// the values in force stay. Which secrets exist and their hosts are fixed at start.
#[cfg(unix)]
async fn reload_secrets_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    secrets: Secrets,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangups.recv() => match load_secrets(&settings)
                .and_then(|loaded| SecretSet::after(loaded, &secrets.current()))
            {
                Ok(set) => {
                    let count = set.secrets().len();
                    secrets.replace(set);
                    tracing::info!(count, "SIGHUP: secrets reloaded");
                }
                Err(error) => tracing::warn!(
                    "SIGHUP: reloading secrets failed, the values in force stay: {error:#}"
                ),
            },
        }
    }
}

/// Acts on what other nodes changed: new runs and cancellations wake the scheduler, schedule
/// changes the firer, new events the event hub, and a newly active plugin version is compiled
/// before its first run.
/// A dropped connection may have lost notifications, so it wakes everything.
async fn follow_changes(
    mut changes: Changes,
    store: Store,
    wakeup: Wakeup,
    schedule_wakeup: ScheduleWakeup,
    registry: Registry,
    shutdown: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            change = changes.next() => change,
        };
        match change {
            Some(Change::RunsQueued | Change::RunCancelled(_)) => wakeup.wake(),
            Some(Change::SchedulesChanged) => schedule_wakeup.wake(),
            Some(Change::EventsVisible) => store.events_visible_elsewhere(),
            Some(Change::PluginActivated(version)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(error) = registry.prepare(&version).await {
                        tracing::warn!(%version, %error, "compiling a version another node activated failed");
                    }
                });
            }
            None => {
                wakeup.wake();
                schedule_wakeup.wake();
                store.events_visible_elsewhere();
            }
        }
    }
}

/// A stable id for this node, kept in the data dir so that a restarted process recognises the
/// leases it held before.
fn node_id(settings: &Settings) -> anyhow::Result<String> {
    let path = settings.data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = format!("node-{}", uuid::Uuid::now_v7().simple());
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod layers {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The code map's rows, top down, as ARCHITECTURE.md's table names them.
    fn rows() -> Vec<Vec<String>> {
        include_str!("../../ARCHITECTURE.md")
            .lines()
            .skip_while(|line| !line.starts_with("| module |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                let modules = line.split('|').nth(1).unwrap_or_default();
                modules
                    .split(',')
                    .map(|module| module.trim().trim_matches('`').to_owned())
                    .collect()
            })
            .collect()
    }

    /// The top-level modules each module of `src` names through `crate::`, outside its tests.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, files);
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    files.push(path);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&src).expect("below src");
            let top = relative.iter().next().expect("a name").to_string_lossy();
            let module = top.trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&file).expect("readable");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for after in code.split("crate::").skip(1) {
                let paths = match after.strip_prefix('{') {
                    Some(list) => list.split('}').next().unwrap_or_default(),
                    None => after,
                };
                for path in paths.split(',') {
                    let name: String = path
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        imports.entry(module.clone()).or_default().insert(name);
                    }
                    if !after.starts_with('{') {
                        break;
                    }
                }
            }
        }
        imports
    }

    /// ARCHITECTURE.md's code map holds: a module imports only modules in its row or below,
    /// and no two modules import each other.
    #[test]
    fn every_module_imports_only_modules_below_it_in_the_code_map() {
        let rank: BTreeMap<String, usize> = rows()
            .into_iter()
            .enumerate()
            .flat_map(|(row, modules)| modules.into_iter().map(move |module| (module, row)))
            .collect();
        assert!(
            rank.contains_key("api") && rank.contains_key("storage"),
            "{rank:?}"
        );
        let imports = imports();
        for (module, targets) in &imports {
            if module == "lib" || module == "main" {
                continue;
            }
            let own = rank.get(module).unwrap_or_else(|| {
                panic!("module {module} is missing from ARCHITECTURE.md's code map")
            });
            for target in targets.iter().filter(|target| *target != module) {
                if let Some(theirs) = rank.get(target) {
                    assert!(
                        theirs >= own,
                        "{module} imports {target}, which is above it"
                    );
                    assert!(
                        !imports
                            .get(target)
                            .is_some_and(|back| back.contains(module)),
                        "{module} and {target} import each other"
                    );
                }
            }
        }
    }
}
