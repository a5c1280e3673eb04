//! The wasmtime host: load, validate, limit, call, hot swap, registry.
mod bindings;
pub mod breaker;
pub mod engine;
pub mod loaded;
pub mod registry;

pub use bindings::types::{
    Failure, FanoutMode, RetryDecision, RouteAction, RouteDecision, Subscriber,
};
pub use engine::{CallMessage, EmptyKv, KvStore, PluginEngine};
pub use loaded::{CallError, CallResult, Hook, Limits, LoadError, LoadedPlugin};
pub use registry::{Binding, Ceilings, DeployRequest, FailureMode, LiveVersion, PluginRegistry};
