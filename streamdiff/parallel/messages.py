"""The messages of one forward through the pipeline stages and the stage spec.

They belong to the model runner (streamdiff/engine/stage_io.py: the one runner produces and
consumes them, whether it holds the whole model or one stage); this module names them for the
parallel package.
"""

from streamdiff.engine.stage_io import Hop, RowMeta, StageInput, StageSpec, StepOut, message_bytes, split_rows, stage_specs

__all__ = ["Hop", "RowMeta", "StageInput", "StageSpec", "StepOut", "message_bytes", "split_rows", "stage_specs"]
