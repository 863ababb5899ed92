#!/usr/bin/env bash
# Stage the wheels of a GPU session (bench/gpu_session.sh): vLLM 0.26 and the driver's stack
# (../shared/gpu/stage.sh --driver), plus what the benches need beyond them: vLLM's OpenAI server stack, since
# TRL 1.16's `trl vllm-serve` execs `vllm serve` (bench/e2e_vs_trl.py). These are the top-level imports of
# vLLM 0.26's entrypoints that the image lacks (found one failed import at a time on the device). .gpuwheels is
# git-ignored: a fresh checkout stages again. Prints the device calls to make, back to back.
#   bash bench/gpu_stage.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exec bash ../shared/gpu/stage.sh --driver uvicorn==0.54.0 h11==0.16.0 httptools==0.9.0 uvloop==0.23.0 \
  python-multipart==0.0.34 prometheus-fastapi-instrumentator==8.1.0 watchfiles==1.3.0 websockets==17.4 \
  model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
