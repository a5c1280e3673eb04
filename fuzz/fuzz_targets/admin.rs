#![no_main]
//! See `switchyard::fuzzing::admin`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::admin(data));
