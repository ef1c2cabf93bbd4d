"""Fibre segmentation on real tissue: simulated fibres planted in the shared real crop.

No TH-labelled real volume is at hand, so the real light-sheet crop of
``../shared/data/cellfinder_crop`` (30 x 510 x 667 voxels at 5 x 2 x 2 µm, a cell
label in ``ch0``, autofluorescence in ``ch1``) is the tissue, and fibres of known truth
are planted in its signal channel (:func:`ketamap.simulate.fibres.plant_fibres`: drawn
and imaged as the simulator does, at the crop's voxel size, with shot noise, their
brightness ``fibre_snr`` in units of the crop's own noise SD as ``segment_fibres``
measures it). The crop and the hybrid are segmented with default parameters, the
autofluorescence channel and the somata ketamap detects in the crop (as the census
passes them). Scored in the interior (3 voxels from the faces) and in the crop's
tissue mask:

* ``recall``: planted footprint voxels found in the hybrid;
* ``precision``: of the voxels found in the hybrid but not in the crop alone, the
  share in the planted footprint (what the crop itself holds, its own neurites, cells
  and vessels, is left out by that difference);
* ``length_ratio``: (hybrid - crop) skeleton length / true planted length;
* the same fibres on the simulator's own tissue (its autofluorescence, stripes,
  gradient and camera; no somata): ``sim_precision``, ``sim_recall``,
  ``sim_length_ratio`` -- the difference is what real tissue costs.

Also the crop alone: the share of its tissue voxels called fibre and their length
density; and, on the simulator's tissue without fibres, the fibre called on somata
that are passed to ``segment_fibres`` and on somata that are not (as a soma the cell
detection missed), with the blob tests of ``FibreParams`` on and off. Prints and saves
``benchmarks/results/bench_fibres_real_crop.json``.

Usage::

    .venv/bin/python benchmarks/bench_fibres_real_crop.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import tifffile

from ketamap.simulate.evaluate import score_fibres
from ketamap.simulate.fibres import FibreSimParams, plant_fibres, simulate_fibres
from ketamap.wholebrain.detect import detect_cells
from ketamap.wholebrain.fibres import FibreParams, segment_fibres, skeleton_lengths

ROOT = Path(__file__).resolve().parents[1]
CROP = ROOT.parent / "shared" / "data" / "cellfinder_crop"
VS = (5.0, 2.0, 2.0)
MARGIN = 3  # voxels from the faces left out of the scores (a fibre's image is cut there)


def load_channel(channel: str) -> np.ndarray:
    """One channel of the shared crop, (z, y, x) uint16."""
    return np.stack([tifffile.imread(f) for f in sorted((CROP / channel).glob("*.tif*"))])


def run(densities, snrs, seeds) -> dict:
    signal, background = load_channel("ch0"), load_channel("ch1")
    somata = detect_cells(signal, voxel_size_um=VS, background=background)
    t = time.perf_counter()
    crop_mask, crop_skeleton, qc = segment_fibres(
        signal, voxel_size_um=VS, background=background, somata=somata
    )
    crop_s = time.perf_counter() - t
    inner = np.zeros(signal.shape, bool)
    inner[(slice(MARGIN, -MARGIN),) * 3] = True
    region = inner & qc["tissue"].full_resolution(tuple(slice(0, n) for n in signal.shape))
    region_mm3 = float(region.sum()) * np.prod(VS) * 1e-9
    crop_len = float(skeleton_lengths(crop_skeleton, VS)[region].sum())
    out = {
        "crop": {
            "shape": list(signal.shape),
            "voxel_size_um": list(VS),
            "n_somata_detected": len(somata),
            "noise_sd_median": qc["noise_sd_median"],
            "tissue_fraction_scored": float(region.mean()),
            "fibre_voxel_fraction": float((crop_mask > 0)[region].mean()),
            "fibre_length_density_mm_per_mm3": crop_len * 1e-3 / region_mm3,
            "segment_s": crop_s,
        },
        "runs": [],
    }
    print(json.dumps(out["crop"], indent=1))
    for density in densities:
        for snr in snrs:
            for seed in seeds:
                params = FibreSimParams(voxel_size_um=VS, fibre_snr=snr)
                hybrid, truth = plant_fibres(
                    signal,
                    noise_sd=qc["noise_sd_median"],
                    density_mm_per_mm3=density,
                    params=params,
                    seed=seed,
                )
                mask, skeleton, _ = segment_fibres(
                    hybrid, voxel_size_um=VS, background=background, somata=somata
                )
                row = {"density_mm_per_mm3": density, "fibre_snr": snr, "seed": seed}
                row.update(score_fibres(mask, skeleton, truth, region=region,
                                        reference=(crop_mask, crop_skeleton)))  # fmt: skip
                sim_mask, sim_skeleton, _ = segment_fibres(
                    truth.signal, voxel_size_um=VS, background=truth.background
                )
                sim = score_fibres(sim_mask, sim_skeleton, truth, region=inner)
                row.update({f"sim_{k}": v for k, v in sim.items() if k != "true_length_um"})
                print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in row.items()))  # fmt: skip
                out["runs"].append(row)
    return out


def undetected_somata(shape=(30, 300, 300)) -> list[dict]:
    """False fibre on simulated tissue without fibres, the somata passed or not.

    The crop alone shows fibre on packed somata the cell detection did not report; the
    simulator's somata (``soma_density_per_mm3``, ``soma_snr``, and
    ``soma_spacing_diameters`` 1 for a packed layer) reproduce it with truth. The blob
    tests are run all three, all but the hollow test, and none.
    """
    rows = []
    vol_mm3 = float(np.prod(shape) * np.prod(VS)) * 1e-9
    tests = {
        "all": {},
        "no_hollow": {"hollow_test": False},
        "none": {"blob_flank_ratio": 0.0, "max_width_ratio": 0.0, "hollow_test": False},
    }
    for density, snr, spacing in (
        (20000.0, 60.0, 2.0),
        (20000.0, 15.0, 2.0),
        (30000.0, 8.0, 2.0),
        (60000.0, 15.0, 1.0),
    ):
        params = FibreSimParams(voxel_size_um=VS, soma_density_per_mm3=density, soma_snr=snr,
                                soma_spacing_diameters=spacing)  # fmt: skip
        sim = simulate_fibres(np.ones(shape, np.uint8), densities_mm_per_mm3={1: 0.0},
                              params=params, seed=1)  # fmt: skip
        for passed, blob_tests in ((True, "all"), (False, "all"), (False, "no_hollow"),
                                   (False, "none")):  # fmt: skip
            mask, skeleton, _ = segment_fibres(
                sim.signal, voxel_size_um=VS, background=sim.background,
                somata=sim.somata if passed else None, params=FibreParams(**tests[blob_tests]),
            )  # fmt: skip
            row = {
                "somata_per_mm3": len(sim.somata) / vol_mm3,
                "soma_snr": snr,
                "soma_spacing_diameters": spacing,
                "somata_passed": passed,
                "blob_tests": blob_tests,
                "fibre_voxel_fraction": float((mask > 0).mean()),
                "false_length_density_mm_per_mm3": float(
                    skeleton_lengths(skeleton, VS).sum() * 1e-3 / vol_mm3
                ),
            }
            print(row)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    default = ROOT / "benchmarks" / "results" / "bench_fibres_real_crop.json"
    ap.add_argument("--out", type=Path, default=default)
    args = ap.parse_args()
    result = run((200.0, 600.0, 1500.0), (6.0, 12.0), range(1, args.seeds + 1))
    result["undetected_somata"] = undetected_somata()
    result["machine"] = {"python": platform.python_version(), "processor": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
