"""Per-hop latency of the stage transport: what one stage-to-stage message costs.

Owns: a micro-benchmark of Ray Compiled Graph channels between trivial actors that forward a
payload of a given size (a step's hidden states) - no model, so the number is the transport
alone. Does not own: the stages themselves (parallel/stage.py) or the projection that uses the number
(simulate.py).

Method: chains of 1 and S pass-through actors; per hop = (median round trip of the S chain -
median round trip of the 1 chain) / (S - 1), so the driver's own submit/get cost cancels.
CPU actors use Ray's shared-memory channels; with `nccl` on GPU actors, NCCL.
"""

from __future__ import annotations

import statistics
import time

# ray_executor first: it sets Ray's environment (no native stack dump on SIGTERM) before ray loads
from streamdiff.parallel.ray_executor import connect  # isort: skip

import ray  # noqa: E402
import torch  # noqa: E402
from ray.dag import InputNode  # noqa: E402

GET_TIMEOUT_S = 60.0


class _Forward:
    def run(self, payload):
        return payload.clone() if isinstance(payload, torch.Tensor) else payload


def _chain_ms(length: int, payload: torch.Tensor, repeats: int, gpu: bool) -> float:
    options = {"num_gpus": 1} if gpu else {"num_cpus": 0}
    actors = [ray.remote(_Forward).options(**options).remote() for _ in range(length)]
    with InputNode() as inp:
        node = inp
        for k, actor in enumerate(actors):
            node = actor.run.bind(node)
            if gpu and k < length - 1:
                node = node.with_tensor_transport(transport="nccl")
    dag = node.experimental_compile()
    try:
        for _ in range(3):  # warm the channels
            ray.get(dag.execute(payload), timeout=GET_TIMEOUT_S)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ray.get(dag.execute(payload), timeout=GET_TIMEOUT_S)
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)
    finally:
        dag.teardown(kill_actors=True)


def measure_hop_ms(payload_bytes: int, num_stages: int = 3, repeats: int = 5, gpu: bool = False,
                   address: str = "") -> dict:
    """Per-hop latency for a payload of `payload_bytes` (fp16/bf16 hidden states)."""
    if num_stages < 2:
        raise ValueError("a hop needs at least two stages")
    connect(address, num_stages)
    payload = torch.zeros(max(payload_bytes // 2, 1), dtype=torch.float16)
    if gpu:
        payload = payload.cuda()
    one = _chain_ms(1, payload, repeats, gpu)
    many = _chain_ms(num_stages, payload, repeats, gpu)
    return {"payload_bytes": payload_bytes, "stages": num_stages, "chain_1_ms": one,
            f"chain_{num_stages}_ms": many, "hop_ms": max(many - one, 0.0) / (num_stages - 1),
            "transport": "nccl" if gpu else "shared-memory channels (CPU)"}


def main(argv: list[str] | None = None) -> None:
    """python -m streamdiff.bench.hops [--bytes N ...] [--stages 3] [--repeats 5] [--gpu]

    Keep runs short on CPU: with Ray 2.60, multi-MB payloads through CPU channels have hung
    after 10-15 executions of one graph in this micro-benchmark (the get then times out after
    60 s); 5 repeats per chain, one payload per run, have been reliable."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, nargs="+", default=[4_792_320],
                        help="payloads (default: 1.3B 480p hidden states of one row in bf16)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="GPU actors with NCCL (one GPU per stage)")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA GPUs (one per stage); this machine has none that torch can use")
    for size in args.bytes:
        r = measure_hop_ms(size, args.stages, args.repeats, args.gpu)
        print(f"{size / 1e6:8.3f} MB: {r['hop_ms']:7.2f} ms per hop ({r['transport']}; chain of 1: "
              f"{r['chain_1_ms']:.2f} ms, chain of {args.stages}: {r[f'chain_{args.stages}_ms']:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()


__all__ = ["measure_hop_ms"]
