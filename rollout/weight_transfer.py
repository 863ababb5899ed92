"""Weight sync: the learner's weights -> every rollout engine, bucket by bucket, without the file system.

`WeightSync.sync(version)` is the driver's one call per step (`rl.components.weight_sync` builds it from
`trainer.weight_sync`). The transports (`SENDERS`, the learner rank 0 end of each):
- `object_store` (engines on CPU, any node): each bucket is one `ray.put`; every engine fetches the buckets
  one at a time while it loads them (Ray moves them between nodes). The refs are kept until the next sync,
  so a restarted engine loads the very same objects (exact, no learner call).
- `ipc` (learner and engine on the same GPU): CUDA IPC handles of each bucket; the engine maps the learner's
  memory and copies it in.
- `nccl` (engines on other GPUs or nodes): one group of learner rank 0 + the engines (vLLM's
  `StatelessProcessGroup` + `PyNcclCommunicator`, the pattern of vLLM's RLHF example, so the engine's own
  torch.distributed world is left alone); each bucket is one broadcast of a flat byte buffer.
- `checkpoint` (the fallback, not a sender): the learner exports a HF checkpoint into the run dir and every
  engine loads it. Needed for vLLM MoE on CPU (its in-place reload corrupts the fused experts, so the engine
  restarts from the checkpoint) and for tensor-parallel engines.

Learner side (`push`): the weights travel under the learner's in-memory state-dict names (transformers 5
keeps Qwen3-MoE experts fused, `experts.gate_up_proj [E, 2I, H]`), cast to the engine's dtype, in buckets
planned from the shapes alone; a sharded (FSDP2) learner gathers one tensor at a time with
`DTensor.full_tensor()` on every rank and rank 0 sends, so no rank holds more than one bucket of gathered
weights. Engine side: the reference engine copies those names into its transformers model; vLLM's
`load_weights` wants the per-expert checkpoint names, which `checkpoint_names` makes as views (no copies).

Measured on 2 H200s through the driver's path (bench/gpu_sync.py, bench/README.md): the real-shape MoE, 3.74 GB
in bf16, with the fused experts copied straight (below), in 0.043 s (87.6 GB/s) over NCCL and 0.068 s (55.3 GB/s)
over IPC at learner world size 1 (through the per-expert path, before: 0.11-0.12 s at world size 1 and 2),
mismatch KL 2e-5 after the sync against 1.4e-3 stale; the checkpoint path 13.9 s. On CPU
(2 cores, 85M-parameter dense model, 308 MB fp32, median of 5 interleaved syncs through `WeightSync`): object
store 0.21 s vs checkpoint 0.71 s into the reference engine, 0.31 s vs 0.92 s into vLLM; with a 2-rank FSDP
learner 0.81 s vs 1.42 s (one gloo all-gather per tensor).
vLLM side (`VllmLoader`): fused expert tensors are copied straight into vLLM's fused MoE parameters where the
kernel uses them as loaded and a probe through vLLM's own per-expert `load_weights` agrees (the per-expert
calls were the ceiling in bench/README.md at 1,683 tensors); a kernel that converts experts after loading is
refused. IPC shares one flat buffer per bucket.
Not covered: tensor-parallel engines with ipc/nccl (every TP worker would join as the same rank; the config
refuses it), object_store into vLLM's multiprocess engine (its worker is not a Ray worker: on GPU use ipc or
nccl).
"""
from __future__ import annotations

import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from rewards.registry import Registry

TRANSPORTS = ("auto", "nccl", "ipc", "object_store", "checkpoint")  # trainer.weight_sync
SENDERS: Registry = Registry("weight sync transport")
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")

Meta = tuple[str, tuple, str]  # (name, shape, dtype name): what a receiver allocates before a broadcast


@dataclass(frozen=True)
class SyncSpec:
    """What the learner needs to push: the transport (a SENDERS name), the bucket size, the engine's dtype."""

    transport: str
    bucket_mb: int = 256
    dtype: str = "float32"  # the engines' weight dtype: the learner casts, so bf16 engines get half the bytes


@dataclass
class Pushed:
    """What a push returns (from learner rank 0): each engine's version, and the buckets (object store)."""

    versions: list[int | None]  # None: the engine died during the sync (the manager restarts and restores it)
    refs: list | None = None
    seconds: dict = field(default_factory=dict)  # rank 0's time in "gather" (casts + FSDP gathers) and "send"


class SyncLost(RuntimeError):
    """An engine died (or failed) during an NCCL weight sync: the learner's broadcast to it never completes
    (PyNccl has no timeout) and the group cannot be rebuilt under a running sync, so the run stops; its
    rerun resumes from the last checkpoint."""


def watch_engines(refs: list, done=None, version: int | None = None, check_every_s: float = 0.05) -> None:
    """Wait until `done()` is true (without `done`: until every ref of `refs`, the engines' pending NCCL receive
    calls, is ready), raising SyncLost as soon as one of those calls fails: a peer dying inside a broadcast
    would otherwise leave the learner waiting on the GPU forever. `done` is polled every 0.2 ms (a bucket's
    broadcast takes milliseconds: a coarser poll would cap the sync's GB/s), the engines every `check_every_s`."""
    import time

    import ray
    from ray.exceptions import RayError

    checked, next_check = set(), 0.0
    while not (done is not None and done()):
        if time.monotonic() >= next_check:
            ready, rest = ray.wait(refs, num_returns=len(refs), timeout=0 if done else check_every_s) if refs else ([], [])
            for i, ref in enumerate(refs):
                if ref in ready and ref not in checked:
                    checked.add(ref)
                    try:
                        ray.get(ref)
                    except RayError as exc:
                        raise SyncLost(f"engine {i} died or failed during the NCCL weight sync to version {version} "
                                       f"({type(exc).__name__}): a broadcast to it never completes, so the run stops; "
                                       "rerun the same command to resume from the last checkpoint") from None
            if done is None and not rest:
                return
            next_check = time.monotonic() + (check_every_s if done else 0.0)
        if done is not None:
            time.sleep(0.0002)


def engine_versions(refs: list) -> list[int | None]:
    """Each engine's version after a sync call; None for an engine that died meanwhile (not an error here:
    `rollout.manager.RolloutManager.synced` replaces it and brings the new actor to the same weights)."""
    import ray
    from ray.exceptions import RayActorError

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except RayActorError:
            out.append(None)
    return out


# -------------------------------------------------------------------------------------------------- names
def sync_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that a sync sends: a tied `lm_head.weight` is skipped (the embedding carries it, as in
    save_pretrained). FSDP2 models give DTensor shards here; `push` gathers them one at a time."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}


def checkpoint_names(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """In-memory names -> HF checkpoint names: fused experts (`experts.gate_up_proj [E, 2I, H]`,
    `experts.down_proj [E, H, I]`) are sliced into per-expert views; everything else passes as it is."""
    for name, t in named:
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


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as in the model's HF checkpoint, without copies."""
    return checkpoint_names(sync_state(model).items())


# ------------------------------------------------------------------------------------------ learner side
def _nbytes(meta: Meta) -> int:
    return math.prod(meta[1]) * getattr(torch, meta[2]).itemsize


def plan_buckets(metas: list[Meta], bucket_bytes: int) -> list[list[Meta]]:
    """Consecutive tensors grouped until a bucket would pass `bucket_bytes` (a larger tensor is a bucket alone)."""
    plan, size = [[]], 0
    for m in metas:
        if plan[-1] and size + _nbytes(m) > bucket_bytes:
            plan.append([])
            size = 0
        plan[-1].append(m)
        size += _nbytes(m)
    return [b for b in plan if b]


def push(state: dict[str, torch.Tensor], spec: SyncSpec, engines: list, version: int, send: bool = True,
         cache: dict | None = None) -> Pushed | None:
    """Stream `state` (from `sync_state`) to `engines` (Ray actor handles of `rollout.engine.EngineHost`) through
    `spec.transport`. DTensor entries are gathered one at a time, so every rank of a sharded learner calls this
    in step and only the rank with `send` talks to the engines; `cache` keeps a transport's setup (the NCCL
    group) between syncs. Returns the sender's `Pushed` (None where `send` is False)."""
    dtype = getattr(torch, spec.dtype)
    plan = plan_buckets([(n, tuple(t.shape), spec.dtype) for n, t in state.items()], spec.bucket_mb << 20)
    sender = SENDERS.get(spec.transport)(engines, {} if cache is None else cache) if send else None
    clock = {"gather": 0.0, "send": 0.0}
    if sender:
        with _timed(clock, "send"):
            sender.begin(plan, version)
    for bucket in plan:
        # FSDP2 shards: cast first (a bf16 gather moves half an fp32 one's bytes), and issue every gather of
        # the bucket before any result is used (async collectives; with one waited-for fp32 gather per tensor,
        # world 2 synced the 0.85B MoE 3x slower than world 1). A collective: every rank, in the same order.
        with _timed(clock, "gather", sync=send):
            tensors = [(name, _gathered(state[name].detach().to(dtype))) for name, _, _ in bucket]
            tensors = [(name, t.wait() if hasattr(t, "wait") else t) for name, t in tensors]
        if sender:
            with _timed(clock, "send"):
                sender.send(tensors)
        del tensors  # gathered copies live one bucket long
    if not sender:
        return None
    with _timed(clock, "send"):
        pushed = sender.finish(version)
    pushed.seconds = clock
    return pushed


@contextmanager
def _timed(clock: dict, key: str, sync: bool = True):
    """Adds the block's wall time to clock[key]; with `sync` on GPU, after the queued work is done (`push`'s
    split of a sync: only the sending rank's clock is read, the others skip the host sync)."""
    t0 = time.perf_counter()
    yield
    if sync and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    clock[key] += time.perf_counter() - t0


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor shard (FSDP2), as an async collective's tensor (`.wait()` it, or it waits on
    first use); any other tensor as it is."""
    if not hasattr(t, "full_tensor"):
        return t
    from torch.distributed.tensor import Replicate

    return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim, async_op=True).to_local()


def pack(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple, object]]:
    """Tensors as flat byte arrays (numpy): Ray stores them without pickling their data and an engine on the
    same node reads them in place (bf16 has no numpy dtype, hence bytes + dtype + shape)."""
    return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape),
             t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()) for n, t in bucket]


def unpack(packed: list[tuple[str, str, tuple, object]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, dtype, shape, data in packed:
        with warnings.catch_warnings():  # the object store's arrays are read-only; loading only reads them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(data)
        yield name, t.view(getattr(torch, dtype)).reshape(shape)


def tensors_from_refs(refs: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Engine side of the object store: fetch one bucket at a time (the previous one is dropped)."""
    import ray

    for ref in refs:
        yield from unpack(ray.get(ref))


@SENDERS.register("object_store")
class ObjectStoreSender:
    def __init__(self, engines: list, cache: dict):
        self.engines, self.refs = engines, []

    def begin(self, plan: list[list[Meta]], version: int) -> None:
        pass

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        import ray

        self.refs.append(ray.put(pack(bucket)))

    def finish(self, version: int) -> Pushed:
        # The refs travel inside a list, so Ray does not resolve them up front: each engine fetches as it loads.
        return Pushed(engine_versions([e.update_weights_from_refs.remote(self.refs, version) for e in self.engines]), self.refs)


@SENDERS.register("ipc")
class IpcSender:
    def __init__(self, engines: list, cache: dict):
        self.engines = engines

    def begin(self, plan: list[list[Meta]], version: int) -> None:
        pass

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        import ray

        flat = flatten([t for _, t in bucket])  # one IPC handle per bucket: each one costs the engine a mapping
        shared = [(metas(bucket), ipc_handle(flat))]
        ray.get([e.update_weights_from_ipc.remote(shared, None) for e in self.engines])  # `flat` lives until all copied

    def finish(self, version: int) -> Pushed:
        import ray

        return Pushed(ray.get([e.update_weights_from_ipc.remote([], version) for e in self.engines]))


@SENDERS.register("nccl")
class NcclSender:
    """Learner rank 0 is rank 0 of a group with the engines (engine i is rank i + 1), made at the first sync to
    this set of engines and kept in `cache` (a restarted engine makes a new set, hence a new group)."""

    def __init__(self, engines: list, cache: dict):
        import ray

        self.engines = engines
        key = tuple(e._actor_id.hex() for e in engines)
        if cache.get("nccl_key") != key:
            host, port = ray.util.get_node_ip_address(), free_port()
            joins = [e.init_weight_group.remote(host, port, i + 1, len(engines) + 1) for i, e in enumerate(engines)]
            cache["nccl"] = NcclWeightSender(host, port, torch.cuda.current_device(), world_size=len(engines) + 1)
            ray.get(joins)
            cache["nccl_key"] = key
        self.comm = cache["nccl"]

    def begin(self, plan: list[list[Meta]], version: int) -> None:
        self.version = version
        self.pending = [e.update_weights_from_nccl.remote(plan, version) for e in self.engines]

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.comm.send_bucket([t for _, t in bucket], wait=lambda done: watch_engines(self.pending, done, self.version))

    def finish(self, version: int) -> Pushed:
        import ray

        watch_engines(self.pending, version=version)
        return Pushed(ray.get(self.pending))


def free_port(host: str = "") -> int:
    """A TCP port free on this node now (the caller binds it soon after; a race is possible, as everywhere)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def placement() -> tuple[str, tuple[str, ...]]:
    """(Ray node id, GPU ids on that node) of the calling actor: two actors on the same GPU give equal tuples."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), tuple(sorted(str(g) for g in ctx.get_accelerator_ids().get("GPU", [])))


# ----------------------------------------------------------------------------- CUDA IPC and NCCL (vLLM side)
_VLLM_FUSED = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}  # HF fused experts -> vLLM's FusedMoE


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bucket as one flat byte buffer (the receiver splits it by the bucket's metas: `split_bucket`)."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def metas(named: list[tuple[str, torch.Tensor]]) -> list[Meta]:
    """What a receiver needs to split a flattened bucket: (name, shape, dtype name) per tensor."""
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named]


def split_bucket(buf: torch.Tensor, metas: list[Meta]) -> list[tuple[str, torch.Tensor]]:
    """`flatten`'s inverse: (name, view of `buf`) per meta."""
    sizes = [_nbytes(m) for m in metas]
    return [(name, chunk.view(getattr(torch, dtype)).view(shape)) for (name, shape, dtype), chunk in zip(metas, buf.split(sizes))]


# vLLM's unquantized MoE kernels that use the experts as loaded; the others convert them once after the
# initial load (FlashInfer CUTLASS swaps gate and up, FlashInfer TRT-LLM and ROCm AITER shuffle), which
# neither `load_weights` nor a direct copy redoes.
_AS_LOADED = ("TRITON", "BATCHED_TRITON")
_CONVERTING = ("FLASHINFER_CUTLASS", "FLASHINFER_TRTLLM", "AITER")


class VllmLoader:
    """Loads the learner's buckets (in-memory names) into a vLLM model. A fused expert tensor (`experts.
    gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) is copied straight into vLLM's fused parameter
    (`experts.w13_weight`, `experts.w2_weight`; from vLLM 0.26 on a `routed_experts` child of the MoE
    layer) when the kernel uses the experts as loaded (`_AS_LOADED`) and the layouts agree: at the first
    tensor of each kind a random probe goes through vLLM's own per-expert `load_weights` and the parameter
    must equal it. Otherwise experts take the per-expert path; a kernel known to convert them after the
    initial load is refused (a tensor sync would leave them unconverted: the checkpoint transport reloads
    through vLLM's full path). Everything else goes through `load_weights`, one call per bucket.
    `direct_copies` counts the tensors that took the direct path (bench/gpu_sync.py prints it)."""

    def __init__(self, model):
        self.model = model
        self.direct: dict[str, bool] = {}  # fused kind -> copied straight (decided at its first tensor)
        self.direct_copies = 0

    def _fused_param(self, prefix: str, kind: str):
        """vLLM's fused parameter for `prefix`.{gate_up_proj, down_proj}, or None (another vLLM layout)."""
        try:
            layer = self.model.get_submodule(prefix)
        except AttributeError:
            return None, None
        experts = getattr(layer, "routed_experts", layer)
        return experts, getattr(experts, _VLLM_FUSED[kind], None)

    def _decide(self, experts, target: torch.Tensor, name: str, t: torch.Tensor) -> bool:
        method = getattr(experts, "quant_method", None)
        backend = getattr(getattr(method, "unquantized_backend", None), "name", None)
        if backend in _CONVERTING or (method is not None and "Unquantized" not in type(method).__name__):
            raise RuntimeError(f"vLLM's MoE kernel ({type(method).__name__}, backend {backend}) converts the expert "
                               "weights after loading, which a tensor weight sync does not redo: use "
                               "trainer.weight_sync=checkpoint")
        if backend not in _AS_LOADED or tuple(target.shape) != tuple(t.shape):
            return False
        probe = torch.randn(t.shape, generator=torch.Generator(device=t.device).manual_seed(0), device=t.device).to(t.dtype)
        self.model.load_weights(weights=checkpoint_names([(name, probe)]))
        return bool(torch.equal(target.data, probe.to(target.dtype)))

    def load(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        rest = []
        for name, t in bucket:
            m = _FUSED_EXPERTS.match(name)
            experts, target = self._fused_param(m[1], m[2]) if m else (None, None)
            if target is not None and m[2] not in self.direct:
                self.direct[m[2]] = self._decide(experts, target, name, t)
            if target is not None and self.direct[m[2]]:
                target.data.copy_(t)
                self.direct_copies += 1
            else:
                rest.append((name, t))
        if rest:
            self.model.load_weights(weights=checkpoint_names(rest))


def loader_stats(worker) -> dict:
    """Runs in the vLLM worker: which fused kinds were copied straight, and how many tensors so far."""
    loader = getattr(worker, "_weight_loader", None)
    return {"direct": dict(loader.direct), "direct_copies": loader.direct_copies} if loader else {}


def _loader(worker) -> VllmLoader:
    if getattr(worker, "_weight_loader", None) is None:
        worker._weight_loader = VllmLoader(worker.model_runner.get_model())
    return worker._weight_loader


def ipc_handle(t: torch.Tensor) -> tuple:
    """A CUDA IPC handle (picklable, a few hundred bytes). The caller keeps `t` alive until the engine has
    loaded it."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(t.detach())


def _rebuild(handle: tuple) -> torch.Tensor:
    fn, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()  # storage device: the consumer's index of the same GPU
    return fn(*args)


def load_from_ipc(worker, shared: list[tuple[list[Meta], tuple]]) -> int:
    """Runs in the vLLM worker (collective_rpc): map each bucket's flat buffer, load it, return the count."""
    loader = _loader(worker)
    for metas, handle in shared:
        loader.load(split_bucket(_rebuild(handle), metas))
    torch.cuda.synchronize()
    return sum(len(metas) for metas, _ in shared)


def _communicator(host: str, port: int, rank: int, device, world_size: int = 2):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(pg, device=device)


def init_nccl_receiver(worker, host: str, port: int, rank: int = 1, world_size: int = 2) -> bool:
    """Runs in the vLLM worker: join the learner's weight group as `rank`."""
    worker._weight_comm = _communicator(host, port, rank, torch.device("cuda", torch.cuda.current_device()), world_size)
    return True


def load_from_nccl(worker, plan: list[list[Meta]]) -> int:
    """Runs in the vLLM worker: receive the buckets of `plan` (lists of (name, shape, dtype), as broadcast by
    `NcclWeightSender.send_bucket`) and load each as it arrives."""
    comm, loader = worker._weight_comm, _loader(worker)
    for bucket in plan:
        buf = torch.empty(sum(_nbytes(m) for m in bucket), dtype=torch.uint8, device="cuda")
        comm.broadcast(buf, src=0, stream=torch.cuda.current_stream())
        loader.load(split_bucket(buf, bucket))
    torch.cuda.synchronize()
    return sum(len(b) for b in plan)


class NcclWeightSender:
    """The learner's end of the weight group (rank 0). The engines join with `init_nccl_receiver` at the
    same time (the rendezvous blocks until all are there)."""

    def __init__(self, host: str, port: int, device: int = 0, world_size: int = 2):
        self.comm = _communicator(host, port, 0, torch.device("cuda", device), world_size)

    def send_bucket(self, tensors: list[torch.Tensor], wait) -> None:
        """One broadcast for the whole bucket, as bytes (the receiver splits it by the bucket's metas).
        `wait(done)` waits until `done()` (the broadcast finished on the GPU) while it watches the receivers
        (`watch_engines`): a receiver that died leaves the broadcast pending forever."""
        flat = flatten(tensors)
        self.comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        finished = torch.cuda.Event()
        finished.record(torch.cuda.current_stream())
        wait(finished.query)
        del flat  # alive until the broadcast has read it


# ------------------------------------------------------------------------------------------- driver side
class WeightSync:
    """The driver's weight sync. `sync(version)` brings every engine of `engines` (a `RolloutManager`) to the
    learner's current weights and checks that each reports `version` (StaleWeightsError otherwise); it also
    tells the manager how a restarted engine catches up. `learner` is anything with `push_weights(spec,
    engine_actors, version) -> Pushed` and `export_hf(dir, bucket_mb, version=)` (rl.learner.LearnerGroup)."""

    def __init__(self, learner, engines, spec: SyncSpec, checkpoint_dir: str):
        self.learner, self.engines, self.spec, self.checkpoint_dir = learner, engines, spec, checkpoint_dir

    @property
    def transport(self) -> str:
        return self.spec.transport

    def sync(self, version: int) -> dict[str, float]:
        """Returns where the sync's time went, in seconds: `gather` and `send` on learner rank 0 (`push`; `send`
        includes waiting for an engine still busy generating, and the engines' loads), `call` the rest of the
        learner call, `engines` the manager's bookkeeping after it (restarting an engine that died counts here);
        the checkpoint transport: `export` and `load`."""
        t0 = time.perf_counter()
        if self.transport == "checkpoint":
            path = self.learner.export_hf(self.checkpoint_dir, self.spec.bucket_mb, version=version)
            t1 = time.perf_counter()
            self.engines.update_weights(path, version)
            return {"export": t1 - t0, "load": time.perf_counter() - t1}
        pushed = self.learner.push_weights(self.spec, self.engines.engines, version)
        t1 = time.perf_counter()
        self.engines.synced(version, pushed.versions, self._restorer(pushed, version))
        return {**pushed.seconds, "call": t1 - t0 - sum(pushed.seconds.values()), "engines": time.perf_counter() - t1}

    def _restorer(self, pushed: Pushed, version: int):
        import ray

        if pushed.refs is not None:  # the same objects: exact, and the learner is not involved
            refs = pushed.refs
            return lambda actor: ray.get(actor.update_weights_from_refs.remote(refs, version))
        # GPU transports keep nothing between syncs: the learner pushes again. In async mode the learner may
        # have trained since, so such an engine can hold weights one step newer than `version` until the next
        # sync (its samples count as one step staler than they are: dropped early, never trained on stale).
        return lambda actor: self.learner.push_weights(self.spec, [actor], version)
