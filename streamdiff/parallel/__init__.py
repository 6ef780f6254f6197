"""Pipeline stages: a DiT split into block ranges on Ray actors (the only package, beside the
Ray hop micro-benchmark, that imports ray), plugged into the engine as its Executor."""
def build_executor(cfg):
    """The executor the config asks for: the local one, or `parallel.num_stages` Ray pipeline
    stages (plus an encode and a decode stage with `parallel.vae_stages`). The place that
    composes an engine passes this as `executor_factory` (the engine itself never imports
    `parallel`)."""
    if cfg.parallel.num_stages > 1 or cfg.parallel.ray_address or cfg.parallel.vae_stages:
        from streamdiff.parallel.ray_executor import RayExecutor

        return RayExecutor(cfg)
    from streamdiff.engine.executor import LocalExecutor

    return LocalExecutor.from_config(cfg)
