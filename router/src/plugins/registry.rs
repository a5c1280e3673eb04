//! Deployed plugins: bindings to topics, versions kept for rollback, the
//! live version of each binding swapped atomically, all persisted in redb.
//!
//! A binding's live version is an `ArcSwapOption`: the publish path loads it
//! once per batch, so every message of a batch is decided by one version and
//! a swap never splits a batch. Calls already running keep their `Arc` to the
//! old version and finish on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use super::engine::{KvStore, PluginEngine};
use super::loaded::{Hook, Limits, LoadError, LoadedPlugin};
use crate::protocol::{ErrorCode, WireError};
use crate::storage::{CutoverMark, Storage, now_ms};

/// How many versions of a plugin are kept for rollback.
pub const KEEP_VERSIONS: usize = 5;

/// What happens when a plugin call fails (trap, timeout, out of memory,
/// invalid decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailureMode {
    /// Route: the publish fails with `plugin_failed`. Filter: not delivered.
    #[default]
    Reject,
    /// Route: the messages go to `<topic>.dlq`. Filter: not delivered.
    DeadLetter,
    /// Behave as if no plugin were deployed.
    Bypass,
}

impl FailureMode {
    /// Parses `reject|dead-letter|bypass`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reject" => FailureMode::Reject,
            "dead-letter" => FailureMode::DeadLetter,
            "bypass" => FailureMode::Bypass,
            _ => return None,
        })
    }
}

/// One deployed version, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// When it was deployed.
    pub deployed_ms: u64,
    /// Component size in bytes.
    pub size: usize,
    /// Deploy-time configuration.
    pub config: BTreeMap<String, String>,
    /// Failure mode.
    pub on_failure: FailureMode,
    /// Per-call deadline.
    pub deadline_ms: u64,
    /// Memory cap.
    pub memory_mb: u64,
    /// Per `topic/partition`, the first offset this version decided.
    #[serde(default)]
    pub cutover: BTreeMap<String, u64>,
    /// Time from going live to its first decision, in microseconds.
    #[serde(default)]
    pub swap_latency_us: Option<u64>,
    /// The principal that deployed it: the version acts with its rights.
    /// Absent for versions deployed before the router had principals,
    /// which act unrestricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_by: Option<String>,
}

/// A deploy, rollback or removal, as kept in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// When.
    pub at_ms: u64,
    /// What: `deploy` or `rollback`.
    pub event: String,
    /// The version that went live.
    pub version: u32,
    /// The principal that made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The activation this event started (its cut-over rows are keyed by
    /// it). Absent in events stored before activations were numbered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<u64>,
    /// Per `topic/partition`, the first offset this activation decided
    /// (shown, not stored: read from the cut-over rows).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cutover: BTreeMap<String, u64>,
    /// Time from this activation to its first decision, in microseconds
    /// (shown, not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_latency_us: Option<u64>,
}

/// A plugin as stored in redb.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginRecord {
    /// Unique name.
    pub name: String,
    /// The hook it implements.
    pub hook: Hook,
    /// The topic it is bound to.
    pub topic: String,
    /// For filters: the consumer group (none: every subscription).
    pub group: Option<String>,
    /// The live version.
    pub live: Option<u32>,
    /// The next version number to hand out.
    pub next_version: u32,
    /// Kept versions, oldest first.
    pub versions: Vec<VersionRecord>,
    /// Deploys and rollbacks, oldest first.
    pub history: Vec<HistoryEvent>,
    /// The number the next activation (deploy or rollback) gets.
    #[serde(default)]
    pub next_activation: u64,
}

/// The version a binding runs now.
pub struct LiveVersion {
    /// Version number.
    pub version: u32,
    /// The compiled plugin.
    pub plugin: LoadedPlugin,
    /// Its failure mode.
    pub on_failure: FailureMode,
    /// The principal that deployed it (see [`VersionRecord::deployed_by`]).
    pub deployer: Option<Arc<str>>,
    activation: Arc<Activation>,
}

/// Activation numbers of versions made live before activations were
/// numbered: out of the range new ones count up in.
const LEGACY_ACTIVATION: u64 = 1 << 63;

impl PluginRecord {
    /// Records a deploy or rollback of `version` in the history and returns
    /// its activation number.
    fn activate(&mut self, event: &str, version: u32, by: Option<String>) -> u64 {
        let id = self.next_activation;
        self.next_activation += 1;
        self.history.push(HistoryEvent {
            at_ms: now_ms(),
            event: event.into(),
            version,
            by,
            activation: Some(id),
            cutover: BTreeMap::new(),
            swap_latency_us: None,
        });
        id
    }
}

/// One activation (deploy or rollback) of a version: its number, when it
/// went live, and the partitions whose cut-over row is already stored.
struct Activation {
    id: u64,
    activated: Instant,
    marked: Mutex<HashSet<(u32, u32)>>,
}

impl Activation {
    fn new(id: u64) -> Arc<Self> {
        Arc::new(Activation {
            id,
            activated: Instant::now(),
            marked: Mutex::new(HashSet::new()),
        })
    }
}

impl LiveVersion {
    /// The cut-over mark to store with a batch this version decided, if
    /// the batch reaches a partition whose first decided offset this
    /// activation has not stored yet. The writer keeps the first row per
    /// partition, in the commit of that record.
    pub fn cutover_mark(
        &self,
        plugin: &Arc<str>,
        partitions: impl Iterator<Item = (u32, u32)>,
    ) -> Option<CutoverMark> {
        let a = &self.activation;
        let marked = a.marked.lock().expect("marked lock");
        let mut parts = partitions;
        parts.any(|tp| !marked.contains(&tp)).then(|| CutoverMark {
            plugin: plugin.clone(),
            activation: a.id,
            latency_us: a.activated.elapsed().as_micros() as u64,
        })
    }

    /// Records that these `(topic id, partition)`s have their cut-over row
    /// stored (their batch was acknowledged), so later batches carry no mark.
    pub fn note_decided(&self, stored: impl Iterator<Item = (u32, u32)>) {
        let mut marked = self.activation.marked.lock().expect("marked lock");
        for tp in stored {
            marked.insert(tp);
        }
    }
}

/// A plugin bound to a topic, with its live version.
pub struct Binding {
    /// Name.
    pub name: Arc<str>,
    /// Hook.
    pub hook: Hook,
    /// Topic.
    pub topic: String,
    /// Group, for filters.
    pub group: Option<String>,
    live: ArcSwapOption<LiveVersion>,
    record: Mutex<PluginRecord>,
    kv: Arc<PluginKv>,
}

impl Binding {
    /// Makes `live` the live version.
    fn activate(&self, live: Arc<LiveVersion>) {
        self.live.store(Some(live));
    }

    /// The live version, if any.
    pub fn live(&self) -> Option<Arc<LiveVersion>> {
        self.live.load_full()
    }
}

/// A plugin's key/value store: committed values in redb, plus the writes
/// of decided batches whose commit is still in flight. Shared by all
/// versions of a plugin, so a hot swap sees the old version's writes.
pub(crate) struct PluginKv {
    storage: Storage,
    name: String,
    staged: Mutex<HashMap<String, Vec<u8>>>,
}

impl PluginKv {
    fn new(storage: Storage, name: &str) -> Arc<Self> {
        Arc::new(PluginKv {
            storage,
            name: name.to_string(),
            staged: Mutex::new(HashMap::new()),
        })
    }
}

impl KvStore for PluginKv {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        if let Some(v) = self.staged.lock().expect("kv lock").get(key) {
            return Some(v.clone());
        }
        self.storage.plugin_kv_get(&self.name, key).ok().flatten()
    }

    fn stage(&self, writes: &[(String, Vec<u8>)]) {
        let mut staged = self.staged.lock().expect("kv lock");
        for (k, v) in writes {
            staged.insert(k.clone(), v.clone());
        }
    }

    fn settle(&self, writes: &[(String, Vec<u8>)]) {
        let mut staged = self.staged.lock().expect("kv lock");
        for (k, v) in writes {
            // Only if no later call has written the key since.
            if staged.get(k) == Some(v) {
                staged.remove(k);
            }
        }
    }
}

/// What `deploy` needs.
#[derive(Debug, Clone, Deserialize)]
pub struct DeployRequest {
    /// Plugin name.
    pub name: String,
    /// Hook.
    pub hook: Hook,
    /// Topic.
    pub topic: String,
    /// Group, for filters.
    #[serde(default)]
    pub group: Option<String>,
    /// Deploy-time configuration.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Failure mode.
    #[serde(default)]
    pub on_failure: FailureMode,
    /// Per-call deadline in ms (default 10).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Memory cap in MiB (default 64).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Who deploys it: set by the router from the connection's principal,
    /// never taken from the request.
    #[serde(skip)]
    pub deployed_by: Option<String>,
}

/// All deployed plugins.
pub struct PluginRegistry {
    engine: PluginEngine,
    ceilings: Ceilings,
    storage: Storage,
    bindings: RwLock<HashMap<String, Arc<Binding>>>,
    admin: tokio::sync::Mutex<()>,
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::PluginInvalid, msg)
}

fn unknown(name: &str) -> WireError {
    WireError::new(
        ErrorCode::UnknownPlugin,
        format!("no plugin named '{name}' (see `switchyard plugin list`)"),
    )
}

/// Router-wide maxima for what a deploy may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    /// Longest per-call deadline, in ms.
    pub max_deadline_ms: u64,
    /// Largest memory cap of one plugin version, in MiB.
    pub max_memory_mb: u64,
    /// Largest sum of the memory caps of all live plugin versions, in MiB.
    pub max_total_memory_mb: u64,
}

impl Default for Ceilings {
    fn default() -> Self {
        Ceilings {
            max_deadline_ms: 1_000,
            max_memory_mb: 256,
            max_total_memory_mb: 2_048,
        }
    }
}

/// A version's limits, held to the ceilings (a version deployed under
/// higher ones, before a restart lowered them, runs under the new ones).
fn limits_of(v: &VersionRecord, c: &Ceilings) -> Limits {
    Limits {
        deadline: Duration::from_millis(v.deadline_ms.clamp(1, c.max_deadline_ms)),
        memory_bytes: (v.memory_mb.clamp(1, c.max_memory_mb) as usize) << 20,
    }
}

fn over_ceiling(what: &str, asked: u64, max: u64, key: &str) -> WireError {
    WireError::new(
        ErrorCode::LimitExceeded,
        format!(
            "{what} {asked} is above this router's maximum of {max} (`{key}` in the router's configuration)"
        ),
    )
}

impl PluginRegistry {
    /// Loads every stored plugin and compiles its live version.
    pub fn open(storage: Storage) -> Result<Self, String> {
        Self::open_with(storage, Ceilings::default())
    }

    /// As [`PluginRegistry::open`], with these maxima for deploys.
    pub fn open_with(storage: Storage, ceilings: Ceilings) -> Result<Self, String> {
        let engine = PluginEngine::new().map_err(|e| format!("plugin engine: {e:#}"))?;
        let reg = PluginRegistry {
            engine,
            ceilings,
            storage: storage.clone(),
            bindings: RwLock::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
        };
        let records = storage.plugin_records().map_err(|e| e.to_string())?;
        for (name, bytes) in records {
            let rec: PluginRecord = serde_json::from_slice(&bytes)
                .map_err(|e| format!("plugin '{name}': corrupt record: {e}"))?;
            let kv = PluginKv::new(storage.clone(), &name);
            let live = match rec.live {
                Some(v) => match reg.load_version(&rec, v, kv.clone()) {
                    Ok(l) => Some(Arc::new(l)),
                    Err(e) => {
                        tracing::error!(plugin = %name, version = v, error = %e, "cannot load the live version; the binding is inactive");
                        None
                    }
                },
                None => None,
            };
            let b = Binding {
                name: name.as_str().into(),
                hook: rec.hook,
                topic: rec.topic.clone(),
                group: rec.group.clone(),
                live: ArcSwapOption::empty(),
                record: Mutex::new(rec),
                kv,
            };
            if let Some(live) = live {
                b.activate(live);
            }
            reg.bindings
                .write()
                .expect("bindings lock")
                .insert(name, Arc::new(b));
        }
        Ok(reg)
    }

    /// The topic plugin `name` is bound to: what plugin-admin grants are
    /// checked against.
    pub fn topic_of(&self, name: &str) -> Result<String, WireError> {
        Ok(self.binding(name)?.topic.clone())
    }

    fn binding(&self, name: &str) -> Result<Arc<Binding>, WireError> {
        self.bindings
            .read()
            .expect("bindings lock")
            .get(name)
            .cloned()
            .ok_or_else(|| unknown(name))
    }

    /// Interrupts plugin calls in progress and refuses new ones (shutdown).
    pub fn stop_calls(&self) {
        tracing::info!("interrupting plugin calls for shutdown");
        self.engine.stop();
    }

    /// The engine (for dry runs).
    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    fn load_version(
        &self,
        rec: &PluginRecord,
        version: u32,
        kv: Arc<PluginKv>,
    ) -> Result<LiveVersion, String> {
        let v = rec
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| format!("version {version} is not kept"))?;
        let wasm = self
            .storage
            .plugin_wasm(&rec.name, version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("component of version {version} is missing"))?;
        let artifact = self
            .storage
            .plugin_artifact(&rec.name, version)
            .map_err(|e| e.to_string())?;
        let plugin = LoadedPlugin::load_cached(
            &self.engine,
            artifact.as_deref(),
            &wasm,
            rec.hook,
            format!("{}@v{version}", rec.name).into(),
            v.config.clone(),
            limits_of(v, &self.ceilings),
            kv,
        )
        .map_err(|e| e.to_string())?;
        Ok(LiveVersion {
            version,
            plugin,
            on_failure: v.on_failure,
            deployer: v.deployed_by.as_deref().map(Into::into),
            // The activation that made this version live, so its cut-over
            // rows continue across a restart (a version live from before
            // activations were numbered gets one of its own).
            activation: Activation::new(
                rec.history
                    .iter()
                    .rev()
                    .find(|e| e.version == version)
                    .and_then(|e| e.activation)
                    .unwrap_or(LEGACY_ACTIVATION | version as u64),
            ),
        })
    }

    /// Every binding with its live version (if any) and how many times it
    /// was activated (deploys and rollbacks): for metrics.
    pub fn snapshot(&self) -> Vec<(Arc<Binding>, Option<Arc<LiveVersion>>, u64)> {
        let bindings = self.bindings.read().expect("bindings lock");
        let mut all: Vec<_> = bindings
            .values()
            .map(|b| {
                let swaps = b.record.lock().expect("record lock").next_activation;
                (b.clone(), b.live(), swaps)
            })
            .collect();
        // A stable order for status, metrics and the console.
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// The live route plugin of `topic`.
    pub fn route_for(&self, topic: &str) -> Option<Arc<LiveVersion>> {
        self.bound(topic, |b| b.hook == Hook::Route)
    }

    /// The live filter for a subscription of `group` on `topic`: one bound
    /// to that group, else one bound to the whole topic.
    pub fn filter_for(&self, topic: &str, group: &str) -> Option<Arc<LiveVersion>> {
        self.bound(topic, |b| {
            b.hook == Hook::Filter && b.group.as_deref() == Some(group)
        })
        .or_else(|| self.bound(topic, |b| b.hook == Hook::Filter && b.group.is_none()))
    }

    /// The live plugin for `hook` on `topic` (priority, fanout, retry).
    pub fn hook_for(&self, hook: Hook, topic: &str) -> Option<Arc<LiveVersion>> {
        self.bound(topic, |b| b.hook == hook)
    }

    /// The live version of the binding `f` accepts that applies to
    /// `topic`: one bound to the topic by name, else the one whose pattern
    /// (`orders.*`) matches it with the longest prefix.
    fn bound(&self, topic: &str, f: impl Fn(&Binding) -> bool) -> Option<Arc<LiveVersion>> {
        let bindings = self.bindings.read().expect("bindings lock");
        let mut best: Option<(&Binding, usize)> = None;
        for b in bindings.values().filter(|b| f(b)) {
            let rank = match topic_pattern(&b.topic) {
                None if b.topic == topic => usize::MAX,
                Some(prefix) if topic.starts_with(prefix) => prefix.len(),
                _ => continue,
            };
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((b, rank));
            }
        }
        best.and_then(|(b, _)| b.live())
    }

    async fn persist(
        &self,
        b: &Binding,
        wasm: Option<(u32, Vec<u8>, Option<Vec<u8>>)>,
        drop_versions: Vec<u32>,
    ) -> Result<(), WireError> {
        let bytes = {
            let rec = b.record.lock().expect("record lock");
            serde_json::to_vec(&*rec).expect("plugin record serializes")
        };
        self.storage
            .put_plugin(&b.name, bytes, wasm, drop_versions)
            .await
            .map_err(|e| e.to_wire())
    }

    /// Validates and deploys a new version, then makes it live.
    pub async fn deploy(
        &self,
        req: DeployRequest,
        wasm: Vec<u8>,
        topic_exists: bool,
    ) -> Result<serde_json::Value, WireError> {
        let _admin = self.admin.lock().await;
        if req.name.is_empty()
            || req.name.len() > 128
            || !req
                .name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "plugin names use 1-128 characters from A-Z a-z 0-9 - _ .",
            ));
        }
        if req.topic.contains('*') {
            crate::auth::Pattern::parse(&req.topic).map_err(|e| {
                WireError::new(ErrorCode::InvalidArgument, format!("plugin binding: {e}"))
            })?;
        } else if !topic_exists {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!(
                    "unknown topic '{}' (create it before binding a plugin to it)",
                    req.topic
                ),
            ));
        }
        if req.group.is_some() && req.hook != Hook::Filter {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "--group applies to filter plugins only",
            ));
        }
        let existing = self
            .bindings
            .read()
            .expect("bindings lock")
            .get(&req.name)
            .cloned();
        if let Some(b) = &existing {
            if b.hook != req.hook || b.topic != req.topic || b.group != req.group {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "plugin '{}' is bound to {} on topic '{}'{}; remove it first to bind it differently",
                        req.name,
                        b.hook.name(),
                        b.topic,
                        b.group
                            .as_ref()
                            .map(|g| format!(" group '{g}'"))
                            .unwrap_or_default()
                    ),
                ));
            }
        } else {
            let clash = self
                .bindings
                .read()
                .expect("bindings lock")
                .values()
                .find(|b| b.hook == req.hook && b.topic == req.topic && b.group == req.group)
                .map(|b| b.name.to_string());
            if let Some(other) = clash {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "topic '{}' already has a {} plugin '{other}'; deploy a new version of it, or remove it first",
                        req.topic,
                        req.hook.name()
                    ),
                ));
            }
        }

        let c = self.ceilings;
        let deadline_ms = req.deadline_ms.unwrap_or(10);
        let memory_mb = req.memory_mb.unwrap_or(64);
        if deadline_ms > c.max_deadline_ms {
            let key = "max_plugin_deadline_ms";
            return Err(over_ceiling(
                "deadline_ms",
                deadline_ms,
                c.max_deadline_ms,
                key,
            ));
        }
        if memory_mb > c.max_memory_mb {
            let key = "max_plugin_memory_mb";
            return Err(over_ceiling("memory_mb", memory_mb, c.max_memory_mb, key));
        }
        // The new version replaces this binding's live one.
        let others: u64 = self
            .bindings
            .read()
            .expect("bindings lock")
            .values()
            .filter(|b| *b.name != *req.name)
            .filter_map(|b| {
                b.live()
                    .map(|l| (l.plugin.limits.memory_bytes >> 20) as u64)
            })
            .sum();
        if others + memory_mb > c.max_total_memory_mb {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "memory_mb {memory_mb} with the {others} MiB of the other live plugins is above this \
                     router's total of {} MiB (`max_plugin_memory_total_mb`); lower memory_mb or remove a plugin",
                    c.max_total_memory_mb
                ),
            ));
        }
        let version = existing
            .as_ref()
            .map(|b| b.record.lock().expect("record lock").next_version)
            .unwrap_or(1);
        let vrec = VersionRecord {
            version,
            deployed_ms: now_ms(),
            size: wasm.len(),
            config: req.config.clone(),
            on_failure: req.on_failure,
            deadline_ms,
            memory_mb,
            cutover: BTreeMap::new(),
            swap_latency_us: None,
            deployed_by: req.deployed_by.clone(),
        };
        // Compile and self-test off the async workers: compiling a large
        // component takes a good fraction of a second.
        let engine = self.engine.clone();
        let label: Arc<str> = format!("{}@v{version}", req.name).into();
        let kv_shared = existing
            .as_ref()
            .map(|b| b.kv.clone())
            .unwrap_or_else(|| PluginKv::new(self.storage.clone(), &req.name));
        let kv: Arc<dyn KvStore> = kv_shared.clone();
        let (hook, config, limits) = (
            req.hook,
            req.config.clone(),
            limits_of(&vrec, &self.ceilings),
        );
        let wasm_for_load = wasm.clone();
        let started = Instant::now();
        let plugin = tokio::task::spawn_blocking(move || {
            let p = LoadedPlugin::load(&engine, &wasm_for_load, hook, label, config, limits, kv)?;
            p.self_test()?;
            Ok::<_, LoadError>(p)
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| invalid(e.to_string()))?;
        let compile_ms = started.elapsed().as_millis() as u64;

        let binding = match existing {
            Some(b) => b,
            None => {
                let b = Arc::new(Binding {
                    name: req.name.as_str().into(),
                    hook: req.hook,
                    topic: req.topic.clone(),
                    group: req.group.clone(),
                    live: ArcSwapOption::empty(),
                    kv: kv_shared,
                    record: Mutex::new(PluginRecord {
                        name: req.name.clone(),
                        hook: req.hook,
                        topic: req.topic.clone(),
                        group: req.group.clone(),
                        live: None,
                        next_version: 1,
                        versions: Vec::new(),
                        history: Vec::new(),
                        next_activation: 0,
                    }),
                });
                self.bindings
                    .write()
                    .expect("bindings lock")
                    .insert(req.name.clone(), b.clone());
                b
            }
        };
        let activation;
        let dropped = {
            let mut rec = binding.record.lock().expect("record lock");
            rec.next_version = version + 1;
            rec.versions.push(vrec);
            rec.live = Some(version);
            activation = rec.activate("deploy", version, req.deployed_by.clone());
            let mut dropped = Vec::new();
            while rec.versions.len() > KEEP_VERSIONS {
                dropped.push(rec.versions.remove(0).version);
            }
            dropped
        };
        let artifact = plugin.precompiled();
        self.persist(&binding, Some((version, wasm, artifact)), dropped)
            .await?;
        let live = Arc::new(LiveVersion {
            version,
            plugin,
            on_failure: req.on_failure,
            deployer: req.deployed_by.as_deref().map(Into::into),
            activation: Activation::new(activation),
        });
        binding.activate(live);
        tracing::info!(plugin = %req.name, version, hook = req.hook.name(), topic = %req.topic, "plugin version live");
        Ok(serde_json::json!({
            "name": req.name,
            "version": version,
            "hook": req.hook.name(),
            "topic": req.topic,
            "compile_ms": compile_ms,
        }))
    }

    /// Makes an earlier version live again (default: the one before the live one).
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<u32>,
        by: Option<String>,
    ) -> Result<serde_json::Value, WireError> {
        let _admin = self.admin.lock().await;
        let b = self.binding(name)?;
        let target = {
            let rec = b.record.lock().expect("record lock");
            match to {
                Some(v) => {
                    if !rec.versions.iter().any(|x| x.version == v) {
                        return Err(WireError::new(
                            ErrorCode::InvalidArgument,
                            format!(
                                "version {v} is not kept; kept versions: {:?}",
                                rec.versions.iter().map(|x| x.version).collect::<Vec<_>>()
                            ),
                        ));
                    }
                    v
                }
                None => {
                    let live = rec.live.unwrap_or(0);
                    rec.versions
                        .iter()
                        .map(|x| x.version)
                        .filter(|v| *v < live)
                        .max()
                        .ok_or_else(|| {
                            WireError::new(
                                ErrorCode::InvalidArgument,
                                "no earlier version to roll back to",
                            )
                        })?
                }
            }
        };
        let rec = b.record.lock().expect("record lock").clone();
        // Compiling a kept version takes milliseconds: fine inline for an
        // admin request.
        let mut live = self
            .load_version(&rec, target, b.kv.clone())
            .map_err(invalid)?;
        {
            let mut rec = b.record.lock().expect("record lock");
            rec.live = Some(target);
            // A new activation with its own cut-over points: the history
            // keeps what every earlier one decided.
            live.activation = Activation::new(rec.activate("rollback", target, by));
        }
        self.persist(&b, None, Vec::new()).await?;
        b.activate(Arc::new(live));
        tracing::info!(plugin = %name, version = target, topic = %b.topic, "plugin rolled back");
        Ok(serde_json::json!({ "name": name, "version": target }))
    }

    /// Removes a plugin: unbinds it and deletes its versions and store.
    pub async fn remove(&self, name: &str) -> Result<serde_json::Value, WireError> {
        let _admin = self.admin.lock().await;
        let b = self
            .bindings
            .write()
            .expect("bindings lock")
            .remove(name)
            .ok_or_else(|| unknown(name))?;
        b.live.store(None);
        self.storage
            .remove_plugin(name)
            .await
            .map_err(|e| e.to_wire())?;
        Ok(serde_json::json!({ "name": name, "removed": true }))
    }

    fn describe(&self, b: &Binding, detail: bool) -> serde_json::Value {
        let mut rec = b.record.lock().expect("record lock").clone();
        if detail {
            self.fill_cutovers(&mut rec);
        }
        let live = b.live();
        let stats = live.as_ref().map(|l| {
            let s = &l.plugin.stats;
            serde_json::json!({
                "calls": s.calls.load(std::sync::atomic::Ordering::Relaxed),
                "messages": s.messages.load(std::sync::atomic::Ordering::Relaxed),
                "failures": s.failures.load(std::sync::atomic::Ordering::Relaxed),
                "p50_us": s.quantile_us(0.5),
                "p99_us": s.quantile_us(0.99),
                "suspended_calls": s.suspended.load(std::sync::atomic::Ordering::Relaxed),
                "suspended_for_ms": l.plugin.breaker.status().0.map(|d| d.as_millis() as u64),
                "suspensions": l.plugin.breaker.status().1,
            })
        });
        let mut v = serde_json::json!({
            "name": rec.name,
            "hook": rec.hook.name(),
            "topic": rec.topic,
            "group": rec.group,
            "live_version": rec.live,
            "versions": rec.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            "on_failure": live.as_ref().map(|l| l.on_failure),
            "stats": stats,
        });
        if detail {
            v["version_details"] = serde_json::to_value(&rec.versions).expect("serializes");
            v["history"] = serde_json::to_value(&rec.history).expect("serializes");
        }
        v
    }

    /// Fills each activation's cut-over points and swap latency from the
    /// stored rows, and each version's from its first activation that
    /// decided anything (what `plugin show` reports).
    fn fill_cutovers(&self, rec: &mut PluginRecord) {
        let rows = match self.storage.plugin_cutovers(&rec.name) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(plugin = %rec.name, error = %e, "cannot read cut-over points");
                return;
            }
        };
        let names: HashMap<u32, String> = self
            .storage
            .topics()
            .into_iter()
            .map(|t| (t.meta.id, t.meta.name.clone()))
            .collect();
        for e in &mut rec.history {
            let Some(a) = e.activation else { continue };
            for &(_, t, p, o, lat) in rows.iter().filter(|r| r.0 == a) {
                let topic = names.get(&t).cloned().unwrap_or_else(|| format!("#{t}"));
                e.cutover.insert(format!("{topic}/{p}"), o);
                e.swap_latency_us = Some(e.swap_latency_us.map_or(lat, |l| l.min(lat)));
            }
        }
        for v in &mut rec.versions {
            if let Some(first) = rec
                .history
                .iter()
                .find(|e| e.version == v.version && !e.cutover.is_empty())
            {
                v.cutover = first.cutover.clone();
                v.swap_latency_us = first.swap_latency_us;
            }
        }
    }

    /// One line per plugin.
    pub fn list(&self) -> serde_json::Value {
        let bindings = self.bindings.read().expect("bindings lock");
        let mut names: Vec<_> = bindings.keys().cloned().collect();
        names.sort();
        serde_json::Value::Array(
            names
                .iter()
                .map(|n| self.describe(&bindings[n], false))
                .collect(),
        )
    }

    /// Everything about one plugin, including each version's cut-over points.
    pub fn show(&self, name: &str) -> Result<serde_json::Value, WireError> {
        let b = self.binding(name)?;
        Ok(self.describe(&b, true))
    }

    /// The current value of a plugin's key/value entry (staged or committed).
    pub fn kv_get(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>, WireError> {
        let b = self.binding(name)?;
        Ok(b.kv.get(key))
    }
}

/// The prefix of a binding's topic pattern (`orders.` for `orders.*`), or
/// `None` for a binding to one topic by name.
pub fn topic_pattern(topic: &str) -> Option<&str> {
    topic.strip_suffix('*')
}
