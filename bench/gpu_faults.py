"""Faults on the real path (issue 21 item 5), each through `python -m rl.train` with a small config:

1. `engine_killed_in_sync`: the engine (its Ray actor's process and every process under it, i.e. vLLM's engine
   core) is SIGKILLed by learner rank 0 just before it sends bucket 2 of the weight sync to version 3 (GPU:
   NCCL, the engine on the other GPU; CPU: Ray's object store, 1 MB buckets).
2. `learner_rank_killed`: learner rank 1 of 2 SIGKILLs itself on entering the metrics all-reduce of step 3's
   train_step, so rank 0 is inside that collective with a dead peer (GPU: NCCL, `trainer.learner_gpus=0.7
   rollout.engine_gpus=0.3`, the engine beside one of the ranks; CPU: gloo).
3. `engine_oom`: the engine runs out of memory in the middle of step 3's generation (GPU: inside vLLM's model
   runner, in its engine-core process, a real allocation of twice the device's memory, so the CUDA caching
   allocator raises a genuine `torch.OutOfMemoryError` and vLLM's own failure path runs: the engine core dies
   and the actor's `generate` raises `EngineDeadError`, as on a real OOM; CPU: the reference engine's third
   decode step raises `torch.OutOfMemoryError`, the message a CUDA OOM has). An OOM that kills the process
   instead (the kernel's OOM killer) is case 1's fault outside a sync.
Optional (`--cases ...`): `engine_actor_killed_in_sync`, case 1 killing the actor's process only, which leaves
vLLM's engine core (the NCCL receiver on GPU) orphaned, as a `ray.kill` or Ray's memory monitor would; and, on
CPU, `engine_oom_vllm`: case 3 in vLLM's CPU engine with its engine core in a process of its own as on GPU
(`VLLM_ENABLE_V1_MULTIPROCESSING=1`), so the OOM reaches the driver as `EngineDeadError`.

The faults are injected from outside the production code: a `sitecustomize.py` written into a temporary dir
that goes first on PYTHONPATH (rl.cluster passes PYTHONPATH on to Ray's workers, and vLLM's engine core
inherits it), which wraps the functions named above as their modules are imported and fires once (an arm file
claimed by an atomic rename). It also records, with timestamps, the driver's engine restarts
(`RolloutManager._restart`) and each engine's and learner's pid.

Each case: the faulted run, the time from the fault to the driver's restart (`restart_begin`) or to its exit,
and the check: a clear exit (non-zero code, an `error: ...` line ending stderr, no traceback) within 60 s, or
a restart within 60 s after which the run completes with no aborted sample (every prompt keeps its n samples:
`rollout.engine.check_groups` held in every step). An exit is followed by a rerun of the same command (no fault):
it resumes from the last checkpoint and must finish. Then, as tests/rl/test_multinode.py checks it, every
step is in consumed.jsonl once and its prompts are the prompt stream's (`PromptStream`), hence the same
consumed-prompt multiset as an uninterrupted run. Processes of the run's Ray session left after each run are
reported and killed (by pid). A run past its limit is killed with its process group; a fault not detected
within `--hang-s` counts as a hang. Each case's failure is recorded and the next case runs.

What the driver does (expected): 1, NCCL: learner rank 0 waits for each broadcast on a CUDA event while it
watches the receivers' pending calls (`rollout.weight_transfer.watch_engines`), since a broadcast to a dead
peer never completes (PyNccl has no timeout): SyncLost, a clear exit, the rerun resumes; object store: the
engine is replaced and loads the same objects (restart). 2: `LearnerGroup` fails at the first rank that dies
(Ray sees the process go; rank 0 would wait in NCCL until its 300 s collective timeout): a clear exit. 3: the
manager replaces an engine whose call raised an OOM or `EngineDeadError` and retries its prompts (restart).

    python bench/gpu_faults.py            # 2 GPUs, vLLM (about 5 minutes; --deadline 480 s in all)
    python bench/gpu_faults.py --cpu      # the analogous cases on CPU (about 2 minutes on 2 cores)

Not covered: a Ray node lost (tests/rl/test_multinode.py, CPU), an engine that dies while an NCCL group is being
formed (the rendezvous blocks without a timeout), a dead engine during an IPC sync (the learner's call should
fail with the engine's ActorDiedError: an exit, not a restart; untested), tensor-parallel engines.

Results: a table on stdout and gpu_faults.json (cpu_faults.json) in $OUT or the current dir, with each run's
log in gpu_faults_logs/ beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
SMALL = {"distill.enabled": "false", "data.prompts_per_step": "4", "rollout.n": "4", "rollout.max_tokens": "12",
         "eval.max_prompts": "4", "eval.k": "2", "trainer.micro_batch_size": "16", "trainer.eval_every": "0",
         "trainer.save_every": "1", "logging.wandb": "false", "logging.plots": "false", "logging.progress": "false"}
# GPU: vLLM without CUDA graphs (every run and every restarted engine starts one: eager starts faster), the
# learner and the engine on a GPU each unless a case says otherwise, vLLM's share small and its KV cache fixed
# so that it starts beside other benches on the same GPUs (bench/gpu_session.sh runs this one beside the
# ablations; vLLM would otherwise count their memory as its own while it profiles); lingua is not on the GPU image.
GPU = {"rollout": "vllm", "rollout.enforce_eager": "true", "trainer.learner_gpus": "1", "rollout.engine_gpus": "1",
       "rollout.gpu_memory_utilization": "0.15", "rollout.extra.kv_cache_memory_bytes": str(2 << 30)}
GPU_ARGS = ["~rewards.math.language"]
CPU = {"cluster.num_cpus": "4"}  # logical CPUs: two learner ranks and an engine fit on 2 cores


@dataclass
class Case:
    name: str
    fault: dict  # spec.json for the sitecustomize: kind and parameters
    gpu: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    cpu_env: dict = field(default_factory=dict)


CASES = [
    # Buckets of 64 MB of a 157M-parameter model (bf16, 314 MB: the 151,936 vocabulary of Qwen3 at hidden 512):
    # the 250 MB still to send after the kill exceed what NCCL can buffer for a dead peer, so the broadcast
    # really waits on it (a tiny model's few MB would just land in NCCL's buffers).
    Case("engine_killed_in_sync", {"kind": "sync_kill", "at_version": 3, "bucket": 2, "tree": True},
         gpu={"model.tiny_overrides": "{vocab_size: 151936, hidden_size: 512}", "trainer.sync_bucket_mb": "64"},
         cpu={"trainer.sync_bucket_mb": "1"}),
    Case("learner_rank_killed", {"kind": "rank_kill", "rank": 1, "at_step": 2},
         gpu={"trainer.world_size": "2", "trainer.learner_gpus": "0.7", "rollout.engine_gpus": "0.3"},
         cpu={"trainer.world_size": "2"}),
    Case("engine_oom", {"kind": "oom", "at_version": 2, "n": 4, "after_calls": 3}),
]
OPTIONAL = [
    Case("engine_actor_killed_in_sync", {"kind": "sync_kill", "at_version": 3, "bucket": 2, "tree": False},
         gpu={"model.tiny_overrides": "{vocab_size: 151936, hidden_size: 512}", "trainer.sync_bucket_mb": "64"},
         cpu={"trainer.sync_bucket_mb": "1"}),
    # CPU only (on GPU it is engine_oom): vLLM's engine core in a process of its own, as on GPU, so the OOM in its
    # model runner kills it and the actor's generate raises EngineDeadError (the in-process engine would raise
    # the OOM itself); the checkpoint transport, as object_store feeds the in-process engine only.
    Case("engine_oom_vllm", {"kind": "oom", "at_version": 2, "n": 4, "after_calls": 3},
         cpu={"rollout": "vllm", "model": "tiny_dense", "trainer.weight_sync": "checkpoint"},
         cpu_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}),
]

SITECUSTOMIZE = r'''
"""Fault injection for one run of bench/gpu_faults.py (written by it; first on PYTHONPATH, so every Python
process of the run imports it). Patches functions as their modules are imported; the fault fires once."""
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    with open(os.path.join(HERE, "spec.json")) as _f:
        SPEC = json.load(_f)
except (OSError, ValueError):
    SPEC = {}
KIND = SPEC.get("kind")
STATE = {"calls": 0, "kill_at_all_reduce": False}


def state():
    """This process's STATE: Ray runs an actor's methods from a pickled copy of the class, whose patched methods
    carry copies of these globals, so shared state is looked up in the imported module."""
    return sys.modules["sitecustomize"].STATE


def event(name, **kw):
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": name, **kw}) + "\n"
    fd = os.open(os.path.join(HERE, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def armed(stage="arm"):
    return os.path.exists(os.path.join(HERE, stage))


def claim(stage="arm"):
    """Only one process wins the rename: the fault fires once in the whole run."""
    try:
        os.rename(os.path.join(HERE, stage), os.path.join(HERE, f"claimed-{stage}-{os.getpid()}"))
        return True
    except OSError:
        return False


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return []


def _alive(pid):
    s = _state(pid)
    return bool(s) and s[0] not in ("Z", "X")


def _tree(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _state(int(d))
            if len(s) > 1:
                kids.setdefault(int(s[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def kill_engines(tree):
    """SIGKILL every live engine actor (pids/engine-*), with its children when `tree`; wait until they are gone."""
    pids_dir = os.path.join(HERE, "pids")
    names = os.listdir(pids_dir) if os.path.isdir(pids_dir) else []
    engines = [int(n.split("-")[1]) for n in names if n.startswith("engine-")]
    victims = [p for e in engines if _alive(e) for p in (_tree(e) if tree else [e])]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 10
    while any(_alive(p) for p in victims) and time.time() < deadline:
        time.sleep(0.01)
    return victims


def _pidfile(name):
    d = os.path.join(HERE, "pids")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"{name}-{os.getpid()}"), "w").close()


# ----------------------------------------------------------------------------------------------- patches
def on_engine(m):
    init, gen = m.EngineHost.__init__, m.EngineHost.generate

    def __init__(self, cfg):
        _pidfile("engine")
        event("engine_start")
        init(self, cfg)

    def generate(self, prompts, sampling):
        # The OOM's gate opens in the engine actor, where the policy version and the kind of call are known;
        # the engine's own code then fails mid-generation (in this process or in vLLM's engine core).
        if (KIND == "oom" and sampling.n == SPEC["n"] and self.engine.policy_version >= SPEC["at_version"]
                and armed() and claim()):
            open(os.path.join(HERE, "live"), "w").close()
        return gen(self, prompts, sampling)

    m.EngineHost.__init__, m.EngineHost.generate = __init__, generate


def _oom_due():
    if not armed("live"):
        return False
    state()["calls"] += 1
    return state()["calls"] >= SPEC["after_calls"] and claim("live")


def on_reference_engine(m):
    process = m.process_logits

    def process_logits(*a, **k):
        if KIND == "oom" and _oom_due():
            import torch

            event("fault", what="torch.OutOfMemoryError raised in the reference engine's decode step")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by bench/gpu_faults.py)")
        return process(*a, **k)

    m.process_logits = process_logits


def on_vllm_runner(m):
    run = m.GPUModelRunner.execute_model

    def execute_model(self, *a, **k):
        if KIND == "oom" and _oom_due():
            import torch

            if not torch.cuda.is_available():  # vLLM on CPU (a check of this hook): raise what CUDA would
                event("fault", what="torch.OutOfMemoryError raised in vLLM's CPU model runner")
                raise torch.OutOfMemoryError("CUDA out of memory (injected by bench/gpu_faults.py)")
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            event("fault", what=f"allocating {2 * total >> 30} GiB in vLLM's model runner (a real CUDA OOM)")
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # raises torch.OutOfMemoryError
        return run(self, *a, **k)

    m.GPUModelRunner.execute_model = execute_model


def on_weight_transfer(m):
    if KIND != "sync_kill":
        return
    for name in ("nccl", "ipc", "object_store"):
        cls = m.SENDERS.get(name)
        begin, send = cls.begin, cls.send

        def _begin(self, plan, version, begin=begin):
            self._fault = {"version": version, "buckets": len(plan), "sent": 0}
            return begin(self, plan, version)

        def _send(self, bucket, send=send, transport=name):
            f = self._fault
            f["sent"] += 1
            if (f["version"] >= SPEC["at_version"] and f["sent"] == min(SPEC["bucket"], f["buckets"])
                    and armed() and claim()):
                t = time.time()
                victims = kill_engines(SPEC.get("tree", True))
                event("fault", t_fault=t, killed=victims, transport=transport,
                      what=f"engine SIGKILLed before bucket {f['sent']}/{f['buckets']} of the sync to version {f['version']}")
            return send(self, bucket)

        cls.begin, cls.send = _begin, _send


def on_learner(m):
    init, step = m.Learner.__init__, m.Learner.train_step

    def __init__(self, cfg, rank=0, *a, **k):
        _pidfile(f"learner{rank}")
        event("learner_start", rank=rank)
        init(self, cfg, rank, *a, **k)

    def train_step(self, *a, **k):
        if KIND == "rank_kill" and self.rank == SPEC["rank"] and self.step >= SPEC["at_step"] and armed() and claim():
            state()["kill_at_all_reduce"] = True
        return step(self, *a, **k)

    m.Learner.__init__, m.Learner.train_step = __init__, train_step
    if KIND == "rank_kill":
        import torch.distributed as dist

        all_reduce = dist.all_reduce

        def _all_reduce(*a, **k):
            if state()["kill_at_all_reduce"]:
                event("fault", what=f"learner rank {SPEC['rank']} SIGKILLed entering its train_step all-reduce")
                os.kill(os.getpid(), signal.SIGKILL)
            return all_reduce(*a, **k)

        dist.all_reduce = _all_reduce


def on_manager(m):
    restart = m.RolloutManager._restart

    def _restart(self, i):
        event("restart_begin", engine=i)
        restart(self, i)
        event("restart_end", engine=i)

    m.RolloutManager._restart = _restart


PATCHES = {"rollout.engine": on_engine, "rollout.reference_engine": on_reference_engine,
           "vllm.v1.worker.gpu_model_runner": on_vllm_runner, "vllm.v1.worker.gpu.model_runner": on_vllm_runner,  # V1, V2
           "rollout.weight_transfer": on_weight_transfer,
           "rl.learner": on_learner, "rollout.manager": on_manager}


class _AfterImport:
    """A meta-path finder that lets the real finders find the module and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                PATCHES[name](module)
                event("patched", module=name)
            except Exception as exc:  # noqa: BLE001  reported, never breaks the run
                event("patch_failed", module=name, error=repr(exc))

        loader.exec_module = exec_module
        return spec


if KIND:
    sys.meta_path.insert(0, _AfterImport())
'''


# ------------------------------------------------------------------------------------------------- runs
LIMITS = {"deadline": float("inf"), "stop": None}  # the whole script's end (--deadline) and a signal's reason


def left_s() -> float:
    return LIMITS["deadline"] - time.time()


@dataclass
class Run:
    rc: int | None = None
    start: float = 0.0
    end: float | None = None
    killed: str | None = None  # why the bench killed it
    lines: list = field(default_factory=list)  # (time, stream, line)
    leftovers: list = field(default_factory=list)

    def text(self, stream: str) -> str:
        return "".join(line for _, s, line in self.lines if s == stream)


def overrides(case: Case, cpu: bool, run_dir: Path) -> list[str]:
    keys = {**SMALL, **(CPU if cpu else GPU), **(case.cpu if cpu else case.gpu), "trainer.steps": str(STEPS),
            "trainer.run_dir": str(run_dir)}
    return ["--config-name", "quickstart", *(([] if cpu else GPU_ARGS)), *(f"{k}={v}" for k, v in keys.items())]


def launch(argv: list[str], env: dict, log: Path, limit_s: float, fault_dir: Path | None, hang_s: float) -> Run:
    """Run `python -m rl.train argv` in its own process group; kill the group at `limit_s`, or `hang_s` after
    the fault when the driver has neither restarted an engine nor exited by then."""
    run = Run(start=time.time())
    proc = subprocess.Popen([sys.executable, "-m", "rl.train", *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def read(stream, name):
        for line in stream:
            run.lines.append((time.time(), name, line))

    def wait():
        proc.wait()
        run.end = time.time()

    readers = [threading.Thread(target=read, args=(s, n), daemon=True) for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]
    waiter = threading.Thread(target=wait, daemon=True)
    for t in (*readers, waiter):
        t.start()
    while waiter.is_alive():
        now = time.time()
        ev = events(fault_dir) if fault_dir else []
        fault = fault_time(ev)
        restarted = fault is not None and any(e["event"] == "restart_begin" and e["t"] >= fault for e in ev)
        if LIMITS["stop"]:
            run.killed = LIMITS["stop"]
        elif now - run.start > limit_s:
            run.killed = f"past the run limit of {limit_s:.0f} s"
        elif left_s() < 0:
            run.killed = "past the script's --deadline"
        elif fault is not None and not restarted and now - fault > hang_s:
            run.killed = f"no exit or restart {hang_s:.0f} s after the fault"
        if run.killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        waiter.join(0.2)
    waiter.join(60)  # a process stuck in the GPU driver may take a while to die
    for t in readers:  # rl.cluster's watchdog shares stderr until it has swept (after a kill)
        t.join(15)
    run.rc = proc.returncode
    log.write_text("".join(f"{t - run.start:8.2f} {s} {line}" for t, s, line in run.lines))
    return run


def events(fault_dir: Path) -> list[dict]:
    path = fault_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # being written
            pass
    return out


def fault_time(ev: list[dict]) -> float | None:
    return next((e.get("t_fault", e["t"]) for e in ev if e["event"] == "fault"), None)


def sweep(ray_tmp: Path) -> list[str]:
    """Processes of the run's Ray session (they name its dir or hold a file under it: rl.cluster's test)
    still there a few seconds after the driver's exit; killed by pid, and returned as 'pid cmdline'."""
    from rl.cluster import _in_session, _processes

    found: list[int] = []
    for _ in range(20):  # rl.cluster's watchdog may still be sweeping after a kill -9 of the driver
        found = [p for p in _processes() if _in_session(p, str(ray_tmp))]
        if not found:
            return []
        time.sleep(0.5)
    out = []
    for pid in found:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            os.kill(pid, signal.SIGKILL)
            out.append(f"{pid} {cmd}")
        except OSError:
            pass
    return out


def gpu_apps() -> list[str]:
    try:
        res = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- checks
def rows(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def expected_prompts(run_dir: Path) -> list[list[str]]:
    """The prompt stream's first STEPS steps for this run's config (config.yaml), as rl.train draws them."""
    from omegaconf import OmegaConf

    from rl.components import setup
    from rl.config import to_schema
    from rl.data import PromptStream

    cfg = to_schema(OmegaConf.load(run_dir / "config.yaml"), validated=False)
    stream = PromptStream(setup(cfg).train_prompts, cfg.data.shuffle_seed)
    return [[p.source for p in stream.next(cfg.data.prompts_per_step)] for _ in range(STEPS)]


def consumed_check(run_dir: Path) -> tuple[bool, str]:
    consumed = rows(run_dir, "consumed.jsonl")
    steps = [r["step"] for r in consumed]
    if steps != list(range(1, STEPS + 1)):
        return False, f"consumed.jsonl steps {steps}, want 1..{STEPS} once each"
    want, got = expected_prompts(run_dir), [r["prompts"] for r in consumed]
    same_multiset = Counter(p for ps in got for p in ps) == Counter(p for ps in want for p in ps)
    if got != want:
        return False, f"prompts differ from the stream's (same multiset: {same_multiset})"
    return True, "consumed prompts = the stream's, step by step"


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(text: str) -> str:
    """The driver's one-line error (`error: ...`) among the last lines of its stderr ('' if none): a line
    another process prints at exit (a resource tracker's warning) may follow it."""
    lines = [line for line in text.splitlines() if line.strip()][-5:]
    return next((line for line in reversed(lines) if line.startswith("error: ")), "")


def latest_step(run_dir: Path) -> int | None:
    link = run_dir / "checkpoints" / "latest"
    try:
        return int(os.readlink(link).rsplit("_", 1)[1]) if link.is_symlink() and (link / "COMPLETE").is_file() else None
    except (OSError, ValueError, IndexError):
        return None


def run_case(case: Case, cpu: bool, work: Path, logs: Path, limit_s: float, hang_s: float) -> dict:
    run_dir, fault_dir = work / case.name, work / f"{case.name}-fault"
    ray_tmp = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    fault_dir.mkdir(parents=True)
    (fault_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (fault_dir / "spec.json").write_text(json.dumps(case.fault))
    (fault_dir / "arm").write_text("")
    argv = overrides(case, cpu, run_dir)
    base = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1", **(case.cpu_env if cpu else {})}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    res: dict = {"case": case.name, "fault": case.fault, "command": "python -m rl.train " + " ".join(argv)}
    try:
        run = launch(argv, {**base, "PYTHONPATH": f"{fault_dir}{os.pathsep}{path}"}, logs / f"{case.name}-fault.log",
                     limit_s, fault_dir, hang_s)
        run.leftovers = sweep(ray_tmp)
        ev = events(fault_dir)
        fault = fault_time(ev)
        restarts = [e for e in ev if e["event"] == "restart_begin" and fault is not None and e["t"] >= fault]
        err = run.text("err")
        res.update(rc=run.rc, wall_s=round((run.end or time.time()) - run.start, 1), killed=run.killed,
                   transport=next((line.split("trainer.weight_sync=")[1].split()[0] for _, _, line in run.lines
                                   if "trainer.weight_sync=" in line), None),
                   fault_event=next((e for e in ev if e["event"] == "fault"), None),
                   patched=sorted({e["module"] for e in ev if e["event"] == "patched"}),
                   patch_failed=[e for e in ev if e["event"] == "patch_failed"],
                   restarts=len(restarts), last_stderr_line=last_line(err)[:300], error_line=error_line(err)[:300],
                   leftovers=run.leftovers,
                   restart_line=next((line.strip() for _, s, line in run.lines if s == "err" and line.startswith("engine ")), ""),
                   traceback_in_stderr="Traceback (most recent call last)" in err,
                   gpu_apps_after=[] if cpu else gpu_apps())  # every process on the GPUs, other benches' too
        metrics = [r for r in rows(run_dir, "metrics.jsonl") if "train/loss" in r]
        res["aborted_samples"] = sum(r.get("rollout/aborted", 0) for r in metrics)
        if fault is None:
            res.update(outcome="fault did not fire" + (f" (run killed: {run.killed})" if run.killed else ""), detect_s=None, ok=False)
        elif run.killed:
            res.update(outcome="hang (killed)", detect_s=None, ok=False)
        elif restarts:
            res["detect_s"] = round(restarts[0]["t"] - fault, 2)
            res["outcome"] = "restart" if run.rc == 0 else f"restart, then exit {run.rc}"
            res["ok"] = run.rc == 0 and res["detect_s"] <= 60 and res["aborted_samples"] == 0
        else:
            res["detect_s"] = round(run.end - fault, 2)
            clear = run.rc != 0 and bool(res["error_line"]) and not res["traceback_in_stderr"]
            res["outcome"] = ("clear exit" if clear else "unclear exit") + f" (rc {run.rc})" if run.rc else "completed, no restart seen"
            res["ok"] = clear and res["detect_s"] <= 60
        if (run.rc != 0 or run.killed) and (LIMITS["stop"] or left_s() < 60):
            res["resume"], resumed = {"rc": None, "skipped": LIMITS["stop"] or "too close to the --deadline"}, False
        elif run.rc != 0 or run.killed:  # the rerun resumes from the last checkpoint
            res["resumed_from_step"] = latest_step(run_dir)
            again = launch(argv, {**base, "PYTHONPATH": path}, logs / f"{case.name}-resume.log", limit_s, None, hang_s)
            again.leftovers = sweep(ray_tmp)
            res["resume"] = {"rc": again.rc, "wall_s": round((again.end or time.time()) - again.start, 1),
                             "killed": again.killed, "last_stderr_line": last_line(again.text("err"))[:300],
                             "leftovers": again.leftovers}
            resumed = again.rc == 0
        else:
            res["resume"] = None  # nothing to resume: the run finished
            resumed = run.rc == 0
        check, note = consumed_check(run_dir) if resumed else (False, "the run did not finish")
        res.update(resume_ok=check, consumed=note)
    except Exception:  # noqa: BLE001  one case's failure must not lose the others
        res.update(outcome="bench error", ok=False, resume_ok=False, error=traceback.format_exc()[-3000:])
    finally:
        res["leftovers_killed"] = sweep(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return res


def notes(r: dict) -> str:
    parts = []
    if r.get("transport"):
        parts.append(f"sync={r['transport']}")
    if r.get("outcome", "").startswith(("clear", "unclear")) or r.get("killed"):
        parts.append((r.get("error_line") or r.get("last_stderr_line", ""))[:150])
    if r.get("restarts"):
        parts.append(f"{r['restarts']} restart(s), {r.get('aborted_samples')} aborted samples: {r.get('restart_line', '')[:90]}")
    if (r.get("resume") or {}).get("skipped"):
        parts.append(f"resume skipped: {r['resume']['skipped']}")
    elif r.get("resume"):
        parts.append(f"resumed from step {r.get('resumed_from_step')} (rerun rc {r['resume']['rc']}, {r['resume']['wall_s']} s)")
    left = [*r.get("leftovers", []), *((r.get("resume") or {}).get("leftovers", []))]
    if left:
        parts.append(f"{len(left)} processes left behind (killed)")
    if r.get("patch_failed"):
        parts.append(f"patch failed: {r['patch_failed']}")
    if r.get("error"):
        parts.append(r["error"].strip().splitlines()[-1][:110])
    return "; ".join(p for p in parts if p)


def table(results: list[dict]) -> str:
    head = f"{'case':30s} | {'outcome':26s} | {'s to detect':>11s} | {'resume ok':9s} | notes"
    lines = [head, "-" * len(head)]
    for r in results:
        d = r.get("detect_s")
        ok = "ok" if r.get("ok") else "FAIL"
        resumed = ("yes" if r.get("resume_ok") else "NO") if r.get("resume") else ("n/a, ok" if r.get("resume_ok") else "NO")
        lines.append(f"{r['case']:30s} | {r.get('outcome', '?')[:21] + ' ' + ok:26s} | "
                     f"{'-' if d is None else f'{d:.1f}':>11s} | {resumed:9s} | {notes(r)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the analogous cases on CPU (reference engine, object store, gloo)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help=f"comma-separated, of {[c.name for c in CASES + OPTIONAL]}")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds per run of rl.train (its process group is killed after)")
    p.add_argument("--hang-s", type=float, default=90, help="seconds after the fault without an exit or restart: a hang")
    p.add_argument("--deadline", type=float, default=480, help="seconds for the whole script: runs past it are killed, "
                   "later cases skipped (bench/gpu_session.sh gives the stage 540 s)")
    p.add_argument("--keep", action="store_true", help="keep the run dirs (under a temp dir, printed)")
    a = p.parse_args()
    by_name = {c.name: c for c in CASES + OPTIONAL}
    chosen = [by_name[n] for n in a.cases.split(",")]
    if not a.cpu and shutil.which("nvidia-smi") is None:
        print("no nvidia-smi: this machine has no GPU; use --cpu", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or ".")
    name = "cpu_faults" if a.cpu else "gpu_faults"
    logs = out / f"{name}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    results: list[dict] = []
    t0 = time.time()
    LIMITS["deadline"] = t0 + a.deadline

    def stop(signum, frame):  # the current run's process group goes too (it is in a session of its own)
        LIMITS["stop"] = f"the bench got {signal.Signals(signum).name}"

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for case in chosen:
        if LIMITS["stop"] or left_s() < 60:
            results.append({"case": case.name, "outcome": f"skipped ({LIMITS['stop'] or 'too close to the --deadline'})",
                            "ok": False, "resume_ok": False})
            continue
        print(f"[{time.time() - t0:6.0f} s] {case.name} ...", flush=True)
        results.append(run_case(case, a.cpu, work, logs, a.run_timeout, a.hang_s))
        (out / f"{name}.json").write_text(json.dumps({"mode": "cpu" if a.cpu else "gpu", "steps": STEPS, "results": results}, indent=1))
        if not a.keep:
            shutil.rmtree(work / case.name, ignore_errors=True)
    print(table(results))
    print(f"{name}.json and {logs.name}/ in {out.resolve()}; {time.time() - t0:.0f} s" + (f"; run dirs in {work}" if a.keep else ""))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.get("ok") and r.get("resume_ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
