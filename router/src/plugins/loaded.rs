//! One compiled plugin version: validation, a pool of instances, calls
//! under a deadline and a memory cap, and call statistics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Resource};
use wasmtime::{Store, StoreLimitsBuilder};

use super::bindings::{self, BatchRep, types};
use super::breaker::Breaker;
use super::engine::{CallMessage, KvStore, PluginEngine, StoreState};

/// The five hooks of the plugin contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// Where a published message goes.
    Route,
    /// Whether a subscriber sees a message.
    Filter,
    /// A message's priority.
    Priority,
    /// Fan-out on write or on read.
    Fanout,
    /// What to do after a failed delivery.
    Retry,
}

impl Hook {
    /// Parses `route|filter|priority|fanout|retry`.
    pub fn parse(s: &str) -> Option<Hook> {
        Some(match s {
            "route" => Hook::Route,
            "filter" => Hook::Filter,
            "priority" => Hook::Priority,
            "fanout" => Hook::Fanout,
            "retry" => Hook::Retry,
            _ => return None,
        })
    }

    /// The hook's name, as in the WIT world.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Route => "route",
            Hook::Filter => "filter",
            Hook::Priority => "priority",
            Hook::Fanout => "fanout",
            Hook::Retry => "retry",
        }
    }
}

/// Resource limits for every call of one plugin version.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget of one call (one batch).
    pub deadline: Duration,
    /// Most linear memory an instance may have.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(10),
            memory_bytes: 64 << 20,
        }
    }
}

/// Why a plugin could not be loaded. Reported at deploy time.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly.
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    /// A core module instead of a component.
    #[error(
        "this is a core WebAssembly module, not a component: build the plugin with `cargo build --release --target wasm32-wasip2`"
    )]
    CoreModule,
    /// The component did not compile.
    #[error("the component does not compile: {0}")]
    Compile(String),
    /// The component does not implement the named hook's world.
    #[error("the component does not implement the `{hook}` hook: {reason}")]
    WrongWorld {
        /// The hook asked for.
        hook: &'static str,
        /// What wasmtime found missing or mismatched.
        reason: String,
    },
    /// The component's self-test failed or trapped.
    #[error("self-test failed: {0}")]
    SelfTest(String),
}

/// Why one call failed. Handled by the binding's failure mode.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The call ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The instance hit its memory cap.
    #[error("out of memory (cap {0} bytes)")]
    OutOfMemory(usize),
    /// The plugin trapped (panicked, or hit an unreachable).
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin returned a decision the router cannot apply.
    #[error("invalid decision: {0}")]
    InvalidDecision(String),
    /// Suspended by its circuit breaker after repeated timeouts; not called.
    #[error("suspended after repeated timeouts; next try in {0:?}")]
    Suspended(Duration),
    /// Too many calls already wait for this plugin; not called.
    #[error("overloaded: {0} calls already waiting")]
    Overloaded(usize),
    /// The router is shutting down: the call was not made, or was
    /// interrupted. Nothing it decided may be applied.
    #[error("router shutting down")]
    Stopped,
}

enum Pre {
    Route(bindings::route::RoutePre<StoreState>),
    Filter(bindings::filter::FilterPre<StoreState>),
    Priority(bindings::priority::PriorityPre<StoreState>),
    Fanout(bindings::fanout::FanoutPre<StoreState>),
    Retry(bindings::retry::RetryPre<StoreState>),
}

enum Inst {
    Route(bindings::route::Route),
    Filter(bindings::filter::Filter),
    Priority(bindings::priority::Priority),
    Fanout(bindings::fanout::Fanout),
    Retry(bindings::retry::Retry),
}

struct Pooled {
    store: Store<StoreState>,
    inst: Inst,
}

/// Calls, failures and call-time percentiles of one version.
pub struct Stats {
    /// Calls made (one per batch).
    pub calls: AtomicU64,
    /// Messages decided.
    pub messages: AtomicU64,
    /// Calls that failed.
    pub failures: AtomicU64,
    /// Calls not made because the breaker had suspended the plugin.
    pub suspended: AtomicU64,
    /// Failures by kind, indexed as [`FAILURE_KINDS`].
    pub failures_by_kind: [AtomicU64; FAILURE_KINDS.len()],
    micros: Mutex<hdrhistogram::Histogram<u64>>,
}

/// The kinds of failed calls, as metrics label them.
pub const FAILURE_KINDS: [&str; 7] = [
    "timeout",
    "memory",
    "trap",
    "invalid_decision",
    "suspended",
    "overloaded",
    "stopped",
];

impl CallError {
    /// Its index in [`FAILURE_KINDS`].
    pub fn kind(&self) -> usize {
        match self {
            CallError::Timeout(_) => 0,
            CallError::OutOfMemory(_) => 1,
            CallError::Trap(_) => 2,
            CallError::InvalidDecision(_) => 3,
            CallError::Suspended(_) => 4,
            CallError::Overloaded(_) => 5,
            CallError::Stopped => 6,
        }
    }
}

impl Stats {
    fn new() -> Self {
        Stats {
            calls: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            suspended: AtomicU64::new(0),
            failures_by_kind: Default::default(),
            micros: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
            ),
        }
    }

    /// Call time at quantile `q` (0..1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.micros.lock().expect("stats lock").value_at_quantile(q)
    }

    /// Counts a failed call.
    fn fail(&self, e: &CallError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failures_by_kind[e.kind()].fetch_add(1, Ordering::Relaxed);
    }

    /// Call times as cumulative counts at each bound (in µs), with their
    /// sum (µs) and count: a histogram for metrics, read at scrape.
    pub fn call_time_buckets(&self, bounds_us: &[u64]) -> (Vec<u64>, f64, u64) {
        let h = self.micros.lock().expect("stats lock");
        let counts = bounds_us.iter().map(|&b| h.count_between(0, b)).collect();
        (counts, h.mean() * h.len() as f64, h.len())
    }
}

/// A call's result, the batch handed back, and its key/value writes.
type Called<R> = (
    Result<R, CallError>,
    Vec<CallMessage>,
    Vec<(String, Vec<u8>)>,
);

/// The most instances kept warm per version.
const POOL_MAX: usize = 16;

/// One compiled, validated plugin version.
pub struct LoadedPlugin {
    component: Component,
    /// The hook it implements.
    pub hook: Hook,
    /// `name@vN`, for logs and errors.
    pub label: Arc<str>,
    /// Its limits.
    pub limits: Limits,
    /// Deploy-time configuration.
    pub config: Arc<BTreeMap<String, String>>,
    /// Call statistics.
    pub stats: Stats,
    engine: PluginEngine,
    pre: Pre,
    kv: Arc<dyn KvStore>,
    pool: Mutex<Vec<Pooled>>,
    /// Calls of one version run one at a time, so that a stateful plugin's
    /// read-modify-write of its key/value store never interleaves.
    serial: Mutex<()>,
    /// Suspends the plugin after repeated timeouts.
    pub breaker: Breaker,
    /// Calls waiting for `serial` off the async workers.
    waiting: AtomicUsize,
    /// Nonzero after a slow call: the next calls run off the async workers
    /// even when `serial` is free, until this many fast ones went by.
    slow: AtomicU32,
}

/// Calls of one version that may wait for it at once; more fail at once
/// (`Overloaded`), so a stuck plugin holds a bounded number of threads.
pub const MAX_WAITING: usize = 64;

/// A call longer than this runs the next [`SLOW_STREAK`] calls off the
/// async worker threads.
const SLOW_CALL: Duration = Duration::from_millis(1);
const SLOW_STREAK: u32 = 64;

/// Runs `f` where it cannot stall the async runtime: on a multi-threaded
/// runtime's worker, through `block_in_place`, which hands the worker's
/// other tasks to another thread while this one waits for and runs the
/// plugin. Elsewhere (a blocking thread, a current-thread runtime, a plain
/// thread) `f` runs as is.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Layer byte pair that marks a component (vs `01 00` for a core module).
const COMPONENT_LAYER: [u8; 2] = [0x01, 0x00];

impl LoadedPlugin {
    /// Compiles `wasm` and checks that it implements `hook`.
    pub fn load(
        engine: &PluginEngine,
        wasm: &[u8],
        hook: Hook,
        label: Arc<str>,
        config: BTreeMap<String, String>,
        limits: Limits,
        kv: Arc<dyn KvStore>,
    ) -> Result<LoadedPlugin, LoadError> {
        if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        if wasm[6..8] != COMPONENT_LAYER {
            return Err(LoadError::CoreModule);
        }
        let component = Component::new(engine.engine(), wasm)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Self::from_component(engine, component, hook, label, config, limits, kv)
    }

    /// Loads a version from the artifact [`LoadedPlugin::precompiled`]
    /// produced earlier, skipping compilation (restart path).
    ///
    /// Falls back to compiling `wasm` if the artifact is missing or was
    /// made by a different build or engine configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn load_cached(
        engine: &PluginEngine,
        artifact: Option<&[u8]>,
        wasm: &[u8],
        hook: Hook,
        label: Arc<str>,
        config: BTreeMap<String, String>,
        limits: Limits,
        kv: Arc<dyn KvStore>,
    ) -> Result<LoadedPlugin, LoadError> {
        if let Some(bytes) = artifact {
            // SAFETY: wasmtime requires that deserialized bytes come from
            // `Component::serialize`. These were produced by this router
            // (`precompiled`) and stored in its own database; wasmtime also
            // checks the artifact's version and engine settings and refuses
            // a mismatch, which lands in the fallback below.
            #[allow(unsafe_code)]
            let c = unsafe { Component::deserialize(engine.engine(), bytes) };
            match c {
                Ok(component) => {
                    return Self::from_component(
                        engine, component, hook, label, config, limits, kv,
                    );
                }
                Err(e) => {
                    tracing::info!(plugin = %label, error = %e, "recompiling: cached artifact unusable")
                }
            }
        }
        Self::load(engine, wasm, hook, label, config, limits, kv)
    }

    /// The compiled artifact, to store beside the component for fast reloads.
    pub fn precompiled(&self) -> Option<Vec<u8>> {
        self.component.serialize().ok()
    }

    fn from_component(
        engine: &PluginEngine,
        component: Component,
        hook: Hook,
        label: Arc<str>,
        config: BTreeMap<String, String>,
        limits: Limits,
        kv: Arc<dyn KvStore>,
    ) -> Result<LoadedPlugin, LoadError> {
        let wrong = |e: wasmtime::Error| LoadError::WrongWorld {
            hook: hook.name(),
            reason: format!("{e:#}"),
        };
        let mut linker = engine.linker().map_err(wrong)?;
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(wrong)?;
        let ipre = linker.instantiate_pre(&component).map_err(wrong)?;
        let component = component.clone();
        let pre = match hook {
            Hook::Route => Pre::Route(bindings::route::RoutePre::new(ipre).map_err(wrong)?),
            Hook::Filter => Pre::Filter(bindings::filter::FilterPre::new(ipre).map_err(wrong)?),
            Hook::Priority => {
                Pre::Priority(bindings::priority::PriorityPre::new(ipre).map_err(wrong)?)
            }
            Hook::Fanout => Pre::Fanout(bindings::fanout::FanoutPre::new(ipre).map_err(wrong)?),
            Hook::Retry => Pre::Retry(bindings::retry::RetryPre::new(ipre).map_err(wrong)?),
        };
        Ok(LoadedPlugin {
            component,
            hook,
            label,
            limits,
            config: Arc::new(config),
            stats: Stats::new(),
            engine: engine.clone(),
            pre,
            kv,
            pool: Mutex::new(Vec::new()),
            serial: Mutex::new(()),
            breaker: Breaker::default(),
            waiting: AtomicUsize::new(0),
            slow: AtomicU32::new(0),
        })
    }

    fn instantiate(&self) -> Result<Pooled, CallError> {
        let state = StoreState {
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .trap_on_grow_failure(true)
                .instances(16)
                .tables(64)
                .memories(8)
                .build(),
            batch: Vec::new(),
            config: self.config.clone(),
            kv: self.kv.clone(),
            kv_writes: Vec::new(),
            label: self.label.clone(),
        };
        let mut store = Store::new(self.engine.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.engine.ticks(self.limits.deadline));
        let r = match &self.pre {
            Pre::Route(p) => p.instantiate(&mut store).map(Inst::Route),
            Pre::Filter(p) => p.instantiate(&mut store).map(Inst::Filter),
            Pre::Priority(p) => p.instantiate(&mut store).map(Inst::Priority),
            Pre::Fanout(p) => p.instantiate(&mut store).map(Inst::Fanout),
            Pre::Retry(p) => p.instantiate(&mut store).map(Inst::Retry),
        };
        match r {
            Ok(inst) => Ok(Pooled { store, inst }),
            Err(e) => Err(self.classify(e)),
        }
    }

    fn classify(&self, e: wasmtime::Error) -> CallError {
        if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
            if self.engine.is_stopping() {
                return CallError::Stopped;
            }
            return CallError::Timeout(self.limits.deadline);
        }
        let text = format!("{e:#}");
        if text.contains("forcing trap when growing memory") || text.contains("memory limit") {
            return CallError::OutOfMemory(self.limits.memory_bytes);
        }
        CallError::Trap(text)
    }

    /// Runs `f` on a pooled instance with `batch` installed. Returns the
    /// result, the batch back, and the key/value writes the call made.
    ///
    /// A plugin never stalls traffic it does not decide: a call that would
    /// wait for another call of this version, or follows a slow call, runs
    /// off the async workers; a suspended, overloaded or stopping plugin is
    /// not called at all.
    fn call<R>(
        &self,
        batch: Vec<CallMessage>,
        f: impl FnOnce(&mut Store<StoreState>, &Inst) -> wasmtime::Result<R>,
    ) -> Called<R> {
        let refuse = |e: CallError, batch| {
            self.stats.fail(&e);
            (Err(e), batch, Vec::new())
        };
        if self.engine.is_stopping() {
            return refuse(CallError::Stopped, batch);
        }
        if let Some(left) = self.breaker.suspended() {
            self.stats.suspended.fetch_add(1, Ordering::Relaxed);
            return refuse(CallError::Suspended(left), batch);
        }
        let started = Instant::now();
        let fast = if self.slow.load(Ordering::Relaxed) == 0 {
            match self.serial.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        } else {
            None
        };
        let called = match fast {
            Some(serial) => self.call_locked(serial, batch, f),
            None => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return refuse(CallError::Overloaded(MAX_WAITING), batch);
                }
                let called = off_worker(|| {
                    let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                    self.call_locked(serial, batch, f)
                });
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                called
            }
        };
        let timed_out = matches!(called.0, Err(CallError::Timeout(_)));
        if timed_out || started.elapsed() > SLOW_CALL {
            self.slow.store(SLOW_STREAK, Ordering::Relaxed);
        } else {
            let _ = self
                .slow
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1));
        }
        if self.breaker.record(timed_out) {
            tracing::warn!(plugin = %self.label, "plugin suspended after repeated timeouts; its failure mode applies until it is tried again");
        }
        called
    }

    fn call_locked<R>(
        &self,
        _serial: std::sync::MutexGuard<'_, ()>,
        batch: Vec<CallMessage>,
        f: impl FnOnce(&mut Store<StoreState>, &Inst) -> wasmtime::Result<R>,
    ) -> Called<R> {
        let n = batch.len() as u64;
        let _running = self.engine.running();
        let started = Instant::now();
        let pooled = self.pool.lock().expect("pool lock").pop();
        let mut pooled = match pooled.map(Ok).unwrap_or_else(|| self.instantiate()) {
            Ok(p) => p,
            Err(e) => {
                self.stats.fail(&e);
                return (Err(e), batch, Vec::new());
            }
        };
        {
            let data = pooled.store.data_mut();
            data.batch = batch;
            data.kv_writes.clear();
        }
        pooled
            .store
            .set_epoch_deadline(self.engine.ticks(self.limits.deadline));
        // Checked after the deadline is set: a stop from now on passes it.
        if self.engine.is_stopping() {
            let batch = std::mem::take(&mut pooled.store.data_mut().batch);
            return (Err(CallError::Stopped), batch, Vec::new());
        }
        let result = f(&mut pooled.store, &pooled.inst);
        let data = pooled.store.data_mut();
        let batch = std::mem::take(&mut data.batch);
        let writes = std::mem::take(&mut data.kv_writes);
        // The deploy's self-test (the only call without messages) is not
        // traffic: `plugin list` counts the calls messages made.
        if n > 0 {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.messages.fetch_add(n, Ordering::Relaxed);
            let micros = started.elapsed().as_micros().max(1) as u64;
            let _ = self.stats.micros.lock().expect("stats lock").record(micros);
        }
        match result {
            Ok(r) => {
                self.kv.stage(&writes);
                let mut pool = self.pool.lock().expect("pool lock");
                if pool.len() < POOL_MAX {
                    pool.push(pooled);
                }
                (Ok(r), batch, writes)
            }
            Err(e) => {
                // A trapped instance may be inconsistent: never reuse it.
                let e = self.classify(e);
                self.stats.fail(&e);
                (Err(e), batch, Vec::new())
            }
        }
    }

    fn count_invalid(&self) {
        self.stats.fail(&CallError::InvalidDecision(String::new()));
    }

    /// Route decisions for `batch`, one per message.
    pub fn route(&self, batch: Vec<CallMessage>) -> CallResult<types::RouteDecision> {
        let n = batch.len();
        let (r, batch, kv) = self.call(batch, |store, inst| match inst {
            Inst::Route(i) => i.call_route(store, Resource::<BatchRep>::new_borrow(0)),
            _ => unreachable!("hook checked at load"),
        });
        self.check_len(r, n, batch, kv)
    }

    /// Filter verdicts for `batch` as seen by `sub`.
    pub fn filter(&self, sub: &types::Subscriber, batch: Vec<CallMessage>) -> CallResult<bool> {
        let n = batch.len();
        let (r, batch, kv) = self.call(batch, |store, inst| match inst {
            Inst::Filter(i) => i.call_filter(store, sub, Resource::<BatchRep>::new_borrow(0)),
            _ => unreachable!("hook checked at load"),
        });
        self.check_len(r, n, batch, kv)
    }

    /// Priorities 0-9 for `batch`.
    pub fn priority(&self, batch: Vec<CallMessage>) -> CallResult<u8> {
        let n = batch.len();
        let (r, batch, kv) = self.call(batch, |store, inst| match inst {
            Inst::Priority(i) => i.call_priority(store, Resource::<BatchRep>::new_borrow(0)),
            _ => unreachable!("hook checked at load"),
        });
        let mut out = self.check_len(r, n, batch, kv);
        if let Ok(v) = &out.decisions
            && let Some(p) = v.iter().find(|p| **p > 9)
        {
            self.count_invalid();
            out.decisions = Err(CallError::InvalidDecision(format!(
                "priority {p} is outside 0-9"
            )));
        }
        out
    }

    /// Fan-out modes for `batch`, given each message's follower count.
    pub fn fanout(
        &self,
        batch: Vec<CallMessage>,
        followers: &[u32],
    ) -> CallResult<types::FanoutMode> {
        let n = batch.len();
        let (r, batch, kv) = self.call(batch, |store, inst| match inst {
            Inst::Fanout(i) => i.call_choose(store, Resource::<BatchRep>::new_borrow(0), followers),
            _ => unreachable!("hook checked at load"),
        });
        self.check_len(r, n, batch, kv)
    }

    /// The retry decision for one failed message.
    pub fn retry(
        &self,
        msg: CallMessage,
        failure: &types::Failure,
    ) -> CallResult<types::RetryDecision> {
        let (r, batch, kv) = self.call(vec![msg], |store, inst| match inst {
            Inst::Retry(i) => {
                i.call_on_failure(store, Resource::<BatchRep>::new_borrow(0), failure)
            }
            _ => unreachable!("hook checked at load"),
        });
        self.check_len(r.map(|d| vec![d]), 1, batch, kv)
    }

    /// Runs the plugin's self-test export.
    pub fn self_test(&self) -> Result<(), LoadError> {
        let (r, _, _) = self.call(Vec::new(), |store, inst| match inst {
            Inst::Route(i) => i.call_self_test(store),
            Inst::Filter(i) => i.call_self_test(store),
            Inst::Priority(i) => i.call_self_test(store),
            Inst::Fanout(i) => i.call_self_test(store),
            Inst::Retry(i) => i.call_self_test(store),
        });
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(LoadError::SelfTest(msg)),
            Err(e) => Err(LoadError::SelfTest(e.to_string())),
        }
    }

    fn check_len<T>(
        &self,
        r: Result<Vec<T>, CallError>,
        n: usize,
        batch: Vec<CallMessage>,
        kv_writes: Vec<(String, Vec<u8>)>,
    ) -> CallResult<T> {
        let decisions = match r {
            Ok(v) if v.len() == n => Ok(v),
            Ok(v) => {
                self.count_invalid();
                Err(CallError::InvalidDecision(format!(
                    "{} decisions for {n} messages",
                    v.len()
                )))
            }
            Err(e) => Err(e),
        };
        CallResult {
            decisions,
            batch,
            kv_writes,
        }
    }

    /// Reports that the commit carrying `writes` finished (see [`KvStore`]).
    pub fn settle_kv(&self, writes: &[(String, Vec<u8>)]) {
        if !writes.is_empty() {
            self.kv.settle(writes);
        }
    }

    /// Counts a decision the caller found invalid (e.g. an unknown topic).
    pub fn record_invalid(&self) {
        self.count_invalid()
    }
}

/// The outcome of one batched call.
pub struct CallResult<T> {
    /// One decision per message, or why the call failed.
    pub decisions: Result<Vec<T>, CallError>,
    /// The messages, handed back.
    pub batch: Vec<CallMessage>,
    /// Key/value writes made by the call (empty if it failed).
    pub kv_writes: Vec<(String, Vec<u8>)>,
}
