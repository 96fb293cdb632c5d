//! The `message_prefix` target: see checks/message_prefix.rs for what it checks.
#![no_main]

#[path = "../checks/message_prefix.rs"]
mod check;
#[allow(dead_code)]
#[path = "../checks/draw.rs"]
mod draw;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
