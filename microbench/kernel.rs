//! Kernel throughput in GB/s of logits, beside a STREAM-like triad measured in the same run.
//!
//! `cargo bench --bench kernel` runs every shape (dense and sparse, f32 and bf16, loss plus
//! logits gradient) on a 2-thread rayon pool, then prints a table with each result as a
//! fraction of the triad bound. The bound for a shape is what the triad's bandwidth allows for
//! that shape's bytes: dense moves logits + labels + gradient, sparse logits + gradient.
//! `XENT_KERNEL_LEVEL` (general, portable, avx2, avx512) caps the kernel's instruction set;
//! `XENT_BENCH_QUICK=1` shortens the measurements (for the anchors script).
//!
//! `dense-unaligned` and `sparse-unaligned` (f32, at 4096x1000 and 16x128256) read the logits
//! and dense labels as little-endian bytes 1 byte past an aligned address, as a raw tensor
//! usually sits in a received gRPC message, beside the aligned cases of the same run:
//! `cargo bench --bench kernel -- "kernel-f32/.*(4096x1000|16x128256)"`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use xent::dtype::Element;
use xent::kernel::{
    self, ClassIds, Elems, Grads, Input, Labels, Layout, LeBytes, Options, Problem, Upstream,
};

const THREADS: usize = 2;
const SHAPES: [(usize, usize); 6] = [
    (64, 10),
    (256, 1000),
    (1024, 1000),
    (4096, 1000),
    (64, 32000),
    (16, 128256),
];
/// Shapes also measured with unaligned f32 inputs.
const UNALIGNED_SHAPES: [(usize, usize); 2] = [(4096, 1000), (16, 128256)];
const TRIAD_N: usize = 16 << 20;

/// The bytes of some elements stored 1 byte past an 8-byte aligned address.
struct Offset {
    words: Vec<u64>,
    len: usize,
}

impl Offset {
    fn new<T: bytemuck::Pod>(v: &[T]) -> Offset {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let mut words = vec![0u64; (bytes.len() + 1).div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[1..1 + bytes.len()].copy_from_slice(bytes);
        Offset {
            words,
            len: bytes.len(),
        }
    }

    fn input<T: bytemuck::Pod>(&self, layout: Layout) -> Input<'_, T> {
        let bytes = &bytemuck::cast_slice::<u64, u8>(&self.words)[1..1 + self.len];
        Input::new(Elems::Le(LeBytes::new(bytes).unwrap()), layout).unwrap()
    }
}

struct Case<T> {
    x: Vec<T>,
    y: Vec<T>,
    ids: Vec<i32>,
    g: Vec<T>,
    layout: Layout,
}

fn case<T: Element>(rows: usize, c: usize) -> Case<T> {
    let n = rows * c;
    let x = (0..n)
        .map(|k| T::from_f64(((k * 7919) % 1013) as f64 / 101.0 - 5.0))
        .collect();
    let mut y = vec![T::from_f64(0.0); n];
    let ids: Vec<i32> = (0..rows).map(|r| ((r * 31 + 7) % c) as i32).collect();
    for (r, &t) in ids.iter().enumerate() {
        y[r * c + t as usize] = T::from_f64(1.0);
    }
    Case {
        x,
        y,
        ids,
        g: vec![T::from_f64(0.0); n],
        layout: Layout {
            outer: rows,
            classes: c,
            inner: 1,
        },
    }
}

/// One evaluation, reading logits and dense labels from `unaligned` copies when given.
fn run<T: Element>(
    cs: &mut Case<T>,
    unaligned: Option<&(Offset, Offset)>,
    sparse: bool,
) -> kernel::Loss {
    let (x, y) = match unaligned {
        Some((x, y)) => (x.input(cs.layout), y.input(cs.layout)),
        None => (
            kernel::view3(&cs.x, cs.layout).unwrap().into(),
            kernel::view3(&cs.y, cs.layout).unwrap().into(),
        ),
    };
    let labels = if sparse {
        Labels::Sparse(ClassIds::I32(&cs.ids))
    } else {
        Labels::Dense(y)
    };
    let p = Problem {
        logits: x,
        labels,
        options: Options::default(),
        class_weights: None,
        sample_weights: None,
        upstream: Upstream::Ones,
    };
    let grads = Grads {
        logits: Some(kernel::view3_mut(&mut cs.g, cs.layout).unwrap()),
        labels: None,
    };
    kernel::evaluate(&p, grads).unwrap()
}

fn quick() -> bool {
    std::env::var("XENT_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Triad `a = b + s c` over 3 x 64 MiB, split in fixed chunks over the same pool; bytes moved
/// per second count the write of `a` once, as STREAM does.
fn triad(c: &mut Criterion, pool: &rayon::ThreadPool) {
    use rayon::prelude::*;
    let (mut a, b, cc) = (
        vec![0.0f32; TRIAD_N],
        vec![1.0f32; TRIAD_N],
        vec![2.0f32; TRIAD_N],
    );
    let mut g = c.benchmark_group("triad");
    g.throughput(Throughput::Bytes((3 * 4 * TRIAD_N) as u64));
    g.sample_size(10);
    g.bench_function("f32", |bch| {
        bch.iter(|| {
            pool.install(|| {
                a.par_chunks_mut(1 << 16)
                    .zip(b.par_chunks(1 << 16))
                    .zip(cc.par_chunks(1 << 16))
                    .for_each(|((a, b), c)| {
                        for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                            *a = b + 3.0 * c;
                        }
                    })
            });
            std::hint::black_box(&a);
        })
    });
    g.finish();
}

fn kernels<T: Element>(c: &mut Criterion, pool: &rayon::ThreadPool, name: &str) {
    let mut g = c.benchmark_group(format!("kernel-{name}"));
    let secs = if quick() { 1 } else { 3 };
    g.measurement_time(Duration::from_secs(secs));
    g.warm_up_time(Duration::from_millis(300));
    g.sample_size(20);
    for (rows, classes) in SHAPES {
        let mut cs = case::<T>(rows, classes);
        g.throughput(Throughput::Bytes((rows * classes * size_of::<T>()) as u64));
        let unaligned = (T::DTYPE == xent::dtype::DType::F32
            && UNALIGNED_SHAPES.contains(&(rows, classes)))
        .then(|| (Offset::new(&cs.x), Offset::new(&cs.y)));
        for sparse in [false, true] {
            let kind = if sparse { "sparse" } else { "dense" };
            let id = BenchmarkId::new(kind, format!("{rows}x{classes}"));
            // The timing loop runs on a pool thread, as the service's kernel calls do: a
            // handoff into the pool per call would be timed too (tens of microseconds under
            // a hypervisor), swamping the small shapes.
            g.bench_function(id, |b| {
                pool.install(|| b.iter(|| run(&mut cs, None, sparse)))
            });
            if let Some(u) = &unaligned {
                let id = BenchmarkId::new(format!("{kind}-unaligned"), format!("{rows}x{classes}"));
                g.bench_function(id, |b| {
                    pool.install(|| b.iter(|| run(&mut cs, Some(u), sparse)))
                });
            }
        }
    }
    g.finish();
}

/// Criterion's mean estimate (ns) of one benchmark, read back from `target/criterion`.
fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let text =
        std::fs::read_to_string(format!("{dir}/criterion/{group}/{id}/new/estimates.json")).ok()?;
    let rest = &text[text.find("\"mean\"")?..];
    let key = "\"point_estimate\":";
    let at = rest.find(key)? + key.len();
    rest[at..].split([',', '}']).next()?.parse().ok()
}

fn summary() {
    let triad = (3 * 4 * TRIAD_N) as f64 / mean_ns("triad", "f32").unwrap_or(f64::NAN);
    println!(
        "\nsummary: level {:?}, {THREADS} threads, triad {triad:.1} GB/s",
        kernel::simd::Level::current()
    );
    println!("bound = triad / (bytes moved per logit byte: 3 dense, 2 sparse)");
    println!(
        "{:<6} {:<16} {:<11} {:>8} {:>8} {:>9}",
        "dtype", "labels", "shape", "GB/s", "bound", "fraction"
    );
    for (name, size) in [("f32", 4usize), ("bf16", 2)] {
        for (rows, classes) in SHAPES {
            for kind in ["dense", "sparse", "dense-unaligned", "sparse-unaligned"] {
                let Some(ns) = mean_ns(
                    &format!("kernel-{name}"),
                    &format!("{kind}/{rows}x{classes}"),
                ) else {
                    continue;
                };
                let gbs = (rows * classes * size) as f64 / ns;
                let bound = triad / if kind.starts_with("dense") { 3.0 } else { 2.0 };
                let shape = format!("{rows}x{classes}");
                println!(
                    "{name:<6} {kind:<16} {shape:<11} {gbs:>8.2} {bound:>8.2} {:>9.2}",
                    gbs / bound
                );
            }
        }
    }
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    triad(&mut c, &pool);
    kernels::<f32>(&mut c, &pool, "f32");
    kernels::<bf16>(&mut c, &pool, "bf16");
    c.final_summary();
    summary();
}
