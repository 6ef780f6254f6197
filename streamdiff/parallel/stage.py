"""One pipeline stage: a thin shell over the model runner holding this stage's spec.

Owns: what only a pipeline stage does beside running its share of a forward — reporting what it
holds (`info`), a drill slowdown, and handing blocks (weights, K/V, every condition's prompt
K/V) to a neighbour when the partition changes.
Does not own: the model, the streams or the forward (engine/model_runner.py: `ModelRunner`,
the same runner the local executor uses, with this stage's `StageSpec`), Ray (ray_executor.py
wraps this class in an actor), which streams run (the plan) or when the partition changes
(partition.py, the executor). No ray import here: tests chain StageWorkers in one process as
well as in actors.
"""

from __future__ import annotations

import torch

from streamdiff.config import Config
from streamdiff.engine.model_runner import ModelRunner
from streamdiff.engine.stage_io import Hop, StageInput, StageSpec, StepOut
from streamdiff.model.causal_wan import CausalWanModel


class StageWorker:
    def __init__(self, cfg: Config, spec: StageSpec, device: str | None = None, max_streams: int | None = None):
        self.cfg = cfg
        self.spec = spec
        self.runner = ModelRunner.for_stage(cfg, spec, device, max_streams)

    def run(self, msg: StageInput | Hop | StepOut) -> StageInput | Hop | StepOut:
        return self.runner.run(msg)

    def info(self) -> dict:
        """What this stage holds (tests count parameters; the executor logs it)."""
        r = self.runner
        params = dict(r.model.named_parameters()) if r.model is not None else {}
        return {
            "index": self.spec.index,
            "block_range": r.model.block_range if r.model is not None else self.spec.block_range,
            "block_params": sum(p.numel() for n, p in params.items() if n.startswith("blocks.")),
            "dit_params": sum(p.numel() for p in params.values()),
            "param_names": sorted(params),
            "pool_layers": list(r.pool.layers) if r.pool is not None else [],
            "pool_bytes": r.pool.nbytes() if r.pool is not None else 0,
            "vae": self.spec.vae,
            "has_vae": r.comps.vae is not None,
            "has_text": r.comps.text is not None,
            "streams": len(r.params),
            "cond_keys": len(r.conditions.by_key),
        }

    def clear_all(self) -> None:
        self.runner.clear_all()

    def free_slots(self) -> int:
        return self.runner.slots.free_slots

    def set_slowdown(self, extra_ms_per_block: float) -> None:
        """Make this stage's device look slower: every block takes `extra_ms_per_block` more."""
        self.runner.extra_ms_per_block = float(extra_ms_per_block)

    def ping(self) -> int:
        return self.spec.index

    # -------------------------------------------------------------- moving blocks

    def give_blocks(self, layers: list[int]) -> dict:
        """Hand `layers` (at one end of this stage's range) to a neighbour: weights, K/V and
        every condition's prompt K/V of those layers. They leave this stage."""
        model, pool = self.runner.model, self.runner.pool
        start, end = model.block_range
        layers = sorted(layers)
        if not layers or not (layers[0] == start or layers[-1] == end - 1) or len(layers) >= end - start:
            raise ValueError(f"stage {self.spec.index} holds [{start}, {end}): cannot give {layers}")
        state = {f"blocks.{i}.{k}": v.cpu() for i in layers for k, v in model.blocks[str(i)].state_dict().items()}
        pool_state = {name: t.cpu() for name, t in pool.remove_layers(layers).items()}
        cond: dict[tuple, dict[int, tuple]] = {}
        for key, kv in self._cross_kvs():
            cond[key] = {i: (kv[i][0].cpu(), kv[i][1].cpu()) for i in layers}
            for i in layers:
                kv.pop(i, None)
        for i in layers:
            del model.blocks[str(i)]
        model.block_range = (layers[-1] + 1, end) if layers[0] == start else (start, layers[0])
        self._sync_spec()
        # The first stage lacks the K/V of conditions only later stages still hold (a finished
        # blend, a prompt its cache dropped): the receiver projects those from their embeddings.
        embs = ({k: e.cpu() for k, e in self.runner.sent_embeddings().items() if k not in cond}
                if self.spec.first else {})
        return {"layers": layers, "state": state, "pool": pool_state, "cond": cond, "embs": embs}

    def take_blocks(self, package: dict) -> None:
        """Receive blocks from a neighbour (the other half of `give_blocks`)."""
        r = self.runner
        layers = package["layers"]
        start, end = r.model.block_range
        if not (layers[-1] + 1 == start or layers[0] == end):
            raise ValueError(f"stage {self.spec.index} holds [{start}, {end}): blocks {layers} are not adjacent")
        donor = CausalWanModel(self.cfg.model, (layers[0], layers[-1] + 1), has_embed=False, has_head=False)
        donor.blocks.load_state_dict({k.split(".", 1)[1]: v for k, v in package["state"].items()}, strict=True)
        donor.cast_(r.dtype).to(r.device).eval().requires_grad_(False)
        merged = {**{name: blk for name, blk in r.model.blocks.items()}, **dict(donor.blocks.items())}
        r.model.blocks = torch.nn.ModuleDict({str(i): merged[str(i)] for i in sorted(int(n) for n in merged)})
        r.model.block_range = (min(start, layers[0]), max(end, layers[-1] + 1))
        r.pool.add_layers(layers, package["pool"])
        for key, kv in self._cross_kvs():
            moved = package["cond"].get(key)
            if moved is None:  # a condition no row has carried downstream yet: project it here
                emb = package.get("embs", {}).get(key)
                fresh = r.model.prompt_kv(emb.to(r.device) if emb is not None else self._emb_for(key))
                moved = {i: fresh[i] for i in layers}
            for i in layers:
                k, v = moved[i]
                kv[i] = (k.to(r.device), v.to(r.device))
        self._sync_spec()

    def _sync_spec(self) -> None:
        spec = self.spec
        self.spec = StageSpec(spec.index, spec.num_stages, tuple(self.runner.model.block_range), spec.first,
                              spec.last, spec.vae)
        self.runner.spec = self.spec

    def _emb_for(self, key: tuple) -> torch.Tensor:
        """The first stage's text embedding of a condition key."""
        r = self.runner
        if key[0] == "prompt":
            return r._prompt_entry(key[1])[1]
        for state in r.streams.values():
            lanes = state.chunks_in_flight()
            for cond_key, emb in [(state.cond_key, state.cond_emb)] + [(l.cond_key, l.cond_emb) for l in lanes]:
                if cond_key == key:
                    return emb
        raise KeyError(f"no embedding for condition {key!r}")

    def _cross_kvs(self):
        """(condition key, the CrossKV dict this stage uses for it), each dict once."""
        r = self.runner
        seen: dict[int, tuple] = {}
        for state in r.streams.values():
            seen.setdefault(id(state.cross_kv), (state.cond_key, state.cross_kv))
            for lane in state.chunks_in_flight():  # chunks keep the condition they entered with
                seen.setdefault(id(lane.cross_kv), (lane.cond_key, lane.cross_kv))
        for prompt, (kv, _) in r._prompt_cache.items():
            seen.setdefault(id(kv), (("prompt", prompt), kv))
        for key, (kv, _) in r.conditions.by_key.items():
            seen.setdefault(id(kv), (key, kv))
        return list(seen.values())


__all__ = ["Hop", "StageInput", "StageSpec", "StageWorker", "StepOut"]
