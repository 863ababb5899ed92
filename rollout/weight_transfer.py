"""Weight sync without the file system: CUDA IPC when the learner and the engine share a GPU, NCCL when
they are on different GPUs (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`, the pattern of vLLM's
RLHF example, so the engine's own torch.distributed world is left alone).

Learner side: `checkpoint_tensors(model)` yields the weights under their HF checkpoint names as views
(transformers 5 keeps Qwen3-MoE experts fused in memory, `experts.gate_up_proj [E, 2I, H]`, and splits
them per expert only when saving; vLLM's `load_weights` expects the per-expert names), then
`ipc_handles(...)` or `NcclWeightSender.send(...)`. Engine side: `VLLMEngine.update_weights_from_ipc` /
`update_weights_from_nccl`, which run `load_weights` in the vLLM worker through `collective_rpc`.

Measured on GPU in bench/gpu_weight_sync.py (time vs bytes, correctness against the learner's log-probs).
Not covered: tensor-parallel engines (every TP rank would receive the full tensors and shard them itself,
which `load_weights` does, but it is untested), FSDP-sharded learners (gather first: `Learner.full_state_dict`),
and the driver does not use these transports yet (it syncs through /dev/shm checkpoints).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as in the model's HF checkpoint, without copies (fused experts are sliced into views).
    A tied `lm_head.weight` is skipped, as save_pretrained does."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            yield name, t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                half = t.shape[1] // 2
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", t[e, half:]
            else:
                yield f"{prefix}.{e}.down_proj.weight", t[e]


def ipc_handles(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple]]:
    """CUDA IPC handles (picklable, a few hundred bytes each). The caller keeps the tensors alive until the
    engine has loaded them."""
    from torch.multiprocessing.reductions import reduce_tensor

    return [(name, reduce_tensor(t.detach())) for name, t in named]


def _rebuild(handle: tuple) -> torch.Tensor:
    fn, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()  # storage device: the consumer's index of the same GPU
    return fn(*args)


def load_from_ipc(worker, handles: list[tuple[str, tuple]]) -> int:
    """Runs in the vLLM worker (collective_rpc): map the learner's memory, load it, return the count."""
    model = worker.model_runner.get_model()
    model.load_weights(weights=((name, _rebuild(h)) for name, h in handles))
    torch.cuda.synchronize()
    return len(handles)


def _communicator(host: str, port: int, rank: int, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=2)
    return PyNcclCommunicator(pg, device=device)


def init_nccl_receiver(worker, host: str, port: int) -> bool:
    """Runs in the vLLM worker: join the learner's two-rank weight group as rank 1."""
    worker._weight_comm = _communicator(host, port, 1, torch.device("cuda", torch.cuda.current_device()))
    return True


def load_from_nccl(worker, metas: list[tuple[str, tuple, str]]) -> int:
    """Runs in the vLLM worker: receive each (name, shape, dtype) broadcast by rank 0, in order, and load it."""
    comm, model = worker._weight_comm, worker.model_runner.get_model()

    def received():
        for name, shape, dtype in metas:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
            comm.broadcast(buf, src=0, stream=torch.cuda.current_stream())
            yield name, buf

    model.load_weights(weights=received())
    torch.cuda.synchronize()
    return len(metas)


class NcclWeightSender:
    """The learner's end of the weight group (rank 0). The engine joins with `init_nccl_receiver` at the
    same time (the rendezvous blocks until both are there)."""

    def __init__(self, host: str, port: int, device: int = 0):
        self.comm = _communicator(host, port, 0, torch.device("cuda", device))

    @staticmethod
    def metas(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple, str]]:
        return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named]

    def send(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for _, t in named:
            self.comm.broadcast(t.contiguous(), src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()
