"""The frame scheduler: per-step choice of which streams' chunks to batch, admission against
SLOs and KV-pool capacity, drop-to-newest input bookkeeping, and the step cost model.

CPU integers and floats only: nothing in this package imports torch.
"""

from streamdiff.scheduler.cost_model import (
    DEFAULT_PRIOR,
    FixedCostModel,
    LinearLaw,
    OnlineCostModel,
    StepCostModel,
)
from streamdiff.scheduler.frame_scheduler import FrameScheduler
from streamdiff.scheduler.types import (
    VAE_TIME_STRIDE,
    Admission,
    PlannedChunk,
    StepPlan,
    StepResult,
    StreamSLO,
    StreamStats,
    frames_for_latents,
)

__all__ = [
    "DEFAULT_PRIOR",
    "VAE_TIME_STRIDE",
    "Admission",
    "FixedCostModel",
    "FrameScheduler",
    "LinearLaw",
    "OnlineCostModel",
    "PlannedChunk",
    "StepCostModel",
    "StepPlan",
    "StepResult",
    "StreamSLO",
    "StreamStats",
    "frames_for_latents",
]
