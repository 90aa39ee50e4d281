//! Converts Whisper from CTranslate2's format (`model.bin` + `vocabulary.txt`) to the file
//! whisper.cpp loads.
//!
//! What differs between the two:
//! - names: CTranslate2's `encoder/layer_0/self_attention/linear_0/weight` style against
//!   whisper.cpp's (OpenAI's) `encoder.blocks.0.attn.query.weight`;
//! - fused projections: CTranslate2 stores self-attention query, key and value as one
//!   `[3·d, d]` matrix and cross-attention key and value as one `[2·d, d]` matrix; whisper.cpp
//!   wants them apart. Whisper's key projection has no bias, so CTranslate2's key-bias slice is
//!   zero and is dropped (a key bias would not change attention anyway: it adds the same
//!   `q·b` to every score of a query, which softmax cancels);
//! - types: whisper.cpp expects f16 for matrices and convolution kernels of an f16 model, and
//!   f32 for vectors, convolution biases (as `[d, 1]`) and positional embeddings;
//! - extras: whisper.cpp's file also carries the mel filterbank and the vocabulary bytes.

pub mod ct2;
pub mod ggml;
pub mod mel;
pub mod vocab;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ct2::{Ct2Model, DType};
use ggml::{Hparams, Tensor, TensorData, WhisperGgml};
use mel::MelFilters;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The input ended early.
    #[error(
        "model file is truncated: at byte {offset} reading {what} needs {needed} bytes, only {available} left"
    )]
    Truncated {
        /// Byte offset where reading stopped.
        offset: u64,
        /// What was being read.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The input is well-formed but not a Whisper model this converter understands.
    #[error("unsupported or corrupt model: {0}")]
    Model(String),
    /// The output could not be written.
    #[error("cannot write the converted model: {0}")]
    Write(String),
}

/// Counts from a finished conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The model's hyper-parameters.
    pub hparams: Hparams,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written.
    pub bytes: u64,
}

impl ConvertReport {
    /// A one-line summary.
    #[must_use]
    pub fn summary(&self) -> String {
        let h = self.hparams;
        let mut s = String::new();
        let _ = write!(
            s,
            "{} tensors, {:.1} MB; vocab {}, audio {}x{} ({} layers, {} heads), text {}x{} ({} layers, {} heads), {} mels",
            self.tensors,
            self.bytes as f64 / 1e6,
            h.n_vocab,
            h.n_audio_ctx,
            h.n_audio_state,
            h.n_audio_layer,
            h.n_audio_head,
            h.n_text_ctx,
            h.n_text_state,
            h.n_text_layer,
            h.n_text_head,
            h.n_mels
        );
        s
    }
}

/// Converts the CTranslate2 model directory `input` (holding `model.bin` and
/// `vocabulary.txt`) into whisper.cpp's format at `output`, written via a `.partial` file so
/// an interrupted run never leaves a half-written model under the final name.
pub fn convert_dir(input: &Path, output: &Path) -> Result<ConvertReport, ConvertError> {
    let model = Ct2Model::open(&input.join("model.bin"))?;
    let vocab_path = input.join("vocabulary.txt");
    let vocab = std::fs::read_to_string(&vocab_path).map_err(|source| ConvertError::Io {
        path: vocab_path,
        source,
    })?;
    let converted = convert(&model, &vocab)?;
    let partial = output.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .map_err(|e| ConvertError::Write(format!("{}: {e}", partial.display())))?;
    let mut writer = std::io::BufWriter::new(file);
    converted.write(&mut writer)?;
    let file = writer
        .into_inner()
        .map_err(|e| ConvertError::Write(e.to_string()))?;
    file.sync_all()
        .map_err(|e| ConvertError::Write(e.to_string()))?;
    let bytes = file
        .metadata()
        .map_err(|e| ConvertError::Write(e.to_string()))?
        .len();
    std::fs::rename(&partial, output)
        .map_err(|e| ConvertError::Write(format!("{}: {e}", output.display())))?;
    Ok(ConvertReport {
        hparams: converted.hparams,
        tensors: converted.tensors.len(),
        bytes,
    })
}

/// Converts a parsed CTranslate2 Whisper model and its `vocabulary.txt` text.
pub fn convert(model: &Ct2Model, vocabulary: &str) -> Result<WhisperGgml, ConvertError> {
    if model.spec != "WhisperSpec" {
        return Err(ConvertError::Model(format!(
            "spec `{}` is not WhisperSpec",
            model.spec
        )));
    }
    let embeddings = model.require("decoder/embeddings/weight")?;
    let dims =
        |name: &str| -> Result<Vec<usize>, ConvertError> { Ok(model.require(name)?.shape.clone()) };
    let [n_vocab, n_text_state] = two(&embeddings.shape, &embeddings.name)?;
    let [n_audio_ctx, n_audio_state] = two(
        &dims("encoder/position_encodings/encodings")?,
        "encoder positions",
    )?;
    let [n_text_ctx, _] = two(
        &dims("decoder/position_encodings/encodings")?,
        "decoder positions",
    )?;
    let conv1 = dims("encoder/conv1/weight")?;
    if conv1.len() != 3 || conv1[0] != n_audio_state || conv1[2] != 3 {
        return Err(ConvertError::Model(format!(
            "encoder/conv1/weight has shape {conv1:?}"
        )));
    }
    if n_text_state != n_audio_state {
        return Err(ConvertError::Model(format!(
            "decoder width {n_text_state} differs from encoder width {n_audio_state}"
        )));
    }
    let n_audio_layer = count_layers(model, "encoder");
    let n_text_layer = count_layers(model, "decoder");
    if n_audio_layer == 0 || n_text_layer == 0 {
        return Err(ConvertError::Model(
            "the model has no encoder or decoder layers".into(),
        ));
    }
    let heads = |name: &str| -> Result<i32, ConvertError> {
        let h = model.require(name)?.scalar_int()?;
        i32::try_from(h)
            .ok()
            .filter(|&h| h > 0 && n_audio_state % h as usize == 0)
            .ok_or_else(|| {
                ConvertError::Model(format!(
                    "{name} = {h} does not divide the width {n_audio_state}"
                ))
            })
    };
    let vocab = vocab::decode_vocabulary(vocabulary);
    if vocab.len() != n_vocab {
        return Err(ConvertError::Model(format!(
            "vocabulary.txt has {} tokens but the embedding matrix has {n_vocab} rows",
            vocab.len()
        )));
    }
    let i =
        |n: usize| i32::try_from(n).map_err(|_| ConvertError::Model(format!("{n} is too large")));
    let hparams = Hparams {
        n_vocab: i(n_vocab)?,
        n_audio_ctx: i(n_audio_ctx)?,
        n_audio_state: i(n_audio_state)?,
        n_audio_head: heads("encoder/num_heads")?,
        n_audio_layer: i(n_audio_layer)?,
        n_text_ctx: i(n_text_ctx)?,
        n_text_state: i(n_text_state)?,
        n_text_head: heads("decoder/num_heads")?,
        n_text_layer: i(n_text_layer)?,
        n_mels: i(conv1[1])?,
        ftype: 1,
    };

    let mut out = Out {
        model,
        d: n_audio_state,
        tensors: Vec::new(),
    };
    out.f32(
        "encoder.positional_embedding",
        "encoder/position_encodings/encodings",
        None,
    )?;
    out.f16("encoder.conv1.weight", "encoder/conv1/weight", None)?;
    out.f32(
        "encoder.conv1.bias",
        "encoder/conv1/bias",
        Some(vec![n_audio_state, 1]),
    )?;
    out.f16("encoder.conv2.weight", "encoder/conv2/weight", None)?;
    out.f32(
        "encoder.conv2.bias",
        "encoder/conv2/bias",
        Some(vec![n_audio_state, 1]),
    )?;
    for l in 0..n_audio_layer {
        let (src, dst) = (format!("encoder/layer_{l}"), format!("encoder.blocks.{l}"));
        out.norm(
            &format!("{dst}.attn_ln"),
            &format!("{src}/self_attention/layer_norm"),
        )?;
        out.split(
            &dst,
            "attn",
            &format!("{src}/self_attention/linear_0"),
            &["query", "key", "value"],
        )?;
        out.linear(
            &format!("{dst}.attn.out"),
            &format!("{src}/self_attention/linear_1"),
        )?;
        out.mlp(&dst, &src)?;
    }
    out.norm("encoder.ln_post", "encoder/layer_norm")?;
    out.f32(
        "decoder.positional_embedding",
        "decoder/position_encodings/encodings",
        None,
    )?;
    out.f16(
        "decoder.token_embedding.weight",
        "decoder/embeddings/weight",
        None,
    )?;
    for l in 0..n_text_layer {
        let (src, dst) = (format!("decoder/layer_{l}"), format!("decoder.blocks.{l}"));
        out.norm(
            &format!("{dst}.attn_ln"),
            &format!("{src}/self_attention/layer_norm"),
        )?;
        out.split(
            &dst,
            "attn",
            &format!("{src}/self_attention/linear_0"),
            &["query", "key", "value"],
        )?;
        out.linear(
            &format!("{dst}.attn.out"),
            &format!("{src}/self_attention/linear_1"),
        )?;
        out.norm(
            &format!("{dst}.cross_attn_ln"),
            &format!("{src}/attention/layer_norm"),
        )?;
        out.linear(
            &format!("{dst}.cross_attn.query"),
            &format!("{src}/attention/linear_0"),
        )?;
        out.split(
            &dst,
            "cross_attn",
            &format!("{src}/attention/linear_1"),
            &["key", "value"],
        )?;
        out.linear(
            &format!("{dst}.cross_attn.out"),
            &format!("{src}/attention/linear_2"),
        )?;
        out.mlp(&dst, &src)?;
    }
    out.norm("decoder.ln", "decoder/layer_norm")?;

    Ok(WhisperGgml {
        hparams,
        filters: MelFilters::whisper(conv1[1]),
        vocab,
        tensors: out.tensors,
    })
}

fn two(shape: &[usize], what: &str) -> Result<[usize; 2], ConvertError> {
    match shape {
        &[a, b] => Ok([a, b]),
        _ => Err(ConvertError::Model(format!(
            "{what} has shape {shape:?}, expected 2 dimensions"
        ))),
    }
}

fn count_layers(model: &Ct2Model, side: &str) -> usize {
    let prefix = format!("{side}/layer_");
    model
        .variables
        .iter()
        .filter_map(|v| {
            v.name
                .strip_prefix(&prefix)?
                .split('/')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1)
}

struct Out<'a> {
    model: &'a Ct2Model,
    d: usize,
    tensors: Vec<Tensor>,
}

impl Out<'_> {
    fn push(&mut self, name: String, shape: Vec<usize>, data: TensorData) {
        self.tensors.push(Tensor { name, shape, data });
    }

    fn f32(
        &mut self,
        name: &str,
        src: &str,
        shape: Option<Vec<usize>>,
    ) -> Result<(), ConvertError> {
        let v = self.model.require(src)?;
        let data = v.to_f32()?;
        self.push(
            name.to_owned(),
            shape.unwrap_or_else(|| v.shape.clone()),
            TensorData::F32(data),
        );
        Ok(())
    }

    fn f16(
        &mut self,
        name: &str,
        src: &str,
        shape: Option<Vec<usize>>,
    ) -> Result<(), ConvertError> {
        let v = self.model.require(src)?;
        let data = v.to_f16_bits()?;
        self.push(
            name.to_owned(),
            shape.unwrap_or_else(|| v.shape.clone()),
            TensorData::F16(data),
        );
        Ok(())
    }

    fn norm(&mut self, dst: &str, src: &str) -> Result<(), ConvertError> {
        self.f32(&format!("{dst}.weight"), &format!("{src}/gamma"), None)?;
        self.f32(&format!("{dst}.bias"), &format!("{src}/beta"), None)
    }

    fn linear(&mut self, dst: &str, src: &str) -> Result<(), ConvertError> {
        self.f16(&format!("{dst}.weight"), &format!("{src}/weight"), None)?;
        self.f32(&format!("{dst}.bias"), &format!("{src}/bias"), None)
    }

    fn mlp(&mut self, dst: &str, src: &str) -> Result<(), ConvertError> {
        self.norm(&format!("{dst}.mlp_ln"), &format!("{src}/ffn/layer_norm"))?;
        self.linear(&format!("{dst}.mlp.0"), &format!("{src}/ffn/linear_0"))?;
        self.linear(&format!("{dst}.mlp.2"), &format!("{src}/ffn/linear_1"))
    }

    /// Splits a fused `[parts·d, d]` projection (and its bias) into whisper.cpp's tensors;
    /// `key` gets no bias.
    fn split(
        &mut self,
        block: &str,
        attn: &str,
        src: &str,
        parts: &[&str],
    ) -> Result<(), ConvertError> {
        let d = self.d;
        let weight = self.model.require(&format!("{src}/weight"))?;
        if weight.shape != [parts.len() * d, d] || !matches!(weight.dtype, DType::F16 | DType::F32)
        {
            return Err(ConvertError::Model(format!(
                "{} has shape {:?} ({:?}), expected [{}, {d}] floats",
                weight.name,
                weight.shape,
                weight.dtype,
                parts.len() * d
            )));
        }
        let bias = self.model.require(&format!("{src}/bias"))?;
        if bias.shape != [parts.len() * d] {
            return Err(ConvertError::Model(format!(
                "{} has shape {:?}",
                bias.name, bias.shape
            )));
        }
        let weights = weight.to_f16_bits()?;
        let biases = bias.to_f32()?;
        for (k, part) in parts.iter().enumerate() {
            let name = format!("{block}.{attn}.{part}");
            let rows = k * d * d..(k + 1) * d * d;
            self.push(
                format!("{name}.weight"),
                vec![d, d],
                TensorData::F16(weights[rows].to_vec()),
            );
            if *part != "key" {
                self.push(
                    format!("{name}.bias"),
                    vec![d],
                    TensorData::F32(biases[k * d..(k + 1) * d].to_vec()),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ct2::f32_to_f16;
    use super::ct2::tests::write_ct2;
    use super::*;

    fn halves(n: usize, base: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|i| f32_to_f16(base + i as f32).to_le_bytes())
            .collect()
    }

    /// A one-layer Whisper-shaped CTranslate2 model with width 2 and distinct values.
    fn tiny_model() -> Vec<u8> {
        let d = 2;
        let mut vars: Vec<(String, Vec<usize>, u8, Vec<u8>)> = vec![
            (
                "encoder/num_heads".into(),
                vec![],
                2,
                1i16.to_le_bytes().to_vec(),
            ),
            (
                "decoder/num_heads".into(),
                vec![],
                2,
                2i16.to_le_bytes().to_vec(),
            ),
            (
                "decoder/embeddings/weight".into(),
                vec![3, d],
                4,
                halves(6, 0.0),
            ),
            (
                "encoder/position_encodings/encodings".into(),
                vec![4, d],
                4,
                halves(8, 0.0),
            ),
            (
                "decoder/position_encodings/encodings".into(),
                vec![3, d],
                4,
                halves(6, 0.0),
            ),
            (
                "encoder/conv1/weight".into(),
                vec![d, 5, 3],
                4,
                halves(30, 0.0),
            ),
            ("encoder/conv1/bias".into(), vec![d], 4, halves(2, 7.0)),
            (
                "encoder/conv2/weight".into(),
                vec![d, d, 3],
                4,
                halves(12, 0.0),
            ),
            ("encoder/conv2/bias".into(), vec![d], 4, halves(2, 0.0)),
        ];
        let mut norm = |p: &str| {
            vars.push((format!("{p}/gamma"), vec![d], 4, halves(d, 1.0)));
            vars.push((format!("{p}/beta"), vec![d], 4, halves(d, 0.0)));
        };
        norm("encoder/layer_norm");
        norm("decoder/layer_norm");
        for side in ["encoder", "decoder"] {
            let mut norm = |p: String| {
                vars.push((format!("{p}/gamma"), vec![d], 4, halves(d, 1.0)));
                vars.push((format!("{p}/beta"), vec![d], 4, halves(d, 0.0)));
            };
            norm(format!("{side}/layer_0/self_attention/layer_norm"));
            norm(format!("{side}/layer_0/ffn/layer_norm"));
            if side == "decoder" {
                norm(format!("{side}/layer_0/attention/layer_norm"));
            }
            let mut lin = |p: String, rows: usize, cols: usize| {
                vars.push((
                    format!("{p}/weight"),
                    vec![rows, cols],
                    4,
                    halves(rows * cols, 0.0),
                ));
                vars.push((format!("{p}/bias"), vec![rows], 4, halves(rows, 100.0)));
            };
            lin(format!("{side}/layer_0/self_attention/linear_0"), 3 * d, d);
            lin(format!("{side}/layer_0/self_attention/linear_1"), d, d);
            lin(format!("{side}/layer_0/ffn/linear_0"), 4 * d, d);
            lin(format!("{side}/layer_0/ffn/linear_1"), d, 4 * d);
            if side == "decoder" {
                lin(format!("{side}/layer_0/attention/linear_0"), d, d);
                lin(format!("{side}/layer_0/attention/linear_1"), 2 * d, d);
                lin(format!("{side}/layer_0/attention/linear_2"), d, d);
            }
        }
        let borrowed: Vec<(&str, &[usize], u8, Vec<u8>)> = vars
            .iter()
            .map(|(n, s, t, b)| (n.as_str(), s.as_slice(), *t, b.clone()))
            .collect();
        write_ct2(
            &borrowed,
            &[("decoder/projection/weight", "decoder/embeddings/weight")],
        )
    }

    #[test]
    fn maps_names_splits_fused_projections_and_picks_types() {
        let model = Ct2Model::parse(&tiny_model()).unwrap();
        let out = convert(&model, "a\nĠb\n<|endoftext|>\n").unwrap();
        let h = out.hparams;
        assert_eq!(
            (
                h.n_vocab,
                h.n_audio_ctx,
                h.n_audio_state,
                h.n_audio_head,
                h.n_audio_layer
            ),
            (3, 4, 2, 1, 1)
        );
        assert_eq!(
            (
                h.n_text_ctx,
                h.n_text_head,
                h.n_text_layer,
                h.n_mels,
                h.ftype
            ),
            (3, 2, 1, 5, 1)
        );
        assert_eq!(out.vocab[1], b" b");
        let get = |n: &str| {
            out.tensors
                .iter()
                .find(|t| t.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        // Fused [q; k; v] rows 0..2, 2..4, 4..6 of a matrix holding 0, 1, 2, ... in order.
        let TensorData::F16(k) = &get("encoder.blocks.0.attn.key.weight").data else {
            panic!()
        };
        assert_eq!(k, &[4.0f32, 5.0, 6.0, 7.0].map(f32_to_f16));
        let TensorData::F32(vb) = &get("decoder.blocks.0.attn.value.bias").data else {
            panic!()
        };
        assert_eq!(vb, &[104.0, 105.0]);
        assert!(out.tensors.iter().all(|t| !t.name.ends_with("key.bias")));
        let TensorData::F32(cvb) = &get("decoder.blocks.0.cross_attn.value.bias").data else {
            panic!()
        };
        assert_eq!(cvb, &[102.0, 103.0]);
        let conv_bias = get("encoder.conv1.bias");
        assert_eq!(conv_bias.shape, vec![2, 1]);
        assert!(matches!(conv_bias.data, TensorData::F32(_)));
        assert!(matches!(
            get("encoder.conv1.weight").data,
            TensorData::F16(_)
        ));
        assert!(matches!(
            get("decoder.positional_embedding").data,
            TensorData::F32(_)
        ));
        assert!(matches!(
            get("decoder.token_embedding.weight").data,
            TensorData::F16(_)
        ));
        assert!(matches!(get("decoder.ln.weight").data, TensorData::F32(_)));
        // whisper.cpp's loader wants exactly this many tensors for one layer each side.
        assert_eq!(out.tensors.len(), 7 + 15 + 2 + 2 + 24);
    }

    #[test]
    fn missing_variables_and_vocab_mismatch_are_errors() {
        let model = Ct2Model::parse(&tiny_model()).unwrap();
        let err = convert(&model, "a\nb\n").unwrap_err();
        assert!(
            err.to_string().contains("vocabulary.txt has 2 tokens"),
            "{err}"
        );
        let mut broken = model.clone();
        broken
            .variables
            .retain(|v| v.name != "decoder/layer_0/attention/linear_2/weight");
        let err = convert(&broken, "a\nb\nc\n").unwrap_err();
        assert!(
            err.to_string().contains("attention/linear_2/weight"),
            "{err}"
        );
    }
}
