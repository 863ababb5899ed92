#!/usr/bin/env bash
# The real path on 2 GPUs, through `python -m rl.train` only (configs/gpu_real_shape.yaml): the four
# corrections on (keep routing replayed), then the same model with keep routing off, for the mismatch-KL
# ratio. Logs and metrics go to $OUT. Run after ../shared/gpu/stage.sh --driver (see bench/README.md).
set -u
export PYTHONPATH=/tmp/site:$PWD $(cat /tmp/site/.env)
export VLLM_USE_FLASHINFER_SAMPLER=0
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -c "import vllm, torch, transformers, ray; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())" > "$out/versions.txt" 2>&1
common=(--config-name gpu_real_shape '~rewards.math.language')
timeout "${T1:-330}" python3 -m rl.train "${common[@]}" > "$out/replay.log" 2>&1; echo "rc=$?" >> "$out/replay.log"
cp runs/gpu_real_shape/metrics.jsonl "$out/replay_metrics.jsonl" 2>/dev/null
timeout "${T2:-230}" python3 -m rl.train "${common[@]}" algo.keep_routing=false model.tiny=null \
  model.path=runs/gpu_real_shape/model_init trainer.run_dir=runs/gpu_no_replay trainer.steps=2 > "$out/noreplay.log" 2>&1
echo "rc=$?" >> "$out/noreplay.log"
cp runs/gpu_no_replay/metrics.jsonl "$out/noreplay_metrics.jsonl" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$out/versions.txt"
