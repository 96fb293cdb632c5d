//! The protobuf codec of every xent.v1 and Open Inference Protocol RPC (build.rs names it for
//! the generated servers and clients): prost, with three things tonic's own codec does not do.
//!
//! - **Refuse before materialising.** A packed repeated field costs one byte per element on the
//!   wire and eight in memory (an int64 zero), so a request within the message limit could
//!   decode to eight times it, all before any validation. Each request is pre-scanned
//!   ([`Prescan`]): a tensor's typed data may not hold more elements than its shape, a shape
//!   may have at most [`MAX_RANK`] dimensions, and the lists that are not tensor data (outputs,
//!   inputs, parameters) at most [`MAX_LIST`] entries. The scan reads lengths, not values, and
//!   allocates nothing.
//! - **Nothing heavy on the I/O thread.** tonic calls a codec inside the poll of the call's
//!   future, on a tokio worker that also serves every other connection's I/O. A message of
//!   [`OFFLOAD_BYTES`] or more is scanned, decoded and encoded inside
//!   [`tokio::task::block_in_place`], which first hands the worker's other tasks to another
//!   thread, so a health check on another connection does not wait for it. (Decompression,
//!   which tonic does before the codec, is moved off the worker by the server's gzip layer.)
//! - **Undecodable is invalid input.** A message that is not valid protobuf is the client's
//!   fault: `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming `request`, not tonic's
//!   `INTERNAL`.

use std::marker::PhantomData;

use bytes::{Buf as _, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::echo::Shape;
use crate::error::Error;
use crate::proto;
use crate::proto::inference;

/// Messages this large or larger are scanned, decoded and encoded off the tokio worker.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// Most dimensions a tensor's shape may have.
pub const MAX_RANK: usize = 64;

/// Most entries of a request's lists that are not tensor data: xent.v1's `outputs`, the Open
/// Inference Protocol's `inputs`, `outputs`, `raw_input_contents` and each `parameters` map.
pub const MAX_LIST: usize = 64;

/// Runs `f` where it cannot stall the tokio worker's other tasks when `heavy`: inside
/// `block_in_place` on a multi-threaded runtime (elsewhere, e.g. a client on a
/// current-thread runtime, there is no other task to stall, and it runs in place).
pub fn offload<R>(heavy: bool, f: impl FnOnce() -> R) -> R {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// A prost codec with the pre-scan, the offload and INVALID_ARGUMENT for undecodable input.
#[derive(Debug)]
pub struct XentCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for XentCodec<T, U> {
    fn default() -> Self {
        XentCodec(PhantomData)
    }
}

impl<T, U> Codec for XentCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Prescan + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = XentEncoder<T>;
    type Decoder = XentDecoder<U>;

    fn encoder(&mut self) -> XentEncoder<T> {
        XentEncoder(PhantomData)
    }

    fn decoder(&mut self) -> XentDecoder<U> {
        XentDecoder(PhantomData)
    }
}

/// The encoding half of [`XentCodec`].
#[derive(Debug)]
pub struct XentEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for XentEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let heavy = item.encoded_len() >= OFFLOAD_BYTES;
        offload(heavy, || item.encode(buf))
            .map_err(|e| Status::internal(format!("encoding the answer: {e}")))
    }
}

/// The decoding half of [`XentCodec`].
#[derive(Debug)]
pub struct XentDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Prescan> Decoder for XentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A slice of the received frame, not a copy: `raw_data` fields stay slices of it.
        let bytes = buf.copy_to_bytes(buf.remaining());
        offload(bytes.len() >= OFFLOAD_BYTES, || decode_checked::<U>(bytes))
            .map(Some)
            .map_err(Error::into_status)
    }
}

/// Pre-scans and decodes one message.
pub fn decode_checked<U: Message + Default + Prescan>(bytes: Bytes) -> Result<U, Error> {
    U::prescan(&bytes)?;
    U::decode(bytes).map_err(|e| {
        Error::invalid(
            "request",
            format!(
                "is not a valid {} protobuf message ({e})",
                U::NAME.unwrap_or("request")
            ),
        )
    })
}

/// A message's checks on its encoded form, before it is decoded.
pub trait Prescan {
    /// The message's full protobuf name, for the refusal of one that does not decode.
    const NAME: Option<&'static str> = None;
    /// Refuses what would decode to more than the message's shapes can use. A message that
    /// is not valid protobuf passes: the decoder refuses it, saying why.
    fn prescan(_bytes: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

/// Messages read as they are: answers, and requests with nothing repeated.
macro_rules! no_prescan {
    ($($t:ty),* $(,)?) => {$( impl Prescan for $t {} )*};
}

no_prescan!(
    proto::EvaluateResponse,
    proto::EvaluateStreamResponse,
    inference::ModelInferResponse,
    inference::ServerLiveRequest,
    inference::ServerLiveResponse,
    inference::ServerReadyRequest,
    inference::ServerReadyResponse,
    inference::ModelReadyRequest,
    inference::ModelReadyResponse,
    inference::ServerMetadataRequest,
    inference::ServerMetadataResponse,
    inference::ModelMetadataRequest,
    inference::ModelMetadataResponse,
    inference::ModelStreamInferResponse,
    inference::ModelConfigRequest,
    inference::ModelConfigResponse,
    inference::ModelStatisticsRequest,
    inference::ModelStatisticsResponse,
    // The RPCs xentd answers UNIMPLEMENTED: their requests are small and never used.
    inference::RepositoryIndexRequest,
    inference::RepositoryIndexResponse,
    inference::RepositoryModelLoadRequest,
    inference::RepositoryModelLoadResponse,
    inference::RepositoryModelUnloadRequest,
    inference::RepositoryModelUnloadResponse,
    inference::SystemSharedMemoryStatusRequest,
    inference::SystemSharedMemoryStatusResponse,
    inference::SystemSharedMemoryRegisterRequest,
    inference::SystemSharedMemoryRegisterResponse,
    inference::SystemSharedMemoryUnregisterRequest,
    inference::SystemSharedMemoryUnregisterResponse,
    inference::CudaSharedMemoryStatusRequest,
    inference::CudaSharedMemoryStatusResponse,
    inference::CudaSharedMemoryRegisterRequest,
    inference::CudaSharedMemoryRegisterResponse,
    inference::CudaSharedMemoryUnregisterRequest,
    inference::CudaSharedMemoryUnregisterResponse,
    inference::TraceSettingRequest,
    inference::TraceSettingResponse,
    inference::LogSettingsRequest,
    inference::LogSettingsResponse,
);

impl Prescan for proto::EvaluateRequest {
    const NAME: Option<&'static str> = Some("xent.v1.EvaluateRequest");
    fn prescan(bytes: &[u8]) -> Result<(), Error> {
        let mut outputs = 0;
        for (number, value) in fields(bytes) {
            let tensor = match number {
                3 => "logits",
                4 => "labels",
                7 => "class_weights",
                8 => "sample_weights",
                13 => "upstream",
                14 => {
                    outputs += value.count(Kind::Varint);
                    check_list("outputs", outputs)?;
                    continue;
                }
                _ => continue,
            };
            if let Value::Len(t) = value {
                check_tensor(tensor, t)?;
            }
        }
        Ok(())
    }
}

impl Prescan for inference::ModelInferRequest {
    const NAME: Option<&'static str> = Some("inference.ModelInferRequest");
    fn prescan(bytes: &[u8]) -> Result<(), Error> {
        let (mut inputs, mut outputs, mut parameters, mut raw) = (0, 0, 0, 0);
        for (number, value) in fields(bytes) {
            match (number, value) {
                (4, _) => {
                    parameters += 1;
                    check_list("parameters", parameters)?;
                }
                (5, Value::Len(input)) => {
                    inputs += 1;
                    check_list("inputs", inputs)?;
                    check_infer_input(input)?;
                }
                (6, _) => {
                    outputs += 1;
                    check_list("outputs", outputs)?;
                }
                (7, _) => {
                    raw += 1;
                    check_list("raw_input_contents", raw)?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn check_list(field: &'static str, n: usize) -> Result<(), Error> {
    if n > MAX_LIST {
        return Err(Error::invalid(
            field,
            format!("has more than {MAX_LIST} entries; xentd takes at most {MAX_LIST}"),
        ));
    }
    Ok(())
}

/// The elements a shape holds (saturating: a shape too large to count holds "very many").
fn capacity(dims: &[i64]) -> u64 {
    dims.iter().fold(1u64, |n, &d| {
        n.saturating_mul(u64::try_from(d).unwrap_or(0))
    })
}

fn check_rank(field: &str, rank: usize) -> Result<(), Error> {
    if rank > MAX_RANK {
        return Err(Error::invalid(
            field,
            format!("has a shape of {rank} dimensions; xentd takes at most {MAX_RANK}"),
        ));
    }
    Ok(())
}

/// A typed data field with more elements than the shape holds.
fn check_data(field: &str, data: &'static str, got: usize, dims: &[i64]) -> Result<(), Error> {
    let want = capacity(dims);
    if got as u64 > want {
        return Err(Error::invalid(
            field,
            format!(
                "has {got} elements in {data} but its shape {} holds {want}; refused before decoding",
                Shape(dims)
            ),
        ));
    }
    Ok(())
}

/// An `xent.v1.Tensor`: `shape` (2), then the typed data fields 4 to 7.
fn check_tensor(field: &'static str, bytes: &[u8]) -> Result<(), Error> {
    let mut dims = Dims::default();
    let mut counts = [0usize; 4];
    const DATA: [(&str, Kind); 4] = [
        ("float_data", Kind::Fixed32),
        ("double_data", Kind::Fixed64),
        ("int32_data", Kind::Varint),
        ("int64_data", Kind::Varint),
    ];
    for (number, value) in fields(bytes) {
        match number {
            2 => {
                dims.read(&value);
                check_rank(field, dims.rank)?;
            }
            4..=7 => {
                let k = (number - 4) as usize;
                counts[k] += value.count(DATA[k].1);
            }
            _ => {}
        }
    }
    for (k, &(data, _)) in DATA.iter().enumerate() {
        check_data(field, data, counts[k], &dims.first)?;
    }
    Ok(())
}

/// An `InferInputTensor`: `name` (1), `shape` (3), `parameters` (4), `contents` (5).
fn check_infer_input(bytes: &[u8]) -> Result<(), Error> {
    let mut name: &[u8] = b"inputs";
    let mut dims = Dims::default();
    let mut parameters = 0;
    let mut contents = Vec::new();
    for (number, value) in fields(bytes) {
        match (number, value) {
            (1, Value::Len(n)) => name = n,
            (3, v) => dims.read(&v),
            (4, _) => parameters += 1,
            (5, Value::Len(c)) => contents.push(c),
            _ => {}
        }
    }
    let name = String::from_utf8_lossy(name);
    check_rank(&name, dims.rank)?;
    if parameters > MAX_LIST {
        return Err(Error::invalid(
            name,
            format!("has more than {MAX_LIST} parameters; xentd takes none on inputs"),
        ));
    }
    const CONTENTS: [(&str, Kind); 8] = [
        ("bool_contents", Kind::Varint),
        ("int_contents", Kind::Varint),
        ("int64_contents", Kind::Varint),
        ("uint_contents", Kind::Varint),
        ("uint64_contents", Kind::Varint),
        ("fp32_contents", Kind::Fixed32),
        ("fp64_contents", Kind::Fixed64),
        ("bytes_contents", Kind::Bytes),
    ];
    let mut counts = [0usize; 8];
    for c in contents {
        for (number, value) in fields(c) {
            if (1..=8).contains(&number) {
                let k = (number - 1) as usize;
                counts[k] += value.count(CONTENTS[k].1);
            }
        }
    }
    for (k, &(data, _)) in CONTENTS.iter().enumerate() {
        check_data(&name, data, counts[k], &dims.first)?;
    }
    Ok(())
}

/// A shape as scanned: its rank, and its first dimensions (up to [`MAX_RANK`]; a longer
/// shape is refused by its rank alone).
#[derive(Debug, Default)]
struct Dims {
    rank: usize,
    first: Vec<i64>,
}

impl Dims {
    /// Adds a shape field's dimensions (packed, or one per field).
    fn read(&mut self, value: &Value<'_>) {
        match *value {
            Value::Varint(v) => self.push(v as i64),
            Value::Len(mut packed) => {
                while self.rank <= MAX_RANK {
                    match varint(&mut packed) {
                        Some(v) => self.push(v as i64),
                        None => return,
                    }
                }
                self.rank += varints(packed);
            }
            Value::Fixed32 | Value::Fixed64 => {}
        }
    }

    fn push(&mut self, d: i64) {
        self.rank += 1;
        if self.first.len() < MAX_RANK {
            self.first.push(d);
        }
    }
}

/// How a repeated scalar field's elements are encoded.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Varint,
    Fixed32,
    Fixed64,
    /// `bytes`, never packed.
    Bytes,
}

/// One field's value on the wire.
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Fixed32,
    Len(&'a [u8]),
}

impl Value<'_> {
    /// Elements this occurrence of a repeated field of `kind` adds: one unpacked, or as many as
    /// a packed run holds.
    fn count(&self, kind: Kind) -> usize {
        match (self, kind) {
            (Value::Len(_), Kind::Bytes) => 1,
            (Value::Len(b), Kind::Varint) => varints(b),
            (Value::Len(b), Kind::Fixed32) => b.len() / 4,
            (Value::Len(b), Kind::Fixed64) => b.len() / 8,
            _ => 1,
        }
    }
}

/// The varints a packed run holds: its bytes without a continuation bit, counted eight at a
/// time (a bomb's run is hundreds of megabytes).
fn varints(b: &[u8]) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let (head, words, tail) = bytemuck::pod_align_to::<u8, u64>(b);
    let last = |s: &[u8]| s.iter().filter(|&&x| x < 0x80).count();
    let mut continued = 0usize;
    for w in words {
        continued += (w & HIGH).count_ones() as usize;
    }
    last(head) + words.len() * 8 - continued + last(tail)
}

/// Pre-scans a request message of the RPC `method` (as `proto::METHODS` names it), for a
/// layer that holds the message before tonic does (the gzip layer, after inflating).
pub fn prescan_method(method: &str, message: &[u8]) -> Result<(), Error> {
    match method {
        "Evaluate" | "EvaluateStream" => proto::EvaluateRequest::prescan(message),
        "ModelInfer" => inference::ModelInferRequest::prescan(message),
        _ => Ok(()),
    }
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        if shift < 64 {
            v |= u64::from(byte & 0x7f) << shift;
        }
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The fields of a message, in wire order; iteration stops at the first malformed field (the
/// decoder then says why). Nothing is allocated, however many fields there are.
fn fields(b: &[u8]) -> Fields<'_> {
    Fields(b)
}

struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = (u32, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = &mut self.0;
        if b.is_empty() {
            return None;
        }
        let field = (|| {
            let key = varint(b)?;
            let number = u32::try_from(key >> 3).ok()?;
            let value = match key & 7 {
                0 => Value::Varint(varint(b)?),
                1 => {
                    *b = b.get(8..)?;
                    Value::Fixed64
                }
                2 => {
                    let len = usize::try_from(varint(b)?).ok()?;
                    let v = b.get(..len)?;
                    *b = &b[len..];
                    Value::Len(v)
                }
                5 => {
                    *b = b.get(4..)?;
                    Value::Fixed32
                }
                _ => return None,
            };
            Some((number, value))
        })();
        if field.is_none() {
            *b = &[];
        }
        field
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tensor::encode;

    fn request(labels: proto::Tensor) -> proto::EvaluateRequest {
        proto::EvaluateRequest {
            logits: Some(encode(&[2, 3], vec![0f32; 6], false)),
            labels: Some(labels),
            ..Default::default()
        }
    }

    fn scan(r: &proto::EvaluateRequest) -> Result<(), Error> {
        proto::EvaluateRequest::prescan(&r.encode_to_vec())
    }

    #[test]
    fn packed_varints_are_counted_whatever_their_alignment() {
        for n in 0..40 {
            for big in [false, true] {
                let v: Vec<i64> = (0..n)
                    .map(|k| if big && k % 3 == 0 { -1 } else { k })
                    .collect();
                let mut bytes = Vec::new();
                for &x in &v {
                    prost::encoding::encode_varint(x as u64, &mut bytes);
                }
                for skew in 0..8 {
                    let mut shifted = vec![0x80u8; skew];
                    shifted.extend_from_slice(&bytes);
                    assert_eq!(varints(&shifted[skew..]), n as usize, "{n} {big} {skew}");
                }
            }
        }
    }

    #[test]
    fn typed_data_is_checked_against_the_shape_packed_or_not() {
        assert!(scan(&request(encode(&[2], vec![1i64, 2], false))).is_ok());
        let long = request(encode(&[2], vec![1i64, 2, 3], false));
        let e = scan(&long).unwrap_err();
        assert_eq!(
            e.to_string(),
            "labels has 3 elements in int64_data but its shape [2] holds 2; refused before decoding"
        );
        // The same field sent unpacked (one key per element), as prost also accepts.
        let mut unpacked = proto::EvaluateRequest {
            logits: long.logits.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut tensor = vec![0x08, proto::DType::DtypeInt64 as u8, 0x10, 0x02];
        for x in [1u8, 2, 3] {
            tensor.extend_from_slice(&[0x38, x]);
        }
        unpacked.push(0x22);
        unpacked.push(tensor.len() as u8);
        unpacked.extend_from_slice(&tensor);
        assert!(proto::EvaluateRequest::decode(&unpacked[..]).is_ok());
        assert!(proto::EvaluateRequest::prescan(&unpacked).is_err());
        // Raw data is not amplified, and is left to the validation.
        assert!(scan(&request(encode(&[2], vec![1i64, 2, 3], true))).is_ok());
        // Malformed input passes the scan; the decoder refuses it.
        assert!(proto::EvaluateRequest::prescan(&[0x22, 0x7f, 0x01]).is_ok());
    }

    #[test]
    fn ranks_and_lists_are_bounded() {
        let mut r = request(proto::Tensor {
            dtype: proto::DType::DtypeInt64 as i32,
            shape: vec![1; MAX_RANK + 1],
            ..Default::default()
        });
        assert!(
            scan(&r)
                .unwrap_err()
                .to_string()
                .starts_with("labels has a shape of 65")
        );
        r.labels = Some(encode(&[2], vec![1i64, 2], false));
        r.outputs = vec![1; MAX_LIST + 1];
        assert_eq!(scan(&r).unwrap_err().field(), Some("outputs"));
        r.outputs = vec![1; MAX_LIST];
        assert!(scan(&r).is_ok());
    }

    #[test]
    fn undecodable_bytes_are_invalid_argument_naming_the_request() {
        let e = decode_checked::<proto::EvaluateRequest>(Bytes::from_static(&[0x0f])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.field(), Some("request"));
    }
}
