"""Learner training-step throughput and peak memory: ours vs TRL's GRPOTrainer, same model, same batch.

Both compute the GRPO loss with the engine's log-probs as pi_old and back-propagate (forward + backward, no
optimiser step), on the same prompts/completions/advantages. Ours: `rl.learner.Learner` (FSDP2, world
size 1, chunked log-probs), its settings built as the driver builds them (`load_config` with the variant's
overrides, then `rl.components.learner_config`; `ours_overrides`). TRL: `GRPOTrainer._compute_loss` (its fused LM head log-probs). Each
variant runs in its own process, started once and warmed up (compiled); then `--rounds` rounds give each variant
`--reps` timed steps in turn, so a ratio is taken round by round, between steps of the same round (the median of
the rounds' ratios is printed with its min and max; the variants' order reverses every other round). CPU, fp32;
peak memory = the process's peak RSS (the warm-up's compilation included) minus its RSS after the warm-up step.
`--gpu`: one GPU, bf16 compute with fp32 master weights on both sides (ours: FSDP2 mixed precision; TRL:
`bf16=True`, the step under its accelerator's autocast), peak memory = `torch.cuda.max_memory_allocated`
minus the allocation after the warm-up step, over all rounds. `BENCH_PROFILE=DIR`: one more step per variant, after the rounds, under
torch.profiler, its top ops written to DIR/profile_<variant>_<model dir>.txt, its device-busy share to the
variant's log; with `BENCH_TRACE=1` also its timeline (.json.gz, chrome://tracing).

    pip install trl==1.16.0   # bench-only dependency
    python bench/learner_vs_trl.py [--models dense0.4b,tiny_moe] [--batch 4] [--prompt-len 64] [--completion-len 128] [--vocab V] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchstats import spread

SHAPES = {"dense0.4b": ("dense", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                      num_key_value_heads=8, head_dim=64)),
          "tiny_moe": ("moe", {}),
          "moe0.85b": ("moe", dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                                   head_dim=64, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
                                   intermediate_size=2048))}  # the shape of the GPU benches


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _batch(B: int, P: int, C: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab, (B, P), generator=g)
    completion = torch.randint(10, vocab, (B, C), generator=g)
    old = -torch.rand(B, C, generator=g) * 5
    adv = torch.randn(B, generator=g)
    return prompt, completion, old, adv


def plain(variant: str) -> str:
    """A variant as a plain file-name part (the device only returns plain names)."""
    return variant.replace("+", "_").replace("@", "_at")


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def parse_variant(spec: str) -> tuple[str, bool, int | None, bool, bool, float]:
    """`ours`, `trl+gc` (gradient checkpointing), `ours+compile` (trainer.compile), `ours+model` (trainer.fsdp_wrap=
    model: one FSDP2 unit; with --gpu), `ours+compile+mem0.5` (trainer.activation_memory_budget),
    `ours+gc+compile@256` (log-prob chunk): (side, checkpointing, chunk, compile, one FSDP unit, budget)."""
    spec, _, chunk = spec.partition("@")
    side, *flags = spec.split("+")
    budgets = [f for f in flags if f.startswith("mem")]
    rest = [f for f in flags if not f.startswith("mem")]
    bad = (side not in ("ours", "trl") or set(rest) - {"gc", "compile", "model"} or len(set(flags)) < len(flags)
           or len(budgets) > 1 or (budgets and "compile" not in rest))
    if bad or (side == "trl" and (chunk or budgets or {"compile", "model"} & set(flags))):
        raise SystemExit(f"--variants: bad variant {spec!r} (ours | trl, then +gc, then for ours +compile, +model, "
                         "+memB with +compile, and @CHUNK)")
    budget = float(budgets[0][3:]) if budgets else 1.0
    return side, "gc" in flags, int(chunk) if chunk else None, "compile" in flags, "model" in flags, budget


def ours_overrides(variant: str, B: int, gpu: bool) -> list[str]:
    """The rl.train overrides of an `ours` variant: one micro-batch of B, bf16 on the GPU, no routing replay
    (the bench's samples carry no routed experts, and TRL replays none)."""
    _, gc, chunk, compiled, one_unit, budget = parse_variant(variant)
    return [f"trainer.micro_batch_size={B}", f"trainer.param_dtype={'bfloat16' if gpu else 'float32'}",
            f"trainer.gradient_checkpointing={str(gc).lower()}", f"trainer.compile={str(compiled).lower()}",
            f"trainer.activation_memory_budget={budget}", f"trainer.fsdp_wrap={'model' if one_unit else 'layer'}",
            "algo.keep_routing=false", "algo.keep_sampling_mask=false"] + ([f"trainer.logprob_chunk={chunk}"] if chunk else [])


def _setup(variant: str, model_dir: str, B: int, P: int, C: int, gpu: bool):
    """The variant's model and one step (forward + backward of the GRPO loss, gradients dropped)."""
    import torch

    side, gc, *_ = parse_variant(variant)
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    prompt, completion, old, adv = _batch(B, P, C, vocab)
    if side == "ours":
        from rl.components import learner_config
        from rl.config import load_config
        from rl.learner import Learner, plan_step
        from rollout.sample import Sample, Status

        # Through the driver's config path (what `python -m rl.train ... <overrides>` builds), beta 0 as TRL's.
        cfg = load_config(ours_overrides(variant, B, gpu), gpus=int(gpu))
        learner = Learner(learner_config(cfg, model_dir, kl_coefs={}))
        samples = [Sample(prompt_ids=prompt[b].tolist(), response_ids=completion[b].tolist(), logprobs=old[b].tolist(),
                          loss_mask=[1] * C, status=Status.COMPLETED, advantage=float(adv[b])) for b in range(B)]
        totals = plan_step(samples, 1, B)
        return lambda: (learner.accumulate_grads(samples, totals), learner.zero_grads())
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=B, beta=0.0, loss_type="grpo",
                      use_cpu=not gpu, bf16=gpu, report_to=[], max_completion_length=C, logging_steps=1000,
                      gradient_checkpointing=gc)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                          args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * B))
    model, dev = trainer.model, trainer.accelerator.device
    model.train()  # as Trainer.train() leaves it (checkpointing only acts in training mode)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the train-mode loss reads it
    if gc:  # what Trainer.train() does for `gradient_checkpointing`; calling _compute_loss directly skips it
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": torch.ones_like(completion), "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(B * C))}
    inputs = {k: v.to(dev) for k, v in inputs.items()}

    def step():
        with trainer.accelerator.autocast():  # what its training_step does (bf16 on GPU)
            loss = trainer._compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def _say(msg: dict) -> None:
    """A message to the parent: one tagged JSON line on stdout (libraries may print there too)."""
    print(TAG + json.dumps(msg), flush=True)


TAG = "@@bench "


def serve(variant: str, model_dir: str, B: int, P: int, C: int, reps: int, gpu: bool = False) -> None:
    """One variant's process, alive across the rounds: set up and warm up (compile), report, then for each `round`
    line on stdin time `reps` steps and report them; at `end` (or EOF) one more step under the profiler (with
    BENCH_PROFILE) and the peak memory over all rounds. The parent alternates the variants' rounds, so every
    variant meets the same spells of host and GPU speed."""
    import torch

    side = parse_variant(variant)[0]
    step = _setup(variant, model_dir, B, P, C, gpu)
    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    if gpu:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    print(f"{variant}: first step (warm-up, compile) {first:.1f} s", file=sys.stderr, flush=True)
    if gpu:
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
    _say({"first_step_s": first})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"{variant}: steps {' '.join(f'{t:.3f}' for t in times)} s", file=sys.stderr, flush=True)
        _say({"step_s": times})
    peak = (torch.cuda.max_memory_allocated() / 2**20 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base
    res = {"peak_extra_mb": peak}
    if os.environ.get("BENCH_PROFILE"):  # one more step under the profiler: the top ops by device (CPU: host) time
        _profile(step, variant, model_dir, gpu)
    if gpu and side == "ours":  # which weight-gradient accumulation the head used (rl.logprobs._accumulate)
        from rl.logprobs import _has_out_dtype_addmm

        res["fp32_out_addmm"] = _has_out_dtype_addmm()
    _say(res)


def _profile(step, variant: str, model_dir: str, gpu: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if gpu:  # the device's kernel time over the (profiled) step's wall time: < 1 where the GPU waits for the host
        from torch.autograd import DeviceType  # kernels and copies only (as the table's total): not FSDP's annotations

        busy = sum(e.self_device_time_total for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        print(f"{variant}: profiled step {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})", file=sys.stderr, flush=True)
    table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=25)
    name = f"profile_{plain(variant)}_{os.path.basename(model_dir)}"
    with open(os.path.join(os.environ["BENCH_PROFILE"], name + ".txt"), "w") as f:
        f.write(table)
    if os.environ.get("BENCH_TRACE"):  # the timeline (where the device waits for the host), gzipped
        trace = os.path.join(os.environ["BENCH_PROFILE"], name + ".json")
        prof.export_chrome_trace(trace)
        subprocess.run(["gzip", "-f", trace], check=True)


class Child:
    """A variant's live process (`serve`): its stderr streams to a log file as it runs (a variant that hangs leaves
    its log); a thread reads its stdout as it comes (libraries may print there, in the same flush as an answer) and
    queues the tagged lines, the answers, each awaited under a time limit."""

    def __init__(self, variant: str, cmd: list[str], log: str, timeout: float):
        import queue
        import threading

        self.variant, self.log, self.timeout = variant, log, timeout
        self.err = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.answers.put(json.loads(line[len(TAG):]))
        self.answers.put(None)  # EOF: the process is gone

    def ask(self, line: str | None) -> dict:
        """Send a request line (None: close stdin, the end) and wait for the answer."""
        try:
            if line is not None:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            else:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass  # exited: answer() says so
        return self.answer()

    def answer(self) -> dict:
        import queue

        try:
            got = self.answers.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"{self.variant}: no answer in {self.timeout} s; its log ({self.log}) ends:\n{_tail(self.log)}") from None
        if got is None:
            self.close()
            raise RuntimeError(f"{self.variant} exited ({self.proc.returncode}); its log ({self.log}) ends:\n{_tail(self.log)}")
        return got

    def close(self) -> None:
        """Kill it if it still runs (a hung or failed variant must not keep its GPU memory), then reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()


def compare(name: str, variants: list[str], children: dict, a) -> None:
    """The rounds over the live, warmed-up variants; each ours/TRL ratio is printed as its round ends, then as the
    median [min, max] over the rounds both sides completed. A variant that fails or hangs is left out (and
    killed), the others go on."""
    tokens = a.batch * (a.prompt_len + a.completion_len)
    tok, steps = {v: {} for v in variants}, {v: [] for v in variants}  # tokens/s by round (over the round's median)
    pairs = {}  # ours variant -> its TRL baseline (same checkpointing)
    for v in variants:
        side, gc, *_ = parse_variant(v)
        if side == "ours" and ("trl+gc" if gc else "trl") in variants:
            pairs[v] = "trl+gc" if gc else "trl"

    def left_out(v: str, e: Exception) -> None:
        print(f"  {name:10s} {v:10s}: left out: {e}", flush=True)
        children.pop(v).close()

    for r in range(a.rounds):
        order = [v for v in variants if v in children]
        for v in order if r % 2 == 0 else order[::-1]:  # alternate who goes first: a drift favours no one
            try:
                st = children[v].ask("round")["step_s"]
            except (RuntimeError, TimeoutError) as e:
                left_out(v, e)
                continue
            steps[v] += st
            tok[v][r] = tokens / statistics.median(st)
        for v, trl in pairs.items():
            if r in tok[v] and r in tok[trl]:
                print(f"  {name:10s} round {r + 1}: {v} / {trl} tokens/s {tok[v][r] / tok[trl][r]:.2f}x", flush=True)
    peaks = {}
    for v in list(children):
        try:
            peaks[v] = children[v].ask(None)
            children.pop(v).close()
        except (RuntimeError, TimeoutError) as e:
            left_out(v, e)
    for v, r in peaks.items():
        print(f"  {name:10s} {v:10s}: {statistics.median(tok[v].values()):8.1f} tok/s (step s {spread(steps[v])} over "
              f"{len(steps[v])} steps in {len(tok[v])} rounds), peak extra {r['peak_extra_mb']:7.0f} MB"
              + (f", bf16->fp32 addmm {r['fp32_out_addmm']}" if "fp32_out_addmm" in r else ""), flush=True)
    for v, trl in pairs.items():
        both = [r for r in tok[v] if r in tok[trl]]
        if not both or v not in peaks or trl not in peaks:
            continue
        speed = [tok[v][r] / tok[trl][r] for r in both]  # round by round: the same spell of host and GPU speed
        mem = peaks[v]["peak_extra_mb"] / max(peaks[trl]["peak_extra_mb"], 1)
        print(f"  {name:10s} {v:10s} / {trl:6s}: tokens/s {spread(speed, '.2f')}x over {len(both)} interleaved "
              f"rounds (target >= 1.5x), peak memory {mem:.2f}x (target <= 0.5x)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dense0.4b,tiny_moe")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds: each variant's live process runs --reps steps in "
                   "turn; a ratio is printed as the median [min, max] of its per-round ratios")
    p.add_argument("--variants", default="trl,ours",
                   help="processes per round, in order: ours | trl, +gc for gradient checkpointing (TRL's own default is "
                        "on), +compile for our trainer.compile, +memB for its activation_memory_budget=B, +model for "
                        "trainer.fsdp_wrap=model, @N for our log-prob chunk; "
                        "each ours variant is compared "
                        "with the trl variant of the same checkpointing, e.g. trl,ours,trl+gc,ours+gc,ours+compile")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tiny tokenizer's 1,030); "
                   "151936 is Qwen3's, where the chunked head matters")
    p.add_argument("--timeout", type=int, default=300, help="seconds a variant may take to start, or to answer a "
                   "round (then it is left out and the others go on)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        serve(a.one[0], a.one[1], a.batch, a.prompt_len, a.completion_len, a.reps, a.gpu)
        return
    from rollout.tiny_models import build_tiny_model

    where = "bf16 mixed precision, GPU (" + __import__("torch").cuda.get_device_name(0) + ")" if a.gpu else "fp32 CPU"
    print(f"B={a.batch} prompt={a.prompt_len} completion={a.completion_len} vocab={a.vocab or 1030}, {where}, fwd+bwd of the GRPO loss")
    for name in a.models.split(","):
        kind, shape = SHAPES[name]
        shape = {**shape, **({"vocab_size": a.vocab} if a.vocab else {})}
        model_dir = str(build_tiny_model(kind, tempfile.mkdtemp(prefix=f"bench-trl-{name}-"), seed=0, **shape))
        variants = a.variants.split(",")
        for v in variants:
            parse_variant(v)
        if len(set(variants)) < len(variants):
            raise SystemExit(f"--variants: a variant is named twice: {a.variants}")
        children = {}
        try:
            for v in variants:  # each warms up (compiles) in turn: no two compile at once
                cmd = [sys.executable, __file__, "--one", v, model_dir, "--batch", str(a.batch), "--prompt-len",
                       str(a.prompt_len), "--completion-len", str(a.completion_len), "--reps", str(a.reps)] + ["--gpu"] * a.gpu
                log = os.path.join(os.environ.get("BENCH_PROFILE") or model_dir, f"log_{plain(v)}_{name}.txt")
                children[v] = Child(v, cmd, log, a.timeout)
                try:
                    print(f"  {name:10s} {v:10s}: ready, first step {children[v].answer()['first_step_s']:.0f} s", flush=True)
                except (RuntimeError, TimeoutError) as e:
                    print(f"  {name:10s} {v:10s}: left out: {e}", flush=True)
                    children.pop(v).close()
            compare(name, variants, children, a)
        finally:
            for child in children.values():
                child.close()

if __name__ == "__main__":
    main()
