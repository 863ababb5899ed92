"""The README's quickstart: `python -m rl.train --config-name quickstart` plus a pointer to the results.

Builds a tiny random Qwen3-MoE-style model, distils the rule-based specialists of the synthetic task family
into it (SFT), then runs mixed GRPO over the math and string domains with V3.2's settings; writes
metrics.jsonl, reward/KL/length PNGs and an offline W&B run into runs/quickstart. Extra arguments are
Hydra overrides (e.g. `trainer.steps=10`).
"""
from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    from rl.train import main as train

    t0 = time.time()
    rc = train(["--config-name", "quickstart", *(sys.argv[1:] if argv is None else argv)])
    print(f"quickstart finished in {time.time() - t0:.0f} s: see runs/quickstart/reward.png and eval.png")
    return rc


if __name__ == "__main__":
    sys.exit(main())
