#!/bin/bash
# Issue 14's CPU targets in one command: every zoo model at 96 px, batch 4, 2 threads, and the
# timm ViT/Swin at 224 px, FullGradient (warm plan) against Captum's Saliency, interleaved;
# then timm's EfficientNet, MobileNetV3 and RegNet at 96 px, replayed and traced (not targets).
#   bash benchmarks/zoo_cpu.sh OUTDIR [METHODS]    (about 6 minutes on 2 quiet cores)
# Prints the FullGrad row of each model; OUTDIR/NAME.{json,md,png} hold the full results.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/zoo_cpu.sh OUTDIR [METHODS]}
METHODS=${2:-saliency,fullgrad}
BIN=${CAPTUM_FULLGRAD:-captum-fullgrad}
mkdir -p "$OUT"
for m in vgg16_bn resnet50 mobilenet_v2 mobilenet_v3_small efficientnet_b0 regnet_y_400mf convnext_tiny; do
  "$BIN" bench --model "$m" --input-size 96 --batch-sizes 4 --methods "$METHODS" --repeats 15 \
    --warmup 3 --threads 2 --device cpu --no-progress --out "$OUT" --name "$m" >/dev/null
  grep '^| fullgrad' "$OUT/$m.md" | sed "s/^/$m /"
done
for m in vit_tiny swin_tiny; do
  PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$BIN" bench --model "timm_models:$m" \
    --input-size 224 --batch-sizes 4 --methods "$METHODS" --repeats 7 --warmup 2 --threads 2 \
    --device cpu --no-progress --out "$OUT" --name "$m" >/dev/null
  grep '^| fullgrad' "$OUT/$m.md" | sed "s/^/$m /"
done
for m in efficientnet_b0 mobilenetv3_small regnety_400mf; do
  PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$BIN" bench --model "timm_models:$m" \
    --input-size 96 --batch-sizes 4 --methods "$METHODS,fullgrad_traced" --repeats 9 --warmup 2 \
    --threads 2 --device cpu --no-progress --out "$OUT" --name "timm_$m" >/dev/null
  grep '^| fullgrad' "$OUT/timm_$m.md" | sed "s/^/timm_$m /"
done
