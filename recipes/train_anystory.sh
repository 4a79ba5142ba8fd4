#!/usr/bin/env bash
# Train the embedded default model's AnyStory adapter in the background: stage 1, then stage 2.
#   recipes/train_anystory.sh            (logs in runs/world_stage{1,2}.out; resumes where it stopped)
# Needs the final base model (recipes/train_base.sh vae clip unet). Each stage's dataset is drawn
# from the sprite world's training identities the first time (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
mkdir -p runs
# (a stage-1 set without target masks cannot serve character_loss_weight: draw it again)
grep -qs target_mask runs/world_stage1/train.jsonl ||
    anystory world dataset --stage 1 --count 40000 --out runs/world_stage1
[ -f runs/world_stage2/train.jsonl ] || anystory world dataset --stage 2 --count 30000 --out runs/world_stage2
nohup bash -c 'anystory train recipes/world_stage1.yaml >> runs/world_stage1.out 2>&1 &&
               anystory train recipes/world_stage2.yaml >> runs/world_stage2.out 2>&1' >/dev/null 2>&1 &
echo $! > runs/world_anystory.pid
echo "AnyStory stages 1 and 2: pid $!, logs runs/world_stage1.out, runs/world_stage2.out"
