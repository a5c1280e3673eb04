//! Deployed plugins: bindings to topics, versions kept for rollback, the
//! live version of each binding swapped atomically, all persisted in redb.
//!
//! A binding's live version is an `ArcSwapOption`: the publish path loads it
//! once per batch, so every message of a batch is decided by one version and
//! a swap never splits a batch. Calls already running keep their `Arc` to the
//! old version and finish on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use super::engine::{KvStore, PluginEngine};
use super::loaded::{Hook, Limits, LoadError, LoadedPlugin};
use crate::protocol::{ErrorCode, WireError};
use crate::storage::{Storage, now_ms};

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

/// What one activation of a version has done: per `(topic, partition)` the
/// first offset it decided, and the time from going live to its first
/// decision. Shared with the binding, so what happens after the version was
/// replaced (acks of batches it decided) still reaches its record.
struct Activation {
    activated: Instant,
    first_decision_us: Mutex<Option<u64>>,
    cutover: Mutex<HashMap<String, HashMap<u32, u64>>>,
}

impl Activation {
    fn new() -> Arc<Self> {
        Arc::new(Activation {
            activated: Instant::now(),
            first_decision_us: Mutex::new(None),
            cutover: Mutex::new(HashMap::new()),
        })
    }
}

impl LiveVersion {
    /// Records that this version decided these `(topic, partition, offset)`s:
    /// one lock per acknowledged batch, and an allocation only the first
    /// time a topic is seen.
    pub fn note_decided<'a>(&self, decided: impl Iterator<Item = (&'a str, u32, u64)>) {
        let mut c = self.activation.cutover.lock().expect("cutover lock");
        for (topic, partition, offset) in decided {
            if !c.contains_key(topic) {
                c.insert(topic.to_string(), HashMap::new());
            }
            c.get_mut(topic)
                .expect("inserted above")
                .entry(partition)
                .and_modify(|o| *o = (*o).min(offset))
                .or_insert(offset);
        }
    }

    /// Marks the first decision, for the swap latency.
    pub fn note_first_decision(&self) {
        let a = &self.activation;
        let mut f = a.first_decision_us.lock().expect("first lock");
        if f.is_none() {
            *f = Some(a.activated.elapsed().as_micros() as u64);
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
    /// Each version's latest activation.
    activations: Mutex<HashMap<u32, Arc<Activation>>>,
}

impl Binding {
    /// Makes `live` the live version.
    fn activate(&self, live: Arc<LiveVersion>) {
        self.activations
            .lock()
            .expect("activations lock")
            .insert(live.version, live.activation.clone());
        self.live.store(Some(live));
    }

    /// The live version, if any.
    pub fn live(&self) -> Option<Arc<LiveVersion>> {
        self.live.load_full()
    }

    /// Copies every activation's cut-over points and swap latency into the
    /// record.
    fn sync_cutover(&self) {
        let activations: Vec<(u32, Arc<Activation>)> = self
            .activations
            .lock()
            .expect("activations lock")
            .iter()
            .map(|(v, a)| (*v, a.clone()))
            .collect();
        let mut rec = self.record.lock().expect("record lock");
        for (version, a) in activations {
            let Some(v) = rec.versions.iter_mut().find(|v| v.version == version) else {
                continue;
            };
            for (t, parts) in a.cutover.lock().expect("cutover lock").iter() {
                for (p, o) in parts {
                    v.cutover
                        .entry(format!("{t}/{p}"))
                        .and_modify(|x| *x = (*x).min(*o))
                        .or_insert(*o);
                }
            }
            if v.swap_latency_us.is_none() {
                v.swap_latency_us = *a.first_decision_us.lock().expect("first lock");
            }
        }
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
                activations: Mutex::new(HashMap::new()),
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
            activation: Activation::new(),
        })
    }

    /// The live route plugin of `topic`.
    pub fn route_for(&self, topic: &str) -> Option<Arc<LiveVersion>> {
        self.find(|b| b.hook == Hook::Route && b.topic == topic)
    }

    /// The live filter for a subscription of `group` on `topic`: one bound
    /// to that group, else one bound to the whole topic.
    pub fn filter_for(&self, topic: &str, group: &str) -> Option<Arc<LiveVersion>> {
        self.find(|b| {
            b.hook == Hook::Filter && b.topic == topic && b.group.as_deref() == Some(group)
        })
        .or_else(|| self.find(|b| b.hook == Hook::Filter && b.topic == topic && b.group.is_none()))
    }

    /// The live plugin for `hook` on `topic` (priority, fanout, retry).
    pub fn hook_for(&self, hook: Hook, topic: &str) -> Option<Arc<LiveVersion>> {
        self.find(|b| b.hook == hook && b.topic == topic)
    }

    fn find(&self, f: impl Fn(&Binding) -> bool) -> Option<Arc<LiveVersion>> {
        self.bindings
            .read()
            .expect("bindings lock")
            .values()
            .find(|b| f(b))
            .and_then(|b| b.live())
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
        if !topic_exists {
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
                    activations: Mutex::new(HashMap::new()),
                    record: Mutex::new(PluginRecord {
                        name: req.name.clone(),
                        hook: req.hook,
                        topic: req.topic.clone(),
                        group: req.group.clone(),
                        live: None,
                        next_version: 1,
                        versions: Vec::new(),
                        history: Vec::new(),
                    }),
                });
                self.bindings
                    .write()
                    .expect("bindings lock")
                    .insert(req.name.clone(), b.clone());
                b
            }
        };
        binding.sync_cutover();
        let dropped = {
            let mut rec = binding.record.lock().expect("record lock");
            rec.next_version = version + 1;
            rec.versions.push(vrec);
            rec.live = Some(version);
            rec.history.push(HistoryEvent {
                at_ms: now_ms(),
                event: "deploy".into(),
                version,
                by: req.deployed_by.clone(),
            });
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
            activation: Activation::new(),
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
        b.sync_cutover();
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
        let live = self
            .load_version(&rec, target, b.kv.clone())
            .map_err(invalid)?;
        {
            let mut rec = b.record.lock().expect("record lock");
            rec.live = Some(target);
            rec.history.push(HistoryEvent {
                at_ms: now_ms(),
                event: "rollback".into(),
                version: target,
                by,
            });
            // Decisions from the new activation count as a new cut-over:
            // forget the earlier activation's, in the record and as a source.
            if let Some(v) = rec.versions.iter_mut().find(|v| v.version == target) {
                v.cutover.clear();
                v.swap_latency_us = None;
            }
            b.activations
                .lock()
                .expect("activations lock")
                .remove(&target);
        }
        self.persist(&b, None, Vec::new()).await?;
        b.activate(Arc::new(live));
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
        b.sync_cutover();
        let rec = b.record.lock().expect("record lock").clone();
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

    /// Persists every binding's cut-over points (at shutdown).
    pub async fn flush(&self) {
        let all: Vec<_> = self
            .bindings
            .read()
            .expect("bindings lock")
            .values()
            .cloned()
            .collect();
        for b in all {
            b.sync_cutover();
            let _ = self.persist(&b, None, Vec::new()).await;
        }
    }
}
