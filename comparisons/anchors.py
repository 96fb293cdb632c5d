#!/usr/bin/env python3
"""The frameworks users would pick instead, on the kernel micro-benchmarks' shapes, in one run.

Times softmax cross-entropy loss plus logits gradient (float32, 2 threads) in TensorFlow's raw
ops (SoftmaxCrossEntropyWithLogits / SparseSoftmaxCrossEntropyWithLogits), JAX jit of
value_and_grad, PyTorch F.cross_entropy + autograd, and numpy, then runs xent's criterion
bench (`cargo bench --bench kernel`, f32 group) in the same run and prints GB/s of logits and
the ratio xent / each. Not run in CI.

    comparisons/anchors.py                   # venv at /work/venvs/anchors (created on first use)
    XENT_ANCHORS_VENV=DIR comparisons/anchors.py

numpy is timed with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (they slow a current numpy and
the ops here use no BLAS anyway).
"""
import json
import os
import subprocess
import sys
import time

SHAPES = [(64, 10), (256, 1000), (1024, 1000), (4096, 1000), (64, 32000), (16, 128256)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("XENT_ANCHORS_VENV", "/work/venvs/anchors")
PACKAGES = ["numpy", "tensorflow-cpu", "jax[cpu]", "torch"]
MODULES = ["numpy", "tensorflow", "jax", "torch"]


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV) or os.environ.get("XENT_ANCHORS_INNER"):
        return
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    missing = [p for p, mod in zip(PACKAGES, MODULES)
               if subprocess.call([py, "-c", f"import {mod}"], stderr=subprocess.DEVNULL) != 0]
    if missing:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", *missing])
    env = dict(os.environ, XENT_ANCHORS_INNER="1")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(k, None)
    os.execve(py, [py, *sys.argv], env)


def best_of(fn, seconds=1.0):
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median


def data(rows, c):
    import numpy as np
    k = np.arange(rows * c, dtype=np.int64)
    x = (((k * 7919) % 1013) / 101.0 - 5.0).astype(np.float32).reshape(rows, c)
    ids = ((np.arange(rows) * 31 + 7) % c).astype(np.int32)
    y = np.zeros((rows, c), np.float32)
    y[np.arange(rows), ids] = 1
    return x, y, ids


def frameworks():
    import numpy as np
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import torch
    torch.set_num_threads(2)
    import jax
    import jax.numpy as jnp

    def jloss(x, y):
        return -jnp.sum(y * jax.nn.log_softmax(x, axis=-1))

    def jsloss(x, t):
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), t[:, None], axis=-1))

    jd = jax.jit(jax.value_and_grad(jloss))
    js = jax.jit(jax.value_and_grad(jsloss))

    def np_dense(x, y):
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        loss = -(y * ((x - m) - np.log(s))).sum(axis=1)
        return loss, e / s * y.sum(axis=1, keepdims=True) - y

    def np_sparse(x, t):
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        r = np.arange(len(t))
        loss = np.log(s[:, 0]) - (x[r, t] - m[:, 0])
        g = e / s
        g[r, t] -= 1
        return loss, g

    out = {}
    for rows, c in SHAPES:
        x, y, ids = data(rows, c)
        tx, ty, tids = tf.constant(x), tf.constant(y), tf.constant(ids)
        px, py_, pids = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids.astype(np.int64))
        jx, jy, jids = jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids)

        def torch_run(target):
            xx = px.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(xx, target, reduction="sum")
            loss.backward()
            return xx.grad

        runs = {
            ("tensorflow", "dense"): lambda: [t.numpy() for t in tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=tx, labels=ty)],
            ("tensorflow", "sparse"): lambda: [t.numpy() for t in tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=tx, labels=tids)],
            ("jax", "dense"): lambda: jax.block_until_ready(jd(jx, jy)),
            ("jax", "sparse"): lambda: jax.block_until_ready(js(jx, jids)),
            ("pytorch", "dense"): lambda: torch_run(py_),
            ("pytorch", "sparse"): lambda: torch_run(pids),
            ("numpy", "dense"): lambda: np_dense(x, y),
            ("numpy", "sparse"): lambda: np_sparse(x, ids),
        }
        for (fw, kind), fn in runs.items():
            out[(fw, kind, rows, c)] = x.nbytes / best_of(fn) / 1e9
    return out


def xent():
    env = dict(os.environ, XENT_BENCH_QUICK="1")
    subprocess.run(["cargo", "bench", "--quiet", "--bench", "kernel", "--", "kernel-f32|triad"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    out = {}
    for rows, c in SHAPES:
        for kind in ("dense", "sparse"):
            path = os.path.join(target, "criterion", "kernel-f32", kind, f"{rows}x{c}", "new", "estimates.json")
            with open(path) as f:
                ns = json.load(f)["median"]["point_estimate"]
            out[(kind, rows, c)] = rows * c * 4 / ns
    return out


def main():
    ensure_venv()
    fw = frameworks()
    xe = xent()
    names = ["tensorflow", "jax", "pytorch", "numpy"]
    print(f"{'labels':<7} {'shape':<11} {'xent':>7} " + " ".join(f"{n:>10}" for n in names) + "  xent/best")
    for kind in ("dense", "sparse"):
        for rows, c in SHAPES:
            x = xe[(kind, rows, c)]
            vals = [fw[(n, kind, rows, c)] for n in names]
            best = max(vals[:3])
            cols = " ".join(f"{v:>6.2f} {x / v:>3.1f}x" for v in vals)
            print(f"{kind:<7} {f'{rows}x{c}':<11} {x:>7.2f} {cols}  {x / best:.2f}")
    print("GB/s of float32 logits (loss + logits gradient, 2 threads); 'Nx' = xent / that framework;")
    print("xent/best is against the best of TensorFlow, JAX and PyTorch.")


if __name__ == "__main__":
    main()
