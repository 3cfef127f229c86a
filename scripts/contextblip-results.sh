#!/usr/bin/env bash
# Reproduces results/contextblip.md: ContextBLIP on the built-in benchmark (seed-0 data, shipped
# small BLIP), 2 CPU cores. Every step skips work whose output already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p xtask && cargo build --release -p ctxalign-cli --example pretrain
R=target/cb
mkdir -p $R

# 1. S0 pre-training, three seeds (200 steps × 32 captions each, ~4 min each).
for s in 0 1 2; do
  [ -f $R/pretrain-seed$s/contextblip.safetensors ] ||
    target/release/examples/pretrain --steps 200 --seed $s --out $R/pretrain-seed$s
done

# 2. Ablation: random instead of text-guided masking, the same three seeds.
for s in 0 1 2; do
  [ -f $R/pretrain-random-mask-seed$s/contextblip.safetensors ] ||
    target/release/examples/pretrain --steps 200 --seed $s --random-mask --out $R/pretrain-random-mask-seed$s
done

# 3. Zero-shot, valid split: BLIP vs the ContextBLIPs.
target/release/xtask zero-shot --out $R/zero-shot.json \
  --contextblip $R/pretrain-seed0 --contextblip $R/pretrain-seed1 --contextblip $R/pretrain-seed2 \
  --contextblip $R/pretrain-random-mask-seed0 --contextblip $R/pretrain-random-mask-seed1 \
  --contextblip $R/pretrain-random-mask-seed2

# 4. Fine-tuning from the seed-0 ContextBLIP: S1 (ViT frozen, 30 steps of 16 descriptions), then S2.
for s in 0 1; do
  [ -f $R/s1-seed$s/contextblip.safetensors ] ||
    target/release/xtask finetune-s1 --contextblip $R/pretrain-seed0 --out $R/s1-seed$s --seed $s \
      --freeze-vision --steps 30 --batch-size 16 --head-lr 1e-3 --backbone-lr 1e-5
  [ -f $R/s2-seed$s/contextblip.safetensors ] ||
    target/release/xtask finetune-s2 --s1 $R/s1-seed$s --out $R/s2-seed$s --seed $s --lr 1e-4
done

# 5. Sweeps (seed 0, 60 S0 steps per setting). The default setting is trained once and shared.
S=target/contextblip-sweeps
target/release/xtask sweep mask-ratio --steps 60 --runs $S
for d in "taps-[1,2,3,4]-seed0" "reduction-2-seed0"; do
  [ -d "$S/$d" ] || cp -r "$S/mask-ratio-0.25-seed0" "$S/$d"
done
target/release/xtask sweep taps --steps 60 --runs $S
target/release/xtask sweep reduction --steps 60 --runs $S
