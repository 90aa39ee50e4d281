#!/bin/bash
# Runs the prebuilt CUDA (sm_90) builds of the runtime's benches (speed, batching, kv_cache)
# and of llama.cpp's llama-bench / llama-batched-bench on the GPU of the device machine.
# Usage (repo root): bash .gpu/run.sh            all output also goes to $OUT/gpu.log
#   DRYRUN=1 bash .gpu/run.sh   here, without a GPU: unpack, link and library checks, model
#                               synthesis, one short CPU run of each binary.
# Env knobs: NPC_GPU_BENCHES="speed batching kv_cache" (which, in order), NPC_BENCH_THREADS.
set -u
REPO=$(pwd)
G=$REPO/.gpu
OUT=${OUT:-/tmp/npc-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

stamp "unpack"
W=/tmp/npc-gpu
rm -rf "$W" && mkdir -p "$W"
tar -xJf "$G/bundle.tar.xz" -C "$W" 2>/dev/null ||
  python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$G/bundle.tar.xz" "$W" ||
  { echo "unpack failed"; exit 1; }
cat "$W/BUILD_INFO" 2>/dev/null

# The bench binaries read assets/ through the path they were compiled at (CARGO_MANIFEST_DIR).
SRC_DIR=$(cat "$W/SRC_DIR")            # e.g. /work/wt/gpu
if [ "$(readlink -f "$SRC_DIR")" != "$(readlink -f "$REPO")" ]; then
  if [ -e "$SRC_DIR" ] && [ ! -L "$SRC_DIR" ]; then
    echo "WARNING: $SRC_DIR exists and is not this repo; benches will read assets from there"
  else
    mkdir -p "$(dirname "$SRC_DIR")" && ln -sfn "$REPO" "$SRC_DIR"
  fi
fi

stamp "model"
MODEL=$REPO/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$MODEL" ] && [ "$(stat -c %s "$MODEL")" = 98362432 ]; then
  echo "using the model already at $MODEL"
else
  rm -f "$MODEL"
  python3 "$G/synth_model.py" build "$G/model.skel" "$MODEL" || { echo "model synthesis failed"; exit 1; }
  echo "NOTE: synthetic stand-in model (real header/tokenizer/norms, tensor types and shapes;"
  echo "      pseudo-random quants): timings are the real model's shapes, text is nonsense."
fi

stamp "CUDA libraries"
CUDA_DIRS=""
add_dir() { case ":$CUDA_DIRS:" in *":$1:"*) ;; *) CUDA_DIRS=${CUDA_DIRS:+$CUDA_DIRS:}$1 ;; esac; }
CANDIDATES=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
dirs = []
try:
    import nvidia
    for p in nvidia.__path__:
        dirs += glob.glob(os.path.join(p, "*", "lib"))
except Exception:
    pass
for s in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += glob.glob(os.path.join(s, "nvidia", "*", "lib"))
print("\n".join(dict.fromkeys(dirs)))
EOF
)
CANDIDATES="$CANDIDATES
$(ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu 2>/dev/null)"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  found=""
  for d in $CANDIDATES; do
    if [ -e "$d/$lib" ]; then found=$d; break; fi
  done
  if [ -z "$found" ]; then
    found=$(timeout 60 find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1 | xargs -r dirname)
  fi
  echo "$lib: ${found:-NOT FOUND}"
  [ -n "$found" ] && add_dir "$found"
done
# Fallback runtime carried in the bundle (cuBLAS is too big to carry).
add_dir "$W/cudart"
if [ -n "${DRYRUN:-}" ]; then
  add_dir "$W/stub"   # libcuda.so.1 stub: there is no driver here
  add_dir "${CUDA_HOME_HERE:-$HOME/.cache/bevy_npc_ai/cuda13}/lib"
fi
export NPC_CUDA_DIRS=$CUDA_DIRS
export LD_LIBRARY_PATH=$W/rs:$W/ggml:$CUDA_DIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

stamp "GPU"
nvidia-smi -L || echo "(nvidia-smi failed)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null

stamp "link check"
missing=0
for f in "$W"/bin/* "$W"/ggml/*.so* "$W"/rs/*.so*; do
  n=$(ldd "$f" 2>&1 | grep -c "not found")
  [ "$n" != 0 ] && { echo "$f:"; ldd "$f" | grep "not found"; missing=1; }
done
for f in "$W"/peer/bin/*; do
  n=$(LD_LIBRARY_PATH=$W/peer/lib:$LD_LIBRARY_PATH ldd "$f" 2>&1 | grep -c "not found")
  [ "$n" != 0 ] && { echo "$f:"; LD_LIBRARY_PATH=$W/peer/lib:$LD_LIBRARY_PATH ldd "$f" | grep "not found"; missing=1; }
done
[ $missing = 0 ] && echo "all libraries resolve"
ldd "$W/ggml/libggml-cuda.so.0" | grep -E "cuda|cublas"

export NPC_AI_PEER_BIN=$W/peerwrap
THREADS=${NPC_BENCH_THREADS:-$(nproc)}

if [ -n "${DRYRUN:-}" ]; then
  stamp "DRYRUN: short CPU runs (no GPU here)"
  timeout 300 "$W/bin/speed" --peer 2 64 32 && echo "speed --peer ok"
  timeout 120 "$NPC_AI_PEER_BIN/llama-bench" -m "$MODEL" -p 32 -n 4 -r 1 -t 2 && echo "llama-bench ok"
  timeout 120 "$NPC_AI_PEER_BIN/llama-batched-bench" -m "$MODEL" -c 2048 -npp 64 -ntg 4 -npl 1,2 -t 2 2>&1 | grep -E "^\|" && echo "llama-batched-bench ok"
  timeout 300 "$W/bin/batching" --bare 2 2 0 2>/dev/null | grep "^BARE " && echo "batching --bare ok (2 sequences, flash attention off)"
  stamp "DRYRUN done"
  exit 0
fi

# GPU load and memory every second while the benches run (shows the work is on the GPU).
nvidia-smi dmon -s um -d 1 > "$OUT/dmon.log" 2>&1 &
DMON=$!

stamp "llama.cpp peers alone (quick sanity: CUDA backend, ngl)"
timeout 60 "$NPC_AI_PEER_BIN/llama-bench" -m "$MODEL" -p 512 -n 128 -r 2 -t "$THREADS" 2>&1 | tail -6

for b in ${NPC_GPU_BENCHES:-speed batching kv_cache}; do
  case $b in speed) limit=150 ;; batching) limit=150 ;; *) limit=100 ;; esac
  stamp "bench $b (timeout ${limit}s)"
  timeout $limit "$W/bin/$b" --bench
  echo "exit status $?"
done

kill $DMON 2>/dev/null
echo "GPU samples ($OUT/dmon.log): peak sm% and framebuffer MB"
awk '/^# *gpu/ {for (i = 2; i <= NF; i++) col[$i] = i - 1} $1 ~ /^[0-9]+$/ && ("fb" in col) {if ($col["fb"] + 0 > fb) fb = $col["fb"]; if ($col["sm"] + 0 > sm) sm = $col["sm"]} END {print "peak sm " sm "%, peak fb " fb " MB"}' "$OUT/dmon.log"
stamp "done"
