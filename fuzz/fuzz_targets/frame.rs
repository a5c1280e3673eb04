#![no_main]
//! See `switchyard::fuzzing::frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::frame(data));
