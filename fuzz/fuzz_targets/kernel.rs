//! The `kernel` target: see checks/kernel.rs for what it checks.
#![no_main]

#[path = "../checks/kernel.rs"]
mod check;
#[allow(dead_code)]
#[path = "../checks/draw.rs"]
mod draw;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
