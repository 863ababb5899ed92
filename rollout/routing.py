"""MoE routing capture (engine side) and keep-routing replay (learner side) on HF MoE blocks.

Both are one small patch on each top-k router module (transformers 5's `*TopKRouter`, e.g.
`Qwen3MoeTopKRouter`, whose forward returns `(router_logits, routing_weights, expert_ids)` and whose
experts consume exactly those ids and weights). A `RoutingController` installs the patch once; its mode
decides what the router does:

- off: the original router (top-k of the softmax, renormalised when `norm_topk_prob`);
- capture: the original router, and the chosen ids of every call are recorded per layer;
- replay: the expert ids come from the caller (what the inference engine used), and the gate weights are
  the *training* router's softmax gathered at those ids and renormalised over them when the model does
  (`norm_topk_prob`), so the router still receives a gradient (V3.2 "Keep Routing"). The router's own
  top-k is kept for the train/infer routing-agreement metric.

Layout: ids are `[num_positions, num_moe_layers, top_k]` for the flattened `[batch * seq]` positions of
one forward call, layers in module order. Not covered: routers of other shapes (e.g. DeepSeek-V3's
grouped routing with bias) need their own patch function.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k router modules of `model`, in layer order (empty for a dense model)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class RoutingController:
    def __init__(self, model: torch.nn.Module):
        self.routers = find_routers(model)
        self.mode = "off"
        self.captured: list[list[torch.Tensor]] = [[] for _ in self.routers]  # per layer, per call [N, k]
        self.own_topk: list[torch.Tensor | None] = [None] * len(self.routers)  # last replay call, per layer
        self._replay: torch.Tensor | None = None  # [N, layers, k]
        for i, r in enumerate(self.routers):
            r._routing_layer, r._routing_ctl = i, self
            r.forward = types.MethodType(_router_forward, r)

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    @contextmanager
    def capture(self):
        """Record the ids every router picks; read them with `take_captured()`."""
        self.mode, self.captured = "capture", [[] for _ in self.routers]
        try:
            yield self
        finally:
            self.mode = "off"

    def take_captured(self) -> list[torch.Tensor]:
        """One `[N, layers, k]` int tensor per forward call since `capture()` began (or the last take)."""
        calls = [torch.stack(per_call, 1) for per_call in zip(*self.captured)]
        self.captured = [[] for _ in self.routers]
        return calls

    @contextmanager
    def replay(self, expert_ids: torch.Tensor):
        """Force the routers of the next forward call(s) to `expert_ids` `[N, layers, k]`."""
        if expert_ids.shape[1] != len(self.routers):
            raise ValueError(f"routing replay: ids have {expert_ids.shape[1]} layers, the model has {len(self.routers)} MoE layers")
        self.mode, self._replay = "replay", expert_ids.long()
        try:
            yield self
        finally:
            self.mode, self._replay = "off", None

    def agreement(self, replayed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of (position, layer) where the training router's own top-k set equals the replayed set: a
        0-dim tensor on the router's device (read on the host once per step, with the step's other metrics)."""
        own = torch.stack(self.own_topk, 1).sort(-1).values  # [N, layers, k]
        same = (own == replayed.to(own.device).long().sort(-1).values).all(-1).float()  # [N, layers]
        if mask is not None:
            m = mask.reshape(-1, 1).float().to(own.device)
            return (same * m).sum() / (m.sum() * same.shape[1]).clamp(min=1)
        return same.mean()


# trainer.compile: the router runs eagerly between the layer's graphs (traced, its layer index would be a
# constant of the graph: one compilation per MoE layer).
@torch.compiler.disable
def _router_forward(self, hidden_states: torch.Tensor):
    ctl: RoutingController = self._routing_ctl
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)  # [N, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_vals, top_ids = torch.topk(probs, self.top_k, dim=-1)
    if ctl.mode == "replay":
        ctl.own_topk[self._routing_layer] = top_ids.detach()
        top_ids = ctl._replay[:, self._routing_layer]
        if top_ids.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"routing replay: {top_ids.shape[0]} positions of ids for {hidden_states.shape[0]} tokens")
        top_vals = probs.gather(-1, top_ids)  # gradient flows into the router through the softmax
    elif ctl.mode == "capture":
        ctl.captured[self._routing_layer].append(top_ids.detach().to(torch.int16).cpu())
    if self.norm_topk_prob:
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
    return logits, top_vals.to(logits.dtype), top_ids
