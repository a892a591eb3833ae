#!/usr/bin/env bash
# The published evaluation (docs/evaluation.md, benchmarks/results/evaluation/): every
# registered saliency method and the three controls on 500 held-out synthetic scenes of
# the bundled `shapes` network, on the CPU with 2 threads. Every metric's n is stated in
# results.md; the costly ones run on the first images only (each metric declares its
# default; the options below pin the published values):
#   localisation, pixel perturbation: 500   ROAD: 50   infidelity: 200
#   max-sensitivity: 16                     sanity check (cascading randomisation): 16
# Methods keep their registry defaults (integrated gradients 50 steps, SmoothGrad 50
# samples, SmoothFullGrad 25 samples). Takes about 10-15 minutes on 2 quiet CPU cores.
#
# `python -m captum_fullgrad.cli evaluate` is `captum-fullgrad evaluate`.
#
# OMP_WAIT_POLICY=PASSIVE: on a shared machine whose cores are busy, OpenMP's default
# spin-waiting made two torch threads up to 10x slower than one (a waiting thread burns
# the core its partner needs); with passive waiting two threads are never slower.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec "${PYTHON:-python}" -m captum_fullgrad.cli evaluate \
    --model shapes --n 500 --data-seed 10000 --seed 0 --batch-size 50 \
    --road-n 50 --infidelity-n 200 --sensitivity-n 16 --sanity-n 16 \
    --device cpu --threads 2 --no-progress \
    --out benchmarks/results/evaluation "$@"
