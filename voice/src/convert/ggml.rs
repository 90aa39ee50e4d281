//! whisper.cpp's model file (the "ggml" format its `whisper_init_from_file` loads).
//!
//! Layout (little endian): magic `0x67676d6c`; eleven `i32` hyper-parameters; the mel
//! filterbank (`i32` bands, `i32` bins, `f32` weights); the vocabulary (`i32` count, then per
//! token a `u32` length and its bytes); then tensors until end of file, each as `i32` rank,
//! `i32` name length, `i32` type (0 = f32, 1 = f16), `i32` per dimension innermost first,
//! the name, and the data.

use std::io::{self, Write};

use super::ConvertError;
use super::mel::MelFilters;

/// `"ggml"` read as a little-endian `u32`.
pub const MAGIC: u32 = 0x6767_6d6c;

/// Whisper's hyper-parameters in the order the file stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hparams {
    /// Vocabulary size (51864 for English-only models).
    pub n_vocab: i32,
    /// Encoder positions (1500 for 30 s of audio).
    pub n_audio_ctx: i32,
    /// Encoder width.
    pub n_audio_state: i32,
    /// Encoder attention heads.
    pub n_audio_head: i32,
    /// Encoder blocks.
    pub n_audio_layer: i32,
    /// Decoder positions.
    pub n_text_ctx: i32,
    /// Decoder width.
    pub n_text_state: i32,
    /// Decoder attention heads.
    pub n_text_head: i32,
    /// Decoder blocks.
    pub n_text_layer: i32,
    /// Mel bands.
    pub n_mels: i32,
    /// Weight type of the large matrices: 0 = f32, 1 = f16.
    pub ftype: i32,
}

impl Hparams {
    fn to_array(self) -> [i32; 11] {
        [
            self.n_vocab,
            self.n_audio_ctx,
            self.n_audio_state,
            self.n_audio_head,
            self.n_audio_layer,
            self.n_text_ctx,
            self.n_text_state,
            self.n_text_head,
            self.n_text_layer,
            self.n_mels,
            self.ftype,
        ]
    }

    fn from_array(a: [i32; 11]) -> Self {
        Self {
            n_vocab: a[0],
            n_audio_ctx: a[1],
            n_audio_state: a[2],
            n_audio_head: a[3],
            n_audio_layer: a[4],
            n_text_ctx: a[5],
            n_text_state: a[6],
            n_text_head: a[7],
            n_text_layer: a[8],
            n_mels: a[9],
            ftype: a[10],
        }
    }
}

/// Tensor payload.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// 32-bit floats (ggml type 0).
    F32(Vec<f32>),
    /// Half-precision bit patterns (ggml type 1).
    F16(Vec<u16>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    fn type_id(&self) -> i32 {
        match self {
            Self::F32(_) => 0,
            Self::F16(_) => 1,
        }
    }
}

/// One named tensor. `shape` is outermost first (numpy / PyTorch order); the file stores it
/// reversed, as ggml's `ne`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// whisper.cpp's name, e.g. `encoder.blocks.0.attn.query.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: TensorData,
}

/// A complete whisper.cpp model file in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperGgml {
    /// Hyper-parameters.
    pub hparams: Hparams,
    /// Mel filterbank used to compute the input features.
    pub filters: MelFilters,
    /// Token bytes by token id.
    pub vocab: Vec<Vec<u8>>,
    /// Tensors in file order.
    pub tensors: Vec<Tensor>,
}

fn len_i32(n: usize, what: &str) -> Result<i32, ConvertError> {
    i32::try_from(n).map_err(|_| ConvertError::Model(format!("{what} {n} does not fit the format")))
}

impl WhisperGgml {
    /// Writes the file to `out`.
    pub fn write(&self, out: &mut impl Write) -> Result<(), ConvertError> {
        let io = |e: io::Error| ConvertError::Write(e.to_string());
        let mut w = |bytes: &[u8]| out.write_all(bytes).map_err(io);
        w(&MAGIC.to_le_bytes())?;
        for v in self.hparams.to_array() {
            w(&v.to_le_bytes())?;
        }
        w(&len_i32(self.filters.n_mel, "mel bands")?.to_le_bytes())?;
        w(&len_i32(self.filters.n_fft, "mel bins")?.to_le_bytes())?;
        let filters: Vec<u8> = self
            .filters
            .data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w(&filters)?;
        w(&len_i32(self.vocab.len(), "vocabulary size")?.to_le_bytes())?;
        for token in &self.vocab {
            w(&(len_i32(token.len(), "token length")? as u32).to_le_bytes())?;
            w(token)?;
        }
        for tensor in &self.tensors {
            let elements: usize = tensor.shape.iter().product();
            if elements != tensor.data.len() || tensor.shape.is_empty() || tensor.shape.len() > 4 {
                return Err(ConvertError::Model(format!(
                    "tensor `{}` has shape {:?} but {} elements",
                    tensor.name,
                    tensor.shape,
                    tensor.data.len()
                )));
            }
            w(&len_i32(tensor.shape.len(), "rank")?.to_le_bytes())?;
            w(&len_i32(tensor.name.len(), "name length")?.to_le_bytes())?;
            w(&tensor.data.type_id().to_le_bytes())?;
            for &d in tensor.shape.iter().rev() {
                w(&len_i32(d, "dimension")?.to_le_bytes())?;
            }
            w(tensor.name.as_bytes())?;
            let bytes: Vec<u8> = match &tensor.data {
                TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            w(&bytes)?;
        }
        Ok(())
    }

    /// Parses a file written by [`write`](Self::write) (or by whisper.cpp's own converters).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConvertError> {
        let mut cur = Cursor { bytes, pos: 0 };
        let i32_at = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let magic = u32::from_le_bytes(cur.take(4, "magic")?.try_into().unwrap_or([0; 4]));
        if magic != MAGIC {
            return Err(ConvertError::Model(format!(
                "bad magic {magic:#010x}: not a whisper.cpp model"
            )));
        }
        let mut hp = [0i32; 11];
        for v in &mut hp {
            *v = i32_at(cur.take(4, "hyper-parameters")?);
        }
        let count = |v: i32, what: &str| {
            usize::try_from(v).map_err(|_| ConvertError::Model(format!("negative {what} {v}")))
        };
        let n_mel = count(i32_at(cur.take(4, "mel bands")?), "mel bands")?;
        let n_fft = count(i32_at(cur.take(4, "mel bins")?), "mel bins")?;
        let raw = cur.take(n_mel.saturating_mul(n_fft).saturating_mul(4), "mel filters")?;
        let data = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let n_vocab = count(i32_at(cur.take(4, "vocabulary size")?), "vocabulary size")?;
        let mut vocab = Vec::with_capacity(n_vocab.min(1 << 20));
        for _ in 0..n_vocab {
            let len = i32_at(cur.take(4, "token length")?) as u32 as usize;
            vocab.push(cur.take(len, "token")?.to_vec());
        }
        let mut tensors = Vec::new();
        while cur.pos < bytes.len() {
            let rank = count(i32_at(cur.take(4, "tensor rank")?), "rank")?;
            let name_len = count(i32_at(cur.take(4, "tensor name length")?), "name length")?;
            let ttype = i32_at(cur.take(4, "tensor type")?);
            if rank == 0 || rank > 4 {
                return Err(ConvertError::Model(format!(
                    "tensor rank {rank} is out of range"
                )));
            }
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(count(i32_at(cur.take(4, "tensor shape")?), "dimension")?);
            }
            shape.reverse();
            let name = String::from_utf8_lossy(cur.take(name_len, "tensor name")?).into_owned();
            let n: usize = shape.iter().product();
            let data = match ttype {
                0 => TensorData::F32(
                    cur.take(n.saturating_mul(4), &format!("data of `{name}`"))?
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                1 => TensorData::F16(
                    cur.take(n.saturating_mul(2), &format!("data of `{name}`"))?
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                other => {
                    return Err(ConvertError::Model(format!(
                        "tensor `{name}` has unsupported type {other}"
                    )));
                }
            };
            tensors.push(Tensor { name, shape, data });
        }
        Ok(Self {
            hparams: Hparams::from_array(hp),
            filters: MelFilters { n_mel, n_fft, data },
            vocab,
            tensors,
        })
    }
}

/// Checks a whisper.cpp model file's structure without loading its weights: header, filters,
/// vocabulary, and that every tensor's data is present in full. whisper.cpp itself does not
/// notice a file cut inside its last tensor, so the helper calls this before loading.
pub fn validate_file(path: &std::path::Path) -> Result<(Hparams, usize), ConvertError> {
    use std::io::{BufReader, Read as _, Seek as _, SeekFrom};
    let file = std::fs::File::open(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| ConvertError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut r = BufReader::new(file);
    let mut pos = 0u64;
    let read_i32 = |r: &mut BufReader<std::fs::File>,
                    pos: &mut u64,
                    what: &str|
     -> Result<i32, ConvertError> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|_| ConvertError::Truncated {
            offset: *pos,
            what: what.to_owned(),
            needed: 4,
            available: size.saturating_sub(*pos),
        })?;
        *pos += 4;
        Ok(i32::from_le_bytes(b))
    };
    let skip = |r: &mut BufReader<std::fs::File>,
                pos: &mut u64,
                n: u64,
                what: &str|
     -> Result<(), ConvertError> {
        if size.saturating_sub(*pos) < n {
            return Err(ConvertError::Truncated {
                offset: *pos,
                what: what.to_owned(),
                needed: n,
                available: size.saturating_sub(*pos),
            });
        }
        r.seek(SeekFrom::Current(n as i64))
            .map_err(|e| ConvertError::Model(e.to_string()))?;
        *pos += n;
        Ok(())
    };
    if read_i32(&mut r, &mut pos, "magic")? as u32 != MAGIC {
        return Err(ConvertError::Model(format!(
            "{}: bad magic: not a whisper.cpp model",
            path.display()
        )));
    }
    let mut hp = [0i32; 11];
    for v in &mut hp {
        *v = read_i32(&mut r, &mut pos, "hyper-parameters")?;
    }
    let nonneg = |v: i32, what: &str| {
        u64::try_from(v).map_err(|_| ConvertError::Model(format!("negative {what} {v}")))
    };
    let n_mel = nonneg(read_i32(&mut r, &mut pos, "mel bands")?, "mel bands")?;
    let n_fft = nonneg(read_i32(&mut r, &mut pos, "mel bins")?, "mel bins")?;
    skip(&mut r, &mut pos, n_mel * n_fft * 4, "mel filters")?;
    let n_vocab = nonneg(
        read_i32(&mut r, &mut pos, "vocabulary size")?,
        "vocabulary size",
    )?;
    for _ in 0..n_vocab {
        let len = read_i32(&mut r, &mut pos, "token length")? as u32;
        skip(&mut r, &mut pos, u64::from(len), "token")?;
    }
    let mut tensors = 0;
    while pos < size {
        let rank = nonneg(read_i32(&mut r, &mut pos, "tensor rank")?, "rank")?;
        let name_len = nonneg(
            read_i32(&mut r, &mut pos, "tensor name length")?,
            "name length",
        )?;
        let ttype = read_i32(&mut r, &mut pos, "tensor type")?;
        if rank == 0 || rank > 4 {
            return Err(ConvertError::Model(format!(
                "tensor {tensors} has rank {rank}"
            )));
        }
        let mut elements = 1u64;
        for _ in 0..rank {
            elements = elements.saturating_mul(nonneg(
                read_i32(&mut r, &mut pos, "tensor shape")?,
                "dimension",
            )?);
        }
        skip(&mut r, &mut pos, name_len, "tensor name")?;
        let width = match ttype {
            0 => 4,
            1 => 2,
            other => {
                return Err(ConvertError::Model(format!(
                    "tensor {tensors} has unsupported type {other}"
                )));
            }
        };
        skip(
            &mut r,
            &mut pos,
            elements.saturating_mul(width),
            &format!("data of tensor {tensors}"),
        )?;
        tensors += 1;
    }
    Ok((Hparams::from_array(hp), tensors))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ConvertError> {
        if self.bytes.len() - self.pos < n {
            return Err(ConvertError::Truncated {
                offset: self.pos as u64,
                what: what.to_owned(),
                needed: n as u64,
                available: (self.bytes.len() - self.pos) as u64,
            });
        }
        self.pos += n;
        Ok(&self.bytes[self.pos - n..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WhisperGgml {
        WhisperGgml {
            hparams: Hparams {
                n_vocab: 3,
                n_audio_ctx: 2,
                n_audio_state: 4,
                n_audio_head: 1,
                n_audio_layer: 1,
                n_text_ctx: 2,
                n_text_state: 4,
                n_text_head: 1,
                n_text_layer: 1,
                n_mels: 2,
                ftype: 1,
            },
            filters: MelFilters {
                n_mel: 2,
                n_fft: 3,
                data: vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
            },
            vocab: vec![b"a".to_vec(), b" the".to_vec(), Vec::new()],
            tensors: vec![
                Tensor {
                    name: "encoder.conv1.bias".into(),
                    shape: vec![4, 1],
                    data: TensorData::F32(vec![1.0, 2.0, 3.0, 4.0]),
                },
                Tensor {
                    name: "m".into(),
                    shape: vec![2, 3],
                    data: TensorData::F16(vec![1, 2, 3, 4, 5, 6]),
                },
            ],
        }
    }

    #[test]
    fn writes_the_documented_layout() {
        let mut out = Vec::new();
        sample().write(&mut out).unwrap();
        assert_eq!(&out[..4], b"lmgg");
        assert_eq!(i32::from_le_bytes(out[4..8].try_into().unwrap()), 3);
        // After magic, 11 hparams, 2 counts, 6 filters, vocab count and 3 tokens (1+4+0 bytes):
        let tensors_at = 4 + 44 + 8 + 24 + 4 + 12 + 5;
        let first = &out[tensors_at..];
        let word = |i: usize| i32::from_le_bytes(first[i * 4..i * 4 + 4].try_into().unwrap());
        // rank 2, name length, f32, ne = [1, 4] (innermost first)
        assert_eq!(
            [word(0), word(1), word(2), word(3), word(4)],
            [2, 18, 0, 1, 4]
        );
        assert_eq!(&first[20..38], b"encoder.conv1.bias");
    }

    #[test]
    fn parse_inverts_write_and_truncation_is_reported() {
        let mut out = Vec::new();
        sample().write(&mut out).unwrap();
        assert_eq!(WhisperGgml::parse(&out).unwrap(), sample());
        let err = WhisperGgml::parse(&out[..out.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(
            WhisperGgml::parse(b"GGUF1234")
                .unwrap_err()
                .to_string()
                .contains("bad magic")
        );
        let dir = std::env::temp_dir().join(format!("npc-voice-ggml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.bin");
        std::fs::write(&path, &out).unwrap();
        assert_eq!(validate_file(&path).unwrap().1, 2);
        for cut in [1, 30, 100, out.len() - 1] {
            std::fs::write(&path, &out[..cut]).unwrap();
            let err = validate_file(&path).unwrap_err();
            assert!(err.to_string().contains("truncated"), "cut {cut}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_shape_data_mismatch() {
        let mut model = sample();
        model.tensors[1].shape = vec![4, 4];
        let err = model.write(&mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("16") || err.to_string().contains("6 elements"),
            "{err}"
        );
    }
}
