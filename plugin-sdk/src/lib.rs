//! Write Switchyard routing policies as plain Rust functions.
//!
//! A plugin is one function and one macro line. Pick the hook with a cargo
//! feature of this crate (`route`, `filter`, `priority`, `fanout` or
//! `retry`), write the function, and export it:
//!
//! ```
//! use switchyard_plugin::prelude::*;
//!
//! /// Sends each order to its region's topic, `orders.other` without one.
//! fn route(m: &Message) -> Route {
//!     match m.header_str("region") {
//!         Some(region) => Route::to(format!("orders.{region}")),
//!         None => Route::to("orders.other"),
//!     }
//! }
//! switchyard_plugin::export_route!(route);
//!
//! # fn main() {
//! // Plugins are unit-tested natively with plain `cargo test`:
//! let m = TestMessage::new(r#"{"total": 42}"#).header("region", "eu");
//! assert_eq!(route(&m.as_message()), Route::to("orders.eu"));
//! # }
//! ```
//!
//! Build the component with `cargo build --release --target wasm32-wasip2`
//! and deploy it with `switchyard plugin deploy`. Inside the router the
//! function runs once per message of each batch, under a time and memory
//! limit; a panic fails the whole batch and the binding's failure mode
//! applies.
//!
//! The host offers exactly what [`host`] lists: logging, deploy-time
//! configuration, a small durable key/value store and a clock. No
//! filesystem, network or environment.

#![warn(missing_docs)]

#[cfg(hook)]
#[doc(hidden)]
pub mod bindings;
mod decisions;
pub mod host;
mod macros;
mod message;
pub mod testing;

pub use decisions::{Action, Failure, FanoutMode, RetryDecision, Route, Subscriber};
pub use message::Message;
pub use testing::TestMessage;

#[cfg(all(target_arch = "wasm32", not(hook)))]
compile_error!(
    "switchyard-plugin: enable exactly one hook feature (route, filter, priority, fanout or retry)"
);

/// Everything a plugin needs, in one import.
pub mod prelude {
    pub use crate::host::{self, Level};
    pub use crate::{
        Action, Failure, FanoutMode, Message, RetryDecision, Route, Subscriber, TestMessage,
    };
}

/// The self-test used when a plugin declares none: always passes.
pub fn no_self_test() -> Result<(), String> {
    Ok(())
}

#[doc(hidden)]
pub mod __private {
    #[allow(unused_imports)]
    pub use crate::decisions::wit::*;
}
