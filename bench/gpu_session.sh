#!/usr/bin/env bash
# The GPU benches of bench/README.md as named stages, for a few device calls after staging
# (`bash bench/gpu_stage.sh`: ../shared/gpu/stage.sh --driver plus vLLM's server stack for e2e_trl; 8 calls). Each stage
# logs to $OUT/<stage>.log under its own time limit, so one that
# fails or hangs leaves the others' results. Usage, on a 2-GPU machine (nvidia-h200-x2):
#   bash bench/gpu_session.sh sync                 # weight sync per transport + learner scaling (bench/gpu_sync.py)
#   bash bench/gpu_session.sh driver rollout       # rl.train at the real shape (auto -> NCCL); rollout vs raw vLLM
#   bash bench/gpu_session.sh ablations faults     # run side by side (correctness, not timing)
#   bash bench/gpu_session.sh trl                  # learner vs TRL at Qwen3's vocabulary
#   bash bench/gpu_session.sh head                 # the log-prob head alone: eager vs compiled passes (one GPU)
#   bash bench/gpu_session.sh e2e_trl              # the whole loop vs TRL's GRPOTrainer + vLLM server
#   bash bench/gpu_session.sh e2e_trl1             # the same on one GPU (nvidia-h200): TRL's colocated vLLM
#   bash bench/gpu_session.sh modes                # async vs sync through rl.train (bench/e2e_modes.py)
#   bash bench/gpu_session.sh modes1 compile       # on one GPU (nvidia-h200): the same, engine and learner sharing
#                                                  # the GPU; rl.train with trainer.compile=true
# trl: TRL_MODELS, TRL_VARIANTS, TRL_ROUNDS, TRL_TIMEOUT (BENCH_TRACE=1: timelines too).
# Extra arguments per stage: SYNC_ARGS, ROLLOUT_ARGS, DRIVER_ARGS, MODES_ARGS, ABL_ARGS, FAULT_ARGS; limits: T_<STAGE>
# (vLLM's start plus a Ray actor's take ~140 s: keep limits of stages that start engines at 400 s or more).
# modes1/compile: MODES_STEPS, COMPILE_STEPS, COMPILE_ARGS; limits T_MODES1, T_COMPILE.
set -u
export PYTHONPATH=/tmp/site:$PWD $(cat /tmp/site/.env 2>/dev/null)
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ALLOW_INSECURE_SERIALIZATION=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -s "$out/versions.txt" ] || python3 -c "import vllm, torch, transformers, ray; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())" > "$out/versions.txt" 2>&1

stage() {  # stage NAME SECONDS CMD...: run CMD under a limit, its own process group, output in $out/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "rc=$? after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

for s in "$@"; do
  case $s in
    sync) stage sync "${T_SYNC:-500}" python3 bench/gpu_sync.py --models ${SYNC_MODELS:-real} --worlds 1,2 --reps 5 --ckpt-reps ${CKPT_REPS:-1} \
            ${SYNC_ARGS:-} --out "$out" ;;
    driver)
      stage driver "${T_DRIVER:-300}" python3 -m rl.train --config-name gpu_real_shape '~rewards.math.language' trainer.steps=3 \
        trainer.run_dir=runs/gpu_tensor_sync ${DRIVER_ARGS:-}
      cp runs/gpu_tensor_sync/metrics.jsonl "$out/driver_metrics.jsonl" 2>/dev/null ;;
    rollout) CUDA_VISIBLE_DEVICES=0 stage rollout "${T_ROLLOUT:-420}" python3 bench/rollout_throughput.py --prompts 128 --n 8 \
               --max-tokens 128 --reps 5 rollout.gpu_memory_utilization=0.4 ${ROLLOUT_ARGS:-} ;;
    ablations) stage ablations "${T_ABL:-540}" python3 bench/ablations.py ${ABL_ARGS:-} --out "$out" & ;;
    faults) stage faults "${T_FAULTS:-540}" python3 bench/gpu_faults.py ${FAULT_ARGS:-} & ;;
    trl) BENCH_PROFILE=$out CUDA_VISIBLE_DEVICES=0 stage trl "${T_TRL:-560}" python3 bench/learner_vs_trl.py --gpu --models ${TRL_MODELS:-dense0.4b,moe0.85b} \
           --batch 8 --prompt-len 256 --completion-len 1024 --vocab 151936 --reps 5 --rounds ${TRL_ROUNDS:-5} \
           --variants ${TRL_VARIANTS:-trl,ours+model+compile+mem0.7,ours+model+compile} --timeout ${TRL_TIMEOUT:-300} ;;
    head) CUDA_VISIBLE_DEVICES=0 stage head "${T_HEAD:-300}" python3 bench/token_logprobs.py --gpu --batch 8 --seq 1024 \
            --vocab 151936 --hidden 1024 --chunk 1024 --variants chunked,compiled --reps 5 --rounds 5 ;;  # the head alone
    e2e_trl) stage e2e_trl "${T_E2E:-580}" python3 bench/e2e_vs_trl.py --gpu --steps 25 --prompts 32 --n 8 --max-tokens 256 \
               '~rewards.math.language' ;;  # TRL's server mode runs `vllm serve`: stage uvicorn and its kin too (untried)
    e2e_trl1) stage e2e_trl1 "${T_E2E1:-580}" python3 bench/e2e_vs_trl.py --gpu --colocate --steps ${E2E_STEPS:-25} --prompts 32 --n 8 \
                --max-tokens 256 '~rewards.math.language' ;;  # one GPU: TRL's colocated vLLM vs ours sharing the GPU
    modes) stage modes "${T_MODES:-570}" python3 bench/e2e_modes.py --steps ${MODES_STEPS:-25} rollout=vllm rollout.engine_gpus=1 \
             trainer.learner_gpus=1 '~rewards.math.language' ${MODES_ARGS:-} ;;
    modes1) stage modes1 "${T_MODES1:-420}" python3 bench/e2e_modes.py --steps ${MODES_STEPS:-15} rollout=vllm \
              '~rewards.math.language' ${MODES_ARGS:-} ;;  # one GPU: engine and learner share it (auto -> IPC)
    compile)  # trainer.compile through the driver: MoE with replayed experts, one GPU
      stage compile "${T_COMPILE:-300}" python3 -m rl.train --config-name quickstart rollout=vllm '~rewards.math.language' \
        trainer.compile=true trainer.steps=${COMPILE_STEPS:-8} trainer.run_dir=runs/gpu_compile logging.wandb=false ${COMPILE_ARGS:-}
      cp runs/gpu_compile/metrics.jsonl "$out/compile_metrics.jsonl" 2>/dev/null ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$out/versions.txt" 2>&1
