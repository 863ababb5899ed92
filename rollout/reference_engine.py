"""A small pure-PyTorch rollout engine over the HF model: batched, KV-cached, exact capture.

It exists because vLLM can return routed experts and sampling masks only on GPU. Here both are exact by
construction: the routed experts are recorded from the HF router modules at every position the engine
runs (`rollout.routing`), and the kept set of each step is the support of the processed distribution
the token was drawn from (`rollout.sampling`, vLLM's processing order). Same `Sample` output as vLLM.

Not covered: continuous batching, paged attention, prefix caching, tensor parallelism, speed. Requests
run in fixed micro-batches (`max_batch`) with left padding; use it for tests, tiny CPU runs and as the
ground truth that vLLM's capture is compared against.
"""
from __future__ import annotations

import itertools

import torch

from rollout.engine import ENGINES, EngineConfig, Groups, SamplingConfig, check_model_dir
from rollout.routing import RoutingController
from rollout.sample import KeptSets, Sample, Status
from rollout.sampling import process_logits, truncates


def load_hf_model(path: str, dtype: str):
    """A HF causal LM from a local checkpoint, with DSA installed when its config asks for it."""
    from transformers import AutoModelForCausalLM

    from rollout.dsa import maybe_install_dsa

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    maybe_install_dsa(model, path)
    return model


@ENGINES.register("reference")
class ReferenceEngine:
    def __init__(self, cfg: EngineConfig, max_batch: int = 64):
        check_model_dir(cfg.model, "rollout.engine.model")
        self.cfg, self.max_batch = cfg, max_batch
        self.model = load_hf_model(cfg.model, cfg.dtype)
        self.routing = RoutingController(self.model)
        self.policy_version = 0
        self._calls = itertools.count()
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad_id = self.model.config.pad_token_id or 0
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

    def update_weights(self, path: str, version: int) -> None:
        """Copy the weights of the HF checkpoint at `path` into the running model (exact)."""
        check_model_dir(path, "weight sync path")
        self.model.load_state_dict(load_hf_model(path, self.cfg.dtype).state_dict())
        self.policy_version = version

    @torch.no_grad()
    def update_weights_from_tensors(self, named, version: int) -> None:
        """Copy (state-dict name, tensor) pairs into the running model as they arrive (the learner's in-memory
        names: same transformers class, same names). Every weight must come exactly once: a name the model does
        not have, or one left out, is an error (the version is then not taken)."""
        from rollout.weight_transfer import sync_state

        own, seen = sync_state(self.model), set()
        for name, t in named:
            if name not in own:
                raise KeyError(f"weight sync: the engine's model has no weight {name!r}")
            own[name].copy_(t)
            seen.add(name)
        missing = sorted(set(own) - seen)
        if missing:
            raise ValueError(f"weight sync left {len(missing)} weights unloaded, e.g. {missing[:3]}")
        self.policy_version = version

    def ping(self) -> int:
        return self.policy_version

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stats=None) -> Groups:
        """n samples for each prompt, grouped by prompt (`rollout.engine.Generator`)."""
        seed = sampling.seed if sampling.seed is not None else self.cfg.seed * 1_000_003 + next(self._calls)
        gen = torch.Generator().manual_seed(seed)
        reqs = [list(p) for p in prompts for _ in range(sampling.n)]  # prompt-major: group i is reqs[i*n:(i+1)*n]
        out: list[Sample] = []
        for s in range(0, len(reqs), self.max_batch):
            out.extend(self._generate_batch(reqs[s : s + self.max_batch], sampling, gen))
        n = sampling.n
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, reqs: list[list[int]], sp: SamplingConfig, gen: torch.Generator) -> list[Sample]:
        from transformers import DynamicCache

        B, P = len(reqs), max(len(p) for p in reqs)
        max_new = min(sp.max_tokens, self.cfg.max_model_len - P)
        if max_new <= 0:
            raise ValueError(f"prompt of {P} tokens leaves no room under max_model_len={self.cfg.max_model_len}")
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(reqs):
            ids[b, P - len(p) :] = torch.tensor(p)
            attn[b, P - len(p) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(sorted((set() if sp.ignore_eos else self.eos_ids) | set(sp.stop_token_ids)), dtype=torch.long)
        record_mask = truncates(sp.temperature, sp.top_k, sp.top_p)
        toks, logps, kept = [], [], []
        done = torch.zeros(B, dtype=torch.bool)
        cache = DynamicCache(config=self.model.config)
        with self.routing.capture():
            logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache).logits[:, -1]
            for step in range(max_new):
                processed = process_logits(logits, sp.temperature, sp.top_k, sp.top_p)  # [B, V]
                logp_all = torch.log_softmax(processed, -1)
                if sp.temperature == 0.0:
                    tok = processed.argmax(-1)
                else:
                    tok = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)
                toks.append(tok)
                logps.append(logp_all.gather(-1, tok[:, None]).squeeze(-1))
                if record_mask:
                    kept.append([torch.isfinite(row).nonzero().squeeze(-1).numpy() for row in processed])
                done |= torch.isin(tok, stop)
                if bool(done.all()) or step == max_new - 1:
                    break
                attn = torch.cat([attn, torch.ones((B, 1), dtype=torch.long)], -1)
                pos = pos[:, -1:] + 1
                logits = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache).logits[:, -1]
            calls = self.routing.take_captured() if self.routing.is_moe else []
        return [self._to_sample(b, reqs[b], P, toks, logps, kept, calls, stop) for b in range(B)]

    def _to_sample(self, b, prompt, P, toks, logps, kept, calls, stop) -> Sample:
        resp = [int(t[b]) for t in toks]
        stop_set = set(stop.tolist())
        end = next((i + 1 for i, t in enumerate(resp) if t in stop_set), None)
        resp = resp[:end] if end else resp
        R = len(resp)
        s = Sample(
            prompt_ids=prompt,
            response_ids=resp,
            logprobs=[float(lp[b]) for lp in logps[:R]],
            loss_mask=[1] * R,
            finish_reason="stop" if end else "length",
            status=Status.COMPLETED if end else Status.TRUNCATED,
            policy_version=self.policy_version,
        )
        if calls:
            layers, k = calls[0].shape[1:]
            prefill = calls[0].reshape(-1, P, layers, k)[b, P - len(prompt) :]  # real prompt positions
            decode = [c[b : b + 1] for c in calls[1:R]]  # the response tokens fed back, all but the last
            s.routed_experts = torch.cat([prefill, *decode]).numpy()
        if kept:
            s.kept = KeptSets.from_lists([kept[t][b] for t in range(R)], self.vocab_size)
        s.validate()
        return s
