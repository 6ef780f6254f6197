"""Benchmark code, kept out of the runtime packages: nothing here runs while serving.

    model.py     `streamdiff bench` model mode (the engine and the real model on synthetic clips)
    engine.py    scheduler decision time; engine versus StreamPipeline throughput
    report.py    what every bench mode reports: summaries, tables, JSON, plots
    device.py    device name, datasheet peaks (MFU), peak memory
    kernels.py   GPU timings of the Triton kernels (`python -m streamdiff.bench.kernels`)
    simulate.py  `streamdiff bench --simulate`: projection for 1..N pipeline stages
    hops.py      Ray hop latency between stages (imports ray)
    modes.py     eager / compiled / CUDA-graph step modes of `streamdiff bench`, host time per step
    gpu_check.py `streamdiff gpu-check`: every GPU measurement in one budgeted run

Importing the package imports nothing heavy; import the module you need.
"""
