"""Ray as the engine: join or start Ray, map a spec's resources to Ray, launch runs on workers.

* `connect(address)`: no address (and no $RAY_ADDRESS) starts a local Ray instance sized to this
  machine, every port of it on 127.0.0.1 (`local_only`); a GCS address (`host:6379`, `auto`, `ray://host:10001`) joins that cluster as a driver.
  (A dashboard URL, `http://host:8265`, means "submit a job" and is handled by orchestration/execution/jobs.py;
  inside that job Ray sets $RAY_ADDRESS to the GCS address, so the job's driver joins here.)
* `worker_options(resources)`: Ray options of one worker. CPU-only workers run JAX on the CPU with
  as many threads as CPUs asked, pinned to as many free cores (orchestration/execution/cpu_slots.py), with
  glibc's malloc keeping XLA's per-step buffers; a fractional GPU share turns off JAX's full-memory
  preallocation; TPU chips are the `TPU` resource.
* `launch(spec, **kwargs)`: one Ray task running orchestration.execution.worker.execute, or for
  `resources.hosts > 1` one actor per host (a placement group spreads them), joined by
  `jax.distributed.initialize` with process 0's node as coordinator. Each worker process runs one
  experiment and exits, so XLA settings and device memory never leak between runs.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any

from orchestration.execution import cpu_slots
from shortcut import progress
from shortcut.errors import ShortcutError
from shortcut.spec import ResourcesSpec, Spec


class ResourcesError(ShortcutError, RuntimeError):
    """The Ray cluster cannot ever provide what a spec asks for."""


def connect(address: str | None = None, *, num_cpus: int | None = None, runtime_env: dict | None = None) -> dict:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start a local instance; returns the
    cluster's resources. `runtime_env` applies to every worker of this driver. A second call in the same
    process reuses the connection (and ignores the arguments)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        local_only()  # before ray is imported
    import ray

    from shortcut.quiet import quiet_ray

    quiet_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING")
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=True, logging_level="WARNING")
            if (node := ray.util.get_node_ip_address()) != LOOPBACK:
                ray.shutdown()
                raise RuntimeError(f"the local Ray instance took the address {node}, not {LOOPBACK}: ray was "
                                   "imported before cluster.local_only() ran")
        _interrupt_on_sigterm()
    return ray.cluster_resources()


LOOPBACK = "127.0.0.1"
# Ray reads this variable when it is imported. On Linux Ray gives a local node the machine's network
# address, and its servers (GCS, raylet, object manager, workers, dashboard and runtime-env agents,
# metrics) listen on every interface or on that address: anyone on the network could submit work. With
# "0", Ray does what it does on macOS and Windows: the node address is 127.0.0.1, and every one of those
# servers binds 127.0.0.1 (Ray binds its gRPC servers to loopback exactly when the node address is it).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_only() -> None:
    """Make the local Ray instance this process starts listen on 127.0.0.1 only; call it before the
    first `import ray` of a driver that starts one (connect does). Its workers inherit it."""
    os.environ[_LOCAL_ONLY_ENV] = "0"


def _interrupt_on_sigterm() -> None:
    """Let SIGTERM stop this driver the way Ctrl-C does (running runs checkpoint, Ray shuts down), not with
    the stack dump and abort of the handler that ray.init installs."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


AGAIN = ("interrupted again: stopped without waiting for the run to finish its checkpoint; the last complete "
         "checkpoint is kept, and the same command resumes from it")


def end_quietly_on_another_interrupt() -> None:
    """After a first Ctrl-C or SIGTERM: another one ends this driver at once with the one line AGAIN, not
    with a traceback from wherever it lands (waiting for the runs to stop, Ray's atexit shutdown). The
    processes it started (a local Ray instance's) are killed with it, not left to notice; checkpoints are
    written atomically, so what a cut-short save leaves is never taken for a checkpoint."""
    import signal
    import threading

    def end(*_):
        os.write(2, f"\n{AGAIN}\n".encode())
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        finally:
            os._exit(130)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, end)
        signal.signal(signal.SIGTERM, end)


# XLA on the CPU allocates each execution's temporaries as one buffer (tens of MB for the digits train
# step) and frees it again; above glibc's mmap threshold that is an mmap/munmap per step, and the kernel
# zeroes every page anew (12,000 page faults a step, a quarter of a digits step's time in the kernel).
# Keeping such buffers in the heap makes a digits step 1.4x faster. The tunables are read when a
# process starts, hence an environment variable.
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def worker_options(r: ResourcesSpec) -> dict[str, Any]:
    """Ray options (num_cpus, num_gpus, resources, runtime_env) of one worker of a run."""
    env = {}
    if r.gpus == 0 and r.tpus == 0:
        threads = str(max(1, int(r.cpus)))
        env.update(JAX_PLATFORMS="cpu", TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS=threads,
                   GLIBC_TUNABLES=CPU_MALLOC_TUNABLES)
        if float(r.cpus).is_integer():
            env[cpu_slots.ENV] = threads  # the worker pins itself to that many free cores
        if int(r.cpus) <= 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if 0 < r.gpus < 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    options: dict[str, Any] = {"num_cpus": r.cpus, "num_gpus": r.gpus, "runtime_env": {"env_vars": env}}
    if r.tpus:
        options["resources"] = {"TPU": r.tpus}
    return options


def demand(r: ResourcesSpec) -> dict[str, float]:
    """What one run takes of a Ray cluster, in Ray's resource names (all its hosts together)."""
    return {"CPU": r.cpus * r.hosts, "GPU": r.gpus * r.hosts, "TPU": r.tpus * r.hosts}


def check_feasible(r: ResourcesSpec, cluster: dict, name: str, *, local: bool) -> str | None:
    """A ResourcesError if a local instance can never run this (Ray would wait forever); on a cluster
    (which may autoscale) a warning to print instead. None when the resources exist."""
    need = demand(r)
    short = {k: v for k, v in need.items() if v and cluster.get(k, 0) < v}
    if not short:
        return None
    have = ", ".join(f"{k} {cluster.get(k, 0):g}" for k in ("CPU", "GPU", "TPU"))
    asks = ", ".join(f"{k} {v:g}" for k, v in short.items())
    message = (f"{name} asks for {asks} (resources: cpus {r.cpus:g}, gpus {r.gpus:g}, tpus {r.tpus}, "
               f"hosts {r.hosts}); this Ray cluster has {have}")
    if local:
        raise ResourcesError(f"{message}. Lower them with --set resources.gpus=0 (etc.), or run on a cluster "
                             "with --address")
    return f"warning: {message}; the run waits until the cluster provides them"


@functools.cache
def _remote_execute():
    import ray

    from orchestration.execution.worker import execute

    return ray.remote(max_calls=1)(execute)


class _HostWorker:
    """One process of a multi-host run (a Ray actor, one per host)."""

    def coordinator_address(self) -> str:
        import ray

        node = ray.util.get_node_ip_address()  # JAX's coordinator binds it (worker.init_distributed)
        with socket.socket() as s:
            s.bind((node, 0))
            port = s.getsockname()[1]
        return f"{node}:{port}"

    def execute(self, spec: Spec, **kwargs) -> dict:
        from orchestration.execution.worker import execute

        return execute(spec, **kwargs)


def launch(spec: Spec, *, name: str | None = None, **kwargs):
    """Start one run of the resolved `spec` on Ray, with its `resources`; returns the ObjectRef of its outcome
    (process 0's, for a multi-host run). kwargs go to orchestration.execution.worker.execute."""
    import ray

    resources = spec.resources
    options = worker_options(resources)
    options["runtime_env"]["env_vars"].update(progress.worker_env())  # bars drawn by this driver, or plain lines
    name = name or spec.name
    if resources.hosts == 1:
        from orchestration.execution.killed import max_retries

        return _remote_execute().options(name=name, max_retries=max_retries(), **options).remote(spec, **kwargs)
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestration.execution.worker import Distributed

    bundle = {"CPU": options["num_cpus"]}
    if options["num_gpus"]:
        bundle["GPU"] = options["num_gpus"]
    bundle.update(options.get("resources", {}))
    # SPREAD: one worker per host where the cluster has the hosts (a TPU host's or a whole GPU node's
    # bundle fits one per host anyway); a single machine may still run every process (for tests).
    group = placement_group([bundle] * resources.hosts, strategy="SPREAD")
    actor_cls = ray.remote(_HostWorker)
    actors = [actor_cls.options(name=None, num_cpus=options["num_cpus"], num_gpus=options["num_gpus"],
                                resources=options.get("resources"), runtime_env=options["runtime_env"],
                                scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
              for i in range(resources.hosts)]
    coordinator = ray.get(actors[0].coordinator_address.remote())
    refs = [a.execute.remote(spec, distributed=Distributed(coordinator, resources.hosts, i), **kwargs)
            for i, a in enumerate(actors)]
    return _first_of_all(refs, actors, group)


def _first_of_all(refs, actors, group):
    """An ObjectRef of process 0's outcome that resolves once every process finished (and frees them)."""
    import ray

    @ray.remote(num_cpus=0)
    def gather(*outcomes):
        return outcomes[0]

    ref = gather.remote(*refs)
    _PENDING[ref] = (actors, group)
    return ref


_PENDING: dict = {}  # keeps multi-host actors and their placement group alive until their run ends


def cancel(refs: list, timeout: float = 120.0) -> None:
    """Stop running launches: KeyboardInterrupt inside each (the run checkpoints and records that it was
    interrupted); waits up to `timeout` seconds for them to end. A further interrupt ends the driver at
    once (end_quietly_on_another_interrupt)."""
    import ray

    end_quietly_on_another_interrupt()
    for ref in refs:
        ray.cancel(ref)
    ray.wait(refs, num_returns=len(refs), timeout=timeout)


def release(ref) -> None:
    """Free the actors and placement group of a finished multi-host run (no-op for single-host runs)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    held = _PENDING.pop(ref, None)
    if held:
        actors, group = held
        for a in actors:
            ray.kill(a)
        remove_placement_group(group)


def cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised (RayTaskError wraps it), else the error itself."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return error.cause
    return error
