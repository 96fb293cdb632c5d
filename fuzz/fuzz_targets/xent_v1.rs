//! The `xent_v1` target: see checks/xent_v1.rs for what it checks.
#![no_main]

#[path = "../checks/xent_v1.rs"]
mod check;
#[allow(dead_code)]
#[path = "../checks/draw.rs"]
mod draw;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
