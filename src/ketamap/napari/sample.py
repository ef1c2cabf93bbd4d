"""Sample data: a small simulated brain, its candidates and its true cells (a few seconds).

The brain is the demo's simulator (:func:`ketamap.simulate.simulate_brain`) on
the phantom atlas at 100 µm, imaged at 60 µm voxels with the realistic
light-sheet artefacts. The candidates are detected with a permissive first pass
(lower SNR and contrast thresholds than the defaults), so that there are
non-cells to proofread; the true cells are there (hidden) to compare with.
"""

from __future__ import annotations

__all__ = ["simulated_brain", "SAMPLE_DETECTION"]

#: The permissive first pass of the sample: many candidates, some of them not cells.
SAMPLE_DETECTION = {"threshold_snr": 4.0, "threshold_contrast": 3.0}


def simulated_brain(seed: int = 0) -> list[tuple]:
    """Simulate a small brain and return it as napari layer data.

    Parameters
    ----------
    seed : int
        Seed of the simulation.

    Returns
    -------
    list of tuple
        The TH-like signal, the autofluorescence (hidden), the candidates (points
        with SNR, contrast, intensity) and the true cells (hidden points with
        their region), in a world of µm.
    """
    import numpy as np

    from ketamap.atlas import load_atlas
    from ketamap.napari._layers import contrast_limits, points_layer
    from ketamap.napari.readers import cell_features
    from ketamap.simulate import BrainParams, simulate_brain
    from ketamap.wholebrain.detect import DetectionParams, detect_cells

    atlas = load_atlas("phantom:100")
    params = BrainParams(voxel_size_um=(60.0, 60.0, 60.0), orientation=atlas.orientation)
    brain = simulate_brain(
        atlas, fold_changes={}, densities={}, params=params.with_artefacts(), seed=seed
    )
    vs = brain.voxel_size_um
    candidates = detect_cells(
        brain.signal,
        voxel_size_um=vs,
        params=DetectionParams(soma_diameter_um=params.soma_diameter_um, **SAMPLE_DETECTION),
        background=brain.background,
    )
    truth = brain.cells.assign(
        acronym=[atlas.ontology.acronym(int(r)) if r else "" for r in brain.cells["region_id"]]
    )
    image = {"scale": vs, "colormap": "gray", "blending": "additive"}
    return [
        (
            brain.signal,
            image | {"name": "simulated TH", "contrast_limits": contrast_limits(brain.signal)},
            "image",
        ),
        (
            brain.background,
            image
            | {
                "name": "simulated autofluorescence",
                "visible": False,
                "contrast_limits": contrast_limits(brain.background),
            },
            "image",
        ),
        points_layer(
            candidates,
            name="candidates",
            voxel_size_um=vs,
            features=cell_features(candidates),
            metadata={"kind": "candidates", "simulated": True},
        ),
        points_layer(
            truth,
            name="true cells",
            voxel_size_um=vs,
            colours=np.tile((0.3, 0.6, 0.9, 1.0), (len(truth), 1)),
            features=cell_features(truth).assign(brightness=truth["brightness"].to_numpy()),
            visible=False,
        ),
    ]
