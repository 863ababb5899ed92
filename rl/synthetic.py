"""A synthetic task family with verifiable answers, and its rule-based 'specialist' solver.

Two domains, so that one RL stage mixes domains with their own reward specs and betas:
- `math`: single-digit addition, asked in English or Chinese (language consistency has something to check);
- `string`: the first or last letter of a short word.
The solver writes the reasoning in the prompt's language and the answer in `\\boxed{}`, the format the
reward specs check. `python -m rl.synthetic OUT_DIR` writes train/eval JSONL files (deterministic).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("cat dog sun red box cup hat pen map egg ant bee owl fox jam key lip net oak pig "
         "rat sky toy van web yak zoo bag bus car").split()


def math_row(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    lang = "zh" if rng.random() < 0.3 else "en"
    prompt = f"{a} 加 {b} 等于多少？" if lang == "zh" else f"What is {a} + {b}?"
    return {"prompt": prompt, "domain": "math", "answer": str(a + b), "language": lang, "a": a, "b": b}


def string_row(rng: random.Random) -> dict:
    w, which = rng.choice(WORDS), rng.choice(["first", "last"])
    return {"prompt": f"What is the {which} letter of {w}?", "domain": "string",
            "answer": w[0] if which == "first" else w[-1], "language": "en", "word": w, "which": which}


def solve(row: dict) -> str:
    """The rule-based specialist's output for a row of this family."""
    if row["domain"] == "math":
        a, b = row["a"], row["b"]
        reasoning = f"{a} 加 {b} 等于 {a + b}" if row["language"] == "zh" else f"{a} plus {b} is {a + b}"
    else:
        reasoning = f"the {row['which']} letter of {row['word']} is {row['answer']}"
    return f"<think>\n{reasoning}\n</think>\n\n\\boxed{{{row['answer']}}}"


def generate(n: int, seed: int, string_fraction: float = 0.3) -> list[dict]:
    rng = random.Random(seed)
    return [string_row(rng) if rng.random() < string_fraction else math_row(rng) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", a.train, 0), ("eval", a.eval, 1)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in generate(n, seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(out)


if __name__ == "__main__":
    main()
