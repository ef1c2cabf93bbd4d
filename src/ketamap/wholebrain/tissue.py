"""Find the tissue of a whole-brain volume on a coarse grid, chunk by chunk.

Cell detection must not look for cells in the void around a brain: the black
camera background (a constant offset plus read noise) or an unlabelled dark tile
of a stitched volume. :func:`find_tissue` returns a coarse :class:`TissueMask`
(one cell per block of about ``block_um`` µm) that the detector consults. Give it
the autofluorescence channel when there is one (it shows all tissue, labelled or
not), else the signal channel.

Method
------
1. **Block statistics, in one chunked pass.** The volume is cut into blocks of
   ``max(4, round(block_um / voxel))`` voxels per axis (at least 4, so that the
   coarse grid holds at most 1/64 of the voxels on coarse whole-brain grids);
   blocks at the end of an axis are shorter and hold only their true voxels.
   Each Dask chunk reports, for the blocks it touches, the number of finite
   voxels, their mean and their sum of squared deviations (two passes over the
   chunk, float64); the pieces of a block cut by chunk borders are merged with
   the exact parallel formula of Chan et al. So memory is bounded by the chunk
   size, the result does not depend on the chunking, and the variance does not suffer from the
   cancellation of "mean of squares minus square of mean" under a large offset.
   NaN and infinite voxels are ignored (a block without finite voxels holds no
   data and is not tissue, unless hole filling or dilation makes it so).
2. **Two classes.** Otsu's threshold on the log of the block means (clipped to
   1e-6 of the largest mean) splits the blocks into a dark and a bright class.
   The log makes the split depend on ratios, not on the camera gain.
3. **A void is accepted only with evidence of one: darker, flatter and one
   level.** The void holds camera noise only; tissue adds photons, hence shot
   noise and texture. With m = mean of the block means and s = typical block SD
   of each class, a void needs ``m_bright >= min_contrast * m_dark`` and
   ``s_bright >= min_noise_ratio * s_dark`` (and some noise in the bright
   class). The typical SD is the lower quartile of a class' block SDs, not the
   median: blocks straddling the tissue edge mix two levels, which only raises
   their SD, so the purest blocks are the least variable ones. Tissue dimmed by
   an illumination gradient passes both tests (its dim end is darker and, with
   fewer photons, less noisy), so a void must also be *one level*, the camera
   offset (plus any haze): its core, the dark blocks no noisier than 1.5
   ``s_dark`` (edge blocks are noisier), must have block means whose 10th-90th
   percentile span is at most a tenth of the contrast (tissue level - void
   level). Dimmed tissue spreads its blocks continuously over a range
   comparable to the contrast (0.27-1.4 of it for fields falling 3-10 fold
   across x; at most 0.036 for the voids of the crop simulator, the shared real
   crop and the real downsampled brain). The span is judged against the
   contrast, not the noise: on downsampled data averaging removes the noise but
   not the haze (the real 50 x 40 x 40 µm brain's void spans 17 of its voxel
   SDs, but 2 % of the contrast). Without a void (an all-tissue crop, even with
   a steep gradient; a constant or all-dark volume) every block with data
   is tissue, and ``void_level`` and ``threshold`` are NaN.
4. **Threshold.** ``void_level`` is the median block mean of the void's core,
   ``tissue_level`` that of the bright class. A block's mean rises linearly
   with the part of it covered by tissue, so the threshold is placed a quarter
   of the way from the void to the tissue level: a block edge-on to the tissue
   counts as tissue when about a quarter of it or more is tissue of typical
   brightness, and tissue regions down to a quarter of the typical contrast are
   kept. This is independent of the camera offset (unlike a threshold on the
   log scale) and of the share of void in the volume (unlike Otsu's).
5. **Clean-up on the coarse grid.** ``mask = block mean > threshold``; holes are
   filled in 3D (dark ventricles enclosed in tissue become tissue; a dark tile
   that reaches a face of the volume, e.g. one spanning all z, stays void);
   isolated single tissue blocks (26-connectivity) are removed when a larger
   tissue component exists: a hot pixel cannot make a block tissue (it moves a
   block mean by its value over the block's voxel count), but a piece of debris
   of block size can, while real tissue always spans several blocks. Finally the
   mask is dilated by ``dilate_blocks`` coarse cells (26-neighbourhood), so
   cells at the tissue surface are never lost.

Arrays are (z, y, x); physical sizes are in micrometres.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import dask.array as da
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from ketamap.errors import InputError, ParameterError
from ketamap.io.atomic import write_json
from ketamap.io.volumes import check_volume, lazy_array
from ketamap.space import check_voxel_size

__all__ = [
    "TissueMask",
    "find_tissue",
    "write_detection_qc",
    "read_tissue_mask",
    "tissue_atlas_dice",
]

log = logging.getLogger(__name__)

_LOG_FLOOR = 1e-6  # block means are clipped to this fraction of the largest before the log
_SD_QUANTILE = 0.25  # a class' typical block SD: edge (mixed) blocks only raise SDs
_CORE_SD_RATIO = 1.5  # the void's core: dark blocks whose SD is at most 1.5 x the void's ...
_CORE_QUANTILES = (0.1, 0.9)  # ... and whose 10th-90th percentile of block means ...
_MAX_VOID_SPREAD = 0.1  # ... spans at most this fraction of the tissue - void contrast
_THRESHOLD_FRACTION = 0.25  # threshold = void + 0.25 (tissue - void)
_MIN_COMPONENT_BLOCKS = 2  # smaller tissue components are debris (unless the largest)
_CHUNK_VOXELS = 2**24  # chunks of a NumPy input (and float64 temporaries ~ 8x this / z-block)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Where the tissue is, on a coarse grid of blocks of a full-resolution volume.

    Parameters
    ----------
    mask : numpy.ndarray of bool, shape (Zc, Yc, Xc)
        True where the coarse cell is tissue. ``Zc = ceil(shape[0] / block_vox[0])``
        etc.: the last cell along an axis may cover fewer voxels. Stored as a
        read-only copy.
    block_vox : tuple of 3 int
        Full-resolution voxels per coarse cell along (z, y, x).
    shape : tuple of 3 int
        Full-resolution shape (z, y, x) that the mask covers (voxels).
    void_level : float
        Robust level of the void (median block mean of the void's core: the dark
        class' blocks as flat as the void), in the input's units; NaN when no void
        was found.
    tissue_level : float
        Median block mean of the tissue (the bright class, or all blocks when no
        void was found); NaN for an empty volume or one without finite values.
    threshold : float
        Block mean above which a block is tissue, before hole filling, clean-up
        and dilation; NaN when no void was found.
    """

    mask: np.ndarray
    block_vox: tuple[int, int, int]
    shape: tuple[int, int, int]
    void_level: float
    tissue_level: float
    threshold: float

    def __post_init__(self):
        block = tuple(int(b) for b in self.block_vox)
        shape = tuple(int(n) for n in self.shape)
        if len(block) != 3 or min(block) < 1 or len(shape) != 3 or min(shape) < 0:
            raise InputError(
                f"TissueMask needs 3 positive block sizes and a 3D shape, got block_vox "
                f"{self.block_vox!r} and shape {self.shape!r}."
            )
        mask = np.array(self.mask, dtype=bool)  # a private copy: the mask cannot be changed
        expected = tuple(-(-n // b) for n, b in zip(shape, block))
        if mask.shape != expected:
            raise InputError(
                f"TissueMask.mask has shape {mask.shape} but a volume of shape {shape} in "
                f"blocks of {block} voxels needs a coarse grid of shape {expected}."
            )
        mask.flags.writeable = False
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "block_vox", block)
        object.__setattr__(self, "shape", shape)
        for name in ("void_level", "tissue_level", "threshold"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def __repr__(self) -> str:
        return (
            f"TissueMask(shape={self.shape}, block_vox={self.block_vox}, "
            f"grid={self.mask.shape}, tissue_fraction={self.tissue_fraction:.3f}, "
            f"void_level={self.void_level:.4g}, tissue_level={self.tissue_level:.4g}, "
            f"threshold={self.threshold:.4g})"
        )

    def contains(self, points_vox) -> np.ndarray:
        """Whether each point lies in a tissue cell.

        Parameters
        ----------
        points_vox : array_like, shape (n, 3)
            Voxel coordinates (z, y, x), float allowed; voxel ``i`` spans
            ``[i - 0.5, i + 0.5)``. A point is rounded to its voxel, its cell is
            ``floor(voxel / block_vox)``, clipped to the grid (points outside the
            volume take the nearest edge cell).

        Returns
        -------
        numpy.ndarray of bool, shape (n,)
            False for points with a non-finite coordinate.

        Raises
        ------
        InputError
            If the points are not an (n, 3) numeric array.
        """
        try:
            pts = np.asarray(points_vox, dtype=np.float64)
        except (TypeError, ValueError):
            pts = None
        if pts is not None and pts.size == 0:
            pts = pts.reshape(0, 3)
        if pts is None or pts.ndim != 2 or pts.shape[1] != 3:
            shape = getattr(pts, "shape", None)
            raise InputError(
                f"points_vox must be a numeric array of shape (n, 3) with columns (z, y, x), "
                f"got {'a non-numeric value' if shape is None else f'shape {shape}'}."
            )
        out = np.zeros(len(pts), dtype=bool)
        if self.mask.size == 0 or len(pts) == 0:
            return out
        finite = np.isfinite(pts).all(axis=1)
        vox = np.floor(pts[finite] + 0.5)
        idx = []
        for a in range(3):
            cell = np.floor_divide(vox[:, a], self.block_vox[a])
            idx.append(np.clip(cell, 0, self.mask.shape[a] - 1).astype(np.intp))
        out[finite] = self.mask[tuple(idx)]
        return out

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the full-resolution voxels that lie in tissue cells (0 if empty)."""
        total = math.prod(self.shape)
        if total == 0:
            return 0.0
        sizes = [self._cell_lengths(a) for a in range(3)]
        # sum over tissue cells of their true voxel counts, without a full-grid array
        voxels = np.einsum("zyx,z,y,x->", self.mask.astype(np.float64), *sizes)
        return float(voxels / total)

    def block_size_um(self, voxel_size_um) -> tuple[float, float, float]:
        """Size of one coarse cell (z, y, x) in µm for the given voxel size.

        Parameters
        ----------
        voxel_size_um : float or sequence of 3 float
            Voxel size (z, y, x) in µm.

        Returns
        -------
        tuple of 3 float
        """
        vs = check_voxel_size(voxel_size_um)
        return tuple(float(b * v) for b, v in zip(self.block_vox, vs))

    def full_resolution(self, slices: tuple[slice, slice, slice]) -> np.ndarray:
        """Return the mask on the full-resolution grid for a box of it (nearest coarse cell).

        Parameters
        ----------
        slices : tuple of 3 slice
            The box (z, y, x) in full-resolution voxels, as for indexing the
            volume (``None`` bounds, negative bounds and steps allowed), e.g. a
            Dask chunk's location.

        Returns
        -------
        numpy.ndarray of bool
            Shape of ``volume[slices]``; each voxel takes the value of its cell.

        Raises
        ------
        InputError
            If ``slices`` is not three slices.
        """
        if not (
            isinstance(slices, tuple)
            and len(slices) == 3
            and all(isinstance(s, slice) for s in slices)
        ):
            raise InputError(f"slices must be a tuple of three slices (z, y, x), got {slices!r}.")
        idx = [np.arange(*s.indices(n)) // b for s, n, b in zip(slices, self.shape, self.block_vox)]
        if any(len(i) == 0 for i in idx):
            return np.zeros(tuple(len(i) for i in idx), dtype=bool)
        return self.mask[np.ix_(*idx)]

    def _cell_lengths(self, axis: int) -> np.ndarray:
        """Return the number of full-resolution voxels of each coarse cell along one axis."""
        n, b = self.shape[axis], self.block_vox[axis]
        starts = np.arange(0, n, b)
        return (np.minimum(starts + b, n) - starts).astype(np.float64)


_STRIDE = 2  # blocks of >= 8 voxels along an axis are sampled every other voxel on it
_MIN_BLOCK_VOX = 4  # coarse cells hold at least 4 voxels per axis (memory on coarse grids)


def find_tissue(
    volume,
    *,
    voxel_size_um,
    block_um: float = 50.0,
    min_contrast: float = 1.5,
    min_noise_ratio: float = 1.5,
    dilate_blocks: int = 1,
) -> TissueMask:
    """Find the tissue of a volume on a coarse grid, separating it from the void.

    See the module docstring for the method. Everything with data is tissue
    unless a void darker and flatter than the tissue, and at one level, is found,
    so the function removes no tissue from an all-tissue crop (not even one dimmed
    tenfold across the field by its illumination), nor raises on a constant or
    all-dark volume.

    Parameters
    ----------
    volume : numpy.ndarray or dask.array.Array, 3D (z, y, x), integers or floats
        The autofluorescence channel when there is one, else the signal. A Dask
        array is read once, chunk by chunk (never materialised); a NumPy array is
        processed in chunks of about 16 M voxels. NaN and infinite voxels are
        ignored.
    voxel_size_um : float or sequence of 3 float
        Voxel size (z, y, x) in µm.
    block_um : float
        Edge of a coarse cell (µm); each axis gets ``max(4, round(block_um /
        voxel))`` voxels per cell (an axis shorter than 4 voxels: its length).
    min_contrast : float
        The void is accepted only if the bright class' mean block level is at
        least this many times the dark class' (>= 1).
    min_noise_ratio : float
        ... and the bright class' typical block SD at least this many times the
        dark class' (>= 0; 0 disables the test).
    dilate_blocks : int
        Coarse cells added around the tissue at the end (>= 0), so that cells at
        the surface are kept.

    Returns
    -------
    TissueMask

    Raises
    ------
    InputError
        If the volume is not a 3D numeric array or the voxel size is invalid.
    ParameterError
        If a parameter is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> vol = rng.normal(12.0, 1.5, (20, 40, 40))
    >>> vol[:, 10:30, 10:30] = rng.poisson(300.0, (20, 20, 20))
    >>> tm = find_tissue(vol, voxel_size_um=10.0, block_um=50.0, dilate_blocks=0)
    >>> tm.block_vox, tm.mask.shape, round(tm.tissue_fraction, 2)
    ((5, 5, 5), (4, 8, 8), 0.25)
    >>> tm.contains([[10, 20, 20], [10, 2, 2]])
    array([ True, False])
    """
    vs = check_voxel_size(voxel_size_um)
    block_um = _positive_float(block_um, "block_um", minimum=0.0, strict=True)
    min_contrast = _positive_float(min_contrast, "min_contrast", minimum=1.0)
    min_noise_ratio = _positive_float(min_noise_ratio, "min_noise_ratio", minimum=0.0)
    if isinstance(dilate_blocks, bool) or not isinstance(dilate_blocks, Integral):
        raise ParameterError(
            f"dilate_blocks must be a whole number of coarse cells >= 0, got {dilate_blocks!r}."
        )
    if dilate_blocks < 0:
        raise ParameterError(f"dilate_blocks must be >= 0, got {dilate_blocks}.")
    dilate_blocks = int(dilate_blocks)

    block = tuple(max(_MIN_BLOCK_VOX, round(block_um / v)) for v in vs)
    # Blocks of 8 voxels or more along an axis are estimated from every other voxel (the
    # level and the spread of a block of thousands of voxels need no more): such blocks
    # are made even, so that the sampled voxels tile them exactly.
    stride = tuple(_STRIDE if b >= 4 * _STRIDE else 1 for b in block)
    block = tuple(b + (-b) % s for b, s in zip(block, stride))
    arr = _as_dask(volume, block)
    shape = tuple(int(n) for n in arr.shape)
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    if arr.size == 0:
        log.info("find_tissue: empty volume of shape %s, no tissue", shape)
        return TissueMask(np.zeros(grid, dtype=bool), block, shape, math.nan, math.nan, math.nan)

    if any(s > 1 for s in stride):
        arr = arr[tuple(slice(None, None, s) for s in stride)]
    count, mean, m2 = _block_moments(arr, tuple(b // s for b, s in zip(block, stride)))
    has_data = count > 0
    sd = np.sqrt(np.divide(m2, count, out=np.zeros_like(m2), where=has_data))
    void_level, tissue_level, threshold = _levels(
        mean[has_data], sd[has_data], min_contrast, min_noise_ratio
    )

    if math.isnan(threshold):
        tissue = has_data.copy()
    else:
        tissue = has_data & (mean > threshold)
        tissue = ndi.binary_fill_holes(tissue)
        tissue = _remove_specks(tissue)
    if dilate_blocks and tissue.any():
        tissue = ndi.binary_dilation(
            tissue, structure=np.ones((3, 3, 3), dtype=bool), iterations=dilate_blocks
        )
    result = TissueMask(tissue, block, shape, void_level, tissue_level, threshold)
    log.info(
        "find_tissue: shape %s, blocks of %s voxels (grid %s); void level %.4g, "
        "tissue level %.4g, threshold %.4g; tissue fraction %.3f",
        shape,
        block,
        grid,
        void_level,
        tissue_level,
        threshold,
        result.tissue_fraction,
    )
    return result


def _positive_float(value, name: str, *, minimum: float, strict: bool = False) -> float:
    """Return a finite float ``>= minimum`` (``> minimum`` if strict), or raise."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ParameterError(
            f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}."
        )
    return float(value)


def _as_dask(volume, block: tuple[int, int, int]) -> da.Array:
    """Check a volume and return it as a Dask array (NumPy input: block-aligned chunks)."""
    arr = check_volume(volume, "volume")
    if isinstance(arr, np.ndarray):
        chunks = [max(n, 1) for n in arr.shape]
        while math.prod(chunks) > _CHUNK_VOXELS:  # halve the longest axis, block-aligned
            a = int(np.argmax([c / b for c, b in zip(chunks, block)]))
            if chunks[a] <= block[a]:
                break
            chunks[a] = max(block[a], (chunks[a] // 2) // block[a] * block[a])
        arr = lazy_array(arr, chunks=tuple(chunks))
    return arr


def _touched(start: int, stop: int, b: int) -> tuple[int, int, np.ndarray]:
    """Cells [c0, c1) touched by voxels [start, stop) and the local starts of their pieces."""
    if stop <= start:  # a chunk of length zero touches no cell
        return start // b, start // b, np.zeros(0, dtype=np.intp)
    c0, c1 = start // b, -(-stop // b)
    starts = np.maximum(np.arange(c0, c1) * b, start) - start
    return c0, c1, starts


def _chunk_moments(x: np.ndarray, block_info=None, *, block) -> np.ndarray:
    """Count, mean and squared deviations of the finite voxels per block piece of a chunk.

    Returns an array (3, nz, ny, nx) over the cells the chunk touches.
    """
    loc = block_info[0]["array-location"]
    parts = [_touched(lo, hi, b) for (lo, hi), b in zip(loc, block)]
    (_, _, z_starts), (_, _, y_starts), (_, _, x_starts) = parts
    if x.size == 0:
        return np.zeros((3, len(z_starts), len(y_starts), len(x_starts)))
    y_len = np.diff(np.append(y_starts, x.shape[1]))
    x_len = np.diff(np.append(x_starts, x.shape[2]))
    out = np.zeros((3, len(z_starts), len(y_starts), len(x_starts)))
    z_bounds = np.append(z_starts, x.shape[0])

    def cells(v):  # (z, y, x) -> (cells y, cells x): sum over z, then over each piece
        v = np.add.reduceat(v.sum(axis=0), y_starts, axis=0)
        return np.add.reduceat(v, x_starts, axis=1)

    integer = np.issubdtype(x.dtype, np.integer)
    for k in range(len(z_starts)):  # one slab of cells at a time: float64 copies stay small
        slab = x[z_bounds[k] : z_bounds[k + 1]].astype(np.float64)
        if integer:  # every voxel is finite: the counts are the pieces' sizes
            all_finite = True
            n = float(len(slab)) * np.multiply.outer(y_len, x_len).astype(np.float64)
        else:
            finite = np.isfinite(slab)
            all_finite = bool(finite.all())
            if not all_finite:
                slab[~finite] = 0.0
            n = cells(finite.astype(np.float64))
        total = cells(slab)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        dev = slab - np.repeat(np.repeat(mean, y_len, axis=0), x_len, axis=1)
        if not all_finite:
            dev[~finite] = 0.0
        out[0, k], out[1, k], out[2, k] = n, mean, cells(dev * dev)
    return out


def _merge_axis(
    n: np.ndarray, mean: np.ndarray, m2: np.ndarray, owner: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive pieces of the same cell along an axis (Chan et al.'s formula)."""
    starts = np.flatnonzero(np.diff(owner, prepend=-1))
    if len(starts) == n.shape[axis]:
        return n, mean, m2
    lengths = np.diff(np.append(starts, n.shape[axis]))
    n_all = np.add.reduceat(n, starts, axis=axis)
    total = np.add.reduceat(n * mean, starts, axis=axis)
    mean_all = np.divide(total, n_all, out=np.zeros_like(total), where=n_all > 0)
    shift = mean - np.repeat(mean_all, lengths, axis=axis)
    m2_all = np.add.reduceat(m2 + n * shift * shift, starts, axis=axis)
    return n_all, mean_all, m2_all


def _block_moments(arr: da.Array, block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite-voxel count, mean and sum of squared deviations of every coarse cell."""
    out_chunks = [(3,)]
    owners = []
    for chunks, b in zip(arr.chunks, block):
        sizes, owner, start = [], [], 0
        for c in chunks:
            c0, c1, _ = _touched(start, start + c, b)
            sizes.append(c1 - c0)
            owner.extend(range(c0, c1))
            start += c
        out_chunks.append(tuple(sizes))
        owners.append(np.asarray(owner))
    pieces = da.map_blocks(
        _chunk_moments,
        arr,
        block=block,
        new_axis=0,
        chunks=tuple(out_chunks),
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
    )
    # one row of chunks along z at a time: whatever order the scheduler picks, only one
    # row of source chunks is ever held (a lazily generated volume is never materialised)
    rows = [pieces.blocks[:, i].compute() for i in range(pieces.numblocks[1])]
    pieces = np.concatenate(rows, axis=1) if rows else np.zeros((3, 0, 0, 0))
    n, mean, m2 = pieces
    for axis, owner in enumerate(owners):
        n, mean, m2 = _merge_axis(n, mean, m2, owner, axis)
    return n, mean, m2


def _levels(
    means: np.ndarray, sds: np.ndarray, min_contrast: float, min_noise_ratio: float
) -> tuple[float, float, float]:
    """Void level, tissue level and threshold from the block means and SDs (NaN: no void).

    Otsu's split of the log block means always finds two classes; the dark one is
    accepted as a void only with evidence of one (step 3 of the module docstring): it
    is darker, flatter within its blocks, and its core is one level.
    """
    if means.size == 0:
        return math.nan, math.nan, math.nan
    no_void = (math.nan, float(np.median(means)), math.nan)
    top = float(means.max())
    if means.size < 2 or top <= 0 or float(means.min()) == top:
        return no_void
    logs = np.log(np.maximum(means, _LOG_FLOOR * top))
    if float(np.ptp(logs)) == 0:
        return no_void
    cut = threshold_otsu(logs)
    dark = logs <= cut
    if dark.all() or not dark.any():
        return no_void
    m_dark, m_bright = float(means[dark].mean()), float(means[~dark].mean())
    s_dark = float(np.quantile(sds[dark], _SD_QUANTILE))
    s_bright = float(np.quantile(sds[~dark], _SD_QUANTILE))
    # the void's core: the dark blocks as flat as the void (not tissue-edge blocks, whose
    # two levels raise their SD); never empty, as a quarter of the dark blocks have SD <= s_dark
    core = means[dark & (sds <= _CORE_SD_RATIO * s_dark)]
    void_level = float(np.median(core))
    tissue_level = float(np.median(means[~dark]))
    lo, hi = np.quantile(core, _CORE_QUANTILES)
    spread = float(hi - lo) / (tissue_level - void_level)  # the bright median is above all dark
    darker = m_bright > 0 and m_bright >= min_contrast * max(m_dark, 0.0)
    flatter = s_bright > 0 and s_bright >= min_noise_ratio * s_dark
    one_level = spread <= _MAX_VOID_SPREAD
    log.debug(
        "find_tissue: classes split at %.4g; mean %.4g vs %.4g, SD %.4g vs %.4g, "
        "void core spans %.3g of the contrast",
        math.exp(cut),
        m_dark,
        m_bright,
        s_dark,
        s_bright,
        spread,
    )
    if not (darker and flatter and one_level):
        log.info(
            "find_tissue: no void (dark/bright class mean %.4g/%.4g, block SD %.4g/%.4g, "
            "dark core spanning %.3g of the contrast): all data is tissue",
            m_dark,
            m_bright,
            s_dark,
            s_bright,
            spread,
        )
        return no_void
    threshold = void_level + _THRESHOLD_FRACTION * (tissue_level - void_level)
    return void_level, tissue_level, threshold


def _remove_specks(tissue: np.ndarray) -> np.ndarray:
    """Remove tissue components of fewer than 2 cells, unless none is larger."""
    labels, n = ndi.label(tissue, structure=np.ones((3, 3, 3), dtype=bool))
    if n < 2:
        return tissue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    small = sizes < _MIN_COMPONENT_BLOCKS
    if sizes.max() < _MIN_COMPONENT_BLOCKS:
        return tissue
    small[0] = False
    return tissue & ~small[labels]


# --------------------------------------------------------------------------- files and QC

TISSUE_MASK_FILE = "tissue_mask.ome.zarr"
DETECTION_QC_FILE = "detection_qc.json"


def write_detection_qc(qc: dict, folder: Path, *, voxel_size_um) -> dict:
    """Write the QC of :func:`~ketamap.wholebrain.detect.detect_cells` into a folder.

    Writes ``detection_qc.json`` (the QC numbers, plus the tissue grid:
    ``tissue_block_vox``, ``tissue_block_um``, ``tissue_grid_shape`` and
    ``volume_shape_vox``) and, when there is a tissue
    mask, ``tissue_mask.ome.zarr``: the coarse mask as uint8 (1 = tissue), one
    voxel per block, scale = voxel size × ``block_vox`` and a translation that
    puts each block's centre over the full-resolution volume. Both files are
    written atomically.

    Parameters
    ----------
    qc : dict
        The second value of ``detect_cells(..., return_qc=True)``.
    folder : path-like
        Output folder (it must exist), e.g. a stage's temporary folder.
    voxel_size_um : float or sequence of 3 float
        Voxel size (z, y, x) in µm of the detected volume.

    Returns
    -------
    dict
        The JSON-ready numbers written to ``detection_qc.json`` (without the
        mask object); the tissue keys are None when there is no mask.
    """
    from ketamap.io.volumes import write_ome_zarr
    from ketamap.space import check_voxel_size

    folder = Path(folder)
    vs = check_voxel_size(voxel_size_um)
    tissue = qc.get("tissue")
    numbers = {k: v for k, v in qc.items() if k != "tissue"}
    numbers |= {
        "tissue_block_vox": None,
        "tissue_block_um": None,
        "tissue_grid_shape": None,
        "volume_shape_vox": None,
    }
    if tissue is not None:
        block_um = tissue.block_size_um(vs)
        numbers |= {
            "tissue_block_vox": list(tissue.block_vox),
            "tissue_block_um": list(block_um),
            "tissue_grid_shape": list(tissue.mask.shape),
            "volume_shape_vox": list(tissue.shape),
        }
        write_ome_zarr(
            tissue.mask.astype(np.uint8),
            folder / TISSUE_MASK_FILE,
            voxel_size_um=block_um,
            translation_um=[(b - 1) / 2 * v for b, v in zip(tissue.block_vox, vs)],
            levels=1,
        )
    write_json(numbers, folder / DETECTION_QC_FILE)
    return numbers


def read_tissue_mask(folder: Path):
    """Read the tissue mask that :func:`write_detection_qc` wrote into a folder.

    Parameters
    ----------
    folder : path-like
        A detect output folder.

    Returns
    -------
    TissueMask or None
        None when the folder has no ``tissue_mask.ome.zarr`` (tissue masking
        was off, or the folder predates it).

    Raises
    ------
    InputError
        If the mask is there but ``detection_qc.json`` is missing or does not
        describe its grid.
    """
    from ketamap.errors import InputError
    from ketamap.io.volumes import open_volume

    folder = Path(folder)
    path = folder / TISSUE_MASK_FILE
    if not path.is_dir():
        return None
    try:
        qc = json.loads((folder / DETECTION_QC_FILE).read_text())
        block, shape = tuple(qc["tissue_block_vox"]), tuple(qc["volume_shape_vox"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"{path} has no readable {DETECTION_QC_FILE} beside it giving its block size and "
            f"volume shape ({e}); run the detect stage again."
        ) from e

    def level(key):
        value = qc.get(key)
        return float("nan") if value is None else float(value)

    mask = np.asarray(open_volume(path).compute()) > 0
    return TissueMask(
        mask, block, shape, level("tissue_void_level"), level("tissue_level"),
        level("tissue_threshold"),
    )  # fmt: skip


_DICE_POINTS = 2**20  # coarse cells mapped to the atlas per call (bounds memory)


def tissue_atlas_dice(tissue, registration, atlas) -> float:
    """Dice of the tissue mask and the atlas brain carried into the sample, on the coarse grid.

    The centre of every coarse cell of the mask (raw sample voxels) is mapped
    to the atlas through the registration
    (:func:`~ketamap.wholebrain.register.cells_to_atlas`); the cell belongs to
    the atlas brain when the atlas voxel it lands in is labelled
    (``annotation > 0``). The Dice coefficient of that coarse brain and the
    tissue mask is 1 when the detector's tissue and the registered atlas cover
    the same blocks. The mask is dilated by a block and blocks at the brain's
    surface are partly tissue, so a good registration of a whole brain scores
    somewhat below 1; a low value means the registration or the tissue mask is
    wrong (or the sample is not a whole brain, e.g. a hemisphere or a crop).

    Parameters
    ----------
    tissue : TissueMask
        From :func:`~ketamap.wholebrain.tissue.find_tissue` or
        :func:`read_tissue_mask`.
    registration : Registration
        The sample's registration; its raw sample shape must be the mask's
        full-resolution shape.
    atlas : Atlas
        The atlas registered to.

    Returns
    -------
    float
        In [0, 1]; 0 when both the mask and the mapped brain are empty.

    Raises
    ------
    InputError
        If the mask and the registration cover different sample shapes.
    """
    from ketamap.errors import InputError
    from ketamap.wholebrain.register import cells_to_atlas
    from ketamap.wholebrain.transforms import dice

    if tuple(tissue.shape) != tuple(registration.sample_shape_vox):
        raise InputError(
            f"The tissue mask covers a volume of shape {tuple(tissue.shape)} but the "
            f"registration one of shape {tuple(registration.sample_shape_vox)}; both must "
            "come from the same mouse's volumes."
        )
    grid = tissue.mask.shape
    if 0 in grid:
        return 0.0
    # centre of each coarse cell in raw voxels; the last cell of an axis may be shorter
    centres = []
    for n, b in zip(tissue.shape, tissue.block_vox):
        starts = np.arange(0, n, b)
        centres.append((starts + np.minimum(starts + b, n) - 1) / 2.0)
    plane = grid[1] * grid[2]
    zs_per_call = max(1, _DICE_POINTS // plane)
    brain = np.zeros(grid, dtype=bool)
    yy, xx = np.meshgrid(centres[1], centres[2], indexing="ij")
    for z0 in range(0, grid[0], zs_per_call):
        zc = centres[0][z0 : z0 + zs_per_call]
        pts = np.column_stack([
            np.repeat(zc, plane), np.tile(yy.ravel(), len(zc)), np.tile(xx.ravel(), len(zc))
        ])  # fmt: skip
        labels, _ = atlas.labels_at(cells_to_atlas(registration, pts))
        brain[z0 : z0 + len(zc)] = (labels > 0).reshape(len(zc), *grid[1:])
    return dice(tissue.mask, brain)
