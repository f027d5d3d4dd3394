#!/usr/bin/env bash
# The edge runtime's GPU check on a GPU machine, in one command:
#   bash benchmarks/edge_gpu_device.sh
# Expects, carried in the repo (ignored paths): .gpu/rest/ (rest.tar.zst: the onnxruntime-gpu
# wheel's files without its CUDA provider library; cuda.sha256; a zstandard wheel), the provider
# library as zstd parts in /tmp/parts/part.* (sent by earlier calls: the wheel is over one call's
# transfer limit), .gpu/bundles/{fp32,fp16,int8} and .whl/ (collafuse, collafuse-edge, diffusers).
# Writes $OUT/edge_gpu.json, $OUT/edge_gpu.log and $OUT/edge_tests_gpu.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# installed into the machine's own environment (it is disposable), beside its nvidia-* CUDA 13
# packages: the layout pip gives 'onnxruntime-gpu[cuda,cudnn]'
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m pip uninstall -q -y onnxruntime || exit 1
t0=$(date +%s)
# 1. onnxruntime-gpu, reassembled
if command -v zstd >/dev/null; then UNZ="zstd -d -q -c"; else
  python3 -m pip install -q --no-index --no-deps --target /tmp/zs .gpu/rest/zstandard-*.whl
  UNZ="env PYTHONPATH=/tmp/zs python3 -c 'import sys,zstandard; zstandard.ZstdDecompressor().copy_stream(open(sys.argv[1],\"rb\"),sys.stdout.buffer)'"; fi
eval "$UNZ .gpu/rest/rest.tar.zst" | tar -C $SITE -xf - || exit 1
cat /tmp/parts/part.* > /tmp/cuda.zst && eval "$UNZ /tmp/cuda.zst" > $SITE/onnxruntime/capi/libonnxruntime_providers_cuda.so || exit 1
want=$(cut -d' ' -f1 .gpu/rest/cuda.sha256); got=$(sha256sum $SITE/onnxruntime/capi/libonnxruntime_providers_cuda.so | cut -d' ' -f1)
[ "$want" = "$got" ] && echo "cuda provider library sha256 ok" || { echo "sha256 mismatch"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
echo "setup $(( $(date +%s) - t0 )) s"; nvidia-smi -L
python3 -c "import onnxruntime as o, torch; print(o.__file__, o.__version__, o.get_available_providers(), torch.__version__)"
# 2. the provider choice as a user's fresh process sees it (no torch imported, no LD_LIBRARY_PATH)
python3 - <<'PY'
import logging, sys; logging.basicConfig(level=logging.WARNING)
sys.modules["torch"] = None
from collafuse_edge import EdgeRuntime, SessionConfig
import numpy as np
from collafuse_edge import Handoff
from collafuse_edge.noise import initial_noise
for prov in (None, ("cuda",), ("tensorrt",)):
    try:
        rt = EdgeRuntime.open(".gpu/bundles/fp32", SessionConfig(providers=prov))
        print(prov, "->", rt.denoiser.providers, rt.denoiser.provider_notes)
    except Exception as e:
        print(prov, "->", type(e).__name__, e)
plain = EdgeRuntime.open(".gpu/bundles/fp32", SessionConfig(providers=("cuda",)))
graph = EdgeRuntime.open(".gpu/bundles/fp32", SessionConfig(providers=("cuda",), cuda_graph=True))
for n in (2, 3, 2):
    h = Handoff(initial_noise(n, (n, 1, 16, 16)), plain.bundle.handoff_level, seed=n)
    print("cuda_graph finish B=%d max|diff| vs plain CUDA:" % n, float(np.abs(graph.finish(h) - plain.finish(h)).max()),
          "graphs:", graph.denoiser._graphs.batch_sizes)
PY
# 3. the edge tests on the GPU build (the automatic choice now starts CUDA)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/edge 2>&1 | tee $OUT/edge_tests_gpu.log | tail -25
# 4. parity and speed
timeout 420 python3 benchmarks/edge_gpu.py --bundles .gpu/bundles --out $OUT/edge_gpu.json 2>&1 | tee $OUT/edge_gpu.log | tail -80
echo "total $(( $(date +%s) - t0 )) s"
