"""Generation across several engine actors: dynamic batching, retries, weight sync with version checks.

Bookkeeping guarantee: every prompt handed to `generate` comes back as its group of exactly `n` samples; a
sample the engines could not produce is a `Status.ABORTED` sample with the reason in `error` (counted by
the driver), never a silently missing row.
"""
from __future__ import annotations

import logging

from rollout.engine import EngineConfig, GenerationStats, Groups, SamplingConfig, check_groups, engine_actor
from rollout.progress import bar
from rollout.sample import Sample, Status

log = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """An engine reports a policy version other than the learner's after a sync."""


class EngineLost(RuntimeError):
    """An engine died and no live node offers what a replacement needs (its node was lost)."""


def engine_broken(cause: BaseException | None) -> bool:
    """Does an error raised by an engine's call leave the engine unusable, so that it is replaced like a dead
    one? A CUDA out-of-memory (torch's OutOfMemoryError: vLLM's in-process engine) or vLLM's EngineDeadError
    (its engine-core process died, of an OOM or anything else: every later call fails too). Names, not
    classes: the driver need not import vLLM."""
    return any(c.__name__ in ("OutOfMemoryError", "EngineDeadError") for c in type(cause).__mro__)


class RolloutManager:
    """`num_engines` engine actors; `generate` (a `rollout.engine.Generator`) spreads prompt chunks over
    whichever engine is free."""

    def __init__(self, cfg: EngineConfig, num_engines: int = 1, chunk_prompts: int | None = None, max_retries: int = 2,
                 num_cpus: float = 1, num_gpus: float = 0, resources: dict | None = None):
        self.cfg, self.chunk_prompts, self.max_retries = cfg, chunk_prompts, max_retries
        self._actor_cls = engine_actor(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources)
        self._needs = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
        self.engines = [self._actor_cls.remote(cfg) for _ in range(num_engines)]
        self.version = 0
        self._restore = None  # brings a new engine actor to the last synced weights (set by every sync)
        self.weight_sync = None  # the transport that feeds these engines (rl.components.weight_sync sets it)
        import ray

        ray.get([e.ping.remote() for e in self.engines])

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stats: GenerationStats | None = None) -> Groups:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        stats = stats if stats is not None else GenerationStats()
        # One call per engine by default (vLLM batches all of its share continuously); a cap splits finer.
        size = self.chunk_prompts or max(1, -(-len(prompts) // len(self.engines)))
        shown = bar(len(prompts) * sampling.n, "generate", unit="sample", leave=False)
        todo = [(s, prompts[s : s + size], 0) for s in range(0, len(prompts), size)]
        done: dict[int, Groups] = {}  # chunk offset -> its groups
        running: dict = {}  # ref -> (engine index, offset, prompts, attempts)
        idle = list(range(len(self.engines)))
        while todo or running:
            while todo and idle:
                start, chunk, attempts = todo.pop(0)
                i = idle.pop(0)
                running[self.engines[i].generate.remote(chunk, sampling)] = (i, start, chunk, attempts)
                stats.chunks += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            i, start, chunk, attempts = running.pop(ready[0])
            try:
                done[start] = ray.get(ready[0])
                idle.append(i)
                shown.update(len(chunk) * sampling.n)
            except (RayActorError, RayTaskError) as exc:  # the engine died or broke: replace it, retry the chunk
                if isinstance(exc, RayTaskError) and not engine_broken(exc.cause):
                    raise
                what = type(exc.cause if isinstance(exc, RayTaskError) else exc).__name__
                log.warning("engine %d failed during generation (%s): restarting it", i, what)
                stats.errors.append(f"engine {i}: {what}")
                self._restart(i)
                stats.restarts += 1
                idle.append(i)
                if attempts < self.max_retries:
                    todo.append((start, chunk, attempts + 1))
                    stats.retries += 1
                else:
                    done[start] = self._aborted(chunk, sampling.n, f"engine died {attempts + 1} times")
                    stats.aborted_samples += len(chunk) * sampling.n
                    shown.update(len(chunk) * sampling.n)
        shown.close()
        return check_groups([g for start in sorted(done) for g in done[start]], len(prompts), sampling.n)

    def update_weights(self, path: str, version: int) -> None:
        """Every engine loads the HF checkpoint at `path`; then each must report `version`, else StaleWeightsError."""
        import ray

        from rollout.weight_transfer import engine_versions

        got = engine_versions([e.update_weights.remote(path, version) for e in self.engines])
        self.synced(version, got, lambda actor: ray.get(actor.update_weights.remote(path, version)))

    def synced(self, version: int, got: list[int | None], restore) -> None:
        """Record a finished sync: `got` holds each engine's version, None for one that died during the sync
        (restarted here and brought to the same weights by `restore(actor)`, as later restarts are);
        StaleWeightsError unless all are then at `version`."""
        self.version, self._restore = version, restore
        for i in [i for i, v in enumerate(got) if v is None]:
            log.warning("engine %d died during the weight sync to version %d: restarted and restored", i, version)
            self._restart(i)
        self.check_versions(None if None in got else got)

    def check_versions(self, got: list[int] | None = None) -> None:
        import ray

        got = got if got is not None else ray.get([e.ping.remote() for e in self.engines])
        stale = [(i, v) for i, v in enumerate(got) if v != self.version]
        if stale:
            raise StaleWeightsError(f"engines at the wrong policy version (index, version): {stale}; learner is at {self.version}")

    def _restart(self, i: int) -> None:
        """A fresh actor, synced to the current weights before it serves again."""
        import ray

        try:
            ray.kill(self.engines[i])
        except Exception:  # noqa: BLE001  already gone
            pass
        self._check_placeable(i)
        self.engines[i] = self._actor_cls.remote(self.cfg)
        if self._restore is not None:
            self._restore(self.engines[i])
        ray.get(self.engines[i].ping.remote())

    def _check_placeable(self, i: int) -> None:
        """Fail at once, naming what is missing, when no live node could hold a replacement engine (Ray would
        keep the new actor pending forever); the run then stops and resumes from its checkpoint once the
        cluster offers the resources again."""
        import ray

        need = {k: v for k, v in self._needs.items() if v}
        if not any(n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in ray.nodes()):
            raise EngineLost(f"engine {i} died and no live node offers {need} for a replacement (a node was lost?); "
                             "rerun the same command once the cluster has them: the run resumes from its checkpoint")

    @staticmethod
    def _aborted(chunk: list[list[int]], n: int, reason: str) -> Groups:
        return [[Sample(prompt_ids=list(p), status=Status.ABORTED, error=reason) for _ in range(n)] for p in chunk]

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            ray.kill(e)
