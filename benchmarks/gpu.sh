#!/usr/bin/env bash
# Every GPU check and benchmark of captum-fullgrad in one run (< 5 minutes on one H100/H200).
# Usage on a GPU machine, from the repository root:
#   bash benchmarks/gpu.sh OUT_DIR
# Needs torch, torchvision, matplotlib, pytest, hypothesis, scikit-image; captum (and,
# optionally, grad-cam for pytorch-grad-cam's FullGrad) from wheels in .whl/ if missing.
# Through the device tool (which returns at most 8 files), pack the directory:
#   bash benchmarks/gpu.sh /tmp/gpu; tar czf "$OUT/gpu.tgz" -C /tmp gpu
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CAPTUM_FULLGRAD_OFFLINE=1
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision, captum; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'captum', captum.__version__)"
} | tee "$out/device.txt"

# 1. CUDA tests (and the CUDA parts of the evaluation metrics).
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -15 | tee "$out/cuda_tests.txt"

# 2. Speed, float32 with TF32 and cuDNN autotuning (as users run it): every method, batch 1/16/64.
timeout 200 python3 -m captum_fullgrad.benchmark --model vgg16_bn --batch-sizes 1,16,64 --repeats 10 --warmup 3 \
  --tf32 --cudnn-benchmark --no-progress --out "$out" --name bench_fp32 > "$out/bench_fp32.log" 2>&1
tail -16 "$out/bench_fp32.log"

# 3. bf16 autocast at batch 64 (throughput vs the float32 run above; completeness gap reported).
timeout 90 python3 -m captum_fullgrad.benchmark --model vgg16_bn --batch-sizes 64 --dtype bfloat16 \
  --methods forward,saliency,fullgrad --repeats 10 --warmup 3 --tf32 --cudnn-benchmark --no-progress \
  --out "$out" --name bench_bf16 > "$out/bench_bf16.log" 2>&1
tail -6 "$out/bench_bf16.log"

# 3b. The same in channels-last memory (cuDNN's bf16 kernels are NHWC), bf16 and float32.
for dtype in bfloat16 float32; do
  timeout 90 python3 -m captum_fullgrad.benchmark --model vgg16_bn --batch-sizes 64 --dtype $dtype --channels-last \
    --methods forward,saliency,fullgrad --repeats 10 --warmup 3 --tf32 --cudnn-benchmark --no-progress \
    --out "$out" --name bench_${dtype}_channels_last > "$out/bench_${dtype}_channels_last.log" 2>&1
  tail -5 "$out/bench_${dtype}_channels_last.log"
done

# 3c. Host time per call: VGG-16-BN's graph at 1/16 width, where the GPU waits for Python.
timeout 60 python3 -m captum_fullgrad.benchmark --model host_models:thin_vgg16_bn --input-size 32 --batch-sizes 1,16 \
  --methods forward,saliency,fullgrad,fullgrad_traced --repeats 30 --warmup 3 --no-progress \
  --out "$out" --name bench_host > "$out/bench_host.log" 2>&1
tail -10 "$out/bench_host.log"

# 3d. Networks whose plans hold activation modules and squeeze-and-excitation products.
for model in efficientnet_b0 mobilenet_v3_small; do
  timeout 45 python3 -m captum_fullgrad.benchmark --model $model --batch-sizes 1,16 \
    --methods saliency,fullgrad,fullgrad_traced --repeats 10 --warmup 3 --tf32 --cudnn-benchmark --no-progress \
    --out "$out" --name bench_$model > "$out/bench_$model.log" 2>&1
  tail -7 "$out/bench_$model.log"
done

# 4. Large batches bounded by internal_batch_size: time should grow linearly with the batch.
timeout 120 python3 -m captum_fullgrad.benchmark --model vgg16_bn --batch-sizes 64,128,256 --internal-batch-size 64 \
  --methods saliency,fullgrad --repeats 3 --warmup 1 --tf32 --cudnn-benchmark --no-progress \
  --out "$out" --name bench_large > "$out/bench_large.log" 2>&1
tail -8 "$out/bench_large.log"
ls -la "$out"
