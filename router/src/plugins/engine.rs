//! The wasmtime engine, the per-call store state and the host functions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use wasmtime::component::{Linker, Resource};
use wasmtime::{Config, Engine, StoreLimits};

use super::bindings::{BatchRep, host, types};
use crate::protocol::RawRecord;

/// The longest deadline any configuration may give a call (the ceiling
/// of `max_plugin_deadline_ms`).
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// One message of the batch a call sees.
#[derive(Clone)]
pub struct CallMessage {
    /// The record.
    pub record: RawRecord,
    /// Its topic.
    pub topic: Arc<str>,
    /// Append (or publish) time.
    pub timestamp_ms: u64,
    /// Delivery attempt.
    pub attempt: u32,
}

/// Everything a plugin instance's store holds.
pub struct StoreState {
    pub(crate) limits: StoreLimits,
    /// The batch of the call in progress.
    pub(crate) batch: Vec<CallMessage>,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    /// Key/value view: committed values plus this call's writes.
    pub(crate) kv: Arc<dyn KvStore>,
    /// Writes made during the current call, applied with its messages.
    pub(crate) kv_writes: Vec<(String, Vec<u8>)>,
    /// `name@version`, for log lines.
    pub(crate) label: Arc<str>,
}

/// A plugin's key/value store as calls see it.
///
/// Writes made while deciding a batch commit with that batch's records. In
/// between, they are *staged*: later calls read them, so a pipelined
/// producer's batches see each other's writes in order. Once the batch's
/// commit succeeds or fails, its writes are *settled*: dropped from the
/// staging area (committed ones are then read from storage; failed ones are
/// gone, as their messages are).
pub trait KvStore: Send + Sync {
    /// The current value of `key`: staged, else committed.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Makes a successful call's writes visible to later calls.
    fn stage(&self, _writes: &[(String, Vec<u8>)]) {}
    /// The commit carrying these writes finished (either way).
    fn settle(&self, _writes: &[(String, Vec<u8>)]) {}
}

/// A store with nothing in it (dry runs, tests).
pub struct EmptyKv;

impl KvStore for EmptyKv {
    fn get(&self, _key: &str) -> Option<Vec<u8>> {
        None
    }
}

impl StoreState {
    fn msg(&self, index: u32) -> wasmtime::Result<&CallMessage> {
        self.batch
            .get(index as usize)
            .ok_or_else(|| wasmtime::Error::msg(format!("message index {index} out of range")))
    }
}

/// The engine shared by every plugin, with an epoch ticker for deadlines.
///
/// The ticker advances the epoch only while a plugin runs: an idle router
/// does not wake a thread a thousand times a second (that cost ~3 % of a
/// core and scheduler noise on every other thread).
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    /// The epoch advances every `tick`.
    tick: Duration,
    ticker: Arc<Ticker>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Calls in progress, and the ticker's wake-up when the first one starts.
#[derive(Default)]
struct Ticker {
    running: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Keeps the epoch ticking while a plugin runs; see [`PluginEngine::running`].
pub struct Running(Arc<Ticker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PluginEngine {
    /// Marks a plugin call (or instantiation) in progress until the guard
    /// drops: epoch deadlines only advance while one is.
    pub fn running(&self) -> Running {
        if self.ticker.running.fetch_add(1, Ordering::AcqRel) == 0 {
            // The ticker re-checks under this lock before it waits, so
            // this wake-up cannot fall between its check and its wait.
            let _g = self.ticker.lock.lock().expect("ticker lock");
            self.ticker.wake.notify_one();
        }
        Running(self.ticker.clone())
    }

    /// Builds the engine and starts its epoch ticker thread.
    pub fn new() -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Async component functions are not part of our contract, and their
        // support costs ~0.4 µs on every call.
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let tick = Duration::from_millis(1);
        let weak = engine.weak();
        let ticker = Arc::new(Ticker::default());
        let t = ticker.clone();
        std::thread::Builder::new()
            .name("switchyard-epoch".into())
            .spawn(move || {
                loop {
                    if t.running.load(Ordering::Acquire) == 0 {
                        let mut g = t.lock.lock().expect("ticker lock");
                        while t.running.load(Ordering::Acquire) == 0 {
                            // Wake now and then to notice the engine is gone.
                            g = t
                                .wake
                                .wait_timeout(g, Duration::from_secs(1))
                                .expect("ticker lock")
                                .0;
                            if weak.upgrade().is_none() {
                                return;
                            }
                        }
                    }
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| wasmtime::Error::msg(format!("cannot start epoch thread: {e}")))?;
        Ok(PluginEngine {
            engine,
            tick,
            ticker,
            stopping: Arc::default(),
        })
    }

    /// Interrupts every call in progress and refuses new ones: for
    /// shutdown, which then never waits out a plugin's deadline.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        // Every deadline is at most this many ticks ahead: pass them all.
        for _ in 0..self.ticks(MAX_DEADLINE) {
            self.engine.increment_epoch();
        }
    }

    /// True once [`PluginEngine::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Epoch ticks for a deadline of `d` (at least one).
    pub fn ticks(&self, d: Duration) -> u64 {
        (d.as_micros() / self.tick.as_micros().max(1)).max(1) as u64 + 1
    }

    /// A linker with the host interfaces. Anything else a component imports
    /// (such as WASI, pulled in by a guest's standard library) is defined to
    /// trap: a plugin gets no filesystem, network, environment or clock.
    pub fn linker(&self) -> wasmtime::Result<Linker<StoreState>> {
        let mut linker = Linker::new(&self.engine);
        types::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |s| s,
        )?;
        host::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |s| s,
        )?;
        // A world's `use types.{batch}` also imports the resource type at
        // the component's root; it is the same host type.
        linker.root().resource(
            "batch",
            wasmtime::component::ResourceType::host::<BatchRep>(),
            |_, _| Ok(()),
        )?;
        Ok(linker)
    }
}

impl types::Host for StoreState {}

impl types::HostBatch for StoreState {
    fn len(&mut self, _b: Resource<BatchRep>) -> u32 {
        self.batch.len() as u32
    }

    fn key(&mut self, _b: Resource<BatchRep>, index: u32) -> Option<Vec<u8>> {
        self.batch
            .get(index as usize)
            .and_then(|m| m.record.key_bytes().map(<[u8]>::to_vec))
    }

    fn header(&mut self, _b: Resource<BatchRep>, index: u32, name: String) -> Option<Vec<u8>> {
        self.batch
            .get(index as usize)
            .and_then(|m| m.record.header(&name))
            .map(|v| v.to_vec())
    }

    fn headers(&mut self, _b: Resource<BatchRep>, index: u32) -> Vec<(String, Vec<u8>)> {
        self.batch
            .get(index as usize)
            .map(|m| {
                m.record
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn payload(&mut self, _b: Resource<BatchRep>, index: u32) -> Vec<u8> {
        self.batch
            .get(index as usize)
            .map(|m| m.record.payload().to_vec())
            .unwrap_or_default()
    }

    fn topic(&mut self, _b: Resource<BatchRep>, index: u32) -> String {
        self.msg(index)
            .map(|m| m.topic.to_string())
            .unwrap_or_default()
    }

    fn timestamp_ms(&mut self, _b: Resource<BatchRep>, index: u32) -> u64 {
        self.msg(index).map(|m| m.timestamp_ms).unwrap_or_default()
    }

    fn attempt(&mut self, _b: Resource<BatchRep>, index: u32) -> u32 {
        self.msg(index).map(|m| m.attempt).unwrap_or_default()
    }

    fn drop(&mut self, _b: Resource<BatchRep>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl host::Host for StoreState {
    fn log(&mut self, level: host::Level, message: String) {
        let plugin = &*self.label;
        match level {
            host::Level::Trace => tracing::trace!(plugin, "{message}"),
            host::Level::Debug => tracing::debug!(plugin, "{message}"),
            host::Level::Info => tracing::info!(plugin, "{message}"),
            host::Level::Warn => tracing::warn!(plugin, "{message}"),
            host::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn config_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
        if let Some((_, v)) = self.kv_writes.iter().rev().find(|(k, _)| *k == key) {
            return Some(v.clone());
        }
        self.kv.get(&key)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) {
        self.kv_writes.push((key, value));
    }

    fn now_ms(&mut self) -> u64 {
        crate::storage::now_ms()
    }
}
