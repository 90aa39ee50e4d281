//! Reader for CTranslate2's `model.bin` (binary format version 6).
//!
//! Layout (little endian): `u32` format version, the spec name, `u32` spec revision, `u32`
//! variable count, then per variable its name, `u8` rank, `u32` per dimension, `u8` data type,
//! `u32` byte count and the data; finally `u32` alias count and (alias, target) name pairs.
//! Every string is a `u16` byte length followed by that many bytes, the last being a NUL.

use std::path::Path;

use super::ConvertError;

/// The only binary layout this reader understands.
pub const SUPPORTED_VERSION: u32 = 6;

/// Element type of a CTranslate2 variable (ids as CTranslate2 numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One named tensor of a CTranslate2 model.
#[derive(Debug, Clone)]
pub struct Variable {
    /// Slash-separated name, e.g. `encoder/layer_0/ffn/linear_0/weight`.
    pub name: String,
    /// Dimensions, outermost first (row-major); empty for a scalar.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Raw little-endian element bytes.
    pub data: Vec<u8>,
}

impl Variable {
    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the variable has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as IEEE half-precision bit patterns (only for `F16` and `F32` data; `F32`
    /// is rounded to nearest even).
    pub fn to_f16_bits(&self) -> Result<Vec<u16>, ConvertError> {
        match self.dtype {
            DType::F16 => Ok(self
                .data
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect()),
            DType::F32 => Ok(self.to_f32()?.into_iter().map(f32_to_f16).collect()),
            other => Err(self.wrong_type(other, "a float tensor")),
        }
    }

    /// The elements as `f32` (from `F32`, `F16` or `BF16` data).
    pub fn to_f32(&self) -> Result<Vec<f32>, ConvertError> {
        let words = |n: usize| self.data.chunks_exact(n);
        match self.dtype {
            DType::F32 => Ok(words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            DType::F16 => Ok(words(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect()),
            DType::BF16 => Ok(words(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect()),
            other => Err(self.wrong_type(other, "a float tensor")),
        }
    }

    /// The value of an integer scalar (e.g. `encoder/num_heads`).
    pub fn scalar_int(&self) -> Result<i64, ConvertError> {
        if self.len() != 1 {
            return Err(ConvertError::Model(format!(
                "variable `{}` has shape {:?}, expected a scalar",
                self.name, self.shape
            )));
        }
        let b = &self.data;
        Ok(match self.dtype {
            DType::I8 => i64::from(b[0] as i8),
            DType::I16 => i64::from(i16::from_le_bytes([b[0], b[1]])),
            DType::I32 => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            other => return Err(self.wrong_type(other, "an integer scalar")),
        })
    }

    fn wrong_type(&self, got: DType, wanted: &str) -> ConvertError {
        ConvertError::Model(format!(
            "variable `{}` has type {got:?}, expected {wanted}",
            self.name
        ))
    }
}

/// A parsed CTranslate2 model: its spec name, revision, variables and aliases.
#[derive(Debug, Clone)]
pub struct Ct2Model {
    /// Spec class name, e.g. `WhisperSpec`.
    pub spec: String,
    /// Spec revision.
    pub revision: u32,
    /// Variables in file order.
    pub variables: Vec<Variable>,
    /// `(alias, target)` pairs: a name that shares another variable's data.
    pub aliases: Vec<(String, String)>,
}

impl Ct2Model {
    /// Reads and parses `path`.
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let bytes = std::fs::read(path).map_err(|e| ConvertError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&bytes)
    }

    /// Parses a whole `model.bin`. A truncated or corrupt file is an error naming the byte
    /// offset and what was being read there.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConvertError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u32("format version")?;
        if version != SUPPORTED_VERSION {
            return Err(ConvertError::Model(format!(
                "CTranslate2 binary format version {version} is not supported (expected {SUPPORTED_VERSION}); is this a model.bin?"
            )));
        }
        let spec = r.string("spec name")?;
        let revision = r.u32("spec revision")?;
        let count = r.u32("variable count")? as usize;
        let mut variables = Vec::with_capacity(count.min(4096));
        for index in 0..count {
            let name = r.string(&format!("name of variable {index}"))?;
            let rank = r.u8(&format!("rank of `{name}`"))?;
            let mut shape = Vec::with_capacity(usize::from(rank));
            for _ in 0..rank {
                shape.push(r.u32(&format!("shape of `{name}`"))? as usize);
            }
            let type_id = r.u8(&format!("type of `{name}`"))?;
            let dtype = DType::from_id(type_id).ok_or_else(|| {
                ConvertError::Model(format!("variable `{name}` has unknown type id {type_id}"))
            })?;
            let byte_len = r.u32(&format!("byte count of `{name}`"))? as usize;
            let expected = shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
            if expected != Some(byte_len) {
                return Err(ConvertError::Model(format!(
                    "variable `{name}` declares {byte_len} bytes but shape {shape:?} of {dtype:?} needs {expected:?}"
                )));
            }
            let data = r.take(byte_len, &format!("data of `{name}`"))?.to_vec();
            variables.push(Variable {
                name,
                shape,
                dtype,
                data,
            });
        }
        let alias_count = r.u32("alias count")? as usize;
        let mut aliases = Vec::with_capacity(alias_count.min(4096));
        for _ in 0..alias_count {
            let alias = r.string("alias name")?;
            let target = r.string(&format!("target of alias `{alias}`"))?;
            aliases.push((alias, target));
        }
        if r.pos != bytes.len() {
            return Err(ConvertError::Model(format!(
                "{} unexpected bytes after the model at offset {}",
                bytes.len() - r.pos,
                r.pos
            )));
        }
        Ok(Self {
            spec,
            revision,
            variables,
            aliases,
        })
    }

    /// The variable called `name`, following aliases.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Variable> {
        let target = self
            .aliases
            .iter()
            .find(|(alias, _)| alias == name)
            .map_or(name, |(_, target)| target.as_str());
        self.variables.iter().find(|v| v.name == target)
    }

    /// Like [`get`](Self::get) but a missing variable is an error.
    pub fn require(&self, name: &str) -> Result<&Variable, ConvertError> {
        self.get(name)
            .ok_or_else(|| ConvertError::Model(format!("the model has no variable `{name}`")))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ConvertError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(ConvertError::Truncated {
                offset: self.pos as u64,
                what: what.to_owned(),
                needed: n as u64,
                available: (self.bytes.len() - self.pos) as u64,
            });
        };
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ConvertError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, ConvertError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ConvertError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String, ConvertError> {
        let len = usize::from(self.u16(what)?);
        let raw = self.take(len, what)?;
        let text = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(text.to_vec())
            .map_err(|_| ConvertError::Model(format!("{what} is not UTF-8")))
    }
}

/// Converts IEEE half-precision bits to `f32`.
#[must_use]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal half: renormalise into an f32 exponent.
            let shift = mant.leading_zeros() - 21;
            let mant = (mant << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (mant << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Converts `f32` to IEEE half-precision bits, rounding to nearest even.
#[must_use]
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        let nan = if mant == 0 { 0 } else { 0x200 };
        return sign | 0x7c00 | nan;
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exp <= 0 {
        if half_exp < -10 {
            return sign;
        }
        let mant = mant | 0x80_0000;
        let shift = (14 - half_exp) as u32;
        let half = mant >> shift;
        let rest = mant & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round = u32::from(rest > halfway || (rest == halfway && half & 1 == 1));
        return sign | (half + round) as u16;
    }
    let half = ((half_exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    let round = u32::from(rest > 0x1000 || (rest == 0x1000 && half & 1 == 1));
    sign | (half + round) as u16
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Serialises variables in CTranslate2's layout (test fixture writer).
    pub(crate) fn write_ct2(
        vars: &[(&str, &[usize], u8, Vec<u8>)],
        aliases: &[(&str, &str)],
    ) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&6u32.to_le_bytes());
        string(&mut out, "WhisperSpec");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
        for (name, shape, dtype, data) in vars {
            string(&mut out, name);
            out.push(shape.len() as u8);
            for d in *shape {
                out.extend_from_slice(&(*d as u32).to_le_bytes());
            }
            out.push(*dtype);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
        for (a, t) in aliases {
            string(&mut out, a);
            string(&mut out, t);
        }
        out
    }

    fn halves(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| f32_to_f16(v).to_le_bytes())
            .collect()
    }

    #[test]
    fn reads_variables_scalars_and_aliases() {
        let bytes = write_ct2(
            &[
                ("decoder/num_heads", &[], 2, 6i16.to_le_bytes().to_vec()),
                ("w", &[2, 2], 4, halves(&[1.0, -2.5, 0.0, 65504.0])),
            ],
            &[("decoder/projection/weight", "w")],
        );
        let model = Ct2Model::parse(&bytes).unwrap();
        assert_eq!(model.spec, "WhisperSpec");
        assert_eq!(model.revision, 3);
        assert_eq!(
            model
                .require("decoder/num_heads")
                .unwrap()
                .scalar_int()
                .unwrap(),
            6
        );
        let w = model.require("decoder/projection/weight").unwrap();
        assert_eq!(w.shape, vec![2, 2]);
        assert_eq!(w.to_f32().unwrap(), vec![1.0, -2.5, 0.0, 65504.0]);
        assert!(model.get("missing").is_none());
    }

    #[test]
    fn every_truncation_is_a_clear_error() {
        let bytes = write_ct2(
            &[(
                "w",
                &[3],
                0,
                [1.0f32, 2.0, 3.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )],
            &[],
        );
        assert!(Ct2Model::parse(&bytes).is_ok());
        for cut in 0..bytes.len() {
            let err = Ct2Model::parse(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, ConvertError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[test]
    fn rejects_wrong_version_and_inconsistent_sizes() {
        let mut bytes = write_ct2(&[("w", &[2], 4, halves(&[1.0, 2.0]))], &[]);
        bytes[0] = 5;
        assert!(
            Ct2Model::parse(&bytes)
                .unwrap_err()
                .to_string()
                .contains("version 5")
        );
        let bytes = write_ct2(&[("w", &[3], 4, halves(&[1.0, 2.0]))], &[]);
        assert!(
            Ct2Model::parse(&bytes)
                .unwrap_err()
                .to_string()
                .contains("declares 4 bytes")
        );
    }

    #[test]
    fn half_conversion_round_trips() {
        for bits in 0..=u16::MAX {
            let value = f16_to_f32(bits);
            if value.is_nan() {
                assert!(f16_to_f32(f32_to_f16(value)).is_nan());
            } else {
                assert_eq!(f32_to_f16(value), bits, "bits {bits:#06x} value {value}");
            }
        }
        assert_eq!(f32_to_f16(1.0 + 1.0 / 4096.0), f32_to_f16(1.0));
        assert_eq!(f32_to_f16(1e6), 0x7c00);
    }
}
