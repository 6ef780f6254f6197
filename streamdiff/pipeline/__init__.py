"""One stream through the model: StreamPipeline (frames in, frames out) and LatentStream (the
DiT alone, latents in, flows out)."""

from streamdiff.pipeline.latent_stream import LatentStream

__all__ = ["LatentStream"]
