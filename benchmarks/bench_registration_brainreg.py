"""ketamap's registration side by side with brainreg (NiftyReg) on the real brain, offline.

Both get the same input: ``brainreg_brain/brain`` (psl, 50 x 40 x 40 µm) and
the Allen CCFv3 at 100 µm with ``brain_in_ccf_100um.tiff`` as reference,
built by ``ketamap atlas build`` into a BrainGlobe folder that brainreg reads
(brainreg needs brainglobe-atlasapi < 3 for that folder layout). brainreg
runs with no network: its atlas API looks up the latest atlas version at
start-up and, offline, needs a ``last_versions.conf`` next to the atlas,
which this script writes.

brainreg is not a ketamap dependency (it pulls napari-side packages); install
it into its own venv and pass its executable::

    python3 -m venv brainreg-venv
    brainreg-venv/bin/pip install brainreg "brainglobe-atlasapi==2.3.1" "pandas<3"
    python benchmarks/bench_registration_brainreg.py --brainreg brainreg-venv/bin/brainreg \\
        [--no-network]   # Linux, as root: run brainreg under `unshare -n`

Compared on brainreg's own "downsampled" grid (the sample reoriented to asr
at 100 µm, the same grid as ketamap's prepared sample, 135 x 77 x 108):
wall time (2 threads each), the distance between the two sample -> atlas
maps (brainreg's ``deformation_field_*.tiff``, atlas mm), the Dice of the
brain and of each major division between the two warped annotations, and
the brain volume. Results: ``benchmarks/results/registration_brainreg.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DIVISIONS = ("Isocortex", "OLF", "HPF", "CTXsp", "CNU", "TH", "HY", "MB", "P", "MY", "CB")


def build_atlas(home: Path) -> str:
    """Write the Allen 100 µm atlas into ``home/.brainglobe`` with ``ketamap atlas build``."""
    from typer.testing import CliRunner

    from ketamap.cli import app

    a = SHARED / "allen_ccf_2017"
    out = home / ".brainglobe"
    args = [
        "atlas",
        "build",
        "--annotation",
        str(a / "ABA_25um_2017_annotation.tif.lzma"),
        "--structures",
        str(a / "structure_tree_safe_2017.csv"),
        "--hemispheres",
        str(a / "ABA_25um_2017_hemispheres.tif.lzma"),
        "--reference",
        str(SHARED / "brainreg_brain" / "brain_in_ccf_100um.tiff"),
        "--resolution",
        "100",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    if result.exit_code:
        raise SystemExit(f"ketamap atlas build failed: {result.output}")
    folder = next(out.glob("allen_mouse_100um_v*"))
    name, version = folder.name.rsplit("_v", 1)
    # offline, brainglobe-atlasapi 2.3 falls back on this cache of the remote versions
    (out / "last_versions.conf").write_text(f"[atlases]\n{name} = {version}\n")
    return name


def run_brainreg(brainreg: str, home: Path, atlas_name: str, out: Path, no_network: bool):
    cmd = [
        brainreg,
        str(SHARED / "brainreg_brain" / "brain"),
        str(out),
        "-v",
        "50",
        "40",
        "40",
        "--orientation",
        "psl",
        "--atlas",
        atlas_name,
        "--n-free-cpus",
        "0",
    ]
    if no_network:
        cmd = ["unshare", "-n", *cmd]
    env = dict(os.environ, HOME=str(home), OMP_NUM_THREADS="2")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit("brainreg failed: " + proc.stderr.strip().splitlines()[-1])
    return seconds


def run_ketamap(params):
    """Register the real brain with ``params``: (atlas, registration, labels, coords, s)."""
    from ketamap.atlas import load_allen
    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.register import register_to_reference, warp_labels_to_sample
    from ketamap.wholebrain.transforms import dense_atlas_vox

    a = SHARED / "allen_ccf_2017"
    atlas = load_allen(
        a / "ABA_25um_2017_annotation.tif.lzma",
        a / "structure_tree_safe_2017.csv",
        hemispheres_path=a / "ABA_25um_2017_hemispheres.tif.lzma",
        reference_path=SHARED / "brainreg_brain" / "brain_in_ccf_100um.tiff",
        resolution_um=100,
    )
    image = open_volume(SHARED / "brainreg_brain" / "brain")
    t0 = time.perf_counter()
    reg = register_to_reference(
        image,
        atlas.reference,
        voxel_size_um=(50, 40, 40),
        orientation="psl",
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_labels=atlas.annotation,
        params=params,
    )
    labels = warp_labels_to_sample(reg, atlas.annotation)
    seconds = time.perf_counter() - t0
    coords = dense_atlas_vox(
        reg.sample_to_atlas, reg.prepared_shape_vox, atlas.resolution_um, step=1
    )
    return atlas, reg, labels, coords, seconds


def compare(atlas, labels, coords, out: Path) -> dict:
    from ketamap.wholebrain.transforms import dice

    theirs_labels = tifffile.imread(out / "registered_atlas.tiff")
    field_mm = np.stack([tifffile.imread(out / f"deformation_field_{i}.tiff") for i in range(3)])
    if theirs_labels.shape != labels.shape:
        return {"error": f"grids differ: brainreg {theirs_labels.shape}, ketamap {labels.shape}"}
    res_mm = np.asarray(atlas.resolution_um).reshape(3, 1, 1, 1) / 1000
    brain = (labels > 0) | (theirs_labels > 0)
    distance_vox = np.linalg.norm(coords * res_mm - field_mm, axis=0)[brain] / res_mm.min()
    onto = atlas.ontology
    divisions = {}
    for acronym in DIVISIONS:
        ids = onto.descendants(onto.lookup(acronym), include_self=True)
        divisions[acronym] = round(dice(np.isin(labels, ids), np.isin(theirs_labels, ids)), 4)
    voxel_mm3 = float(np.prod(atlas.resolution_um)) / 1e9
    return {
        "map_distance_median_vox": round(float(np.median(distance_vox)), 3),
        "map_distance_p95_vox": round(float(np.percentile(distance_vox, 95)), 3),
        "dice_brain": round(dice(labels > 0, theirs_labels > 0), 4),
        "leaf_label_agreement": round(float(np.mean(labels[brain] == theirs_labels[brain])), 4),
        "dice_divisions": divisions,
        "brain_volume_mm3": round(float((labels > 0).sum()) * voxel_mm3, 1),
        "brainreg_brain_volume_mm3": round(float((theirs_labels > 0).sum()) * voxel_mm3, 1),
        "ccf_brain_volume_mm3": round(float((atlas.annotation > 0).sum()) * voxel_mm3, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brainreg", required=True, help="the brainreg executable (its own venv)")
    ap.add_argument("--no-network", action="store_true", help="run brainreg under unshare -n")
    ap.add_argument("--engines", nargs="+", default=["simpleitk"])
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "registration_brainreg.json")
    )
    args = ap.parse_args()
    from ketamap.wholebrain.register import RegistrationParams

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        name = build_atlas(home)
        out = Path(tmp) / "brainreg"
        brainreg_s = run_brainreg(args.brainreg, home, name, out, args.no_network)
        print(f"brainreg: {brainreg_s:.1f} s", flush=True)
        rows = []
        for engine in args.engines:
            params = RegistrationParams(engine=engine, n_threads=2)
            atlas, reg, labels, coords, seconds = run_ketamap(params)
            row = {
                "engine": engine,
                "ketamap_s": round(seconds, 1),
                "brainreg_s": round(brainreg_s, 1),
                "time_ratio_brainreg_over_ketamap": round(brainreg_s / seconds, 1),
                "qc": {
                    k: reg.qc[k]
                    for k in (
                        "correlation_after",
                        "dice_brain_mask",
                        "reference_blur_um",
                        "flagged",
                    )
                },
                **compare(atlas, labels, coords, out),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "machine": f"{os.cpu_count()} cores visible, 2 threads each",
        "brainreg": subprocess.run(
            [args.brainreg, "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
