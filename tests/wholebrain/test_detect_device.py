"""The optional PyTorch back-end of the Gaussian filters gives the scipy path's cells."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import ParameterError
from ketamap.wholebrain import DetectionParams, detect_cells


@pytest.mark.parametrize(
    "shape,voxel_um,kwargs",
    [
        (
            (40, 128, 128),
            (5.0, 2.0, 2.0),
            dict(density_per_mm3=5000.0, psf_sigma_um=(3.0, 1.5, 1.5), extent=3.0),
        ),  # noqa: E501
        ((48, 64, 64), (25.0, 25.0, 25.0), {}),
    ],
)
def test_torch_back_end_matches_scipy(shape, voxel_um, kwargs, simulate_volume):
    pytest.importorskip("torch")
    signal, background, _ = simulate_volume(shape, voxel_um, seed=2, **kwargs)
    cpu = detect_cells(
        signal, voxel_size_um=voxel_um, background=background, params=DetectionParams(device="cpu")
    )
    torch_cpu = detect_cells(
        signal,
        voxel_size_um=voxel_um,
        background=background,
        params=DetectionParams(device="torch-cpu", chunk_size_vox=(24, 64, 64)),
    )
    assert len(cpu) > 10
    # float32 rounding differs between the two convolutions: positions agree to 1e-3 voxel
    pd.testing.assert_frame_equal(torch_cpu, cpu, check_exact=False, rtol=1e-3, atol=1e-3)


def test_unknown_device_is_one_sentence():
    with pytest.raises(ParameterError, match="device must be one of"):
        DetectionParams(device="gpu")


def test_cuda_without_a_gpu_is_refused_before_any_work():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ParameterError, match="no CUDA GPU"):
        detect_cells(
            np.zeros((8, 8, 8)),
            voxel_size_um=(5.0, 2.0, 2.0),
            params=DetectionParams(device="cuda"),
        )


def test_auto_without_torch_uses_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    vol = np.zeros((16, 32, 32), dtype=np.float32)
    vol[8, 16, 16] = 200.0
    cells = detect_cells(vol, voxel_size_um=(25.0, 25.0, 25.0))
    assert len(cells) == 1
    with pytest.raises(ParameterError, match="needs PyTorch"):
        detect_cells(
            vol, voxel_size_um=(25.0, 25.0, 25.0), params=DetectionParams(device="torch-cpu")
        )
