"""The engine: many live streams, one batched DiT forward per step over a shared KV pool.

    AsyncEngine (asyncio handle, loop thread)  ->  EngineCore (schedule -> execute -> update)
        ->  Executor protocol: LocalExecutor -> ModelRunner (Components, one KVPool, StreamStates)

`import streamdiff.engine` does not import torch; `ModelRunner` (and LocalExecutor.from_config)
load it when first used.
"""

from streamdiff.engine.async_engine import AsyncEngine
from streamdiff.engine.core import DEFAULT_DEADLINE_MS, AdmissionRefused, EngineCore, StepReport
from streamdiff.engine.executor import Executor, LocalExecutor
from streamdiff.engine.types import (
    ChunkInput,
    EngineStepResult,
    FrameMeta,
    OutputFrame,
    StreamClosedError,
    StreamOutput,
    StreamParams,
    validate_changes,
)

__all__ = [
    "DEFAULT_DEADLINE_MS",
    "AdmissionRefused",
    "AsyncEngine",
    "ChunkInput",
    "EngineCore",
    "EngineStepResult",
    "Executor",
    "FrameMeta",
    "LocalExecutor",
    "ModelRunner",
    "OutputFrame",
    "StepReport",
    "StreamClosedError",
    "StreamOutput",
    "StreamParams",
    "validate_changes",
]


def __getattr__(name: str):
    if name == "ModelRunner":
        from streamdiff.engine.model_runner import ModelRunner

        return ModelRunner
    raise AttributeError(f"module 'streamdiff.engine' has no attribute {name!r}")
