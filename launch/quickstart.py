"""The README's quickstart: build a tiny MoE checkpoint, start a vLLM engine in a Ray actor, sample from it.

Until the driver lands this is the end-to-end smoke path (model factory -> Ray -> vLLM -> Sample records).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args(argv)

    import ray
    from transformers import AutoTokenizer

    from rollout.chat import encode_chat
    from rollout.tiny_models import build_tiny_model
    from rollout.engine import EngineConfig, SamplingConfig, engine_actor

    t0 = time.time()
    model_dir = build_tiny_model("moe", Path(args.run_dir) / "model", seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = encode_chat(tok, [{"role": "user", "content": "what is 12 + 30?"}])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = engine_actor(num_cpus=1).remote(EngineConfig(model=str(model_dir), max_model_len=512))
        samples = ray.get(actor.generate.remote([prompt], SamplingConfig(n=args.n, max_tokens=24, seed=0)))
    finally:
        ray.shutdown()
    for s in samples:
        mean_lp = sum(s.logprobs) / len(s.logprobs)
        print(f"[{s.status.value}] {len(s.response_ids)} tokens, mean logp {mean_lp:.3f}: {tok.decode(s.response_ids)!r}")
    print(f"quickstart ok in {time.time() - t0:.1f} s (random weights: the text is noise)")


if __name__ == "__main__":
    main()
