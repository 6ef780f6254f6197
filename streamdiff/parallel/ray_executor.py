"""RayStages: pipeline stages as Ray actors, each forward one Ray Compiled Graph execution.

Owns: joining or starting Ray (`parallel.ray_address`: "" starts a local instance, "auto" or
HOST:PORT joins a cluster made with `ray start --head` / `ray start --address`), one actor per
stage (`num_gpus=1` where the cluster has a GPU per stage, CPU actors otherwise) that builds
ONLY its blocks, pool, and VAE half / prompt encoder (stage.py), the compiled graph
input -> stage 0 -> ... -> stage S-1 -> output (NCCL between GPU actors, Ray's shared-memory
channels between CPU actors, each sized for the largest message: `channel_bytes`), up to S
plans in flight (one per stage), and the fault path: a dead or hung actor is found by ping,
replaced by a fresh one with the same block range, and the graph is compiled again; a graph
teardown that does not end within TEARDOWN_TIMEOUT_S gets every actor replaced. Whether a
forward is back is asked without reading it (`ready`, for the live loop). This is the only
module that imports ray.
Does not own: what a step does (executor.py: `StagedExecutor` drives a `Stages` transport;
this module provides `RayStages`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace

# Before ray is imported: no native stack dump when the server is stopped with SIGTERM (Ray's
# C++ failure-signal handler would print one and kill the driver before it cleans up), and no
# usage-stats notice.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Read once, when ray loads: a join's connect attempt waits this long, not 30 s (see `connect`).
os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "10")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.dag import DAGContext, InputNode  # noqa: E402

from streamdiff.config import Config, ConfigError
from streamdiff.parallel.executor import StageFailure
from streamdiff.parallel.partition import ranges
from streamdiff.preflight import check_reachable
from streamdiff.engine.types import ChunkInput, StreamOutput
from streamdiff.parallel.messages import Hop, StageInput, StageSpec, StepOut, message_bytes, stage_specs
from streamdiff.parallel.stage import StageWorker

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 5.0
CPU_WAIT_S = 10.0  # for the CPUs a stage actor needs to be free before it is refused
FIRST_STEPS_TIMEOUT_S = 300.0  # the first forwards load kernels (Triton JIT, cuDNN autotune)
FIRST_STEPS = 20
TEARDOWN_TIMEOUT_S = 20.0  # Ray waits on a stage loop that missed its cancel without a bound
# A graph with no stream for this long is torn down (`RayStages.idle`)
IDLE_TEARDOWN_S = 30.0
CHANNEL_STORE_SHARE = 1 / 16  # of a node's object store (Ray: 30 % of memory), the most the channels take
ENV_PASSED = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES_OVERRIDE", "STREAMDIFF_CONFIG_DIR")


class _DeadActorCancel(logging.Filter):
    """Ray's compiled graph logs "Error cancelling worker task" with two ActorDiedError
    tracebacks when it tears down around a stage actor that died; the executor replaces that
    stage and says so in one line of its own (`StagedExecutor._recover`), so this record is
    not shown. Any other error of that logger still is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Error cancelling worker task" and isinstance(exc, ray.exceptions.ActorDiedError))


logging.getLogger("ray.dag.compiled_dag_node").addFilter(_DeadActorCancel())


def _init_ray(**kwargs) -> None:
    """ray.init, keeping this process's SIGTERM handler: Ray's own (sys.exit) replaced the CLI's,
    so a bench over Ray actors stopped with SIGTERM exited 1 without the report of what it had
    measured, which Ctrl-C prints (a probe)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ClusterError(ConfigError):
    """The Ray cluster cannot be joined or cannot run these stages (one line for the CLI)."""


def connect(address: str, num_stages: int) -> bool:
    """Use the Ray instance this process already has, join `address`, or start a local one
    (True: this call started it, so shutting down may stop it). Ray's start-up notices are not
    shown (ERROR level only; the actors' own logs stay in Ray's session folder)."""
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in (*ENV_PASSED, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER") if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        if address != "auto":
            check_reachable(address)
        # Joining retries NUM_REDIS_GET_RETRIES (20) times, each waiting py_gcs_connect_timeout_s
        # (30 s) plus pubsub timeouts: a port that answers TCP but is no Ray head (the dashboard's
        # 8265, another service) held the server ~14 minutes, deaf to SIGTERM. Bounded here, to
        # about 20 s (one attempt), unless the user set Ray's own variables.
        ours = "RAY_gcs_server_port_wait_time_s" not in os.environ
        if ours:  # read at the call: one attempt (and only for this join: a later one gets Ray's own)
            os.environ["RAY_gcs_server_port_wait_time_s"] = "1"
        try:
            _init_ray(address=address, runtime_env=runtime_env, **quiet)
        except ConnectionError as exc:  # "auto" with no cluster on this machine, a head that went away
            why = "no Ray cluster runs on this machine" if address == "auto" else \
                f"Ray cluster at {address}: {str(exc).splitlines()[0]}"
            if address != "auto" and os.environ.get("RAY_AUTH_MODE") != "token":
                # Ray >= 2.59's `ray start --head` turns token authentication on; a driver joining a
                # HOST:PORT sends no token unless told to, and Ray says why only in a warning
                # (InvalidAuthToken), which the quiet logging above hides ("auto" finds it by itself)
                why += ("; if the cluster uses Ray token authentication (`ray start`'s default since Ray 2.59), "
                        "set RAY_AUTH_MODE=token here (the token: ~/.ray/auth_token or RAY_AUTH_TOKEN)")
            raise ClusterError(f"--ray-address {address}: {why} (start one with `ray start --head`, or leave out "
                               f"--ray-address to run the stages in a local Ray)") from None
        finally:
            if ours:
                os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        return False
    cpus = max(os.cpu_count() or 1, num_stages + 1)
    _init_ray(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, **quiet)
    return True


def channel_bytes(cfg: Config, buffers: int, store_bytes: float, hop_tensors: bool = True) -> int:
    """The size of every compiled-graph channel buffer: the largest message `cfg` can make
    (`message_bytes`), never below Ray's default, and `buffers` of them (channels x executions
    in flight) taking at most CHANNEL_STORE_SHARE of a node's object store (`store_bytes`; 0:
    unknown, no cap). Why the largest message: Ray grows a channel for a larger one by switching
    its writer and readers to a new buffer, but a graph's teardown closes the buffers the driver
    knew at compile time, so a stage whose next read is on a grown buffer never sees the cancel
    and `teardown` waits for it without a bound (the demo over Ray at 256x256 hung in warm-up
    that way: a stream's first chunk with its latents passed 1 MB). Past the cap (many streams
    of large frames) a large message may still grow a channel, and the teardown bound
    (TEARDOWN_TIMEOUT_S, then fresh actors) is what remains: said once, as a warning."""
    floor = int(DAGContext.get_current().buffer_size_bytes)
    need = max(message_bytes(cfg, hop_tensors), floor)
    if not store_bytes or need * buffers <= CHANNEL_STORE_SHARE * store_bytes:
        return need
    cap = max(floor, int(CHANNEL_STORE_SHARE * store_bytes / buffers))
    log.warning("stage messages may reach %.0f MB (cache.max_streams=%d at %dx%d) but %d channel buffers of that "
                "size would take over %g%% of Ray's object store: they hold %.0f MB each, and when the last "
                "stream leaves the stages may need replacing (up to %g s)", need / 1e6, cfg.cache.max_streams,
                cfg.video.width, cfg.video.height, buffers, CHANNEL_STORE_SHARE * 100, cap / 1e6, TEARDOWN_TIMEOUT_S)
    return cap


def object_store_bytes() -> float:
    """The smallest object store of the cluster's live nodes (a channel's buffers live on its
    writer's node); 0 when Ray does not say."""
    sizes = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n.get("Alive")]
    return min(sizes) if sizes else 0.0


class RayStages:
    """The `Stages` transport over Ray actors and one compiled graph."""

    shared_cores: int | None = None  # actors may sit on other machines: not counted here

    def __init__(self, cfg: Config, counts: list[int], timeout_s: float | None = None):
        self.specs = stage_specs(ranges(counts), cfg.parallel.vae_stages)  # + encode / decode stages if asked
        self.started_ray = connect(cfg.parallel.ray_address, len(self.specs))
        self.cfg = cfg
        self.timeout_s = timeout_s or cfg.parallel.step_timeout_s
        gpus = ray.cluster_resources().get("GPU", 0)
        self.on_gpu = cfg.runtime.device != "cpu" and gpus >= len(self.specs)
        if cfg.runtime.device == "cuda" and not self.on_gpu:
            raise ClusterError(f"runtime.device=cuda but the Ray cluster has {gpus:g} GPUs for {len(self.specs)} "
                               f"stages (one GPU per stage; --set runtime.device=cpu runs CPU actors)")
        if not self.on_gpu:  # a CPU actor a stage: pending actors waited 5 minutes without a word (a probe)
            deadline = time.monotonic() + CPU_WAIT_S  # (actors just killed give theirs back a moment later)
            while (free := ray.available_resources().get("CPU", 0)) < len(self.specs) and time.monotonic() < deadline:
                time.sleep(0.2)
            cpus = ray.cluster_resources().get("CPU", 0)
            if free < len(self.specs):
                raise ClusterError(f"the Ray cluster has {free:g} of its {cpus:g} CPUs free for {len(self.specs)} "
                                   f"stages (one CPU each): `ray status` shows what holds them; start the cluster "
                                   f"with more (ray start --num-cpus N) or serve fewer stages")
        transport = cfg.parallel.transport
        self.nccl = self.on_gpu and transport in ("auto", "nccl")
        if transport == "nccl" and not self.on_gpu:
            raise ClusterError(f"parallel.transport=nccl needs one GPU per stage in the Ray cluster, which has "
                               f"{gpus:g} for {len(self.specs)} stages (auto picks NCCL where it can, shared "
                               f"memory otherwise)")
        # Up to one plan per stage in flight, each in its micro-batches, plus a prepare forward.
        self.max_executions = len(self.specs) * max(1, cfg.parallel.micro_batches) + 1
        # Every channel sized for the largest message up front: see `channel_bytes`.
        self.channel_bytes = channel_bytes(cfg, (len(self.specs) + 1) * self.max_executions, object_store_bytes(),
                                           hop_tensors=not self.nccl)
        self.actors = [self._spawn(spec) for spec in self.specs]
        self._gets = 0
        self._wait_ready(self.actors)
        self.dag = None
        self.stale = False  # a teardown timed out: replace every actor before the next graph
        self.teardown_timeout_s = TEARDOWN_TIMEOUT_S
        self.idle_teardown_s = IDLE_TEARDOWN_S
        self.compiles = 0  # graphs compiled so far (each one leaks Ray's channel buffers: `idle`)
        self._lock = threading.RLock()  # the graph: submits against an idle teardown's timer
        self._idle_gen = 0  # bumped by every idle and submit: a timer of an older one does nothing
        self._idle_timer: threading.Timer | None = None
        self._compile()

    # -------------------------------------------------------------- actors and graph

    def _spawn(self, spec: StageSpec):
        threads = max(1, (os.cpu_count() or 1) // len(self.specs))
        options = {"num_gpus": 1} if self.on_gpu else {"num_cpus": 1}
        actor_cls = ray.remote(StageActor).options(**options, max_restarts=0)
        return actor_cls.remote(self.cfg, spec, "cuda" if self.on_gpu else "cpu", threads, self.channel_bytes)

    def _wait_ready(self, actors) -> None:
        try:
            ray.get([a.ping.remote() for a in actors], timeout=max(self.timeout_s, 300.0))
        except Exception as exc:
            raise StageFailure(f"stage actors did not start: {exc}") from exc

    def _compile(self) -> None:
        with InputNode() as inp:
            node = inp
            for k, actor in enumerate(self.actors):
                node = actor.run.bind(node)
                # NCCL between stages that hold blocks (hidden states); VAE stages exchange
                # latent-sized host tensors only.
                blocks_both = k < len(self.actors) - 1 and self.specs[k].has_blocks and self.specs[k + 1].has_blocks
                if self.nccl and blocks_both:
                    node = node.with_tensor_transport(transport="nccl")
        ctx = DAGContext.get_current()  # this process writes the input channel: its size too
        before, ctx.buffer_size_bytes = ctx.buffer_size_bytes, self.channel_bytes
        try:
            self.dag = node.experimental_compile(_max_inflight_executions=self.max_executions,
                                                 _buffer_size_bytes=self.channel_bytes)
            self.compiles += 1
        finally:
            ctx.buffer_size_bytes = before
        log.debug("stage graph compiled: %d channels x %d buffers of %.1f MB", len(self.actors) + 1,
                  self.max_executions, self.channel_bytes / 1e6)

    def _teardown(self) -> None:
        """Tear the compiled graph down, waiting at most TEARDOWN_TIMEOUT_S: a stage whose
        execution loop misses Ray's cancel (the demo at 256x256 did, before `channel_bytes`)
        makes `teardown` wait for it forever. Then the actors are stale: `recover` replaces every one
        before the next graph (`submit` calls it), so the server goes on instead of hanging."""
        if self.dag is None:
            return
        dag, self.dag = self.dag, None
        done = threading.Event()

        def run() -> None:
            try:
                dag.teardown()
            except Exception:  # a dead actor makes teardown complain; the graph is gone anyway
                log.debug("compiled graph teardown", exc_info=True)
            finally:
                done.set()

        threading.Thread(target=run, name="streamdiff-ray-teardown", daemon=True).start()
        if not done.wait(self.teardown_timeout_s):
            log.warning("the stage graph did not tear down within %g s (a stage loop missed its cancel): "
                        "replacing the stage actors before the next step", self.teardown_timeout_s)
            self.stale = True

    def _failed(self, why: str) -> StageFailure:
        """Tear the graph down before the failure propagates: the caller then drops the refs of
        steps in flight, and a ref deleted while its graph is still up tries to free its results
        on channels a dead actor closed (an error Python can only print, from `__del__`); once
        the graph is torn down a ref's deletion does nothing. The executor recovers next anyway."""
        self._teardown()
        return StageFailure(why)

    # -------------------------------------------------------------- Stages protocol

    def idle(self) -> None:
        """No stream is left: the compiled graph is torn down `idle_teardown_s` later unless a
        step comes first (0: at once); the next submit then compiles it again. Its actors' read
        loops poll their channels, a core each, while nothing flows (4 CPU actors of the demo:
        1.8 cores), so an idle graph is not kept for ever; nor torn down at once, since every
        compile leaks (Ray 2.60: the channels' shared memory stays mapped in this process, 32 MB
        a compile for the demo over 2 stages, and their named semaphores stay in /dev/shm), and
        a server whose streams come and go (a page reconnecting, OBS restarting, a probe's churn:
        +172 MB a loop of 7 streams) compiled at every one."""
        with self._lock:
            self._idle_gen += 1
            self._cancel_idle_timer()
            if self.idle_teardown_s <= 0:
                self._teardown()
                return
            gen = self._idle_gen
            self._idle_timer = threading.Timer(self.idle_teardown_s, self._teardown_if_still_idle, args=(gen,))
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _teardown_if_still_idle(self, gen: int) -> None:
        with self._lock:
            if gen == self._idle_gen:
                self._teardown()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def submit(self, msg: StageInput) -> object:
        with self._lock:
            self._idle_gen += 1
            self._cancel_idle_timer()
            try:
                if self.stale:  # the last teardown did not end: fresh actors first
                    self.recover()
                if self.dag is None:  # (compiled here only: a graph never run whose actor then
                    # died aborted the whole process inside Ray, a probe's second kill while idle)
                    if dead := self._replace(every=False):
                        log.warning("pipeline stage%s %s died while no stream ran: replaced",
                                    "s" if len(dead) > 1 else "", dead)
                    self._compile()
                return self.dag.execute(msg)
            except Exception as exc:
                raise self._failed(f"submitting step {msg.step_id}: {type(exc).__name__}: {exc}") from exc

    def get(self, handle: object) -> StepOut:
        self._gets += 1
        timeout_s = self.timeout_s if self._gets > FIRST_STEPS else max(self.timeout_s, FIRST_STEPS_TIMEOUT_S)
        try:
            out = ray.get(handle, timeout=timeout_s)
        except Exception as exc:
            raise self._failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return own(out)

    def ready(self, handle: object) -> bool:
        """Whether a forward's result is back, without waiting or handing it over. A
        CompiledDAGRef's `get` may be called once, so this asks its graph to read results up to
        the ref's index with a zero timeout (the first half of `get`; Ray documents 0 as "succeed
        at once or time out"): a result that is back is kept in the graph's buffer for `get`,
        one that is not leaves the graph's single output channel unread. On a Ray without that
        method, or when the read fails (a dead actor), True: `get` then waits or reports it."""
        read_until = getattr(self.dag, "_execute_until", None)
        if read_until is None:
            return True
        try:
            read_until(handle._execution_index, handle._channel_index, 0)
        except ray.exceptions.RayChannelTimeoutError:
            return False
        except Exception:  # get() raises it as a StageFailure and recovers
            return True
        return True

    def call(self, index: int, method: str, *args) -> object:
        try:
            return ray.get(getattr(self.actors[index], method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as exc:  # the stage raised: re-raise its error
            raise exc.as_instanceof_cause() from None
        except Exception as exc:
            raise StageFailure(f"stage {index} {method}: {type(exc).__name__}") from exc

    def recover(self) -> str:
        """Tear the graph down and replace dead or unresponsive actors (same block ranges); after
        a teardown that did not end (`stale`), every actor: none can be trusted to have stopped
        its loop. The next `submit` compiles the graph."""
        with self._lock:  # not under an idle teardown (its timer thread)
            self._teardown()
            dead = self._replace(every=self.stale)
            self.stale = False
            self._gets = 0  # replaced actors warm up again
            return f"stage{'s' if len(dead) != 1 else ''} {dead} replaced" if dead else "no stage died; the graph is compiled again"

    def _replace(self, every: bool) -> list[int]:
        """Replace the actors that do not answer (`every`: all of them); their indices."""
        dead = [k for k, actor in enumerate(self.actors) if every or not self._answers(actor)]
        for k in dead:
            try:
                ray.kill(self.actors[k])
            except Exception:
                pass
            self.actors[k] = self._spawn(self.specs[k])
        self._wait_ready([self.actors[k] for k in dead])
        return dead

    @staticmethod
    def _answers(actor) -> bool:
        try:
            ray.get(actor.ping.remote(), timeout=PING_TIMEOUT_S)
            return True
        except Exception:
            return False

    def actor(self, index: int):
        return self.actors[index]

    def shutdown(self) -> None:
        with self._lock:
            self._idle_gen += 1
            self._cancel_idle_timer()
            self._teardown()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:  # the local instance this process started: leave no Ray process behind
            ray.shutdown()


def own(msg):
    """A copy of a message's arrays and tensors. Values read from a compiled-graph channel may
    be zero-copy views of its shared buffer, and a view kept past the next read (a VAE cache
    holding input frames, an output frame waiting in a queue) blocks the writer for good."""
    if isinstance(msg, StepOut):
        finished = {sid: StreamOutput(np.array(o.frames), o.metas) for sid, o in msg.finished.items()}
        flows = None if msg.flows is None else msg.flows.clone()
        decode = [(sid, x0.clone(), tag) for sid, x0, tag in msg.decode]
        return replace(msg, finished=finished, flows=flows, decode=decode)
    if isinstance(msg, StageInput):
        chunks = {sid: ChunkInput(np.array(c.frames), c.metas) for sid, c in msg.chunks.items()}
        return replace(msg, chunks=chunks, flows=[(key, f.clone()) for key, f in msg.flows],
                       encoded={sid: lat.clone() for sid, lat in msg.encoded.items()})
    if isinstance(msg, Hop) and msg.hidden is not None and msg.hidden.device.type == "cpu":
        return replace(msg, hidden=msg.hidden.clone(), x=msg.x.clone(),
                       embs={k: e.clone() for k, e in msg.embs.items()})
    return msg


class StageActor(StageWorker):
    """A StageWorker with its torch thread count set for the host it shares; it owns every
    value it reads from the graph (see `own`)."""

    def __init__(self, cfg: Config, spec: StageSpec, device: str, threads: int, channel_bytes: int):
        import torch

        torch.set_num_threads(threads)
        # The channels this actor writes are made here, at their writer, with this process's
        # default size (Ray 2.60 does not pass the graph's size to them): see `channel_bytes`.
        DAGContext.get_current().buffer_size_bytes = channel_bytes
        super().__init__(cfg, spec, device)

    def run(self, msg):
        return super().run(own(msg))


__all__ = ["RayStages", "StageActor", "connect"]
