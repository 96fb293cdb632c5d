//! A fixed kernel workload for `scripts/kernel-guard` to count instructions of under callgrind.
//!
//! 32 x 1000 f32 rows (under the kernel's parallel threshold, so no rayon thread runs), dense
//! and sparse, loss and logits gradient, a few times over. Run with
//! `XENT_KERNEL_LEVEL=portable` so the count does not depend on the machine's vector units.
#![allow(dead_code, unused_imports)]

#[path = "../../../src/dtype.rs"]
mod dtype;
#[path = "../../../src/kernel/mod.rs"]
mod kernel;

use kernel::{ClassIds, Grads, Labels, Layout, Options, Problem, Upstream};

fn main() {
    let (rows, c) = (32, 1000);
    let layout = Layout { outer: rows, classes: c, inner: 1 };
    let x: Vec<f32> = (0..rows * c).map(|k| ((k * 7919) % 1013) as f32 / 101.0 - 5.0).collect();
    let ids: Vec<i32> = (0..rows).map(|r| ((r * 31 + 7) % c) as i32).collect();
    let mut y = vec![0.0f32; rows * c];
    for (r, &t) in ids.iter().enumerate() {
        y[r * c + t as usize] = 1.0;
    }
    let mut g = vec![0.0f32; rows * c];
    let mut total = 0.0;
    for _ in 0..4 {
        for sparse in [false, true] {
            let labels = if sparse {
                Labels::Sparse(ClassIds::I32(&ids))
            } else {
                Labels::Dense(kernel::view3(&y, layout).unwrap().into())
            };
            let p = Problem {
                logits: kernel::view3(&x, layout).unwrap().into(),
                labels,
                options: Options { reduction: kernel::Reduction::Sum, ..Options::default() },
                class_weights: None,
                sample_weights: None,
                upstream: Upstream::Ones,
            };
            let grads = Grads { logits: Some(kernel::view3_mut(&mut g, layout).unwrap()), labels: None };
            if let kernel::Loss::Reduced(v) = kernel::evaluate(&p, grads).unwrap() {
                total += v;
            }
        }
    }
    println!("level {:?} loss {total}", kernel::simd::Level::current());
}
