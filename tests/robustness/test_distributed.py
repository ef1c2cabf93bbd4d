"""The same cells on every scheduler: threads, a LocalCluster, and a cluster that loses a worker."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from ketamap.engine.scheduler import distributed_active, use_scheduler
from ketamap.wholebrain.detect import DetectionParams, detect_cells

# worker processes cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VOXEL_UM = (5.0, 5.0, 5.0)
PARAMS = DetectionParams(chunk_size_vox=(24, 48, 48))


def synthetic_volume(shape=(72, 144, 144), n_cells=120, seed=0) -> np.ndarray:
    """Background + Poisson-like noise + Gaussian somata of 15 µm."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(200.0, 8.0, shape).astype(np.float32)
    sigma = 15.0 / (2 * np.sqrt(3)) / VOXEL_UM[0]
    zz, yy, xx = np.ogrid[-4:5, -4:5, -4:5]
    blob = np.exp(-(zz**2 + yy**2 + xx**2) / (2 * sigma**2)).astype(np.float32)
    for c in rng.integers(5, np.array(shape) - 5, (n_cells, 3)):
        sl = tuple(slice(int(p) - 4, int(p) + 5) for p in c)
        vol[sl] += 300.0 * blob
    return np.clip(vol, 0, 65535).astype(np.uint16)


def slow(block: np.ndarray) -> np.ndarray:
    time.sleep(0.3)  # 27 blocks on 2 workers: at least 4 s, so the kill lands mid-run
    return block


@pytest.fixture(scope="module")
def volume():
    return synthetic_volume()


@pytest.fixture(scope="module")
def expected(volume):
    with use_scheduler():
        cells = detect_cells(volume, voxel_size_um=VOXEL_UM, params=PARAMS)
    assert len(cells) > 80  # the synthetic somata are found
    return cells


@pytest.fixture(scope="module")
def cluster_client():
    with use_scheduler(
        cluster="local", n_workers=2, threads_per_worker=1, memory_limit="2GB"
    ) as client:
        yield client


def test_local_cluster_gives_identical_cells(volume, expected, cluster_client):
    assert distributed_active()
    assert len(cluster_client.scheduler_info()["workers"]) == 2
    cells = detect_cells(
        da.from_array(volume, chunks=(24, 48, 48)), voxel_size_um=VOXEL_UM, params=PARAMS
    )
    pd.testing.assert_frame_equal(cells, expected)


def test_a_worker_lost_mid_run_does_not_change_the_result(volume, expected, cluster_client):
    lazy = da.from_array(volume, chunks=(24, 48, 48)).map_blocks(slow, dtype=volume.dtype)
    before = cluster_client.run(os.getpid)
    result, failure = {}, {}

    def compute():
        try:
            result["cells"] = detect_cells(lazy, voxel_size_um=VOXEL_UM, params=PARAMS)
        except Exception as e:  # reported below, in the test's thread
            failure["error"] = e

    # the client is Dask's default scheduler (global config): the thread uses it too
    worker = threading.Thread(target=compute)
    worker.start()
    time.sleep(1.5)
    assert worker.is_alive(), "the computation ended before a worker could be killed"
    os.kill(next(iter(before.values())), signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive() and not failure, failure
    cluster_client.wait_for_workers(2, timeout=30)
    after = cluster_client.run(os.getpid)
    assert set(after.values()) != set(before.values())  # the nanny started a new worker
    pd.testing.assert_frame_equal(result["cells"], expected)


def write_study(root, n_subjects=3):
    """A small study whose brains are synthetic OME-Zarr volumes (detection only)."""
    from ketamap.io.volumes import write_ome_zarr

    text = (
        '[study]\nname = "tiny"\natlas = "phantom:100"\nreference_group = "a"\n'
        f'[imaging]\nvoxel_size_um = {list(VOXEL_UM)}\norientation = "psl"\n'
        '[[groups]]\nname = "a"\ndose_mg_per_kg = 0\n'
        '[[groups]]\nname = "b"\ndose_mg_per_kg = 30\n'
    )
    for i in range(n_subjects):
        write_ome_zarr(
            synthetic_volume(seed=10 + i),
            root / f"m{i}.ome.zarr",
            voxel_size_um=VOXEL_UM,
            chunks=(24, 72, 72),
        )
        text += f'[[subjects]]\nid = "m{i}"\ngroup = "{"ab"[i % 2]}"\nsignal = "m{i}.ome.zarr"\n'
    text += "[detection]\nchunk_size_vox = [24, 48, 48]\n"
    (root / "study.toml").write_text(text)
    return root / "study.toml"


def test_run_cluster_local_matches_the_default_run(tmp_path, run_cli, monkeypatch):
    import shutil

    import ketamap.engine.scheduler

    seen = []  # what each subject job saw: were its chunks sent to a cluster?
    real = ketamap.engine.scheduler.distributed_active
    monkeypatch.setattr(
        ketamap.engine.scheduler, "distributed_active", lambda: seen.append(real()) or seen[-1]
    )
    write_study(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert run_cli("run", tmp_path / "a" / "study.toml", "--stage", "detect") == 0
    assert seen and not any(seen)
    seen.clear()
    assert (
        run_cli(
            "run",
            tmp_path / "b" / "study.toml",
            "--stage",
            "detect",
            "--cluster",
            "local",
            "--workers",
            "2",
        )
        == 0
    )
    assert seen and all(seen)
    for i in range(3):
        a = (tmp_path / "a" / "subjects" / f"m{i}" / "detect" / "cells.csv").read_text()
        b = (tmp_path / "b" / "subjects" / f"m{i}" / "detect" / "cells.csv").read_text()
        assert a == b and a.count("\n") > 80, i


def test_detect_cli_on_an_existing_scheduler(volume, cluster_client, tmp_path, run_cli):
    np.save(tmp_path / "v.npy", volume)
    args = ("detect", tmp_path / "v.npy", "--voxel-size", *VOXEL_UM)
    assert run_cli(*args, "--out", tmp_path / "threads") == 0
    address = cluster_client.scheduler.address
    assert run_cli(*args, "--out", tmp_path / "remote", "--scheduler", address) == 0
    a = (tmp_path / "threads" / "cells.csv").read_text()
    assert a == (tmp_path / "remote" / "cells.csv").read_text() and a.count("\n") > 80


def test_scheduler_choice_errors(monkeypatch):
    import shutil

    from ketamap.errors import ParameterError

    with pytest.raises(ParameterError, match="not both"):
        with use_scheduler("tcp://127.0.0.1:1", "local"):
            pass
    with pytest.raises(ParameterError, match="one of local, slurm, pbs"):
        with use_scheduler(cluster="sge"):
            pass
    with pytest.raises(ParameterError, match="n_workers"):
        with use_scheduler(cluster="local", n_workers=0):
            pass
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ParameterError, match="dask-jobqueue|sbatch"):
        with use_scheduler(cluster="slurm"):
            pass
