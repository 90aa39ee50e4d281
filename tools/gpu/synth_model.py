#!/usr/bin/env python3
"""Synthetic stand-in for the default model, for a machine the real file cannot be carried to.

The real SmolLM2-135M-Instruct Q4_1 GGUF is 98 MB (93.8 MiB) and barely compresses (xz: ~93%),
while a device call may carry 64 MiB in all. This keeps everything of the real file that
decides *speed* and *tokenization*:
  * the whole GGUF header byte for byte (architecture, shapes, tensor types and offsets,
    tokenizer vocab/merges, chat template), and every F32 tensor (the norms) byte for byte;
  * for each Q4_1 / Q8_0 tensor: the same blocks, with the real tensor's median scale (and
    median min, Q4_1) in every block and pseudo-random 4-/8-bit quants (SHAKE-256 of the name).
So the GPU runs the same kernels on the same shapes and types: timings are the real model's,
but the text it writes is nonsense. The embedding rows of end-of-generation and control
tokens are zeroed (their logits are then 0, below the random maximum) so that replies run to
their token limit instead of stopping at a random end token.

  make:  synth_model.py make REAL.gguf SKELETON   (here; needs numpy + llama.cpp's gguf-py)
  build: synth_model.py build SKELETON OUT.gguf   (there; standard library only)
"""
import hashlib
import json
import struct
import sys

Q4_1, Q8_0, F32 = 3, 8, 0
BLOCK = {Q4_1: 20, Q8_0: 34}


def make(real, skeleton):
    import numpy as np
    import gguf

    r = gguf.GGUFReader(real)
    data_start = r.data_offset
    raw = open(real, "rb").read()
    tensors, f32 = [], bytearray()
    for t in r.tensors:
        entry = {
            "name": t.name,
            "type": int(t.tensor_type),
            "offset": int(t.data_offset) - data_start,
            "nbytes": int(t.n_bytes),
            "ne0": int(t.shape[0]),
        }
        blob = raw[t.data_offset : t.data_offset + int(t.n_bytes)]
        if entry["type"] == F32:
            entry["f32_at"] = len(f32)
            f32 += blob
        elif entry["type"] in BLOCK:
            size = BLOCK[entry["type"]]
            blocks = np.frombuffer(blob, dtype=np.uint8).reshape(-1, size)
            d = blocks[:, 0:2].copy().view(np.float16).ravel().astype(np.float32)
            entry["d"] = float(np.median(d))
            if entry["type"] == Q4_1:
                m = blocks[:, 2:4].copy().view(np.float16).ravel().astype(np.float32)
                entry["m"] = float(np.median(m))
        else:
            raise SystemExit(f"unsupported tensor type {t.tensor_type} in {t.name}")
        tensors.append(entry)
    field = r.fields["tokenizer.ggml.token_type"]
    token_types = [int(field.parts[i][0]) for i in field.data]
    special = {i for i, ty in enumerate(token_types) if ty in (3, 4)}  # control, user-defined
    for key in ("eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id"):
        f = r.fields.get("tokenizer.ggml." + key)
        if f is not None:
            special.add(int(f.parts[f.data[0]][0]))
    meta = {
        "size": len(raw),
        "data_start": data_start,
        "sha256_real": hashlib.sha256(raw).hexdigest(),
        "tensors": tensors,
        "zero_tokens": sorted(special),
    }
    header = raw[:data_start]
    js = json.dumps(meta).encode()
    with open(skeleton, "wb") as out:
        out.write(struct.pack("<QQQ", len(header), len(f32), len(js)))
        out.write(header)
        out.write(f32)
        out.write(js)
    print(f"skeleton {skeleton}: header {len(header)} B, f32 {len(f32)} B, "
          f"{len(tensors)} tensors, {len(special)} zeroed tokens")


def f16(value):
    return struct.pack("<e", value)


def build(skeleton, out_path):
    raw = open(skeleton, "rb").read()
    nh, nf, nj = struct.unpack_from("<QQQ", raw)
    header = raw[24 : 24 + nh]
    f32 = raw[24 + nh : 24 + nh + nf]
    meta = json.loads(raw[24 + nh + nf : 24 + nh + nf + nj])
    buf = bytearray(meta["size"])
    buf[: len(header)] = header
    base = meta["data_start"]
    for t in meta["tensors"]:
        at, n, ty = base + t["offset"], t["nbytes"], t["type"]
        if ty == F32:
            buf[at : at + n] = f32[t["f32_at"] : t["f32_at"] + n]
            continue
        data = bytearray(hashlib.shake_256(t["name"].encode()).digest(n))
        size = BLOCK[ty]
        count = n // size
        d = f16(t["d"])
        data[0::size] = d[0:1] * count
        data[1::size] = d[1:2] * count
        if ty == Q4_1:
            m = f16(t["m"])
            data[2::size] = m[0:1] * count
            data[3::size] = m[1:2] * count
        if t["name"] == "token_embd.weight":
            row = t["ne0"] // 32 * size
            for token in meta["zero_tokens"]:
                for b in range(t["ne0"] // 32):
                    start = token * row + b * size + (2 if ty == Q8_0 else 4)
                    end = token * row + (b + 1) * size
                    # Q8_0: quant 0 is 0.0; Q4_1: w = d*q + m, so q=0 gives m (set m to 0 too).
                    data[start:end] = bytes(end - start)
                    if ty == Q4_1:
                        data[token * row + b * size + 2 : token * row + b * size + 4] = f16(0.0)
        buf[at : at + n] = data
    with open(out_path, "wb") as out:
        out.write(buf)
    print(f"synthetic model {out_path}: {len(buf)} bytes, sha256 {hashlib.sha256(buf).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
