//! The GGUF header, read without llama.cpp: the metadata and tensor shapes an adapter is
//! checked against before llama.cpp sees it (a crafted file must get a clear error, never an
//! abort), and a writer for the small F32 files the adapter generator makes.
//!
//! Only what the checks need is kept: string and number metadata (arrays are skipped), and
//! each tensor's name, shape and type. Every count and length is bounded before anything is
//! allocated for it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

/// GGUF's metadata value types (gguf.h's `gguf_type`).
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// ggml's `GGML_TYPE_F32`.
pub(crate) const GGML_F32: u32 = 0;
/// ggml's `GGML_TYPE_Q4_1`: blocks of 32 values, an f16 scale and minimum, 4 bits each.
pub(crate) const GGML_Q4_1: u32 = 3;
/// ggml's type ids end before this one (`GGML_TYPE_COUNT` of the bundled llama.cpp is 40).
const GGML_TYPE_LIMIT: u32 = 64;

/// Longest key or string value read (the chat template is the longest a model carries).
const MAX_STRING: u64 = 1 << 24;
/// Most metadata entries and tensors a header may declare.
const MAX_ENTRIES: u64 = 1 << 20;
/// Most elements an array may declare (a vocabulary has a few hundred thousand).
const MAX_ARRAY: u64 = 1 << 26;
/// Most dimensions a tensor has (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// The data alignment a file without `general.alignment` has.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value the checks use; other types are skipped.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// A string.
    Text(String),
    /// Any integer type.
    Int(i128),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// An array (its elements are not kept).
    Array,
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorInfo {
    /// ggml's dimensions, innermost first (`ne[0]` is a weight's input size).
    pub(crate) shape: Vec<u64>,
    /// ggml's type id.
    pub(crate) kind: u32,
}

/// What a GGUF file's header says.
#[derive(Clone, Debug, Default)]
pub(crate) struct Header {
    pub(crate) metadata: HashMap<String, Value>,
    pub(crate) tensors: HashMap<String, TensorInfo>,
}

impl Header {
    /// Reads the header of the file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not GGUF, or its header is malformed (said in words).
    pub(crate) fn read(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|err| format!("cannot open it: {err}"))?;
        let mut reader = Reader(BufReader::new(file));
        reader.header()
    }

    /// The string value of `key`, if it has one.
    pub(crate) fn text(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::Text(text)) => Some(text),
            _ => None,
        }
    }

    /// The number value of `key` (integer or float), if it has one.
    pub(crate) fn number(&self, key: &str) -> Option<f64> {
        match self.metadata.get(key) {
            Some(Value::Float(value)) => Some(*value),
            #[allow(clippy::cast_precision_loss)]
            Some(Value::Int(value)) => Some(*value as f64),
            _ => None,
        }
    }
}

struct Reader<R>(R);

impl<R: Read> Reader<R> {
    fn header(&mut self) -> Result<Header, String> {
        let mut magic = [0u8; 4];
        self.0
            .read_exact(&mut magic)
            .map_err(|_| "it is shorter than a GGUF header".to_owned())?;
        if &magic != b"GGUF" {
            return Err("it is not a GGUF file".to_owned());
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} (this build reads 2 and 3)"));
        }
        let tensors = self.count("tensor")?;
        let entries = self.count("metadata")?;
        let mut header = Header::default();
        for _ in 0..entries {
            let key = self.string()?;
            let kind = self.u32()?;
            let value = self.value(kind)?;
            header.metadata.insert(key, value);
        }
        for _ in 0..tensors {
            let name = self.string()?;
            let dims = self.u32()?;
            if dims == 0 || dims > MAX_DIMS {
                return Err(format!("tensor {name} has {dims} dimensions"));
            }
            let mut shape = Vec::with_capacity(dims as usize);
            for _ in 0..dims {
                shape.push(self.u64()?);
            }
            let kind = self.u32()?;
            if kind >= GGML_TYPE_LIMIT {
                return Err(format!("tensor {name} has the unknown type {kind}"));
            }
            let _offset = self.u64()?;
            header.tensors.insert(name, TensorInfo { shape, kind });
        }
        Ok(header)
    }

    fn count(&mut self, what: &str) -> Result<u64, String> {
        let count = self.u64()?;
        if count > MAX_ENTRIES {
            return Err(format!("it declares {count} {what} entries"));
        }
        Ok(count)
    }

    fn value(&mut self, kind: u32) -> Result<Value, String> {
        Ok(match kind {
            TYPE_U8 => Value::Int(self.bytes::<1>()?[0].into()),
            TYPE_I8 => Value::Int(i8::from_le_bytes(self.bytes()?).into()),
            TYPE_U16 => Value::Int(u16::from_le_bytes(self.bytes()?).into()),
            TYPE_I16 => Value::Int(i16::from_le_bytes(self.bytes()?).into()),
            TYPE_U32 => Value::Int(self.u32()?.into()),
            TYPE_I32 => Value::Int(i32::from_le_bytes(self.bytes()?).into()),
            TYPE_U64 => Value::Int(self.u64()?.into()),
            TYPE_I64 => Value::Int(i64::from_le_bytes(self.bytes()?).into()),
            TYPE_F32 => Value::Float(f32::from_le_bytes(self.bytes()?).into()),
            TYPE_F64 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            TYPE_BOOL => Value::Bool(self.bytes::<1>()?[0] != 0),
            TYPE_STRING => Value::Text(self.string()?),
            TYPE_ARRAY => {
                let element = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ARRAY || element == TYPE_ARRAY {
                    return Err(format!("an array of {len} elements of type {element}"));
                }
                for _ in 0..len {
                    self.value(element)?;
                }
                Value::Array
            }
            other => return Err(format!("unknown metadata type {other}")),
        })
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(format!("a string of {len} bytes"));
        }
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
        self.0.read_exact(&mut bytes).map_err(truncated)?;
        String::from_utf8(bytes).map_err(|_| "a string that is not UTF-8".to_owned())
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut bytes = [0u8; N];
        self.0.read_exact(&mut bytes).map_err(truncated)?;
        Ok(bytes)
    }
}

fn truncated(_: io::Error) -> String {
    "its header ends early".to_owned()
}

/// A metadata value to write.
pub(crate) enum WriteValue<'a> {
    Text(&'a str),
    F32(f32),
}

/// A tensor to write: name, ggml shape (innermost first), values, and whether they are
/// stored as Q4_1 (the innermost size a multiple of 32) rather than F32.
pub(crate) struct WriteTensor {
    pub(crate) name: String,
    pub(crate) shape: Vec<u64>,
    pub(crate) values: Vec<f32>,
    pub(crate) q4_1: bool,
}

impl WriteTensor {
    /// The tensor's data as the file stores it.
    fn data(&self) -> Vec<u8> {
        if !self.q4_1 {
            return self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        let mut bytes = Vec::with_capacity(self.values.len() / 32 * 20);
        for block in self.values.chunks(32) {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (scale, low) = (f16_bits((max - min) / 15.0), f16_bits(min));
            let (d, m) = (f16_value(scale), f16_value(low));
            bytes.extend_from_slice(&scale.to_le_bytes());
            bytes.extend_from_slice(&low.to_le_bytes());
            let level = |x: f32| {
                if d == 0.0 {
                    0
                } else {
                    // In 0..=15 by the clamp.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let q = ((x - m) / d).round().clamp(0.0, 15.0) as u8;
                    q
                }
            };
            for j in 0..16 {
                bytes.push(level(block[j]) | (level(block[j + 16]) << 4));
            }
        }
        bytes
    }
}

/// `value` as IEEE half-precision bits (round to nearest; tiny values flush to zero, huge
/// ones saturate): enough for the generator's weights.
fn f16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if value == 0.0 || exponent <= 0 {
        return sign;
    }
    if exponent >= 31 {
        return sign | 0x7bff;
    }
    let mantissa = bits & 0x7f_ffff;
    let rounded = (u32::try_from(exponent).unwrap_or(0) << 10) + ((mantissa + 0x1000) >> 13);
    sign | u16::try_from(rounded.min(0x7bff)).unwrap_or(0x7bff)
}

/// The value of half-precision `bits` (normal numbers and zero, as [`f16_bits`] writes).
fn f16_value(bits: u16) -> f32 {
    let sign = if bits & 0x8000 == 0 { 1.0 } else { -1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    if exponent == 0 {
        return 0.0;
    }
    let mantissa = f32::from(bits & 0x3ff) / 1024.0;
    sign * (1.0 + mantissa) * 2f32.powi(exponent - 15)
}

/// Writes a GGUF (version 3) file of `metadata` and `tensors`.
pub(crate) fn write(
    path: &Path,
    metadata: &[(&str, WriteValue<'_>)],
    tensors: &[WriteTensor],
) -> io::Result<()> {
    fn string(head: &mut Vec<u8>, text: &str) {
        head.extend_from_slice(&(text.len() as u64).to_le_bytes());
        head.extend_from_slice(text.as_bytes());
    }
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut head, key);
        match value {
            WriteValue::Text(text) => {
                head.extend_from_slice(&TYPE_STRING.to_le_bytes());
                string(&mut head, text);
            }
            WriteValue::F32(value) => {
                head.extend_from_slice(&TYPE_F32.to_le_bytes());
                head.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
    let padded = |len: usize| len.next_multiple_of(DEFAULT_ALIGNMENT as usize);
    let mut offset = 0u64;
    for tensor in tensors {
        string(&mut head, &tensor.name);
        head.extend_from_slice(&(tensor.shape.len() as u32).to_le_bytes());
        for dim in &tensor.shape {
            head.extend_from_slice(&dim.to_le_bytes());
        }
        let kind = if tensor.q4_1 { GGML_Q4_1 } else { GGML_F32 };
        head.extend_from_slice(&kind.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += padded(tensor.data().len()) as u64;
    }
    head.resize(padded(head.len()), 0);
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(&head)?;
    for tensor in tensors {
        let mut bytes = tensor.data();
        bytes.resize(padded(bytes.len()), 0);
        out.write_all(&bytes)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("npc-gguf-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_written_file_reads_back() {
        let path = temp("roundtrip.gguf");
        write(
            &path,
            &[
                ("general.type", WriteValue::Text("adapter")),
                ("adapter.lora.alpha", WriteValue::F32(8.0)),
            ],
            &[WriteTensor {
                name: "blk.0.attn_q.weight.lora_a".into(),
                shape: vec![3, 2],
                values: vec![0.5; 6],
                q4_1: false,
            }],
        )
        .unwrap();
        let header = Header::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(header.text("general.type"), Some("adapter"));
        assert_eq!(header.number("adapter.lora.alpha"), Some(8.0));
        assert_eq!(
            header.tensors["blk.0.attn_q.weight.lora_a"],
            TensorInfo {
                shape: vec![3, 2],
                kind: GGML_F32
            }
        );
    }

    #[test]
    fn half_precision_round_trips_the_values_it_can_hold() {
        for value in [0.0, 1.0, -2.5, 0.000_122_070_31, 65504.0, 0.1] {
            let back = f16_value(f16_bits(value));
            assert!(
                (back - value).abs() <= value.abs() / 1024.0,
                "{value} → {back}"
            );
        }
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-2.0), 0xc000);
    }

    #[test]
    fn malformed_headers_are_errors_not_allocations() {
        let path = temp("bad.gguf");
        let cases: [(&[u8], &str); 4] = [
            (b"GGU", "shorter"),
            (b"NOPE0000", "not a GGUF"),
            (b"GGUF\x07\0\0\0", "version 7"),
            // Version 3, no tensor, one entry whose key claims 2^60 bytes.
            (
                b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x10",
                "a string of",
            ),
        ];
        for (bytes, expected) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = Header::read(&path).unwrap_err();
            assert!(err.contains(expected), "{err:?} for {bytes:?}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// The test model's header: the metadata and tensor shapes llama.cpp reports.
    #[test]
    fn the_test_model_header_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets")
            .join(crate::catalog::TEST_MODEL.asset_path());
        let header = Header::read(&path).unwrap();
        assert_eq!(header.text("general.architecture"), Some("llama"));
        assert_eq!(header.text("general.type"), Some("model"));
        let q = &header.tensors["blk.0.attn_q.weight"];
        assert_eq!(q.shape, vec![576, 576]);
        assert_eq!(header.tensors["blk.0.attn_v.weight"].shape, vec![576, 192]);
    }
}
