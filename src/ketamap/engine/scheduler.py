"""Pick the Dask scheduler a run uses: local threads, or a dask.distributed cluster.

The same graph runs on every scheduler and gives the same result; only where
the chunks are computed changes:

* default: the local threaded scheduler (one process, shared memory);
* ``scheduler="tcp://host:8786"``: an existing ``dask.distributed`` scheduler;
* ``cluster="local"``: a ``LocalCluster`` of worker processes on this machine;
* ``cluster="slurm"`` or ``"pbs"``: a ``dask_jobqueue`` cluster whose job
  settings (queue, cores, memory, walltime ...) come from Dask's configuration
  (``~/.config/dask/jobqueue.yaml``), scaled to ``n_workers`` jobs. The jobs are
  submitted before the block starts (a job the queue refuses is an error); the
  block does not wait for them to run.

``dask.distributed`` and ``dask_jobqueue`` are imported only when asked for,
so ``import ketamap`` stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator

from ketamap.errors import ParameterError, require

__all__ = ["use_scheduler", "distributed_active", "map_jobs", "CLUSTERS"]

log = logging.getLogger(__name__)

CLUSTERS = ("local", "slurm", "pbs")


def distributed_active() -> bool:
    """Tell whether Dask computations currently go to a ``dask.distributed`` client."""
    import dask

    sched = dask.config.get("scheduler", None)
    if sched in ("dask.distributed", "distributed"):
        return True
    if sched is None and "distributed" in sys.modules:  # a client may be the default
        try:
            from distributed import default_client

            default_client()
            return True
        except (ImportError, ValueError):
            return False
    return False


def map_jobs(fn: Callable, jobs: Iterable[tuple], n_jobs: int = 1) -> Iterator:
    """Run ``fn(*job)`` for every job, in worker processes when ``n_jobs > 1``.

    The one place where ketamap starts worker processes. Results come back in the
    order of ``jobs`` as each is ready. If the caller is interrupted (Ctrl-C, or
    SIGTERM turned into :class:`KeyboardInterrupt` by the command line) or a job
    fails, queued jobs are cancelled and running workers are terminated before the
    exception propagates, so no worker is left computing; what they had begun is
    only ever a temporary that a re-run cleans up (outputs are written atomically).

    Parameters
    ----------
    fn : callable
        A picklable, top-level function.
    jobs : iterable of tuple
        Positional arguments of each call.
    n_jobs : int
        Worker processes; 1 (or a single job) runs in this process.

    Yields
    ------
    object
        ``fn(*job)`` for each job, in order.

    Examples
    --------
    >>> list(map_jobs(pow, [(2, 3), (3, 2)]))
    [8, 9]
    """
    jobs = list(jobs)
    if n_jobs <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job)
        return
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), initializer=_worker_signals)
    try:
        futures = [pool.submit(fn, *job) for job in jobs]
        for fut in futures:
            yield fut.result()
    except BaseException:
        # a running job is not cancelled by shutdown: its worker is terminated (taken
        # before the shutdown, which forgets the executor's processes)
        workers = list((getattr(pool, "_processes", None) or {}).values())
        for proc in workers:
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def _worker_signals() -> None:
    """In a worker: Ctrl-C is for the parent (it stops the workers), SIGTERM ends it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _distributed():
    return require("distributed", needed_for="A distributed scheduler", install="dask[distributed]")


# the loggers of a cluster run: the scheduler (in this process) and dask-jobqueue
_CLUSTER_LOGGERS = ("distributed", "dask_jobqueue")


@contextlib.contextmanager
def _cluster_logging() -> Iterator[None]:
    """Send the log records of a cluster run through ketamap's logging, at INFO at most.

    ``distributed`` logs every worker that joins or leaves, every client and every
    connection at INFO, on a console handler of its own (or, when logging was set up
    before it was imported, through the root logger's handlers at its own INFO level,
    whatever level ketamap logs at). During a cluster run that buries the progress bar.
    For the length of the run these loggers lose their console handlers (file handlers
    stay), propagate to the root logger's handlers and follow the level of the
    ``ketamap`` logger, never below INFO: WARNING and above by default, INFO where
    ketamap logs INFO (``--verbose``, or a log file). The workers of a SLURM or PBS
    cluster log to their jobs' output files (``log-directory`` of the jobqueue
    configuration). Everything is restored afterwards.
    """
    level = max(logging.INFO, logging.getLogger("ketamap").getEffectiveLevel())
    saved = []
    for name in _CLUSTER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        for handler in list(logger.handlers):
            if _is_console(handler):
                logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = True
    try:
        yield
    finally:
        for logger, old_level, propagate, handlers in saved:
            logger.setLevel(old_level)
            logger.propagate = propagate
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream in (sys.stderr, sys.__stderr__)


def _jobqueue_cluster(kind: str, n_workers: int):
    dask_jobqueue = require(
        "dask_jobqueue",
        needed_for=f"--cluster {kind}",
        install="ketamap[cluster]",
        what="the dask-jobqueue package",
        otherwise=" and describe the jobs in ~/.config/dask/jobqueue.yaml",
    )
    submit_command = "sbatch" if kind == "slurm" else "qsub"
    if shutil.which(submit_command) is None:
        raise ParameterError(
            f"--cluster {kind} submits jobs with {submit_command}, which is not on this "
            f"machine's PATH; run ketamap on a {kind.upper()} login node."
        )
    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    try:
        cluster = cls()  # queue, cores, memory, walltime ... from jobqueue.<kind> config
    except (ValueError, TypeError) as e:
        raise ParameterError(
            f"The {kind} cluster is not configured; set jobqueue.{kind}.cores and "
            f"jobqueue.{kind}.memory in ~/.config/dask/jobqueue.yaml."
        ) from e
    # what cluster.scale(jobs=n_workers) does, but the submissions are awaited here (not
    # the jobs' start): a job the queue refuses is then an error, instead of a run that
    # waits for workers forever while the job is resubmitted in the background
    while len(cluster.worker_spec) < n_workers:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state)
    except RuntimeError as e:
        from distributed.core import Status

        for job in cluster.workers.values():  # never submitted: nothing to cancel
            if getattr(job, "job_id", None) is None:
                job.status = Status.failed
        cluster.close()
        said = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = said[-1] if said else f"{submit_command} failed"
        raise ParameterError(
            f"{kind.upper()} refused the jobs of the workers ({reason}); check jobqueue.{kind} "
            "(queue, account, cores, memory, walltime ...) in ~/.config/dask/jobqueue.yaml."
        ) from e
    return cluster


@contextlib.contextmanager
def use_scheduler(
    scheduler: str | None = None,
    cluster: str | None = None,
    *,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    threads: int | None = None,
) -> Iterator[object | None]:
    """Run the enclosed Dask computations on the chosen scheduler.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler (``tcp://host:8786``,
        or a scheduler file ending in ``.json``).
    cluster : {"local", "slurm", "pbs"}, optional
        Start a cluster for the duration of the block: a ``LocalCluster`` of
        ``n_workers`` processes, or ``n_workers`` SLURM/PBS jobs through
        dask-jobqueue. Mutually exclusive with ``scheduler``.
    n_workers : int
        Worker processes (``local``) or jobs (``slurm``/``pbs``).
    threads_per_worker : int
        Threads per ``LocalCluster`` worker.
    memory_limit : str, float or None
        Memory limit per ``LocalCluster`` worker (e.g. ``"4GB"``; ``"auto"``
        shares the machine's memory; None for no limit). Workers above 95 % of
        it are restarted and their tasks recomputed elsewhere.
    threads : int, optional
        Threads of the local threaded scheduler (default: one per core).

    Yields
    ------
    distributed.Client or None
        The client when a distributed scheduler is used, else None.

    Raises
    ------
    ParameterError
        If both ``scheduler`` and ``cluster`` are given, ``cluster`` is not one
        of ``local``, ``slurm``, ``pbs``, a needed package is missing, the
        scheduler cannot be reached, or the queue refuses the worker jobs.

    Notes
    -----
    While a distributed scheduler is in use, the log records of ``distributed``
    and ``dask_jobqueue`` go through ketamap's logging at the ``ketamap``
    logger's level (never below INFO), not to a console handler of their own.

    Examples
    --------
    >>> import dask.array as da
    >>> with use_scheduler():
    ...     int(da.ones(10, chunks=5).sum().compute())
    10
    """
    import dask

    if scheduler and cluster:
        raise ParameterError("Give either --scheduler ADDRESS or --cluster KIND, not both.")
    if cluster is not None and cluster not in CLUSTERS:
        raise ParameterError(f'--cluster must be one of {", ".join(CLUSTERS)}, got "{cluster}".')
    for name, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name} must be a whole number of at least 1, got {value!r}.")
    if not scheduler and not cluster:
        options = {"scheduler": "threads"}
        if threads is not None:
            options["num_workers"] = threads
        with dask.config.set(options):
            yield None
        return
    distributed = _distributed()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cluster_logging())  # restored last, after the cluster closed
        if cluster == "local":
            # dashboard on a free port: a busy default port (8787) would only raise a warning
            lc = distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=":0",
            )
            stack.enter_context(lc)
            target = lc
        elif cluster in ("slurm", "pbs"):
            target = stack.enter_context(_jobqueue_cluster(cluster, n_workers))
        else:
            target = scheduler
        try:
            if isinstance(target, str) and target.endswith(".json"):
                client = distributed.Client(scheduler_file=target, timeout="30s")
            else:
                client = distributed.Client(target, timeout="30s")
        except OSError as e:
            raise ParameterError(f"Cannot reach the Dask scheduler at {target}: {e}.") from e
        stack.enter_context(client)  # the client sets itself as Dask's default scheduler
        log.info("use_scheduler: %s", client)
        yield client
