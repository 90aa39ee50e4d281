#!/usr/bin/env python3
"""Trains a LoRA adapter for a GGUF model on the CPU and writes it as a GGUF LoRA.

    python3 tools/lora/train.py --model MODEL.gguf --data EXAMPLES.txt --out ADAPTER.gguf

`cargo xtask setup` runs it (with the pinned packages of requirements.txt) on the examples
`cargo run -p npc_native --example lora_data` tokenized; see tools/lora/README.md.

The model is computed as llama.cpp computes it, from the GGUF's own tensors (dequantized to
f32): token embedding, then per layer RMS norm, attention (grouped-query, RoPE as the
architecture applies it), RMS norm and the SwiGLU feed-forward, then the final norm and the
output projection (the embedding when the model ties them). Only the adapter's low-rank
matrices are trained; the base weights stay frozen. Every example shares the persona's system
prompt, so each step computes that prefix once and the examples' own tokens (the player's
line and the reply) attend to it: a step costs the prefix plus a few dozen tokens a line.

The loss is the cross-entropy of the reply's tokens (and its end-of-turn token). The seed
fixes the initial matrices and the order of the batches: two runs on one machine printed
the same losses.
"""

import argparse
import math
import sys
import time

import os

import numpy as np

# Before jax is imported: run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import gguf  # noqa: E402


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_base(path):
    """The model's hyperparameters and its tensors as f32 arrays (numpy layout: out, in)."""
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        sys.exit(f"train.py: {path}: architecture {arch!r} is not supported (llama, qwen2)")
    hp = {
        "arch": arch,
        "layers": int(field(reader, f"{arch}.block_count")),
        "embd": int(field(reader, f"{arch}.embedding_length")),
        "heads": int(field(reader, f"{arch}.attention.head_count")),
        "kv_heads": int(field(reader, f"{arch}.attention.head_count_kv")),
        "eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_base": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
    }
    hp["head_dim"] = hp["embd"] // hp["heads"]
    # llama.cpp rotates adjacent pairs for llama (its converter permuted Q and K to match)
    # and the two halves of each head for qwen2 ("neox").
    hp["neox"] = arch == "qwen2"
    weights = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        weights[tensor.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    return hp, weights


def read_examples(path):
    """Lines of `prompt ids | target ids` (comma-separated token ids)."""
    examples = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            prompt, target = line.split("|")
            examples.append(
                ([int(t) for t in prompt.split(",")], [int(t) for t in target.split(",")])
            )
    if not examples:
        sys.exit(f"train.py: {path} holds no examples")
    return examples


def rms_norm(x, weight, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, hp):
    """x: (..., T, heads, head_dim); positions: (T,)."""
    d = hp["head_dim"]
    freqs = hp["rope_base"] ** (-np.arange(0, d, 2, dtype=np.float32) / d)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # (T, d/2)
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    if hp["neox"]:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape)


def project(h, weights, name, lora, scale):
    """h @ W.T (+ bias) (+ the adapter's B·A·h)."""
    out = h @ weights[name + ".weight"].T
    bias = weights.get(name + ".bias")
    if bias is not None:
        out = out + bias
    pair = lora.get(name + ".weight")
    if pair is not None:
        a, b = pair
        out = out + scale * ((h @ a.T) @ b.T)
    return out


def run_layers(weights, lora, hp, scale, xp, xs, layers):
    """The hidden states after `layers` (a range): `xp` (P, E) is the shared prefix's, `xs`
    (B, S, E) the examples' own tokens', which follow it."""
    P = xp.shape[0]
    B, S = xs.shape[:2]
    H, KV, D = hp["heads"], hp["kv_heads"], hp["head_dim"]
    group = H // KV
    pos_p = jnp.arange(P)
    pos_s = P + jnp.arange(S)
    causal_p = jnp.tril(jnp.ones((P, P), dtype=bool))
    causal_s = jnp.concatenate(
        [jnp.ones((S, P), dtype=bool), jnp.tril(jnp.ones((S, S), dtype=bool))], axis=1
    )
    inv = 1.0 / math.sqrt(D)

    def attend(q, k, v, mask):
        # q: (..., T, H, D); k, v: (..., K, KV, D) -> (..., T, H*D)
        k = jnp.repeat(k, group, axis=-2)
        v = jnp.repeat(v, group, axis=-2)
        scores = jnp.einsum("...thd,...khd->...htk", q, k) * inv
        scores = jnp.where(mask, scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("...htk,...khd->...thd", probs, v)
        return out.reshape(out.shape[:-2] + (H * D,))

    for layer in layers:
        blk = f"blk.{layer}."
        # The shared prefix.
        h = rms_norm(xp, weights[blk + "attn_norm.weight"], hp["eps"])
        qp = rope(project(h, weights, blk + "attn_q", lora, scale).reshape(P, H, D), pos_p, hp)
        kp = rope(project(h, weights, blk + "attn_k", lora, scale).reshape(P, KV, D), pos_p, hp)
        vp = project(h, weights, blk + "attn_v", lora, scale).reshape(P, KV, D)
        attn = attend(qp, kp, vp, causal_p)
        xp = xp + project(attn, weights, blk + "attn_output", lora, scale)
        # Each example's own tokens, over the prefix's keys and values and their own.
        h = rms_norm(xs, weights[blk + "attn_norm.weight"], hp["eps"])
        qs = rope(project(h, weights, blk + "attn_q", lora, scale).reshape(B, S, H, D), pos_s, hp)
        ks = rope(project(h, weights, blk + "attn_k", lora, scale).reshape(B, S, KV, D), pos_s, hp)
        vs = project(h, weights, blk + "attn_v", lora, scale).reshape(B, S, KV, D)
        k_all = jnp.concatenate([jnp.broadcast_to(kp, (B, P, KV, D)), ks], axis=1)
        v_all = jnp.concatenate([jnp.broadcast_to(vp, (B, P, KV, D)), vs], axis=1)
        attn = attend(qs, k_all, v_all, causal_s)
        xs = xs + project(attn, weights, blk + "attn_output", lora, scale)

        def ffn(x):
            h = rms_norm(x, weights[blk + "ffn_norm.weight"], hp["eps"])
            gate = project(h, weights, blk + "ffn_gate", lora, scale)
            up = project(h, weights, blk + "ffn_up", lora, scale)
            return x + project(jax.nn.silu(gate) * up, weights, blk + "ffn_down", lora, scale)

        if layer + 1 < hp["layers"]:
            xp = ffn(xp)  # the prefix's last feed-forward feeds nothing
        xs = ffn(xs)
    return xp, xs


def logits_of(weights, hp, xs):
    """The output layer over the last hidden states (the embedding when the model ties
    them)."""
    xs = rms_norm(xs, weights["output_norm.weight"], hp["eps"])
    output = weights.get("output.weight", weights["token_embd.weight"])
    return xs @ output.T  # (B, S, vocab)


def own_tokens(examples, prefix_len):
    """Every example's own tokens after the shared prefix, its next-token targets and its
    loss mask (the reply's tokens), padded to one width so a step compiles once."""
    width = max(len(p) - prefix_len + len(t) for p, t in examples)
    tokens = np.zeros((len(examples), width), dtype=np.int32)
    nexts = np.zeros((len(examples), width), dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for at, (prompt, target) in enumerate(examples):
        own = prompt[prefix_len:] + target
        tokens[at, : len(own)] = own
        nexts[at, : len(own) - 1] = own[1:]
        # Position j predicts own[j + 1]: from the prompt's last token on, the reply.
        mask[at, len(prompt) - prefix_len - 1 : len(own) - 1] = 1.0
    return tokens, nexts, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model (GGUF)")
    parser.add_argument("--data", required=True, help="examples from the lora_data example")
    parser.add_argument("--out", required=True, help="the adapter to write (GGUF)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attn_q,attn_k,attn_v,attn_output")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--first-layer",
        type=int,
        default=0,
        help="adapt only this layer and those after it (the layers before are computed "
        "once, not every step)",
    )
    parser.add_argument("--name", default="trained LoRA")
    args = parser.parse_args()

    started = time.time()
    hp, numpy_weights = load_base(args.model)
    if not 0 <= args.first_layer < hp["layers"]:
        sys.exit(f"train.py: --first-layer must be under the model's {hp['layers']} layers")
    examples = read_examples(args.data)
    prompts = [p for p, _ in examples]
    prefix_len = len(prompts[0])
    for p in prompts[1:]:
        while p[:prefix_len] != prompts[0][:prefix_len]:
            prefix_len -= 1
    # Keep at least one prompt token of each example in its own part (it predicts the first
    # reply token).
    prefix_len = min(prefix_len, min(len(p) for p in prompts) - 1)
    print(
        f"[lora] {hp['arch']}, {hp['layers']} layers; {len(examples)} examples sharing "
        f"a {prefix_len}-token prefix; loaded in {time.time() - started:.0f} s",
        flush=True,
    )
    weights = {name: jnp.asarray(w) for name, w in numpy_weights.items()}
    del numpy_weights

    rng = np.random.default_rng(args.seed)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    adapted = range(args.first_layer, hp["layers"])
    lora = {}
    for name in sorted(weights):
        if not name.endswith(".weight") or not any(f".{t}.weight" in name for t in targets):
            continue
        if not any(name.startswith(f"blk.{layer}.") for layer in adapted):
            continue
        out_dim, in_dim = weights[name].shape
        a = rng.normal(0.0, 1.0 / math.sqrt(in_dim), size=(args.rank, in_dim))
        lora[name] = (jnp.asarray(a, dtype=jnp.float32), jnp.zeros((out_dim, args.rank), jnp.float32))
    if not lora:
        sys.exit(f"train.py: the model has no tensor among {targets}")
    # alpha = rank: llama.cpp scales the update by alpha / rank = 1 (times the persona's scale).
    alpha = float(args.rank)
    scale = alpha / args.rank

    # The frozen layers' output, once for every example: the adapter does not change it.
    tokens, nexts, mask = own_tokens(examples, prefix_len)
    embd = weights["token_embd.weight"]
    frozen = jax.jit(
        lambda weights, xp, xs: run_layers(weights, {}, hp, scale, xp, xs, range(args.first_layer))
    )
    xp, xs = frozen(
        weights, embd[jnp.asarray(prompts[0][:prefix_len])], embd[jnp.asarray(tokens)]
    )

    # The weights are an argument, not constants folded into the compiled step.
    def loss_fn(lora, weights, xp, xs, nexts, mask):
        _, xs = run_layers(weights, lora, hp, scale, xp, xs, adapted)
        logp = jax.nn.log_softmax(logits_of(weights, hp, xs), axis=-1)
        picked = jnp.take_along_axis(logp, nexts[..., None], axis=-1)[..., 0]
        return -(picked * mask).sum() / mask.sum()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    # Adam, by hand (no optimizer package).
    m = jax.tree_util.tree_map(jnp.zeros_like, lora)
    v = jax.tree_util.tree_map(jnp.zeros_like, lora)
    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def adam(lora, m, v, grads, t, lr):
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        fix1, fix2 = 1 - b1**t, 1 - b2**t
        lora = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * (m / fix1) / (jnp.sqrt(v / fix2) + eps), lora, m, v
        )
        return lora, m, v

    batch = min(args.batch, len(examples))
    nexts, mask = jnp.asarray(nexts), jnp.asarray(mask)
    step = 0
    first_loss = None
    while step < args.steps:
        # Shuffled batches of whole `batch`es.
        order = rng.permutation(len(examples))
        for at in range(0, len(order) - batch + 1, batch):
            if step == args.steps:
                break
            step += 1
            rows = jnp.asarray(order[at : at + batch])
            loss, grads = grad_fn(lora, weights, xp, xs[rows], nexts[rows], mask[rows])
            # A short warm-up, then a cosine decay.
            lr = args.lr * min(1.0, step / 5) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            lora, m, v = adam(lora, m, v, grads, step, lr)
            loss = float(loss)
            if not math.isfinite(loss):
                sys.exit(f"train.py: the loss is {loss} at step {step}")
            if first_loss is None:
                first_loss = loss
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(
                    f"[lora] step {step}/{args.steps}: loss {loss:.3f} "
                    f"({time.time() - started:.0f} s)",
                    flush=True,
                )

    writer = gguf.GGUFWriter(args.out, hp["arch"])
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", args.name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (a, b) in sorted(lora.items()):
        # numpy layout (rows, columns) is ggml's (ne1, ne0): A is [in, rank] and B
        # [rank, out] in ggml's order, as llama.cpp's LoRA loader expects.
        writer.add_tensor(name + ".lora_a", np.asarray(a, dtype=np.float32))
        writer.add_tensor(name + ".lora_b", np.asarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(
        f"[lora] wrote {args.out}: {len(lora)} adapted tensors, rank {args.rank}; "
        f"loss {first_loss:.3f} -> {loss:.3f} in {time.time() - started:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
