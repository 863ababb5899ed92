"""DeepSeek Sparse Attention (DSA, V3.2 section 2.1), a reference PyTorch implementation for HF Qwen3-style
models, used by both the learner (transformers forward) and the reference engine (it lives in `rollout/`
because both need it).

Lightning indexer: for query token t and earlier token s,
    I_{t,s} = sum_j w_{t,j} * ReLU(q_{t,j} . k_s)
with a few small indexer heads j (queries q_{t,j} and weights w_{t,j} from h_t, one shared key k_s from h_s).
Each query attends only to the `top_k` keys with the largest I_{t,s} among s <= t (all of them when there
are at most `top_k`: the dense fallback). Main attention is the model's own (same projections, RoPE,
GQA), masked to the selected keys.

How it plugs in: `install_dsa(model, top_k, ...)` adds an `indexer` to every attention module, a forward
pre-hook that hands the indexer the layer's input hidden states, and switches the model to the "dsa"
attention function registered with transformers' AttentionInterface. The per-layer tensors the training
losses need (main attention distribution, indexer scores, selection) are kept on the modules when
`keep_for_loss(model, True)`; `rl.dsa` turns them into the warm-up and sparse-stage KL losses.

What a reference implementation cannot show: speed. Main attention is computed densely and then masked (so
outputs are exact), and the indexer is O(L^2) in plain matmuls; the real gains need DeepSeek's fused FP8
indexer and sparse attention kernels. `bench/dsa.py` reports what this implementation does cost.
Not covered: MLA (DSA is instantiated on MLA in V3.2; here it sits on GQA), FP8, and KV-cache eviction.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_NAME = "dsa"


class LightningIndexer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int = 16):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.wq = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.ww = nn.Linear(hidden_size, num_heads, bias=False)

    def scores(self, h_q: torch.Tensor, h_k: torch.Tensor) -> torch.Tensor:
        """I `[B, Lq, S]` for query hidden states `[B, Lq, H]` and key hidden states `[B, S, H]` (fp32)."""
        B, Lq, _ = h_q.shape
        q = self.wq(h_q).float().view(B, Lq, self.num_heads, self.head_dim)  # [B, Lq, J, d]
        k = self.wk(h_k).float()  # [B, S, d]
        w = self.ww(h_q).float()  # [B, Lq, J]
        return torch.einsum("btj,btjs->bts", w, F.relu(torch.einsum("btjd,bsd->btjs", q, k)))


def select_topk(index_scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean `[B, Lq, S]` selection: the top_k allowed keys by indexer score (all allowed ones if fewer)."""
    if allowed.sum(-1).max() <= top_k:
        return allowed
    masked = index_scores.masked_fill(~allowed, float("-inf"))
    idx = masked.topk(min(top_k, masked.shape[-1]), dim=-1).indices
    sel = torch.zeros_like(allowed).scatter_(-1, idx, True)
    return sel & allowed  # rows with fewer than top_k allowed keys picked some -inf ones: drop them


def dsa_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The "dsa" attention function (transformers' AttentionInterface signature). Mirrors eager attention
    op for op, so that with every key selected the output is bitwise the dense output."""
    from transformers.models.qwen3.modeling_qwen3 import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [B, H, Lq, S]
    S = key_states.shape[-2]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, :S]
    allowed = torch.isfinite(attn_weights[:, 0]) & (attn_weights[:, 0] > torch.finfo(attn_weights.dtype).min / 2)
    h_q = module._dsa_hidden  # [B, Lq, H] the layer's input, from the pre-hook
    h_k = _indexer_keys_input(module, h_q, S)
    idx_in_q, idx_in_k = (h_q.detach(), h_k.detach()) if module._dsa_detach else (h_q, h_k)
    index_scores = module.indexer.scores(idx_in_q, idx_in_k)  # [B, Lq, S]
    selected = select_topk(index_scores.detach(), allowed, module._dsa_top_k)
    if not bool(selected.eq(allowed).all()):
        attn_weights = attn_weights.masked_fill(~selected[:, None], torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if module._dsa_keep:
        module._dsa_state = {"attn": attn_weights, "index": index_scores, "selected": selected, "allowed": allowed}
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _indexer_keys_input(module, h_q: torch.Tensor, S: int) -> torch.Tensor:
    """Hidden states of all S key positions. A full forward has them all; cached decoding (the reference
    engine) keeps this layer's past inputs, reset at every prefill."""
    Lq = h_q.shape[1]
    if Lq == S:
        module._dsa_hcache = h_q.detach()
    else:
        module._dsa_hcache = torch.cat([module._dsa_hcache, h_q.detach()], 1)
    return module._dsa_hcache if Lq != S else h_q


def _capture_hidden(module, args, kwargs):
    module._dsa_hidden = kwargs.get("hidden_states", args[0] if args else None)


def attention_modules(model) -> list[nn.Module]:
    base = getattr(model, model.base_model_prefix)
    return [layer.self_attn for layer in base.layers]


def install_dsa(model, top_k: int, index_heads: int = 4, index_dim: int = 16, weights_dir: str | None = None) -> None:
    """Make `model` use DSA (see module docstring). Indexer weights come from `weights_dir` (a checkpoint
    saved with them) when it has them, else a seeded random init. Records the settings in the config."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTN_NAME, dsa_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)
    hidden = model.config.hidden_size
    for attn in attention_modules(model):
        if not hasattr(attn, "indexer"):
            attn.indexer = LightningIndexer(hidden, index_heads, index_dim).to(next(attn.parameters()))
            attn.register_forward_pre_hook(_capture_hidden, with_kwargs=True)
        attn._dsa_top_k, attn._dsa_keep, attn._dsa_detach, attn._dsa_state = top_k, False, False, None
    if weights_dir is not None:
        _load_indexers(model, weights_dir)
    model.config.dsa = {"top_k": top_k, "index_heads": index_heads, "index_dim": index_dim}
    model.config._attn_implementation = ATTN_NAME
    model.set_attn_implementation(ATTN_NAME) if hasattr(model, "set_attn_implementation") else None


def _load_indexers(model, weights_dir: str) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    found = {}
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        found.update({k: v for k, v in load_file(str(f)).items() if ".indexer." in k})
    if found:
        missing = [k for k in model.state_dict() if ".indexer." in k and k not in found]
        if missing:
            raise ValueError(f"{weights_dir}: checkpoint has indexer weights but not {missing[:3]}")
        model.load_state_dict(found, strict=False)


def maybe_install_dsa(model, weights_dir: str) -> bool:
    """Install DSA when the checkpoint's config asks for it (`"dsa": {...}` in config.json)."""
    cfg = getattr(model.config, "dsa", None)
    if not cfg:
        return False
    install_dsa(model, cfg["top_k"], cfg.get("index_heads", 4), cfg.get("index_dim", 16), weights_dir=weights_dir)
    return True


def keep_for_loss(model, keep: bool = True, detach_indexer_input: bool = False) -> None:
    """Keep each layer's attention/indexer tensors for the DSA losses; detach the indexer's input (sparse
    stage: the indexer loss must not reach the main model)."""
    for attn in attention_modules(model):
        attn._dsa_keep, attn._dsa_detach, attn._dsa_state = keep, detach_indexer_input, None
