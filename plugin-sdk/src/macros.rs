//! The `export_*!` macros: one line turns a function into a component export.
//!
//! Each takes the hook function and, optionally, `self_test = path` naming a
//! `fn() -> Result<(), String>` that the router runs at deploy time. On
//! native builds the macros only check the function's signature, so
//! `cargo test` works without WebAssembly.

/// Exports `fn(&Message) -> Route` as the plugin's route hook.
#[macro_export]
macro_rules! export_route {
    ($f:path) => {
        $crate::export_route!($f, self_test = $crate::no_self_test);
    };
    ($f:path, self_test = $t:path) => {
        const _: fn(&$crate::Message<'_>) -> $crate::Route = $f;
        const _: fn() -> ::std::result::Result<(), ::std::string::String> = $t;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::switchyard::plugin::types as __t;
            struct __Plugin;
            impl $crate::bindings::Guest for __Plugin {
                fn route(batch: &__t::Batch) -> ::std::vec::Vec<__t::RouteDecision> {
                    (0..batch.len())
                        .map(|i| {
                            $crate::__private::route_to_wit($f(&$crate::Message::__from_host(
                                batch, i,
                            )))
                        })
                        .collect()
                }
                fn self_test() -> ::std::result::Result<(), ::std::string::String> {
                    $t()
                }
            }
            $crate::bindings::__export_world!(__Plugin);
        };
    };
}

/// Exports `fn(&Subscriber, &Message) -> bool` as the plugin's filter hook.
#[macro_export]
macro_rules! export_filter {
    ($f:path) => {
        $crate::export_filter!($f, self_test = $crate::no_self_test);
    };
    ($f:path, self_test = $t:path) => {
        const _: fn(&$crate::Subscriber, &$crate::Message<'_>) -> bool = $f;
        const _: fn() -> ::std::result::Result<(), ::std::string::String> = $t;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::switchyard::plugin::types as __t;
            struct __Plugin;
            impl $crate::bindings::Guest for __Plugin {
                fn filter(sub: __t::Subscriber, batch: &__t::Batch) -> ::std::vec::Vec<bool> {
                    let sub = $crate::__private::subscriber_from_wit(sub);
                    (0..batch.len())
                        .map(|i| $f(&sub, &$crate::Message::__from_host(batch, i)))
                        .collect()
                }
                fn self_test() -> ::std::result::Result<(), ::std::string::String> {
                    $t()
                }
            }
            $crate::bindings::__export_world!(__Plugin);
        };
    };
}

/// Exports `fn(&Message) -> u8` (0 lowest to 9 highest) as the priority hook.
#[macro_export]
macro_rules! export_priority {
    ($f:path) => {
        $crate::export_priority!($f, self_test = $crate::no_self_test);
    };
    ($f:path, self_test = $t:path) => {
        const _: fn(&$crate::Message<'_>) -> u8 = $f;
        const _: fn() -> ::std::result::Result<(), ::std::string::String> = $t;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::switchyard::plugin::types as __t;
            struct __Plugin;
            impl $crate::bindings::Guest for __Plugin {
                fn priority(batch: &__t::Batch) -> ::std::vec::Vec<u8> {
                    (0..batch.len())
                        .map(|i| $f(&$crate::Message::__from_host(batch, i)))
                        .collect()
                }
                fn self_test() -> ::std::result::Result<(), ::std::string::String> {
                    $t()
                }
            }
            $crate::bindings::__export_world!(__Plugin);
        };
    };
}

/// Exports `fn(&Message, followers: u32) -> FanoutMode` as the fan-out hook.
#[macro_export]
macro_rules! export_fanout {
    ($f:path) => {
        $crate::export_fanout!($f, self_test = $crate::no_self_test);
    };
    ($f:path, self_test = $t:path) => {
        const _: fn(&$crate::Message<'_>, u32) -> $crate::FanoutMode = $f;
        const _: fn() -> ::std::result::Result<(), ::std::string::String> = $t;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::switchyard::plugin::types as __t;
            struct __Plugin;
            impl $crate::bindings::Guest for __Plugin {
                fn choose(
                    batch: &__t::Batch,
                    followers: ::std::vec::Vec<u32>,
                ) -> ::std::vec::Vec<__t::FanoutMode> {
                    (0..batch.len())
                        .map(|i| {
                            let n = followers.get(i as usize).copied().unwrap_or(0);
                            $crate::__private::fanout_to_wit($f(
                                &$crate::Message::__from_host(batch, i),
                                n,
                            ))
                        })
                        .collect()
                }
                fn self_test() -> ::std::result::Result<(), ::std::string::String> {
                    $t()
                }
            }
            $crate::bindings::__export_world!(__Plugin);
        };
    };
}

/// Exports `fn(&Message, &Failure) -> RetryDecision` as the retry hook.
#[macro_export]
macro_rules! export_retry {
    ($f:path) => {
        $crate::export_retry!($f, self_test = $crate::no_self_test);
    };
    ($f:path, self_test = $t:path) => {
        const _: fn(&$crate::Message<'_>, &$crate::Failure) -> $crate::RetryDecision = $f;
        const _: fn() -> ::std::result::Result<(), ::std::string::String> = $t;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::switchyard::plugin::types as __t;
            struct __Plugin;
            impl $crate::bindings::Guest for __Plugin {
                fn on_failure(batch: &__t::Batch, f: __t::Failure) -> __t::RetryDecision {
                    let f = $crate::__private::failure_from_wit(f);
                    $crate::__private::retry_to_wit($f(&$crate::Message::__from_host(batch, 0), &f))
                }
                fn self_test() -> ::std::result::Result<(), ::std::string::String> {
                    $t()
                }
            }
            $crate::bindings::__export_world!(__Plugin);
        };
    };
}
