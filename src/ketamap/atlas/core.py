"""The in-memory atlas: annotation, hemispheres, optional reference and ontology.

Arrays are (axis0, axis1, axis2) in the atlas' own orientation, named by a
BrainGlobe three-letter code (``"asr"``: axis 0 runs anterior -> posterior,
axis 1 superior -> inferior, axis 2 right -> left). Hemisphere values follow
BrainGlobe: 1 = left, 2 = right, 0 = outside the volume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ketamap.atlas.ontology import Ontology
from ketamap.errors import AtlasError, InputError
from ketamap.space import check_orientation

__all__ = ["Atlas", "LEFT", "RIGHT"]

logger = logging.getLogger(__name__)

LEFT = 1
RIGHT = 2


@dataclass(frozen=True, eq=False)
class Atlas:
    """A brain atlas held in memory.

    Parameters
    ----------
    name : str
        Atlas name, e.g. ``"allen_mouse_50um"`` or ``"ketamap_phantom_50um"``.
    annotation : ndarray, shape (n0, n1, n2)
        Region labels (ids of ``ontology``); 0 = outside the brain. Integer
        arrays are converted losslessly to uint32 (ids above 65535 are kept).
    hemispheres : ndarray, shape (n0, n1, n2)
        1 = left, 2 = right, 0 = outside the volume; converted to uint8.
    resolution_um : tuple of 3 float
        Voxel size along each axis, in µm.
    orientation : str
        BrainGlobe orientation code of the arrays, ``"asr"`` for Allen and
        BrainGlobe atlases.
    ontology : Ontology
        The region tree.
    reference : ndarray, optional
        Intensity template with the same shape, float32 or uint16.
    synthetic_reference : bool
        The reference is no image but one grey level per region, made from the
        annotation (an atlas folder written without a template): fine for simulated
        brains drawn from the same atlas, useless for registering a real brain.

    Raises
    ------
    AtlasError
        If the shapes differ, a dtype or value is impossible, the resolution
        is not three positive numbers or the orientation is not a valid code.

    Notes
    -----
    The labels are not checked against the ontology here (that needs a full
    pass over the volume); :meth:`region_volumes_mm3` and
    :meth:`Ontology.rollup` raise on unknown labels.

    Examples
    --------
    >>> from ketamap.atlas import make_phantom
    >>> atlas = make_phantom(resolution_um=100)
    >>> atlas.shape, atlas.orientation
    ((132, 80, 114), 'asr')
    """

    name: str
    annotation: np.ndarray
    hemispheres: np.ndarray
    resolution_um: tuple[float, float, float]
    orientation: str
    ontology: Ontology
    reference: np.ndarray | None = None
    synthetic_reference: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise once, here
        if not isinstance(self.ontology, Ontology):
            raise AtlasError(f"Atlas {self.name!r}: ontology must be an Ontology.")
        ann = np.asarray(self.annotation)
        if ann.ndim != 3:
            raise AtlasError(f"Atlas {self.name!r}: annotation must be 3-D, got shape {ann.shape}.")
        set_(self, "annotation", _as_labels(ann, self.name))
        hemi = np.asarray(self.hemispheres)
        if hemi.shape != ann.shape:
            raise AtlasError(
                f"Atlas {self.name!r}: hemispheres shape {hemi.shape} differs from "
                f"annotation shape {ann.shape}."
            )
        if not np.issubdtype(hemi.dtype, np.integer):
            raise AtlasError(
                f"Atlas {self.name!r}: hemispheres must be integers, got {hemi.dtype}."
            )
        if hemi.size and (hemi.min() < 0 or hemi.max() > 2):
            raise AtlasError(
                f"Atlas {self.name!r}: hemispheres must hold 0 (outside), 1 (left) or 2 (right), "
                f"got values in [{hemi.min()}, {hemi.max()}]."
            )
        set_(self, "hemispheres", hemi.astype(np.uint8, copy=False))
        try:
            res = tuple(float(r) for r in self.resolution_um)
        except (TypeError, ValueError) as e:
            raise AtlasError(
                f"Atlas {self.name!r}: resolution_um must be 3 numbers, got {self.resolution_um!r}."
            ) from e
        if len(res) != 3 or not all(np.isfinite(r) and r > 0 for r in res):
            raise AtlasError(
                f"Atlas {self.name!r}: resolution_um must be 3 positive numbers, "
                f"got {self.resolution_um!r}."
            )
        set_(self, "resolution_um", res)
        set_(self, "orientation", _atlas_orientation(self.orientation))
        if self.reference is not None:
            ref = np.asarray(self.reference)
            if ref.shape != ann.shape:
                raise AtlasError(
                    f"Atlas {self.name!r}: reference shape {ref.shape} differs from "
                    f"annotation shape {ann.shape}."
                )
            if ref.dtype not in (np.float32, np.uint16):
                raise AtlasError(
                    f"Atlas {self.name!r}: reference must be float32 or uint16, got {ref.dtype}."
                )
            set_(self, "reference", ref)

    def __repr__(self) -> str:
        return (
            f"Atlas(name={self.name!r}, shape={self.shape}, resolution_um={self.resolution_um}, "
            f"orientation={self.orientation!r}, regions={len(self.ontology)}, "
            f"reference={'yes' if self.reference is not None else 'no'})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the volumes, in voxels (axis0, axis1, axis2)."""
        return tuple(int(s) for s in self.annotation.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        r = self.resolution_um
        return r[0] * r[1] * r[2] * 1e-9

    def labels_at(self, points_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look up the region and hemisphere at atlas voxel coordinates.

        Parameters
        ----------
        points_vox : ndarray, shape (N, 3)
            Float coordinates in atlas voxels (axis0, axis1, axis2); each is
            rounded to the nearest voxel centre (``floor(x + 0.5)``).

        Returns
        -------
        labels : ndarray of uint32, shape (N,)
            Region ids; 0 outside the volume (or for NaN coordinates).
        hemispheres : ndarray of uint8, shape (N,)
            1 = left, 2 = right; 0 outside the volume.

        Raises
        ------
        AtlasError
            If ``points_vox`` is not an (N, 3) array.

        Examples
        --------
        >>> import numpy as np
        >>> from ketamap.atlas import make_phantom
        >>> atlas = make_phantom(resolution_um=100)
        >>> labels, hemi = atlas.labels_at(np.array([[-5.0, 0, 0]]))
        >>> int(labels[0]), int(hemi[0])
        (0, 0)
        """
        pts = np.asarray(points_vox, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise AtlasError(f"points_vox must have shape (N, 3), got {pts.shape}.")
        labels = np.zeros(len(pts), dtype=np.uint32)
        hemi = np.zeros(len(pts), dtype=np.uint8)
        if len(pts) == 0:
            return labels, hemi
        with np.errstate(invalid="ignore"):
            idx = np.floor(pts + 0.5)
            inside = np.all(np.isfinite(idx), axis=1)
            inside &= np.all((idx >= 0) & (idx < np.array(self.shape)), axis=1)
        ijk = idx[inside].astype(np.intp)
        labels[inside] = self.annotation[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        hemi[inside] = self.hemispheres[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        return labels, hemi

    def region_volumes_mm3(self) -> pd.DataFrame:
        """Volume of every label present in the annotation, per hemisphere.

        Returns
        -------
        DataFrame
            Columns ``id`` (int64), ``acronym``, ``hemisphere`` (uint8, 1 = left,
            2 = right; 0 only for labelled voxels outside both hemispheres) and
            ``volume_mm3`` (float64), one row per (label, hemisphere) present,
            sorted by id then hemisphere.

        Raises
        ------
        AtlasError
            If the annotation holds a label missing from the ontology.

        Examples
        --------
        >>> from ketamap.atlas import make_phantom
        >>> vol = make_phantom(resolution_um=100).region_volumes_mm3()
        >>> sorted(vol.hemisphere.unique().tolist())
        [1, 2]
        """
        onto = self.ontology
        flat = self.annotation.reshape(-1)
        pos = onto._positions(flat)  # -1 outside, else ontology row
        n = len(onto)
        key = (pos.astype(np.int64) + 1) * 3 + self.hemispheres.reshape(-1)
        counts = np.bincount(key, minlength=(n + 1) * 3).reshape(n + 1, 3)[1:]
        rows, hemi = np.nonzero(counts)
        df = pd.DataFrame(
            {
                "id": onto.ids[rows],
                "acronym": onto.table["acronym"].to_numpy()[rows],
                "hemisphere": hemi.astype(np.uint8),
                "volume_mm3": counts[rows, hemi] * self.voxel_volume_mm3,
            }
        )
        return df.sort_values(["id", "hemisphere"], kind="stable").reset_index(drop=True)


def _as_labels(ann: np.ndarray, name: str) -> np.ndarray:
    """Return the annotation as uint32, refusing lossy conversions."""
    if ann.dtype == np.uint32:
        return ann
    if not np.issubdtype(ann.dtype, np.integer):
        raise AtlasError(f"Atlas {name!r}: annotation must hold integer labels, got {ann.dtype}.")
    if ann.size and (int(ann.min()) < 0 or int(ann.max()) > np.iinfo(np.uint32).max):
        raise AtlasError(
            f"Atlas {name!r}: annotation labels must lie in [0, 2**32), "
            f"got [{ann.min()}, {ann.max()}]."
        )
    return ann.astype(np.uint32)


def _atlas_orientation(code) -> str:
    try:
        return check_orientation(code, where="Atlas orientation")
    except InputError as e:
        raise AtlasError(str(e)) from e
