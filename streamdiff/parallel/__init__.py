"""Pipeline stages: a DiT split into block ranges on Ray actors (the only package, beside the
Ray hop micro-benchmark, that imports ray), plugged into the engine as its Executor."""


def serves_on_threads(par) -> bool:
    """`parallel` asks for pipeline stages as threads in this process (`build_executor` builds
    them; `streamdiff bench` measures them beside the one-process step)."""
    return par.backend == "threads" and (par.num_stages > 1 or par.vae_stages)


def staged_executor(cfg, *, ray: bool, rebalance: bool | None = None):
    """`parallel.num_stages` DiT stages split by `parallel.partition` (or evenly), as Ray actors
    or as threads in this process, behind one StagedExecutor (its `counts` say the split; it
    moves blocks off a slow stage while serving if `rebalance`, None: `parallel.rebalance`)."""
    from streamdiff.parallel.executor import StagedExecutor, ThreadedStages
    from streamdiff.parallel.partition import initial_counts

    if ray:
        from streamdiff.parallel.ray_executor import RayStages as transport
    else:
        transport = ThreadedStages
    par = cfg.parallel
    counts = initial_counts(par.partition, cfg.model.num_layers, par.num_stages)
    return StagedExecutor(cfg, transport(cfg, counts), rebalance=rebalance)


def build_executor(cfg):
    """The executor the config asks for: the local one, or `parallel.num_stages` pipeline stages
    (plus an encode and a decode stage with `parallel.vae_stages`) as Ray actors or, with
    `parallel.backend: threads`, as threads in this process. The place that composes an engine
    passes this as `executor_factory` (the engine itself never imports `parallel`)."""
    par = cfg.parallel
    if serves_on_threads(par):
        return staged_executor(cfg, ray=False)
    if par.num_stages > 1 or par.ray_address or par.vae_stages:
        return staged_executor(cfg, ray=True)
    from streamdiff.engine.executor import LocalExecutor

    return LocalExecutor.from_config(cfg)
