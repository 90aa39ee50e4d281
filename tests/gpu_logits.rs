//! The Vulkan device computes what the CPU computes: llama.cpp directly, no runtime (its own
//! process, so it owns llama.cpp's backend), the test model loaded twice, on the CPU and with
//! every layer on the device. Run by `cargo xtask gpu-check` with `tests/gpu.rs`.
//!
//! Greedy decoding amplifies rounding: where the two best tokens are a near-tie, the device's
//! other summation order picks the other one and the texts part from there. So the test
//! feeds both the CPU's greedy tokens (teacher forcing) and compares the logits at every
//! position: where the device's best token is not the CPU's, the CPU's two must be a near-tie
//! (closer than the rows differ); the picks agree at 9 positions in 10 or more, and no row
//! differs by 2 % of its energy.

mod common;

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

/// Tokens generated after the prompt.
const GENERATE: usize = 48;

/// The prompts: the blacksmith's kind of exchange, in the model's ChatML.
const PROMPTS: [&str; 2] = [
    "<|im_start|>system\nYou are Brom, the blacksmith of Oakvale. Answer in one or two \
     sentences.<|im_end|>\n<|im_start|>user\nGood morning! What do you sell?<|im_end|>\n\
     <|im_start|>assistant\n",
    "<|im_start|>system\nYou are Mira, who keeps the Oakvale inn.<|im_end|>\n<|im_start|>user\n\
     Is there a room free tonight, and what does it cost?<|im_end|>\n<|im_start|>assistant\n",
];

/// The logits at each position of `tokens` after the prompt's last one: the prompt in one
/// decode, then one token per decode, as the runtime generates.
fn logits_along(
    backend: &LlamaBackend,
    model: &LlamaModel,
    prompt: &[LlamaToken],
    forced: Option<&[LlamaToken]>,
) -> (Vec<Vec<f32>>, Vec<LlamaToken>) {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(2)
        .with_n_threads_batch(2);
    let mut ctx = model.new_context(backend, params).expect("context");
    let mut batch = LlamaBatch::new(512, 1);
    for (at, &token) in prompt.iter().enumerate() {
        batch
            .add(token, at as i32, &[0], at + 1 == prompt.len())
            .unwrap();
    }
    ctx.decode(&mut batch).expect("prompt");
    let mut rows = Vec::new();
    let mut tokens = Vec::new();
    for step in 0..GENERATE {
        let logits = ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
        let token = match forced {
            Some(forced) => forced[step],
            None => LlamaToken(best(&logits) as i32),
        };
        rows.push(logits);
        tokens.push(token);
        batch.clear();
        batch
            .add(token, (prompt.len() + step) as i32, &[0], true)
            .unwrap();
        ctx.decode(&mut batch).expect("token");
    }
    (rows, tokens)
}

fn best(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap()
}

#[test]
fn the_device_computes_the_cpus_logits_along_a_greedy_reply() {
    let backend = LlamaBackend::init().expect("backend");
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let path = common::model_path();
    let cpu = LlamaModel::load_from_file(
        &backend,
        &path,
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .expect("model on the CPU");
    let gpu = LlamaModel::load_from_file(
        &backend,
        &path,
        &LlamaModelParams::default().with_n_gpu_layers(u32::MAX),
    )
    .expect("model on the device");
    let (mut positions, mut same_best, mut worst_gap, mut worst_tie) = (0, 0, 0f32, 0f32);
    let mut worst_nmse = 0f64;
    for prompt in PROMPTS {
        let tokens = cpu.vocab().tokenize(prompt.as_bytes(), true, true);
        let (cpu_rows, greedy) = logits_along(&backend, &cpu, &tokens, None);
        let (gpu_rows, _) = logits_along(&backend, &gpu, &tokens, Some(&greedy));
        for (cpu_row, gpu_row) in cpu_rows.iter().zip(&gpu_rows) {
            positions += 1;
            let (cpu_best, gpu_best) = (best(cpu_row), best(gpu_row));
            // How far apart the two rows are where it matters: the CPU's ten best tokens.
            let mut order: Vec<usize> = (0..cpu_row.len()).collect();
            order.select_nth_unstable_by(9, |&a, &b| cpu_row[b].total_cmp(&cpu_row[a]));
            let gap = order[..10]
                .iter()
                .map(|&t| (cpu_row[t] - gpu_row[t]).abs())
                .fold(0f32, f32::max);
            worst_gap = worst_gap.max(gap);
            // The normalized squared error over the whole row (llama.cpp's `test-backend-ops`
            // measure).
            let (err, energy) = cpu_row
                .iter()
                .zip(gpu_row)
                .fold((0f64, 0f64), |(e, n), (&c, &g)| {
                    (e + f64::from(c - g).powi(2), n + f64::from(c).powi(2))
                });
            worst_nmse = worst_nmse.max(err / energy);
            if cpu_best == gpu_best {
                same_best += 1;
            } else {
                // The device picked another token: on the CPU it must be a near-tie, closer to
                // the best than the rows differ.
                let tie = cpu_row[cpu_best] - cpu_row[gpu_best];
                worst_tie = worst_tie.max(tie);
                assert!(
                    tie <= 2.0 * gap,
                    "the device's pick is {tie} below the CPU's best, the rows differ by {gap}"
                );
            }
        }
    }
    eprintln!(
        "{same_best} of {positions} positions with the same best token; largest difference \
         over the CPU's 10 best logits {worst_gap:.3}; largest CPU margin where they differ \
         {worst_tie:.3}; largest normalized squared error of a row {worst_nmse:.2e}"
    );
    // The bounds are about twice what the first run on lavapipe measured (93 of 96, 9.4e-3).
    // The device's kernels round differently (other summation orders, and f16 where the
    // device reports it, as lavapipe does), which moves logits by tenths; a wrong kernel
    // moves them by whole units and changes most picks.
    assert!(
        same_best * 10 >= positions * 9,
        "the device picked the CPU's best token at only {same_best} of {positions} positions"
    );
    assert!(
        worst_nmse < 2e-2,
        "a row of logits differs by {worst_nmse:.2e} of its energy between the CPU and the device"
    );
}
