"""`ketamap run --cluster slurm` on a real one-node SLURM gives the threaded run's outputs.

The fixture starts a private SLURM on this machine (its own munge key and socket, its own
``slurm.conf``, ports and state in a temporary folder, every daemon on 127.0.0.1) and a Dask
configuration for dask-jobqueue. The main test (slow) runs a small simulated study once on
the threaded scheduler and once through two SLURM jobs, both through the command line in a
subprocess, and compares the outputs; another checks that jobs the queue refuses stop the run
with one sentence. The last test, of the logging of a cluster run, needs no SLURM.

It needs root, Debian's ``slurm-wlm`` and ``munge`` and dask-jobqueue (``ketamap[cluster]``);
otherwise it is skipped, unless ``KETAMAP_REQUIRE_SLURM=1`` (set by ``.ci/run`` after it has
installed them) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ketamap.simulate import BrainParams, simulate_census

KETAMAP = [sys.executable, "-c", "from ketamap.cli import main; main()"]
STAGES = ("detect", "register", "quantify", "stats")  # the report adds time, not scheduling
COMPARED = (
    "detect/cells.csv",
    "register/volumes.csv",
    "quantify/regions.csv",
    "quantify/cells_atlas.csv",
)
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
SBIN = os.pathsep.join(("/usr/sbin", "/usr/local/sbin", "/sbin"))
N_JOBS = 2

# A worker preload: every task a worker computes is appended to a file named after the SLURM
# job the worker runs in, so the test sees which jobs did the work.
TASK_LOG_PRELOAD = """
import os
from distributed import WorkerPlugin

class TaskLog(WorkerPlugin):
    def __init__(self, path):
        self.path = path

    def transition(self, key, start, finish, **kwargs):
        if start == "executing" and finish == "memory":
            with open(self.path, "a") as f:
                f.write(str(key) + "\\n")

async def dask_setup(worker):
    job = os.environ.get("SLURM_JOB_ID", "no-job")
    await worker.plugin_add(TaskLog(os.path.join({tasks!r}, job + ".txt")), name="task-log")
"""


def _program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _unavailable() -> str | None:
    """Why a one-node SLURM cannot be started here, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    missing = [name for name in PROGRAMS if _program(name) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install slurm-wlm munge)"
    if importlib.util.find_spec("dask_jobqueue") is None:
        return "dask-jobqueue is not installed (pip install 'ketamap[cluster]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    if not path.is_file():
        return f"({path.name} not written)"
    return f"{path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class Slurm:
    """A one-node SLURM started by the fixture."""

    root: Path
    env: dict[str, str]  # SLURM_CONF and DASK_CONFIG for the commands of a run
    job_logs: Path  # the dask-worker-<job>.err/.out files of the jobs
    tasks: Path  # <job>.txt: the tasks each job's worker computed
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def command(self, *args: str) -> str:
        found = subprocess.run(
            [_program(args[0]), *args[1:]], env=self.env, text=True, capture_output=True, timeout=60
        )
        assert found.returncode == 0, f"{' '.join(args)} failed: {found.stderr}"
        return found.stdout

    def jobs(self) -> list[str]:
        """The job ids in the queue (pending, running or completing)."""
        return self.command("squeue", "-h", "-o", "%i").split()

    def node_state(self) -> str:
        return self.command("sinfo", "-h", "-N", "-o", "%T").strip()

    def logs(self) -> str:
        """The ends of the daemons' logs and of their console output."""
        logs = self.root / "log"
        return "\n".join(_tail(logs / f"{n}{ext}") for n in self.procs for ext in (".log", ".out"))


def _write_config(root: Path, cpus: int, memory_mb: int) -> dict[str, str]:
    """slurm.conf and the Dask configuration; the environment that points at them."""
    for sub in ("state", "spool", "log", "jobs", "tasks", "workers", "dask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    (root / "plugstack.conf").write_text("")
    conf.write_text(f"""\
ClusterName=ketamaptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / "munge" / "munge.socket"}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
PlugStackConfig={root / "plugstack.conf"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
MailProg=/bin/true
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    preload = root / "task_log.py"
    preload.write_text(TASK_LOG_PRELOAD.replace("{tasks!r}", repr(str(root / "tasks"))))
    # one worker of one thread per job; every address on the loopback interface: the
    # scheduler (interface lo), its dashboard, the workers, their nannies and dashboards
    (root / "dask" / "jobqueue.yaml").write_text(f"""\
jobqueue:
  slurm:
    cores: 1
    processes: 1
    memory: 2GB
    walltime: "00:30:00"
    interface: lo
    local-directory: {root / "workers"}
    log-directory: {root / "jobs"}
    worker-extra-args: ["--dashboard-address", "127.0.0.1:0", "--preload", "{preload}"]
    scheduler-options:
      dashboard_address: "127.0.0.1:0"
""")
    return {"SLURM_CONF": str(conf), "DASK_CONFIG": str(root / "dask")}


def _start(slurm: Slurm, name: str, *args: str) -> None:
    with open(slurm.root / "log" / f"{name}.out", "w") as out:  # the daemon keeps a copy
        slurm.procs[name] = subprocess.Popen(
            [_program(name), *args],
            env=slurm.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(what: str, ready, slurm: Slurm, timeout_s: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        dead = [n for n, p in slurm.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(
                f"{', '.join(dead)} exited while waiting for {what}.\n" + slurm.logs()
            )
        try:
            if ready():
                return
        except (AssertionError, OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}.\n" + slurm.logs())


def _stop(slurm: Slurm) -> None:
    """Cancel what is left in the queue, stop the daemons, end any process of their jobs."""
    import psutil

    try:
        left = slurm.jobs()
        if left:
            slurm.command("scancel", *left)
            _wait("the queue to empty", lambda: not slurm.jobs(), slurm, timeout_s=30)
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError):
        pass  # the daemons are stopped below whatever the queue says
    for name in ("slurmd", "slurmctld", "munged"):
        proc = slurm.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    # a job step outlives slurmd: end every process still pointing at this slurm.conf
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_CONF") == slurm.env["SLURM_CONF"]:
                proc.kill()
        except (psutil.Error, OSError):
            continue


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM on 127.0.0.1 for this module: started, idle, and stopped after."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("KETAMAP_REQUIRE_SLURM", "") not in ("", "0"):
            pytest.fail(f"no SLURM to test with: {reason}, and KETAMAP_REQUIRE_SLURM is set")
        pytest.skip(f"no SLURM to test with: {reason}")
    root = tmp_path_factory.mktemp("slurm")
    # the machine's CPUs and memory, but room for the test's jobs (1 CPU, 2 GB each) on a
    # smaller one: slurmd takes the node's size from slurm.conf (config_overrides)
    cpus = max(len(os.sched_getaffinity(0)), N_JOBS)
    with open("/proc/meminfo") as f:
        memory_mb = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024
    memory_mb = max(memory_mb, 2048 * N_JOBS)
    env = {**os.environ, **_write_config(root, cpus, memory_mb)}
    slurm = Slurm(root=root, env=env, job_logs=root / "jobs", tasks=root / "tasks")
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
    try:
        _start(
            slurm,
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={root / 'log' / 'munged.log'}",
        )
        _wait("munged", (munge / "munge.socket").exists, slurm)
        _start(slurm, "slurmctld", "-D", "-f", env["SLURM_CONF"])
        _start(slurm, "slurmd", "-D", "-f", env["SLURM_CONF"], "-N", "localhost")
        _wait("the node to be idle", lambda: slurm.node_state() == "idle", slurm)
        yield slurm
    finally:
        _stop(slurm)


def _command(manifest: Path, *args: str) -> list[str]:
    """``ketamap run MANIFEST --stage ... ARGS``."""
    stages = [a for s in STAGES for a in ("--stage", s)]
    return [*KETAMAP, "run", str(manifest), *stages, *args]


def _outputs(root: Path) -> dict[str, str]:
    found = {}
    for sub in sorted((root / "subjects").iterdir()):
        for rel in COMPARED:
            found[f"{sub.name}/{rel}"] = (sub / rel).read_text()
    found["stats/regions.csv"] = (root / "stats" / "regions.csv").read_text()
    return found


class _Listening(threading.Thread):
    """Sample the listening TCP addresses of every process of the run and of its jobs."""

    def __init__(self, pid: int, slurm_conf: str):
        super().__init__(daemon=True)
        self.pid, self.slurm_conf = pid, slurm_conf
        self.seen: dict[tuple[str, int], str] = {}  # (address, pid) -> process name
        self.stop = threading.Event()

    def _ours(self, pid: int) -> bool:
        import psutil

        try:
            proc = psutil.Process(pid)
            return (
                pid == self.pid
                or self.pid in {p.pid for p in proc.parents()}
                or proc.environ().get("SLURM_CONF") == self.slurm_conf
            )
        except (psutil.Error, OSError):
            return False

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.5):
            for conn in psutil.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid and self._ours(conn.pid):
                    try:
                        name = " ".join(psutil.Process(conn.pid).cmdline()[:4])
                    except (psutil.Error, OSError):
                        continue
                    self.seen.setdefault((conn.laddr.ip, conn.pid), name)


@pytest.mark.slow
def test_run_on_slurm_matches_the_threaded_run(slurm, tmp_path):
    threaded = tmp_path / "threads" / "study"
    manifest = simulate_census(
        threaded,
        atlas="phantom:100",
        scenario="null",
        n_per_group=2,
        seed=5,
        params=BrainParams(voxel_size_um=(60.0, 60.0, 60.0)),
    )
    # one ITK thread makes registration bit-for-bit reproducible; it runs in the calling
    # process on every scheduler, so a short affine-only one keeps the test short
    manifest.write_text(
        manifest.read_text() + "\n[registration]\nn_threads = 1\n"
        "deformable = false\nmatch_reference_blur = false\n"
        "affine_iterations = 100\n"
    )
    clustered = tmp_path / "slurm" / "study"
    shutil.copytree(threaded, clustered)

    done = subprocess.run(_command(manifest), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"ketamap run failed:\n{done.stderr[-3000:]}"
    env = {**os.environ, **{k: slurm.env[k] for k in ("SLURM_CONF", "DASK_CONFIG")}}
    cmd = _command(clustered / "study.toml", "--cluster", "slurm", "--workers", str(N_JOBS))
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening = _Listening(run.pid, slurm.env["SLURM_CONF"])
    listening.start()
    try:
        out, err = run.communicate(timeout=900)
    finally:
        listening.stop.set()
        listening.join(timeout=30)
    assert run.returncode == 0, f"ketamap run --cluster slurm failed:\n{err[-3000:]}"

    # the same outputs, byte for byte
    expected, found = _outputs(threaded), _outputs(clustered)
    assert len(found) == 4 * len(COMPARED) + 1
    for name, text in expected.items():
        assert found[name] == text, f"{name} differs between threads and SLURM"

    # SLURM ran the workers: N_JOBS jobs, each registered to the run's scheduler and
    # computing some of its tasks, and the run cancelled them when it ended
    _wait("the jobs to leave the queue", lambda: not slurm.jobs(), slurm)
    ctld = (slurm.root / "log" / "slurmctld.log").read_text()
    allocated = re.findall(r"sched: Allocate JobId=(\d+) NodeList=localhost", ctld)
    assert len(allocated) == N_JOBS, ctld[-2000:]
    schedulers = set()
    for job in allocated:
        log = (slurm.job_logs / f"dask-worker-{job}.err").read_text()
        schedulers.update(re.findall(r"Registered to:\s+(tcp://\S+)", log))
    assert len(schedulers) == 1 and next(iter(schedulers)).startswith("tcp://127.0.0.1:")
    tasks = {p.stem: p.read_text().splitlines() for p in slurm.tasks.glob("*.txt")}
    assert set(tasks) == set(allocated), tasks.keys()  # both jobs computed tasks
    assert sum(map(len, tasks.values())) > 10

    # every address the run and its jobs listened on is on the loopback interface
    workers = {pid for (_, pid), cmd in listening.seen.items() if "dask_worker" in cmd}
    assert len(workers) >= N_JOBS, listening.seen
    outside = {k: v for k, v in listening.seen.items() if k[0] not in ("127.0.0.1", "::1")}
    assert not outside, outside

    # the scheduler's INFO lines are not on the console (only WARNING and above)
    assert not re.search(r"^INFO\b|\bINFO\b.*distributed|distributed.*\bINFO\b", err, re.M), err
    assert "4 subjects, 12 subject stages run" in out


def test_cluster_logging_keeps_info_off_the_console(monkeypatch):
    """distributed's INFO lines follow ketamap's level; its own console handler is set aside."""
    import io
    import logging

    from ketamap.engine.scheduler import _cluster_logging

    console = io.StringIO()
    root, dist = logging.getLogger(), logging.getLogger("distributed")
    own = logging.StreamHandler(sys.stderr)  # what distributed installs on import
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(console)])
    monkeypatch.setattr(dist, "handlers", [own])
    monkeypatch.setattr(dist, "propagate", False)
    # ketamap's level follows the root's here (the command line sets it to INFO and
    # filters on its console handler instead: tests/test_cli.py)
    monkeypatch.setattr(logging.getLogger("ketamap"), "level", logging.NOTSET)
    levels = root.level, dist.level
    try:
        dist.setLevel(logging.INFO)
        for root_level, shown in ((logging.WARNING, False), (logging.INFO, True)):
            root.setLevel(root_level)
            with _cluster_logging():
                assert dist.handlers == [] and dist.propagate
                logging.getLogger("distributed.scheduler").info("Register worker %d", root_level)
                logging.getLogger("dask_jobqueue.core").warning("sbatch failed %d", root_level)
            assert dist.handlers == [own] and not dist.propagate and dist.level == logging.INFO
            text = console.getvalue()
            assert (f"Register worker {root_level}" in text) is shown
            assert f"sbatch failed {root_level}" in text
    finally:
        root.setLevel(levels[0])
        dist.setLevel(levels[1])


def test_a_job_the_queue_refuses_is_one_sentence(slurm, monkeypatch):
    """sbatch refusing the jobs stops the run at once, instead of waiting for workers."""
    import dask

    from ketamap.engine.scheduler import use_scheduler
    from ketamap.errors import ParameterError

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    jobs = {
        "cores": 1,
        "memory": "1GB",
        "queue": "no-such-partition",
        "interface": "lo",
        "scheduler-options": {"dashboard_address": "127.0.0.1:0"},
    }
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in jobs.items()}):
        with pytest.raises(ParameterError, match=r"^SLURM refused .*[Ii]nvalid partition"):
            with use_scheduler(cluster="slurm", n_workers=2):
                pass
    assert not slurm.jobs()
