//! Generated guest bindings for the one hook world this build targets.
//! Plugin code never uses this module directly; the `export_*!` macros do.

#![allow(missing_docs, clippy::all, unsafe_op_in_unsafe_fn)]

#[cfg(feature = "route")]
wit_bindgen::generate!({
    path: "../wit",
    world: "route",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin::bindings",
});

#[cfg(feature = "filter")]
wit_bindgen::generate!({
    path: "../wit",
    world: "filter",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin::bindings",
});

#[cfg(feature = "priority")]
wit_bindgen::generate!({
    path: "../wit",
    world: "priority",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin::bindings",
});

#[cfg(feature = "fanout")]
wit_bindgen::generate!({
    path: "../wit",
    world: "fanout",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin::bindings",
});

#[cfg(feature = "retry")]
wit_bindgen::generate!({
    path: "../wit",
    world: "retry",
    pub_export_macro: true,
    export_macro_name: "__export_world",
    default_bindings_module: "switchyard_plugin::bindings",
});
