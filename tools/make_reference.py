#!/usr/bin/env python3
"""Regenerate the xent conformance reference cases in tests/reference/.

    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install -r tools/requirements-reference.txt
    /path/to/venv/bin/python tools/make_reference.py           # regenerate everything
    /path/to/venv/bin/python tools/make_reference.py --check   # only re-verify the stored files

Run from anywhere; paths are resolved from this file. CI never runs this script: it reads the
committed manifest.json and .npy files (format: tests/reference/FORMAT.md).

Expected values are computed in float64 by the real frameworks (TensorFlow, Keras, PyTorch) from
inputs that were first rounded to the case's dtype. Where the spec (semantics.md) lists a
Deviation from a framework, the framework's own ops are composed to the spec's formula instead,
and the case's "source" says so. Every case records the exact call that produced its values.

After writing, the script verifies every valid case three ways:
  1. framework call vs the spec composed in TF ops (for cases where no deviation applies);
  2. an independent float64 numpy implementation of the spec vs the stored expected values;
  3. the spec's worked example (section 9) against the published figures.
`--check` runs step 2 alone on the committed files and needs only numpy and ml-dtypes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
KEEP = {"FORMAT.md", "README.md"}  # hand-written files in OUT that regeneration must not touch

F64 = np.float64
NP_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
LOSS_NAMES = {"dense": "softmax_cross_entropy", "sparse": "sparse_softmax_cross_entropy"}
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size", "sum_by_nonzero_weights")
PROB_EPS = 1e-7  # Keras backend.epsilon(); the spec uses 1 - eps exactly in float64

# Spec section 9.
WORKED_LOGITS = [[1.0, 2.0, 0.5], [0.2, 0.8, 1.5]]
WORKED_LABELS = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
WORKED_LOSS = [0.46436878, 0.57048061]
WORKED_MEAN = 0.51742470


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    kind: str  # "dense" | "sparse"
    dtype: str
    logits: Any
    labels: Any
    label_dtype: str = "int64"
    axis: int = -1
    label_smoothing: float = 0.0
    ignore_index: Optional[int] = None
    from_logits: bool = True
    z_loss: float = 0.0
    reduction: str = "none"
    class_weights: Any = None
    sample_weights: Any = None
    upstream: Any = None
    method: Optional[str] = None  # framework recipe; chosen from the options when None
    error: Optional[dict] = None  # {"field": ..., "contains": ...} for an invalid case
    probe: Optional[Callable[["Case"], str]] = None  # error cases: what the framework does

    @property
    def rank(self) -> int:
        return np.ndim(self.logits)

    @property
    def ax(self) -> int:
        return self.axis % self.rank

    @property
    def C(self) -> int:
        return np.shape(self.logits)[self.ax]

    @property
    def per_example_shape(self) -> tuple:
        s = list(np.shape(self.logits))
        del s[self.ax]
        return tuple(s)

    @property
    def loss_shape(self) -> tuple:
        return self.per_example_shape if self.reduction == "none" else ()


def round_to(a, dtype: str) -> np.ndarray:
    """Round to `dtype`, then return the exactly-representable values in storage precision."""
    a = np.asarray(a, dtype=F64)
    r = a.astype(NP_DTYPES[dtype])
    return r.astype(np.float32 if dtype == "float32" else F64)


def finalize(c: Case) -> Case:
    c.logits = round_to(c.logits, c.dtype)
    if c.kind == "dense":
        c.labels = round_to(c.labels, c.dtype)
    else:
        c.labels = np.asarray(c.labels, dtype=np.int64)
    for k in ("class_weights", "sample_weights", "upstream"):
        v = getattr(c, k)
        if v is not None:
            setattr(c, k, round_to(v, c.dtype))
    return c


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def normal(rng, shape, scale=2.0):
    return rng.normal(0.0, scale, size=shape)


def soft_labels(rng, shape, axis=-1):
    """Soft labels with values k/64 along `axis`: exact in every dtype and summing to exactly 1."""
    shape = tuple(shape)
    ax = axis % len(shape)
    cl = shape[:ax] + shape[ax + 1:] + (shape[ax],)
    n = int(np.prod(cl[:-1]))
    rows = [rng.multinomial(64, rng.dirichlet(np.ones(cl[-1]))) for _ in range(n)]
    y = np.asarray(rows, dtype=F64).reshape(cl) / 64.0
    return np.moveaxis(y, -1, ax)


def one_hot(ids, C, axis=-1):
    ids = np.asarray(ids)
    y = (ids[..., None] == np.arange(C)).astype(F64)
    return np.moveaxis(y, -1, axis % (ids.ndim + 1))


def ids_for(rng, shape, C):
    return rng.integers(0, C, size=shape)


def probs(rng, shape):
    """Positive, unnormalized probability-like inputs far from the 1e-7 clip."""
    return rng.uniform(0.05, 1.0, size=shape)


def build_cases() -> list[Case]:
    cases: list[Case] = []

    def add(c: Case):
        cases.append(finalize(c))

    def dense(name, dtype, shape=(4, 5), axis=-1, labels=None, logits=None, **kw):
        r = rng_for(name)
        x = normal(r, shape) if logits is None else logits
        y = soft_labels(r, np.shape(x), axis) if labels is None else labels
        add(Case(name, "dense", dtype, x, y, axis=axis, **kw))

    def sparse(name, dtype, shape=(4, 5), axis=-1, labels=None, logits=None, label_dtype="int64", **kw):
        r = rng_for(name)
        x = normal(r, shape) if logits is None else logits
        if labels is None:
            s = list(np.shape(x))
            C = s.pop(axis % len(s))
            labels = ids_for(r, s, C)
        add(Case(name, "sparse", dtype, x, labels, axis=axis, label_dtype=label_dtype, **kw))

    # --- spec section 9 worked example -------------------------------------------------------
    dense("spec_example_none_f64", "float64", logits=WORKED_LOGITS, labels=WORKED_LABELS)
    dense("spec_example_mean_f64", "float64", logits=WORKED_LOGITS, labels=WORKED_LABELS, reduction="mean")

    # --- every dtype (soft labels for dense) -----------------------------------------------------
    # (float32: the rank-3 axis cases, dense_one_row_f32 and sparse_int32_upstream_f32 below)
    for d, s in (("float16", "f16"), ("bfloat16", "bf16"), ("float64", "f64")):
        dense(f"dense_basic_{s}", d, shape=(4, 6))
        sparse(f"sparse_basic_{s}", d, shape=(4, 6))
    sparse("sparse_int32_upstream_f32", "float32", shape=(5, 4), label_dtype="int32",
           upstream=[1.0, 0.5, -1.0, 0.0, 3.0])

    # --- huge logits with mixed spreads, tiny logits ----------------------------------------------
    def huge_rows(h, s):
        if s == "f16":  # spreads up to 6e4 only: a spread of 2 * 6e4 gives losses above float16's max
            return [[h, 0.0, h, 1.0], [-h, -h, -h, -h], [h, h, h, h], [-h, 1.0, -h, 2.0], [h, h - 32, h - 64, h]]
        return [[h, -h, 0.0, h], [-h, -h, -h, -h], [h, h, h, -h], [-h, 1.0, -h, 2.0], [h, -h, h, -h]]

    mixed = {  # extra rows: large spreads and large common offsets
        "f64": [[700.0, -700.0, 0.0, 1.0], [1e15, 1e15 + 1, 1e15 - 1, 1e15 + 2], [-1e15, 1e-300, -1e300, 5e-324]],
        "f32": [[80.0, -80.0, 0.0, 1.0], [1e6, 1e6 + 1, 1e6 - 1, 1e6 + 2], [-1e38, 1e-30, 1e38, 1e-45]],
        "f16": [[11.0, -11.0, 0.0, 1.0], [1000.0, 1001.0, 999.0, 1002.0], [-3e4, 6e-8, 3e4, 0.0]],
    }
    for d, s, h in (("float32", "f32", 1e30), ("float64", "f64", 1e30), ("float16", "f16", 6e4)):
        tag = "1e30" if h == 1e30 else "6e4"
        x = huge_rows(h, s) + mixed[s]
        r = rng_for(f"huge_{s}")
        dense(f"dense_huge_{tag}_mixed_{s}", d, logits=x, labels=soft_labels(r, (8, 4)))
        sparse(f"sparse_huge_{tag}_mixed_{s}", d, logits=x, labels=[1, 2, 3, 0, 2, 1, 3, 2])
    r = rng_for("tiny")
    tiny = np.concatenate([r.normal(0, 1e-30, (3, 5)), np.zeros((1, 5))])
    dense("dense_tiny_1e-30_f64", "float64", logits=tiny)

    # --- -inf, +inf, NaN ------------------------------------------------------------------------
    ni, nan, pi = -np.inf, np.nan, np.inf
    x = [[1.0, ni, 0.5, ni], [ni, 2.0, ni, -1.0], [0.3, 0.2, 0.1, ni]]
    ylab = [[0.75, 0.0, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    dense("dense_neginf_label0_f64", "float64", logits=x, labels=ylab)
    dense("dense_neginf_label0_mean_f32", "float32", logits=x, labels=ylab, reduction="mean")
    dense("dense_neginf_nonzero_label_and_all_row_f64", "float64",
          logits=[[1.0, ni, 0.5], [ni, ni, ni], [0.1, 0.2, 0.3]],
          labels=[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    sparse("sparse_neginf_f64", "float64",  # -inf at non-targets, at the target, and a whole row
           logits=[[1.0, ni, 0.5, ni], [ni, ni, 3.0, ni], [1.0, ni, 0.5, 0.0], [ni, ni, ni, ni], [0.1, 0.2, 0.3, 0.4]],
           labels=[0, 2, 1, 3, 2])
    xbad = [[1.0, 2.0, 0.5, 0.0], [1.0, nan, 0.5, 0.0], [1.0, pi, 0.5, 0.0], [nan, pi, 0.5, 0.0], [0.0, 0.5, -0.5, 1.0]]
    dense("dense_nan_posinf_rows_f64", "float64", logits=xbad)
    sparse("sparse_nan_posinf_rows_f32", "float32", logits=xbad, labels=[0, 1, 2, 3, 3])
    dense("dense_nan_labels_and_sample_weights_f64", "float64",
          logits=[[1.0, 2.0, 0.5], [0.2, 0.8, 1.5], [0.0, 1.0, 2.0], [0.5, -1.0, 1.0]],
          labels=[[0.0, 1.0, 0.0], [nan, 0.5, 0.5], [0.25, 0.25, 0.5], [0.5, 0.0, 0.5]],
          sample_weights=[1.0, 1.0, nan, 2.0])
    # Infinite labels: +inf at the class holding the maximum (alone, and beside finite labels),
    # -inf there, +inf elsewhere, and a finite row; the loss is -y_j * log_softmax_j, infinite.
    dense("dense_inf_labels_at_max_f64", "float64",
          logits=[[1.0, 2.0, 0.5, 0.0], [0.3, -1.0, 2.5, 0.1], [1.0, 0.5, 0.0, -0.5], [0.0, 1.5, -2.0, 0.5],
                  [0.2, 0.4, 0.6, 0.8]],
          labels=[[0.0, pi, 0.0, 0.0], [0.25, 0.0, pi, 0.5], [ni, 0.0, 0.0, 0.0], [pi, 0.0, 0.0, 0.0],
                  [0.25, 0.25, 0.25, 0.25]])

    # --- shapes: one class, one row, zero rows, rank 1 -------------------------------------------
    dense("dense_single_class_f64", "float64", shape=(3, 1))
    sparse("sparse_single_class_f64", "float64", shape=(3, 1), reduction="mean")
    dense("dense_one_row_f32", "float32", shape=(1, 7))
    dense("dense_zero_rows_none_f32", "float32", logits=np.zeros((0, 4)), labels=np.zeros((0, 4)))
    sparse("sparse_zero_rows_sum_over_batch_size_f64", "float64", logits=np.zeros((0, 4)),
           labels=np.zeros((0,), np.int64), reduction="sum_over_batch_size")
    sparse("sparse_zero_rows_sum_by_nonzero_weights_f32", "float32", logits=np.zeros((0, 4)),
           labels=np.zeros((0,), np.int64), reduction="sum_by_nonzero_weights", sample_weights=2.0)
    dense("dense_rank1_f64", "float64", shape=(5,))
    sparse("sparse_rank1_sum_upstream_f64", "float64", shape=(5,), reduction="sum", upstream=-1.5)

    # --- class axis: every axis of rank-3 and rank-4 inputs --------------------------------------
    # Some rank-4 cases are reduced without weights: the element count of a multi-dimensional loss.
    red4 = {("dense", 1): "sum_over_batch_size", ("dense", -2): "sum_by_nonzero_weights", ("dense", 3): "sum",
            ("sparse", 2): "sum_over_batch_size", ("sparse", -3): "sum_by_nonzero_weights", ("sparse", 0): "sum"}
    for rank, shape, d, s in ((3, (3, 4, 5), "float32", "f32"), (4, (2, 3, 4, 5), "float64", "f64")):
        for axis in list(range(rank)) + list(range(-1, -rank - 1, -1)):
            a = f"axis{axis}" if axis >= 0 else f"axisneg{-axis}"
            rd = red4.get(("dense", axis), "none") if rank == 4 else "none"
            rs = red4.get(("sparse", axis), "none") if rank == 4 else "none"
            dense(f"dense_{a}_rank{rank}{'' if rd == 'none' else '_' + rd}_{s}", d, shape=shape, axis=axis,
                  reduction=rd)
            sparse(f"sparse_{a}_rank{rank}{'' if rs == 'none' else '_' + rs}_{s}", d, shape=shape, axis=axis,
                   label_dtype="int32" if axis % 2 else "int64", reduction=rs)

    # --- labels not summing to one (Deviation 1) -------------------------------------------------
    dense("dense_labels_unnormalized_f64", "float64", shape=(4, 4),
          labels=[[0.0, 2.0, 0.0, 0.0], [0.25, 0.125, 0.0, 0.125], [0.0, 0.0, 0.0, 0.0], [1.5, -0.5, 0.25, 0.75]])
    dense("dense_labels_unnormalized_mean_f32", "float32", shape=(3, 4), reduction="mean",
          labels=[[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 3.0, 0.0], [0.0, 0.25, 0.0, 0.0]])

    # --- 128k classes ------------------------------------------------------------------------------
    sparse("sparse_vocab128256_f32", "float32", shape=(1, 128256))

    # --- label smoothing ---------------------------------------------------------------------------
    dense("dense_smoothing_f64", "float64", shape=(4, 5), label_smoothing=0.1)
    dense("dense_smoothing_weighted_mean_f32", "float32", shape=(4, 5), label_smoothing=0.2,
          reduction="mean", sample_weights=[1.0, 0.0, 2.0, 0.5])
    dense("dense_smoothing_one_f64", "float64", shape=(3, 4), label_smoothing=1.0)
    dense("dense_smoothing_axisneg3_rank3_f64", "float64", shape=(3, 4, 5), axis=-3, label_smoothing=0.3)
    dense("dense_smoothing_axis1_rank3_sum_f64", "float64", shape=(3, 4, 5), axis=1, label_smoothing=0.1,
          reduction="sum")
    sparse("sparse_smoothing_f64", "float64", shape=(4, 5), label_smoothing=0.1)
    sparse("sparse_smoothing_mean_f64", "float64", shape=(5, 4), label_smoothing=0.25, reduction="mean")
    sparse("sparse_smoothing_axis1_rank3_f64", "float64", shape=(2, 5, 3), axis=1, label_smoothing=0.2)

    # --- class weights -----------------------------------------------------------------------------
    cw5 = [0.5, 2.0, 1.0, 0.25, 3.0]
    dense("dense_class_weights_smoothing_mean_f64", "float64", shape=(4, 5), class_weights=cw5,
          label_smoothing=0.2, reduction="mean")
    dense("dense_class_weights_weighted_mean_f64", "float64", shape=(4, 5), class_weights=cw5,
          reduction="mean", sample_weights=[2.0, 0.0, 1.0, 0.5])
    sparse("sparse_class_weights_mean_f64", "float64", shape=(6, 5), class_weights=cw5, reduction="mean")
    sparse("sparse_class_weights_smoothing_mean_f64", "float64", shape=(6, 5), class_weights=cw5,
           label_smoothing=0.15, reduction="mean")
    sparse("sparse_class_weights_weighted_mean_f64", "float64", shape=(6, 5), class_weights=cw5,
           reduction="mean", sample_weights=[1.0, 2.0, 0.0, 0.5, 1.0, 3.0])
    sparse("sparse_class_weights_sum_by_nonzero_weights_f64", "float64", shape=(6, 4),
           class_weights=[1.0, 0.0, 2.0, 0.5], labels=[0, 1, 2, 3, 1, 2],
           reduction="sum_by_nonzero_weights", sample_weights=[1.0, 1.0, 0.0, 2.0, 1.0, 0.5])
    sparse("sparse_class_weights_smoothing_axis0_rank3_sum_over_batch_size_f32", "float32", shape=(4, 3, 2),
           axis=0, class_weights=[0.5, 2.0, 1.0, 1.5], label_smoothing=0.1, reduction="sum_over_batch_size")

    # --- ignore_index ------------------------------------------------------------------------------
    ig = [0, -100, 3, 1, -100, 2]
    sparse("sparse_ignore_index_none_f64", "float64", shape=(6, 4), labels=ig, ignore_index=-100)
    sparse("sparse_ignore_index_sum_f64", "float64", shape=(6, 4), labels=ig, ignore_index=-100, reduction="sum")
    sparse("sparse_ignore_index_mean_f64", "float64", shape=(6, 4), labels=ig, ignore_index=-100, reduction="mean")
    sparse("sparse_ignore_index_sum_over_batch_size_f64", "float64", shape=(6, 4), labels=[0, 2, 3, 1, 2, 2],
           ignore_index=2, reduction="sum_over_batch_size")
    sparse("sparse_ignore_index_sum_by_nonzero_weights_f64", "float64", shape=(6, 4), labels=[0, -1, 3, 1, -1, 2],
           ignore_index=-1, reduction="sum_by_nonzero_weights", sample_weights=[1.0, 2.0, 0.0, 0.5, 1.0, 1.0])
    sparse("sparse_ignore_index_weighted_mean_i32_f32", "float32", shape=(6, 4), labels=ig, ignore_index=-100,
           label_dtype="int32", reduction="mean", sample_weights=[1.0, 2.0, 0.5, 0.0, 1.0, 3.0])
    sparse("sparse_ignore_index_class_weights_mean_f64", "float64", shape=(6, 4), labels=[0, 1, 3, 1, 2, 2],
           ignore_index=1, class_weights=[0.5, 2.0, 1.0, 4.0], reduction="mean")
    sparse("sparse_ignore_index_smoothing_mean_f64", "float64", shape=(6, 4), labels=ig, ignore_index=-100,
           label_smoothing=0.2, reduction="mean")
    sparse("sparse_ignore_index_axis1_rank3_f32", "float32", shape=(2, 4, 3), axis=1,
           labels=[[0, -100, 3], [-100, 2, 1]], ignore_index=-100, reduction="mean")
    for red in ("mean", "sum_over_batch_size", "sum_by_nonzero_weights"):
        sparse(f"sparse_ignore_all_{red}_f64", "float64", shape=(3, 4), labels=[-100, -100, -100],
               ignore_index=-100, reduction=red)

    # --- sample weights: scalar, full (in the reductions below), broadcast ----------------------
    dense("dense_sample_weights_scalar_mean_f64", "float64", shape=(4, 5), sample_weights=0.75, reduction="mean")
    dense("dense_sample_weights_bcast_n1_rank3_sum_by_nonzero_weights_f64", "float64", shape=(3, 4, 5),
          sample_weights=[[1.0], [0.0], [2.0]], reduction="sum_by_nonzero_weights")
    sparse("sparse_sample_weights_bcast_n1_rank3_none_f32", "float32", shape=(3, 4, 5),
           sample_weights=[[1.0], [0.0], [-2.0]])
    sparse("sparse_sample_weights_bcast_m_rank3_mean_f64", "float64", shape=(3, 4, 5),
           sample_weights=[0.5, 0.0, 1.0, 2.0], reduction="mean")

    # --- every reduction, with and without weights; upstream gradients ------------------------
    sw = [1.0, 0.0, 2.0, 0.5, 1.5]
    for red in REDUCTIONS:
        # (unweighted reductions: spec_example_mean_f64, the reduced rank-4 axis cases, ...)
        up_d = {"none": [1.0, -2.0, 0.5, 0.0, 3.0], "mean": 2.5}.get(red)
        up_s = {"sum_by_nonzero_weights": -0.75}.get(red)
        dense(f"dense_reduction_{red}_weighted{'_upstream' if up_d is not None else ''}_f64", "float64",
              shape=(5, 4), reduction=red, sample_weights=sw, upstream=up_d)
        sparse(f"sparse_reduction_{red}_weighted{'_upstream' if up_s is not None else ''}_f64", "float64",
               shape=(5, 4), reduction=red, sample_weights=sw, upstream=up_s)

    # --- z_loss --------------------------------------------------------------------------------------
    dense("dense_z_loss_f64", "float64", shape=(4, 5), z_loss=0.01)
    dense("dense_z_loss_bf16", "bfloat16", shape=(4, 5), z_loss=0.125)
    dense("dense_z_loss_axis0_rank3_mean_f64", "float64", shape=(4, 3, 2), axis=0, z_loss=0.1, reduction="mean")
    sparse("sparse_z_loss_weighted_mean_f32", "float32", shape=(4, 5), z_loss=0.05, reduction="mean",
           sample_weights=[1.0, 0.0, 2.0, 0.5])
    sparse("sparse_z_loss_ignore_index_mean_f64", "float64", shape=(5, 4), labels=[0, -100, 3, 1, 2],
           ignore_index=-100, z_loss=0.02, reduction="mean")

    # --- from_logits = false -----------------------------------------------------------------------
    r = rng_for("probs")
    dense("dense_probs_sum_over_batch_size_f32", "float32", logits=probs(r, (4, 5)), from_logits=False,
          reduction="sum_over_batch_size")
    dense("dense_probs_smoothing_f64", "float64", logits=probs(r, (4, 5)), from_logits=False, label_smoothing=0.1)
    dense("dense_probs_axis1_rank3_f64", "float64", logits=probs(r, (2, 4, 3)), axis=1, from_logits=False)
    clip_x = [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 1e-9], [0.3, 0.2, 0.4, 0.1], [2.0, 1.0, 1.0, 0.0]]
    dense("dense_probs_clipped_f64", "float64", logits=clip_x, from_logits=False,
          labels=[[1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    sparse("sparse_probs_f64", "float64", logits=probs(r, (5, 4)), from_logits=False)
    sparse("sparse_probs_clipped_mean_f64", "float64", logits=clip_x, labels=[0, 2, 1, 3], from_logits=False,
           reduction="mean")

    # --- invalid requests ----------------------------------------------------------------------------
    def err(name, kind, field, contains="", probe=None, shape=(2, 3), logits=None, labels=None, dtype="float32", **kw):
        x = np.zeros(shape) if logits is None else logits
        if labels is None:
            if kind == "dense":
                labels = np.zeros(np.shape(x))
                if np.size(labels):
                    labels[..., 0] = 1.0
            else:
                labels = np.zeros(np.shape(x)[:-1], np.int64)
        add(Case(name, kind, dtype, x, labels, error={"field": field, "contains": contains}, probe=probe, **kw))

    err("error_sparse_label_out_of_range", "sparse", "labels", "out of range", labels=[0, 3], probe=probe_tf_sparse)
    err("error_sparse_label_negative", "sparse", "labels", "out of range", labels=[-1, 0], probe=probe_tf_sparse)
    err("error_sparse_label_out_of_range_with_ignore_index", "sparse", "labels", "out of range",
        labels=[-100, 7], ignore_index=-100, probe=probe_torch)
    err("error_dense_zero_classes", "dense", "logits", shape=(2, 0), probe=probe_tf_dense)
    err("error_rank0_logits", "dense", "logits", logits=np.float64(1.0), labels=np.float64(1.0),
        probe=probe_tf_dense)
    err("error_dense_labels_shape_mismatch", "dense", "labels", labels=np.zeros((2, 4)), probe=probe_tf_dense)
    err("error_sparse_labels_shape_mismatch", "sparse", "labels", labels=[0, 1, 2], probe=probe_tf_sparse)
    err("error_class_weights_wrong_length", "sparse", "class_weights", class_weights=[1.0, 2.0], probe=probe_torch)
    err("error_sample_weights_not_broadcastable", "dense", "sample_weights", shape=(3, 4),
        sample_weights=[1.0, 2.0], reduction="mean", probe=probe_tf_weights)
    err("error_label_smoothing_above_one", "dense", "label_smoothing", label_smoothing=1.5, probe=probe_tf_v1_smoothing)
    err("error_z_loss_negative", "sparse", "z_loss", z_loss=-0.5)
    err("error_axis_out_of_range", "dense", "axis", axis=2, probe=probe_tf_dense)
    err("error_axis_below_range", "sparse", "axis", axis=-3)
    err("error_upstream_wrong_shape", "dense", "upstream", upstream=[1.0, 2.0, 3.0])

    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


# --------------------------------------------------------------------------------------------
# Spec checks shared by every mode (numpy only)
# --------------------------------------------------------------------------------------------

def validate(c: Case) -> Optional[tuple[str, str]]:
    """Spec section 7 applied to a case: (field, reason) of the first problem, or None."""
    shape = np.shape(c.logits)
    if len(shape) == 0:
        return ("logits", "rank 0")
    if not -len(shape) <= c.axis < len(shape):
        return ("axis", "out of range")
    C = shape[c.axis % len(shape)]
    if C == 0:
        return ("logits", "zero classes")
    if c.kind == "dense":
        if np.shape(c.labels) != shape:
            return ("labels", "shape")
    else:
        if np.shape(c.labels) != c.per_example_shape:
            return ("labels", "shape")
    if c.class_weights is not None and np.shape(c.class_weights) != (C,):
        return ("class_weights", "length")
    if c.sample_weights is not None:
        try:
            if np.broadcast_shapes(np.shape(c.sample_weights), c.per_example_shape) != c.per_example_shape:
                return ("sample_weights", "not broadcastable")
        except ValueError:
            return ("sample_weights", "not broadcastable")
    if c.upstream is not None and np.shape(c.upstream) != c.loss_shape:
        return ("upstream", "shape")
    if not 0.0 <= c.label_smoothing <= 1.0:
        return ("label_smoothing", "range")
    if c.z_loss < 0:
        return ("z_loss", "negative")
    if c.kind == "sparse":
        t = np.asarray(c.labels)
        bad = (t < 0) | (t >= C)
        if c.ignore_index is not None:
            bad &= t != c.ignore_index
        if bad.any():
            return ("labels", "out of range")
    return None


def spec_numpy(c: Case):
    """Independent float64 implementation of semantics.md (explicit formulas, no autodiff)."""
    ax, C, eps = c.ax, c.C, float(c.label_smoothing)
    x = np.moveaxis(np.asarray(c.logits, F64), ax, -1)
    w = np.ones(C) if c.class_weights is None else np.asarray(c.class_weights, F64)
    with np.errstate(all="ignore"):
        if c.from_logits:
            m = x.max(axis=-1, keepdims=True)
            sh = x - m
            e = np.exp(sh)
            S = e.sum(axis=-1, keepdims=True)
            logp = sh - np.log(S)  # never x - lse (spec section 1)
            sm = e / S
            lse = (m + np.log(S))[..., 0]
        else:
            tot = x.sum(axis=-1, keepdims=True)
            p = x / tot
            clipped = (p < PROB_EPS) | (p > 1.0 - PROB_EPS)
            pc = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
            logp = np.log(pc)

        def grad_from_coef(coef):
            """Logits gradient of -sum_j coef_j log q_j (coef constant)."""
            if c.from_logits:
                return sm * coef.sum(axis=-1, keepdims=True) - coef
            d = np.where(clipped, 0.0, -coef / pc)
            return (d - (d * p).sum(axis=-1, keepdims=True)) / tot

        mask = None
        wt = None
        if c.kind == "dense":
            y = np.moveaxis(np.asarray(c.labels, F64), ax, -1)
            ys = y * (1.0 - eps) + eps / C if eps > 0 else y
            coef = w * ys
            loss = -np.where(coef == 0, 0.0, coef * logp).sum(axis=-1)  # 0 * log 0 = 0 (Deviation 4)
            gx = grad_from_coef(coef)
            gy = -(1.0 - eps) * w * logp
        else:
            t = np.asarray(c.labels, np.int64)
            mask = np.ones(t.shape, bool) if c.ignore_index is None else t != c.ignore_index
            ts = np.where(mask, t, 0)
            oh = (ts[..., None] == np.arange(C)).astype(F64)
            wt = w[ts]
            coef = (1.0 - eps) * wt[..., None] * oh
            if eps > 0:
                coef = coef + (eps / C) * w
            loss = -np.take_along_axis(logp, ts[..., None], axis=-1)[..., 0] * (1.0 - eps) * wt
            if eps > 0:
                loss = loss - (eps / C) * (w * logp).sum(axis=-1)
            gx = grad_from_coef(coef)
            gy = None
        if c.z_loss > 0:
            loss = loss + c.z_loss * lse ** 2
            gx = gx + 2.0 * c.z_loss * lse[..., None] * sm
        if c.from_logits:  # spec section 6: NaN / +inf anywhere, or all -inf: the row is NaN
            bad = np.isnan(x).any(-1) | np.isposinf(x).any(-1) | np.isneginf(x).all(-1)
            loss = np.where(bad, np.nan, loss)
            gx = np.where(bad[..., None], np.nan, gx)
            if gy is not None:
                gy = np.where(bad[..., None], np.nan, gy)
        if mask is not None:
            loss = np.where(mask, loss, 0.0)
            gx = np.where(mask[..., None], gx, 0.0)

        # Reductions (section 4) and the chain rule with the upstream gradient (section 5).
        shp = loss.shape
        s = np.ones(shp) if c.sample_weights is None else np.broadcast_to(np.asarray(c.sample_weights, F64), shp)
        g = np.ones(c.loss_shape) if c.upstream is None else np.asarray(c.upstream, F64)
        L = s * loss
        valid = np.ones(shp, bool) if mask is None else mask
        omega = s * valid
        if c.kind == "sparse" and c.class_weights is not None:
            omega = omega * wt
        r = c.reduction
        if r == "none":
            out, dl = L, s * g
        else:
            total = L.sum()
            if r == "sum":
                out, dl = total, s * g
            else:
                den = {"mean": omega.sum(), "sum_over_batch_size": float(valid.sum()),
                       "sum_by_nonzero_weights": float(np.count_nonzero(omega))}[r]
                if den == 0:
                    out, dl = F64(0.0), np.zeros(shp)
                else:
                    out, dl = total / den, s * g / den
        gx = np.moveaxis(gx * dl[..., None], -1, ax)
        if gy is not None:
            gy = np.moveaxis(gy * dl[..., None], -1, ax)
    return np.asarray(out, F64), gx, gy


def compare(a, b) -> tuple[float, float, bool]:
    """(max abs error on near-zero values, max rel error elsewhere, non-finite pattern equal)."""
    a = np.asarray(a, F64)
    b = np.asarray(b, F64)
    if a.shape != b.shape:
        return np.inf, np.inf, False
    fa, fb = np.isfinite(a), np.isfinite(b)
    same = bool(np.array_equal(fa, fb) and np.array_equal(np.isnan(a), np.isnan(b))
                and np.array_equal(a[np.isinf(a)], b[np.isinf(b)]))
    both = fa & fb
    if not both.any():
        return 0.0, 0.0, same
    a, b = a[both], b[both]
    mag = np.maximum(np.abs(a), np.abs(b))
    diff = np.abs(a - b)
    near0 = mag < 1e-12
    max_abs = float(diff[near0].max()) if near0.any() else 0.0
    max_rel = float((diff[~near0] / mag[~near0]).max()) if (~near0).any() else 0.0
    return max_abs, max_rel, same


# --------------------------------------------------------------------------------------------
# Reading and writing the files
# --------------------------------------------------------------------------------------------

def options_of(c: Case) -> dict:
    return {"axis": c.axis, "label_smoothing": float(c.label_smoothing), "ignore_index": c.ignore_index,
            "from_logits": c.from_logits, "z_loss": float(c.z_loss), "reduction": c.reduction}


def load_cases() -> list[Case]:
    man = json.loads((OUT / "manifest.json").read_text())
    cases = []
    for e in man["cases"]:
        def ld(key, where="inputs"):
            p = e.get(where, {}).get(key)
            return None if p is None else np.load(OUT / p)
        o = e["options"]
        kind = "dense" if e["loss"] == "softmax_cross_entropy" else "sparse"
        c = Case(e["name"], kind, e["dtype"], ld("logits"), ld("labels"), label_dtype=e.get("label_dtype", "int64"),
                 axis=o["axis"], label_smoothing=o["label_smoothing"], ignore_index=o["ignore_index"],
                 from_logits=o["from_logits"], z_loss=o["z_loss"], reduction=o["reduction"],
                 class_weights=ld("class_weights"), sample_weights=ld("sample_weights"), upstream=ld("upstream"),
                 error=e.get("error"))
        c.expected = None if "expected" not in e else (ld("loss", "expected"), ld("grad_logits", "expected"),
                                                        ld("grad_labels", "expected"))
        cases.append(c)
    return cases


def check_stored(verbose=True) -> bool:
    """Recompute every stored valid case with spec_numpy and compare with the stored expectations."""
    cases = load_cases()
    ok = True
    worst = {"f64": [0.0, 0.0, ""], "f32": [0.0, 0.0, ""]}
    n_valid = n_err = 0
    for c in cases:
        v = validate(c)
        if c.error is not None:
            n_err += 1
            if v is None or v[0] != c.error["field"]:
                print(f"FAIL {c.name}: expected an error on {c.error['field']}, spec check says {v}")
                ok = False
            continue
        n_valid += 1
        if v is not None:
            print(f"FAIL {c.name}: valid case rejected by the spec check: {v}")
            ok = False
            continue
        loss, gx, gy = spec_numpy(c)
        stored = c.expected
        if c.dtype == "float32":
            loss, gx = loss.astype(np.float32), gx.astype(np.float32)
            gy = None if gy is None else gy.astype(np.float32)
        bucket = worst["f32" if c.dtype == "float32" else "f64"]
        for what, mine, ref in (("loss", loss, stored[0]), ("grad_logits", gx, stored[1]), ("grad_labels", gy, stored[2])):
            if mine is None and ref is None:
                continue
            if (mine is None) != (ref is None):
                print(f"FAIL {c.name}: {what} present in only one of spec/stored")
                ok = False
                continue
            a, r_, same = compare(mine, ref)
            if not same:
                print(f"FAIL {c.name}: {what} non-finite pattern differs")
                ok = False
            tol = 1e-12 if c.dtype != "float32" else 1e-6
            if r_ > tol or a > 1e-15:
                print(f"FAIL {c.name}: {what} rel {r_:.3e} abs {a:.3e}")
                ok = False
            if r_ > bucket[0]:
                bucket[0], bucket[2] = r_, f"{c.name}/{what}"
            bucket[1] = max(bucket[1], a)
    if verbose:
        print(f"numpy spec check: {n_valid} valid cases, {n_err} error cases")
        print(f"  float64-stored cases: max rel error {worst['f64'][0]:.3e} ({worst['f64'][2]}), "
              f"max abs error near zero {worst['f64'][1]:.3e}")
        print(f"  float32-stored cases (both rounded to float32): max rel error {worst['f32'][0]:.3e} "
              f"({worst['f32'][2]}), max abs error near zero {worst['f32'][1]:.3e}")
        print("numpy spec check:", "OK" if ok else "FAILED")
    return ok


# --------------------------------------------------------------------------------------------
# Framework recipes (generation mode only)
# --------------------------------------------------------------------------------------------

tf = keras = torch = F = None


def import_frameworks():
    global tf, keras, torch, F
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow as _tf
    _tf.config.threading.set_intra_op_parallelism_threads(1)
    _tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras as _keras
    _keras.config.set_floatx("float64")
    import torch as _torch
    import torch.nn.functional as _F
    _torch.set_num_threads(1)
    tf, keras, torch, F = _tf, _keras, _torch, _F


@dataclass
class Result:
    loss: np.ndarray
    grad_logits: np.ndarray
    grad_labels: Optional[np.ndarray]
    source: str


def v1_reduction(name):
    R = tf.compat.v1.losses.Reduction
    return {"none": R.NONE, "sum": R.SUM, "mean": R.MEAN, "sum_over_batch_size": R.SUM_OVER_BATCH_SIZE,
            "sum_by_nonzero_weights": R.SUM_BY_NONZERO_WEIGHTS}[name]


V1_RED_NAMES = {"none": "NONE", "sum": "SUM", "mean": "MEAN", "sum_over_batch_size": "SUM_OVER_BATCH_SIZE",
                "sum_by_nonzero_weights": "SUM_BY_NONZERO_WEIGHTS"}


def tf_weights(c: Case, per):
    """Sample weights for tf.compat.v1: a tensor of the loss's rank (v1 requires equal ranks)."""
    if c.sample_weights is None:
        return 1.0, ""
    s = tf.constant(np.asarray(c.sample_weights, F64))
    if 0 < s.shape.rank < per.shape.rank:
        return tf.broadcast_to(s, per.shape), " (weights first expanded to the loss shape with tf.broadcast_to)"
    return s, ""


V1_CROSSCHECK = {"rel": 0.0, "n": 0, "worst": ""}


def v1_reduce(c: Case, per):
    """Reduction and sample weights with tf.compat.v1.losses.compute_weighted_loss semantics.

    compute_weighted_loss casts losses and weights to float32 internally, so the expected values
    use the same definition in float64 TF ops (weights broadcast to the loss shape; NONE: w * l;
    SUM: sum(w * l); MEAN: sum(w * l) / sum(w); SUM_OVER_BATCH_SIZE: sum(w * l) / size;
    SUM_BY_NONZERO_WEIGHTS: sum(w * l) / count(w != 0); tf.math.divide_no_nan like TF's safe
    division), and the real compute_weighted_loss is run alongside and must agree to float32
    rounding. Returns (tensor, description)."""
    if c.sample_weights is None and c.reduction == "none":
        return per, ""
    w, note = tf_weights(c, per)
    ref32 = tf.compat.v1.losses.compute_weighted_loss(per, weights=w, reduction=v1_reduction(c.reduction))
    wb = tf.broadcast_to(tf.cast(w, tf.float64), tf.shape(per))
    L = per * wb
    r = c.reduction
    if r == "none":
        out = L
    elif r == "sum":
        out = tf.reduce_sum(L)
    else:
        den = {"mean": tf.reduce_sum(wb), "sum_over_batch_size": tf.cast(tf.size(per), tf.float64),
               "sum_by_nonzero_weights": tf.cast(tf.math.count_nonzero(wb), tf.float64)}[r]
        out = tf.math.divide_no_nan(tf.reduce_sum(L), den)
    a, b = np.asarray(out.numpy(), F64), np.asarray(ref32.numpy(), F64)
    ma, mr, same = compare(a, b)
    assert same and mr < 2e-6 and ma < 1e-10, (c.name, "compute_weighted_loss cross-check", ma, mr)
    V1_CROSSCHECK["n"] += 1
    if mr > V1_CROSSCHECK["rel"]:
        V1_CROSSCHECK["rel"], V1_CROSSCHECK["worst"] = mr, c.name
    return out, v1_desc(c, note)


def v1_desc(c: Case, note: str = "") -> str:
    if c.sample_weights is None and c.reduction == "none":
        return ""
    wdesc = "weights=sample_weights" if c.sample_weights is not None else "weights=1.0"
    return (f" + tf.compat.v1.losses.compute_weighted_loss({wdesc}, "
            f"reduction=tf.compat.v1.losses.Reduction.{V1_RED_NAMES[c.reduction]}){note} "
            "[float32 internally: its definition evaluated in float64 TF ops, the call agreeing to float32 rounding]")


def tf_run(c: Case, build, watch_labels=True) -> tuple:
    x = tf.constant(np.asarray(c.logits, F64))
    if c.kind == "dense":
        y = tf.constant(np.asarray(c.labels, F64))
    else:
        y = tf.constant(np.asarray(c.labels), dtype=tf.int32 if c.label_dtype == "int32" else tf.int64)
    g = tf.constant(np.ones(c.loss_shape) if c.upstream is None else np.asarray(c.upstream, F64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        if c.kind == "dense" and watch_labels:
            tape.watch(y)
        loss = build(x, y)
        obj = tf.reduce_sum(loss * g)
    Z = tf.UnconnectedGradients.ZERO
    gx = tape.gradient(obj, x, unconnected_gradients=Z).numpy()
    gy = tape.gradient(obj, y, unconnected_gradients=Z).numpy() if c.kind == "dense" and watch_labels else None
    return np.asarray(loss.numpy(), F64), gx, gy


def torch_run(c: Case, build) -> tuple:
    x = torch.tensor(np.asarray(c.logits, F64), requires_grad=True)
    if c.kind == "dense":
        y = torch.tensor(np.asarray(c.labels, F64), requires_grad=True)
    else:
        y = torch.tensor(np.asarray(c.labels, np.int64))
    g = torch.tensor(np.ones(c.loss_shape) if c.upstream is None else np.asarray(c.upstream, F64))
    loss = build(x, y)
    (loss * g).sum().backward()
    gx = x.grad.numpy() if x.grad is not None else np.zeros(np.shape(c.logits))
    gy = None
    if c.kind == "dense":
        gy = y.grad.numpy() if y.grad is not None else np.zeros(np.shape(c.labels))
    return np.asarray(loss.detach().numpy(), F64), gx, gy


TAPE = "; gradients by tf.GradientTape of sum(loss * upstream) w.r.t. logits{} (float64)"


def tape_note(c):
    return TAPE.format(" and labels" if c.kind == "dense" else "")


def zloss_tf(c, x):
    return c.z_loss * tf.square(tf.reduce_logsumexp(x, axis=c.ax))


ZDESC = " + z_loss * tf.square(tf.reduce_logsumexp(logits, axis)) (z_loss has no framework op: composed in TF ops)"


def axis_desc(c):
    if c.axis == -1 or c.rank == 1:
        return ""
    if c.axis < 0:
        return f", axis={c.ax} (axis {c.axis} passed as its non-negative equivalent)"
    return f", axis={c.ax}"


def m_tf_dense(c: Case) -> Result:
    """tf.nn.softmax_cross_entropy_with_logits (Keras categorical_crossentropy for axis != -1)."""
    desc = {}

    def build(x, y):
        if c.axis == -1 or c.rank == 1:
            per = tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=x)
            desc["call"] = "tf.nn.softmax_cross_entropy_with_logits(labels, logits)"
        else:
            per = keras.losses.categorical_crossentropy(y, x, from_logits=True, axis=c.ax)
            desc["call"] = (f"keras.losses.categorical_crossentropy(labels, logits, from_logits=True{axis_desc(c)}) "
                            "[calls tf.nn.softmax_cross_entropy_with_logits]")
        if c.z_loss > 0:
            per = per + zloss_tf(c, x)
            desc["call"] += ZDESC
        out, d = v1_reduce(c, per)
        desc["call"] += d
        return out

    loss, gx, gy = tf_run(c, build)
    return Result(loss, gx, gy, desc["call"] + tape_note(c))


def m_tf_v1_smoothing(c: Case) -> Result:
    """Label smoothing as tf.compat.v1.losses.softmax_cross_entropy defines it (class axis last)."""
    assert c.ax == c.rank - 1 and c.z_loss == 0
    eps = c.label_smoothing

    # compat.v1 smooths with num_classes = shape(labels)[-1], stops gradients into the labels and
    # reduces in float32; the same definition in float64 with gradients into the labels:
    def build(x, y):
        ys = y * (1.0 - eps) + eps / c.C
        per = tf.nn.softmax_cross_entropy_with_logits(labels=ys, logits=x)
        return v1_reduce(c, per)[0]
    loss, gx, gy = tf_run(c, build)

    def build_v1(x, y):
        w, _ = tf_weights(c, tf.zeros(c.per_example_shape))
        return tf.compat.v1.losses.softmax_cross_entropy(onehot_labels=y, logits=x, weights=w, label_smoothing=eps,
                                                         reduction=v1_reduction(c.reduction))
    loss32, gx32, _ = tf_run(c, build_v1, watch_labels=False)
    for a, b in ((loss, loss32), (gx, gx32)):
        ma, mr, same = compare(a, b)
        assert same and mr < 2e-6 and ma < 1e-10, (c.name, "compat.v1 cross-check", ma, mr)
        V1_CROSSCHECK["n"] += 1
        if mr > V1_CROSSCHECK["rel"]:
            V1_CROSSCHECK["rel"], V1_CROSSCHECK["worst"] = mr, c.name
    wdesc = "weights=sample_weights" if c.sample_weights is not None else "weights=1.0"
    red = v1_desc(c)
    src = (f"tf.compat.v1.losses.softmax_cross_entropy(onehot_labels=labels, logits, {wdesc}, label_smoothing={eps}, "
           f"reduction=tf.compat.v1.losses.Reduction.{V1_RED_NAMES[c.reduction]}) evaluated in float64 as its "
           f"definition: tf.nn.softmax_cross_entropy_with_logits(labels * (1 - {eps}) + {eps} / {c.C}, logits)"
           f"{red}; the compat.v1 call itself (float32 internally, no labels gradient) agrees with loss and "
           "grad_logits to float32 rounding; gradients by tf.GradientTape of sum(loss * upstream) w.r.t. logits "
           "and labels (float64)")
    return Result(loss, gx, gy, src)


def m_tf_sparse(c: Case) -> Result:
    desc = {}

    def build(x, y):
        xl = x
        if c.ax != c.rank - 1:
            perm = [i for i in range(c.rank) if i != c.ax] + [c.ax]
            xl = tf.transpose(x, perm)
            pre = f"tf.transpose(logits, {perm}) to move class axis {c.axis} last, then "
        else:
            pre = ""
        per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=xl)
        desc["call"] = pre + f"tf.nn.sparse_softmax_cross_entropy_with_logits(labels as {c.label_dtype}, logits)"
        if c.z_loss > 0:
            per = per + zloss_tf(c, x)
            desc["call"] += ZDESC
        out, d = v1_reduce(c, per)
        desc["call"] += d
        return out

    loss, gx, gy = tf_run(c, build)
    return Result(loss, gx, None, desc["call"] + tape_note(c))


def torch_spec_reduce(c: Case, per, t):
    """Spec section 4 in torch ops on per-example losses from F.cross_entropy(reduction='none')."""
    shp = tuple(per.shape)
    s = (torch.ones(shp, dtype=torch.float64) if c.sample_weights is None
         else torch.tensor(np.asarray(c.sample_weights, F64)).expand(shp))
    valid = torch.ones(shp, dtype=torch.bool) if (c.kind == "dense" or c.ignore_index is None) else (t != c.ignore_index)
    omega = s * valid
    if c.kind == "sparse" and c.class_weights is not None:
        w = torch.tensor(np.asarray(c.class_weights, F64))
        omega = omega * w[torch.where(valid, t, torch.zeros_like(t))]
    L = s * per
    if c.reduction == "none":
        return L
    total = L.sum()
    if c.reduction == "sum":
        return total
    den = {"mean": omega.sum(), "sum_over_batch_size": valid.sum().to(torch.float64),
           "sum_by_nonzero_weights": (omega != 0).sum().to(torch.float64)}[c.reduction]
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(total), total / safe)


TORCH_RED_DESC = {
    "mean": "sum(L) / sum(omega)",
    "sum_over_batch_size": "sum(L) / count(rows not ignored)",
    "sum_by_nonzero_weights": "sum(L) / count(omega != 0)",
    "sum": "sum(L)",
    "none": "L",
}


def m_torch(c: Case) -> Result:
    """torch.nn.functional.cross_entropy (class weights, ignore_index, smoothing with class ids)."""
    native = c.sample_weights is None and c.reduction in ("none", "sum", "mean")
    all_ignored = (c.kind == "sparse" and c.ignore_index is not None
                   and bool(np.all(np.asarray(c.labels) == c.ignore_index)))
    dev3 = native and c.reduction == "mean" and all_ignored
    if dev3:
        native = False
    assert c.z_loss == 0 and c.from_logits

    def build(x, y):
        if x.dim() >= 2:
            x = x.movedim(c.ax, 1)
            if c.kind == "dense":
                y = y.movedim(c.ax, 1)
        kw = {}
        if c.class_weights is not None:
            kw["weight"] = torch.tensor(np.asarray(c.class_weights, F64))
        if c.ignore_index is not None:
            kw["ignore_index"] = c.ignore_index
        if c.label_smoothing:
            kw["label_smoothing"] = c.label_smoothing
        if native:
            return F.cross_entropy(x, y, reduction=c.reduction, **kw)
        per = F.cross_entropy(x, y, reduction="none", **kw)
        return torch_spec_reduce(c, per, y if c.kind == "sparse" else None)

    loss, gx, gy = torch_run(c, build)
    args = []
    if c.class_weights is not None:
        args.append("weight=class_weights")
    if c.ignore_index is not None:
        args.append(f"ignore_index={c.ignore_index}")
    if c.label_smoothing:
        args.append(f"label_smoothing={c.label_smoothing}")
    tgt = ("target=labels (probabilities)" if c.kind == "dense" else "target=labels (class ids as torch.int64)")
    if c.rank >= 2 and c.ax != 1:
        tgt = tgt.replace("labels", f"labels.movedim({c.ax}, 1)") if c.kind == "dense" else tgt
        move = f"input=logits.movedim({c.ax}, 1), "
    else:
        move = "input=logits, "
    red = c.reduction if native else "none"
    src = f"torch.nn.functional.cross_entropy({move}{tgt}{''.join(', ' + a for a in args)}, reduction='{red}')"
    if not native:
        om = ["sample_weights" if c.sample_weights is not None else "1"]
        if c.kind == "sparse" and c.class_weights is not None:
            om.append("class_weights[t]")
        if c.kind == "sparse" and c.ignore_index is not None:
            om.append("(t != ignore_index)")
        src += (f", then the spec's {c.reduction} reduction in torch ops: L = "
                + ("sample_weights * loss" if c.sample_weights is not None else "loss")
                + f", {TORCH_RED_DESC[c.reduction]}"
                + (f" with omega = {' * '.join(om)}" if c.reduction in ("mean", "sum_by_nonzero_weights") else "")
                + ", a zero denominator giving 0")
        if dev3:
            src += (" (Deviation 3: every row is ignored; torch's reduction='mean' returns NaN, the spec returns 0 "
                    "with zero gradients)")
    src += f"; gradients by torch autograd of sum(loss * upstream) w.r.t. logits{' and labels' if c.kind == 'dense' else ''} (float64)"
    return Result(loss, gx, gy, src)


def m_keras(c: Case) -> Result:
    """Keras with from_logits=False (inputs kept away from the 1e-7 clip)."""
    desc = {}

    def build(x, y):
        if c.kind == "dense":
            if c.reduction == "sum_over_batch_size" and c.sample_weights is None and c.axis == -1:
                lossobj = keras.losses.CategoricalCrossentropy(from_logits=False, label_smoothing=c.label_smoothing,
                                                               reduction="sum_over_batch_size", dtype="float64")
                desc["call"] = ("keras.losses.CategoricalCrossentropy(from_logits=False, "
                                "reduction='sum_over_batch_size', dtype='float64')(labels, logits)")
                return lossobj(y, x)
            per = keras.losses.categorical_crossentropy(y, x, from_logits=False, label_smoothing=c.label_smoothing,
                                                        axis=c.ax if c.axis != -1 else -1)
            ls = f", label_smoothing={c.label_smoothing}" if c.label_smoothing else ""
            desc["call"] = f"keras.losses.categorical_crossentropy(labels, logits, from_logits=False{ls}{axis_desc(c)})"
        else:
            assert c.ax == c.rank - 1 and c.label_smoothing == 0
            per = keras.losses.sparse_categorical_crossentropy(y, x, from_logits=False)
            desc["call"] = "keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=False)"
        out, d = v1_reduce(c, per)
        desc["call"] += d
        return out

    loss, gx, gy = tf_run(c, build)
    return Result(loss, gx, gy, desc["call"] + " (Keras 3, TensorFlow backend, float64)" + tape_note(c))


def m_keras_ignore_class(c: Case) -> Result:
    assert c.kind == "sparse" and c.reduction == "sum_over_batch_size" and c.sample_weights is None
    assert c.class_weights is None and not c.label_smoothing and c.ax == c.rank - 1

    def build(x, y):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=c.ignore_index,
                                                          reduction="sum_over_batch_size", dtype="float64")(y, x)
    loss, gx, _ = tf_run(c, build)
    src = (f"keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class={c.ignore_index}, "
           "reduction='sum_over_batch_size', dtype='float64')(labels, logits) (Keras 3, TensorFlow backend: "
           "ignored rows are left out of the count)" + tape_note(c))
    return Result(loss, gx, None, src)


def tf_spec_reduce(c: Case, per, mask, wt):
    shp = per.shape
    s = (tf.ones(shp, tf.float64) if c.sample_weights is None
         else tf.broadcast_to(tf.constant(np.asarray(c.sample_weights, F64)), shp))
    L = s * per
    omega = s
    if wt is not None:
        omega = omega * wt
    if mask is not None:
        omega = tf.where(mask, omega, tf.zeros_like(omega))
        count = tf.reduce_sum(tf.cast(mask, tf.float64))
    else:
        count = tf.cast(tf.size(per), tf.float64)
    r = c.reduction
    if r == "none":
        return L
    total = tf.reduce_sum(L)
    if r == "sum":
        return total
    den = {"mean": tf.reduce_sum(omega), "sum_over_batch_size": count,
           "sum_by_nonzero_weights": tf.cast(tf.math.count_nonzero(omega), tf.float64)}[r]
    return tf.math.divide_no_nan(total, den)


def m_tf_spec(c: Case) -> Result:
    """The spec's formulas composed in TF ops (float64); gradients by tape."""
    ax, C, eps = c.ax, c.C, float(c.label_smoothing)
    parts = []

    def bcast_w():
        shape = [1] * c.rank
        shape[ax] = C
        return tf.reshape(tf.constant(np.asarray(c.class_weights, F64)), shape)

    def build(x, y):
        parts.clear()
        if c.from_logits:
            logp = tf.nn.log_softmax(x, axis=ax)
            parts.append(f"logq = tf.nn.log_softmax(logits, axis={ax})")
        else:
            p = x / tf.reduce_sum(x, axis=ax, keepdims=True)
            p = tf.clip_by_value(p, tf.constant(PROB_EPS, tf.float64), tf.constant(1.0 - PROB_EPS, tf.float64))
            logp = tf.math.log(p)
            parts.append(f"logq = tf.math.log(tf.clip_by_value(logits / tf.reduce_sum(logits, axis={ax}, "
                         "keepdims=True), 1e-7, 1 - 1e-7)) with 1 - 1e-7 exact in float64")
        mask = wt = None
        if c.kind == "dense":
            ys = y
            if eps > 0:
                ys = y * (1.0 - eps) + eps / C
                parts.append(f"labels * (1 - {eps}) + {eps} / C with C = {C} along axis {ax}")
            coef = ys
            if c.class_weights is not None:
                coef = coef * bcast_w()
                parts.append("times class_weights")
            per = -tf.reduce_sum(tf.math.multiply_no_nan(logp, coef), axis=ax)
            parts.append(f"loss = -tf.reduce_sum(tf.math.multiply_no_nan(logq, labels), axis={ax})")
        else:
            if c.ignore_index is not None:
                mask = tf.not_equal(y, tf.cast(c.ignore_index, y.dtype))
                t = tf.where(mask, y, tf.zeros_like(y))
            else:
                t = y
            oh = tf.one_hot(t, C, axis=ax, dtype=tf.float64)
            nll = -tf.reduce_sum(tf.math.multiply_no_nan(logp, oh), axis=ax)
            parts.append(f"nll = -tf.reduce_sum(tf.math.multiply_no_nan(logq, tf.one_hot(labels, C, axis={ax})), axis={ax})")
            per = nll
            if c.class_weights is not None:
                wt = tf.gather(tf.constant(np.asarray(c.class_weights, F64)), t)
                per = per * wt
                parts.append("times class_weights[labels]")
            if eps > 0:
                wb = bcast_w() if c.class_weights is not None else tf.constant(1.0, tf.float64)
                per = (1.0 - eps) * per + (eps / C) * -tf.reduce_sum(logp * wb, axis=ax)
                parts.append(f"(1 - eps) * that - (eps / C) * sum_j {'w_j ' if c.class_weights is not None else ''}logq_j")
        if c.z_loss > 0:
            per = per + zloss_tf(c, x)
            parts.append("+ z_loss * tf.square(tf.reduce_logsumexp(logits, axis))")
        if mask is not None:
            per = tf.where(mask, per, tf.zeros_like(per))
            parts.append("ignored rows set to 0 with tf.where")
        if c.reduction in ("mean", "sum_over_batch_size", "sum_by_nonzero_weights"):
            parts.append(f"times sample weights, spec {c.reduction} reduction with tf.math.divide_no_nan")
        elif c.reduction == "sum":
            parts.append("times sample weights, tf.reduce_sum")
        elif c.sample_weights is not None:
            parts.append("times sample weights, no reduction")
        else:
            parts.append("no reduction")
        return tf_spec_reduce(c, per, mask, wt)

    loss, gx, gy = tf_run(c, build)
    return Result(loss, gx, gy, "spec formula composed in TF ops (float64): " + "; ".join(parts) + tape_note(c))


METHODS = {"tf_dense": m_tf_dense, "tf_v1_smoothing": m_tf_v1_smoothing, "tf_sparse": m_tf_sparse,
           "torch": m_torch, "keras": m_keras, "keras_ignore_class": m_keras_ignore_class, "tf_spec": m_tf_spec}


def deviations(c: Case) -> list[str]:
    """Spec deviations that apply to a case (their expected values then follow the spec)."""
    out = []
    x = np.moveaxis(np.asarray(c.logits, F64), c.ax, -1)
    if c.kind == "dense" and c.from_logits:
        y = np.moveaxis(np.asarray(c.labels, F64), c.ax, -1)
        rowsum = y.sum(axis=-1)
        if not np.all(rowsum == 1.0):
            out.append("Deviation 1: some label rows do not sum to one (or hold NaN); TF's op returns "
                       "softmax - labels as the logits gradient, the spec the true gradient "
                       "softmax * sum(labels) - labels")
        finite_row = np.isfinite(x).any(axis=-1, keepdims=True)
        if np.any(np.isneginf(x) & (y == 0) & finite_row):
            out.append("Deviation 4: -inf logits where the label is 0 contribute 0 (TF returns NaN from 0 * inf); "
                       "composed with tf.math.multiply_no_nan")
    if c.kind == "dense" and c.label_smoothing > 0 and c.ax != c.rank - 1:
        out.append("Deviation 2: label smoothing divides by C along the class axis (Keras 3 divides by the size "
                   "of the last axis)")
    if c.kind == "sparse" and c.ignore_index is not None and c.reduction == "mean" \
            and np.all(np.asarray(c.labels) == c.ignore_index):
        out.append("Deviation 3")
    if not c.from_logits and c.kind == "sparse":
        p = x / x.sum(axis=-1, keepdims=True)
        if np.any((p < PROB_EPS) | (p > 1.0 - PROB_EPS)):
            out.append("from_logits=false with probabilities at the 1e-7 clip: Keras's "
                       "sparse_categorical_crossentropy clips the input before normalizing it (and renormalizes "
                       "the clipped values through log_softmax), the spec normalizes, then clips, then takes "
                       "-log p_t, so the spec formula is composed in TF ops")
    return out


def choose_method(c: Case) -> tuple[str, list[str]]:
    devs = deviations(c)
    if c.method:
        return c.method, devs
    only_dev3 = devs == ["Deviation 3"]
    if devs and not only_dev3:
        return "tf_spec", devs
    if not c.from_logits:
        return "keras", devs
    if c.kind == "sparse" and c.ignore_index is not None and c.z_loss > 0:
        return "tf_spec", devs
    if c.class_weights is not None or (c.kind == "sparse" and (c.ignore_index is not None or c.label_smoothing)):
        if (c.kind == "sparse" and c.ignore_index is not None and c.reduction == "sum_over_batch_size"
                and c.sample_weights is None and c.class_weights is None and not c.label_smoothing
                and c.ax == c.rank - 1):
            return "keras_ignore_class", devs
        return "torch", devs
    if c.kind == "dense" and c.label_smoothing > 0:
        return "tf_v1_smoothing", devs
    return ("tf_dense" if c.kind == "dense" else "tf_sparse"), devs


def framework_without_deviation(c: Case) -> Optional[Result]:
    """The framework's own result for a deviation case, for the record."""
    try:
        if not c.from_logits:
            return m_keras(c)
        if c.kind == "dense" and c.label_smoothing > 0 and c.ax != c.rank - 1:
            def build(x, y):
                return v1_reduce(c, keras.losses.categorical_crossentropy(
                    y, x, from_logits=True, label_smoothing=c.label_smoothing, axis=c.ax))[0]
            loss, gx, gy = tf_run(c, build)
            return Result(loss, gx, gy, "keras.losses.categorical_crossentropy(label_smoothing, axis)")
        if c.kind == "dense":
            return m_tf_dense(c)
        if c.kind == "sparse" and c.ignore_index is not None:
            def build(x, y):
                return F.cross_entropy(x.movedim(c.ax, 1) if x.dim() >= 2 else x, y,
                                       ignore_index=c.ignore_index, reduction=c.reduction)
            loss, gx, gy = torch_run(c, build)
            return Result(loss, gx, gy, "torch.nn.functional.cross_entropy(reduction='mean')")
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return Result(np.array(np.nan), np.array(np.nan), None, f"raised {type(e).__name__}")
    return None


# Probes for invalid cases: what the frameworks themselves do with the same request.

def _probe(fn) -> str:
    try:
        out = fn()
        return f"returns {np.array2string(np.asarray(out), precision=6)}"
    except Exception as e:  # noqa: BLE001 - the exception is the observation
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "{{function_node" in msg:
            msg = msg.split("}}", 1)[-1].strip()
        msg = msg.split(" [Op:")[0]
        return f"raises {type(e).__name__}" + (f": {msg[:140]}" if msg else "")


def probe_tf_dense(c):
    return "tf.nn.softmax_cross_entropy_with_logits " + _probe(lambda: tf.nn.softmax_cross_entropy_with_logits(
        labels=tf.constant(np.asarray(c.labels, F64)), logits=tf.constant(np.asarray(c.logits, F64)), axis=c.axis))


def probe_tf_sparse(c):
    return "tf.nn.sparse_softmax_cross_entropy_with_logits (CPU) " + _probe(
        lambda: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant(np.asarray(c.labels)),
                                                               logits=tf.constant(np.asarray(c.logits, F64))))


def probe_torch(c):
    kw = {}
    if c.class_weights is not None:
        kw["weight"] = torch.tensor(np.asarray(c.class_weights, F64))
    if c.ignore_index is not None:
        kw["ignore_index"] = c.ignore_index
    if c.label_smoothing:
        kw["label_smoothing"] = c.label_smoothing
    return "torch.nn.functional.cross_entropy " + _probe(lambda: F.cross_entropy(
        torch.tensor(np.asarray(c.logits, F64)), torch.tensor(np.asarray(c.labels)), reduction="none", **kw))


def probe_tf_weights(c):
    return "tf.compat.v1.losses.compute_weighted_loss " + _probe(lambda: tf.compat.v1.losses.compute_weighted_loss(
        tf.zeros(c.per_example_shape, tf.float64), weights=tf.constant(np.asarray(c.sample_weights, F64)),
        reduction=v1_reduction(c.reduction)))


def probe_tf_v1_smoothing(c):
    return "tf.compat.v1.losses.softmax_cross_entropy " + _probe(lambda: tf.compat.v1.losses.softmax_cross_entropy(
        tf.constant(np.asarray(c.labels, F64)), tf.constant(np.asarray(c.logits, F64)),
        label_smoothing=c.label_smoothing, reduction=v1_reduction("none")))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def to_storage(a, c: Case):
    return np.asarray(a, np.float32 if c.dtype == "float32" else F64)


def manifest_text(manifest: dict) -> str:
    """JSON with one case per line: diffable and small."""
    head = {k: v for k, v in manifest.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(v)},")
    lines.append(' "cases": [')
    body = [" " + json.dumps(e, separators=(", ", ": ")) for e in manifest["cases"]]
    lines.append(",\n".join(body))
    lines.append(" ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == manifest
    return text


def generate() -> bool:
    import_frameworks()
    cases = build_cases()
    import importlib.metadata as md
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "ml_dtypes": md.version("ml-dtypes")}

    # Clear previous output (case folders and manifest), keeping the hand-written files.
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():
        if p.name in KEEP:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()

    entries = []
    sanity = {"abs": 0.0, "rel": 0.0, "n": 0, "worst": ""}
    dev_notes = []
    ok = True
    for c in cases:
        e = {"name": c.name, "source": "", "loss": LOSS_NAMES[c.kind], "dtype": c.dtype}
        if c.kind == "sparse":
            e["label_dtype"] = c.label_dtype
        e["options"] = options_of(c)
        d = OUT / c.name
        d.mkdir()
        inputs = {}

        def save(key, arr, where):
            np.save(d / f"{key}.npy", arr)
            where[key] = f"{c.name}/{key}.npy"

        save("logits", to_storage(c.logits, c), inputs)
        save("labels", c.labels if c.kind == "sparse" else to_storage(c.labels, c), inputs)
        for k in ("class_weights", "sample_weights", "upstream"):
            v = getattr(c, k)
            if v is not None:
                save(k, to_storage(v, c), inputs)
        e["inputs"] = inputs

        v = validate(c)
        if c.error is not None:
            assert v is not None and v[0] == c.error["field"], (c.name, v)
            probe = f"; framework behaviour: {c.probe(c)}" if c.probe else ""
            e["source"] = f"spec section 7 ({v[1]} -> INVALID_ARGUMENT naming '{v[0]}'){probe}"
            e["error"] = c.error
            entries.append(e)
            continue
        assert v is None, (c.name, v)

        method, devs = choose_method(c)
        res = METHODS[method](c)
        src = res.source
        if devs:
            if devs != ["Deviation 3"]:  # the torch recipe already explains Deviation 3
                src = "; ".join(devs) + ". Expected values: " + src
            raw = framework_without_deviation(c)
            if raw is not None:
                parts = []
                for what, a, b in (("loss", raw.loss, res.loss), ("grad_logits", raw.grad_logits, res.grad_logits)):
                    if np.shape(a) != np.shape(b):
                        parts.append(f"{what}: {raw.source}")
                        continue
                    ma, mr, same = compare(a, b)
                    dd = np.abs(np.asarray(a, F64) - np.asarray(b, F64))
                    dd = dd[np.isfinite(dd)]
                    diff = float(dd.max()) if dd.size else 0.0
                    parts.append(f"{what} max |diff| {diff:.3g}" + ("" if same else ", NaN/inf pattern differs"))
                dev_notes.append(f"{c.name}: framework call without the deviation differs: " + ", ".join(parts))
        e["source"] = src

        # Sanity: the spec composed in TF ops must agree with the framework call.
        if method != "tf_spec" and not devs:
            comp = m_tf_spec(c)
            for what, a, b in (("loss", res.loss, comp.loss), ("grad_logits", res.grad_logits, comp.grad_logits),
                               ("grad_labels", res.grad_labels, comp.grad_labels)):
                if a is None:
                    continue
                ma, mr, same = compare(a, b)
                if not same or mr > 1e-12 or ma > 1e-15:
                    print(f"FAIL {c.name}: framework vs composed spec {what}: abs {ma:.3e} rel {mr:.3e} same={same}")
                    ok = False
                sanity["n"] += 1
                fin = np.isfinite(a) & np.isfinite(b)
                dabs = float(np.max(np.abs(np.asarray(a, F64)[fin] - np.asarray(b, F64)[fin]), initial=0.0))
                if dabs > sanity["abs"]:
                    sanity["abs"] = dabs
                if mr > sanity["rel"]:
                    sanity["rel"], sanity["worst"] = mr, f"{c.name}/{what}"

        # Every finite expected value must be representable in the case's dtype.
        big = float(ml_dtypes.finfo(NP_DTYPES[c.dtype]).max)
        for arr in (res.loss, res.grad_logits, res.grad_labels):
            if arr is not None:
                fin = np.asarray(arr, F64)[np.isfinite(arr)]
                assert not fin.size or np.abs(fin).max() <= big, (c.name, "expected value overflows", c.dtype)
        # Shapes as FORMAT.md requires.
        assert res.loss.shape == c.loss_shape, (c.name, res.loss.shape, c.loss_shape)
        assert res.grad_logits.shape == np.shape(c.logits), c.name
        if c.kind == "dense":
            assert res.grad_labels is not None and res.grad_labels.shape == np.shape(c.labels), c.name
        exp = {}
        save("loss", to_storage(res.loss, c), exp)
        save("grad_logits", to_storage(res.grad_logits, c), exp)
        if c.kind == "dense":
            save("grad_labels", to_storage(res.grad_labels, c), exp)
        e["expected"] = exp
        entries.append(e)

        if c.name == "spec_example_none_f64":
            assert np.allclose(res.loss, WORKED_LOSS, rtol=0, atol=5e-9), res.loss
        if c.name == "spec_example_mean_f64":
            check = np.log(np.e + np.e ** 2 + np.e ** 0.5) - 2.0
            assert abs(float(res.loss) - WORKED_MEAN) < 5e-9, res.loss
            assert abs(float(WORKED_LOSS[0]) - check) < 5e-9
            print(f"spec section 9: losses {WORKED_LOSS} and mean {WORKED_MEAN} reproduced "
                  f"(mean {float(res.loss):.10f})")

    manifest = {"generator": "python tools/make_reference.py", "versions": versions, "cases": entries}
    (OUT / "manifest.json").write_text(manifest_text(manifest))

    n_valid = sum(1 for e in entries if "expected" in e)
    print(f"wrote {len(entries)} cases ({n_valid} valid, {len(entries) - n_valid} invalid) to {OUT}")
    print(f"versions: {versions}")
    print(f"framework call vs spec composed in TF ops, {sanity['n']} arrays on cases without a deviation: "
          f"max abs diff {sanity['abs']:.3e}, max rel diff {sanity['rel']:.3e} ({sanity['worst']})")
    print(f"tf.compat.v1 float32 cross-checks: {V1_CROSSCHECK['n']} arrays, max rel diff "
          f"{V1_CROSSCHECK['rel']:.3e} ({V1_CROSSCHECK['worst']})")
    for n in dev_notes:
        print("  " + n)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only verify the stored files against the numpy spec")
    args = ap.parse_args()
    ok = True
    if not args.check:
        ok = generate()
    ok = check_stored() and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
