//! Host bindings generated from `wit/`, one module per hook world. The
//! `types` and `host` interfaces are generated once (in `route`) and shared.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Host-side representation of a `batch` borrowed into a call: the rep is
/// an index into the store's current batch, so no table entry is created
/// per call.
pub struct BatchRep;

pub mod route {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "route",
        with: {
            "switchyard:plugin/types.batch": super::BatchRep,
        },
        additional_derives: [PartialEq, Eq],
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
        with: {
            "switchyard:plugin/types": super::route::switchyard::plugin::types,
            "switchyard:plugin/host": super::route::switchyard::plugin::host,
        },
    });
}

pub mod priority {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "priority",
        with: {
            "switchyard:plugin/types": super::route::switchyard::plugin::types,
            "switchyard:plugin/host": super::route::switchyard::plugin::host,
        },
    });
}

pub mod fanout {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "fanout",
        with: {
            "switchyard:plugin/types": super::route::switchyard::plugin::types,
            "switchyard:plugin/host": super::route::switchyard::plugin::host,
        },
    });
}

pub mod retry {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "retry",
        with: {
            "switchyard:plugin/types": super::route::switchyard::plugin::types,
            "switchyard:plugin/host": super::route::switchyard::plugin::host,
        },
    });
}

pub use route::switchyard::plugin::{host, types};
