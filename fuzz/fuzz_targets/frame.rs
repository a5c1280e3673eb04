#![no_main]
//! See `switchyard::fuzzing::frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::frames(data));
