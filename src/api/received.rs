//! Raw tensors as the server receives them: decoded from one protobuf frame, each `raw_data`
//! is a slice of that frame at whatever offset the framing gives it, and reaches the kernel
//! in place, without a copy, whatever its alignment.

use bytes::Bytes;
use half::bf16;
use prost::Message as _;

use crate::api::tensor::encode;
use crate::compute::evaluate;
use crate::dtype::DType;
use crate::eval::Evaluation;
use crate::eval::Tensors;
use crate::kernel;
use crate::kernel::{Elems, copies};
use crate::proto;

const ROWS: usize = 4;
const CLASSES: usize = 2500;

/// A request of float32 or bfloat16 logits with dense labels or class ids; class weights
/// send it down the kernel's general path.
fn request(id: &str, dtype: DType, sparse: bool, weighted: bool) -> proto::EvaluateRequest {
    let shape = [ROWS, CLASSES];
    let x: Vec<f32> = (0..ROWS * CLASSES)
        .map(|k| ((k * 7919) % 1013) as f32 / 101.0 - 5.0)
        .collect();
    let ids: Vec<i32> = (0..ROWS).map(|r| (r * 31 % CLASSES) as i32).collect();
    let mut y = vec![0.0f32; ROWS * CLASSES];
    for (r, &t) in ids.iter().enumerate() {
        y[r * CLASSES + t as usize] = 1.0;
    }
    let float = |v: Vec<f32>| match dtype {
        DType::BF16 => encode(&shape, v.into_iter().map(bf16::from_f32).collect(), true),
        _ => encode(&shape, v, true),
    };
    proto::EvaluateRequest {
        request_id: id.into(),
        loss: if sparse {
            proto::LossKind::SparseSoftmaxCrossEntropy
        } else {
            proto::LossKind::SoftmaxCrossEntropy
        } as i32,
        logits: Some(float(x)),
        labels: Some(if sparse {
            encode(&[ROWS], ids, true)
        } else {
            float(y)
        }),
        label_smoothing: 0.1,
        class_weights: weighted.then(|| encode(&[CLASSES], vec![1.0f32; CLASSES], true)),
        ..Default::default()
    }
}

/// The request as the server receives it: decoded from one buffer, so each `raw_data` is a
/// slice of that buffer at whatever offset the protobuf framing gives it.
fn received(req: &proto::EvaluateRequest) -> Evaluation {
    let frame = Bytes::from(req.encode_to_vec());
    crate::api::decode(proto::EvaluateRequest::decode(frame).unwrap()).unwrap()
}

/// Whether the logits reached the kernel as unaligned bytes.
fn unaligned_logits(ev: &Evaluation) -> bool {
    match &ev.tensors {
        Tensors::F32(t) => matches!(t.logits.data.elems(), Elems::Le(_)),
        Tensors::BF16(t) => matches!(t.logits.data.elems(), Elems::Le(_)),
        _ => unreachable!("float32 and bfloat16 only"),
    }
}

/// Request ids of 0 to 3 bytes move the tensors through every offset modulo 4: on the fast
/// path, unaligned logits and dense labels are read where they were received, with no
/// full-size copy (only unaligned class ids, one per row, are copied), and give the bits
/// of aligned ones. The general path copies them, once per call.
#[test]
fn unaligned_raw_tensors_reach_the_fast_path_without_a_copy() {
    let fast = kernel::simd::Level::current() != kernel::simd::Level::General;
    for dtype in [DType::F32, DType::BF16] {
        for sparse in [false, true] {
            for weighted in [false, true] {
                // Encoded tensors are aligned `Vec`s, read in place.
                let direct = crate::api::decode(request("", dtype, sparse, weighted));
                let direct = direct.unwrap();
                assert!(!unaligned_logits(&direct));
                let aligned = evaluate(&direct);
                let mut unaligned_seen = 0;
                for id in ["", "a", "ab", "abc"] {
                    let ev = received(&request(id, dtype, sparse, weighted));
                    unaligned_seen += usize::from(unaligned_logits(&ev));
                    let before = copies::bytes();
                    let got = evaluate(&ev);
                    let copied = copies::bytes() - before;
                    let what = format!("{dtype} sparse {sparse} weighted {weighted} id {id:?}");
                    // (Not `assert_eq!`: the outputs are too long to print.)
                    assert!(got.as_ref().unwrap() == aligned.as_ref().unwrap(), "{what}");
                    let tensor = ROWS * CLASSES * dtype.size();
                    if fast && !weighted {
                        assert!(copied <= ROWS * 4, "{what}: {copied} bytes copied");
                    } else if unaligned_logits(&ev) {
                        assert!(copied >= tensor, "{what}: {copied} bytes copied");
                    }
                }
                let want = if dtype == DType::F32 { 3 } else { 2 };
                assert_eq!(unaligned_seen, want, "{dtype} sparse {sparse}");
            }
        }
    }
}
