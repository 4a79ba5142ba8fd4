#!/usr/bin/env bash
# Start or resume base-model runs in the background: niced, one thread each, logs in runs/.
#   recipes/train_base.sh vae clip unet     (the UNet waits until the VAE and the text tower are final)
# Each run continues from its checkpoint in checkpoints/<model>.state/ (training state, logs and preview
# pictures are written there, not kept in git); a finished run only republishes. Without that state
# a run starts again from step 0 and publishes over the shipped weights in anystory_cli/assets/default/
# at its checkpoints (recipes/base_<model>.yaml has its steps and a line on why).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
mkdir -p runs
# the UNet trains on the final VAE's latents and the final text tower's conditioning
final() { python -c "import sys; from anystory_cli.lab.train_base import asset_status as s; \
sys.exit(not all(s('anystory_cli/assets/default', n)['final'] for n in ('vae', 'text_encoder')))"; }
for model in "$@"; do
  wait_for=""
  [ "$model" = unet ] && wait_for="until final; do sleep 60; done; "
  nohup nice -n 10 bash -c "${wait_for}anystory train recipes/base_${model}.yaml" \
    >> "runs/base_${model}.out" 2>&1 &
  echo $! > "runs/base_${model}.pid"
  echo "base_${model}: pid $!, log runs/base_${model}.out"
done
