"""Read calcium traces and ROI footprints from an NWB file (optional ``pynwb``).

What is read, from the ``ophys`` processing module (or, failing that, any
module holding these containers):

* **Fluorescence**: a ``RoiResponseSeries`` in a ``Fluorescence`` (or
  ``DfOverF``) container. With ``series=None`` the first series of the
  container named ``Fluorescence`` is used (suite2p's export names it so),
  otherwise the first series found; ``series`` picks one by name, either the
  series' own name or its container's. Data are stored (frames, ROIs) and
  returned (ROIs, frames).
* **Neuropil**: the series of a container named ``Neuropil`` with the same
  number of ROIs, when present (suite2p's export).
* **Frame rate**: the series' ``rate``, or 1 / median interval of its
  ``timestamps``.
* **Footprints**: the ``PlaneSegmentation`` the series' ``rois`` point into:
  ``pixel_mask`` (x, y, weight in the NWB schema) or ``image_mask``. Files
  written by suite2p (recognised by their ``Backgrounds_0`` images) store
  (y, x, weight) in ``pixel_mask`` and are read that way. An ``iscell``
  column, when present, keeps only the ROIs labelled as cells.
* **Mean image**: an image named ``meanImg`` or ``mean`` in an ``Images``
  container, when present.

``pynwb`` is an optional dependency (``pip install ketamap[nwb]``); without
it, reading an ``.nwb`` file raises one :class:`~ketamap.errors.InputError`
sentence saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ketamap.errors import InputError, InputNotFoundError, require
from ketamap.io.traces import Recording, check_traces

__all__ = ["read_nwb"]

log = logging.getLogger(__name__)


def _import_pynwb():
    return require(
        "pynwb", needed_for="Reading NWB files", install="ketamap[nwb]", error=InputError
    )


def _containers(nwbfile):
    """Yield (module, name, container) for every data interface of every processing module."""
    mods = list(nwbfile.processing.values())
    mods.sort(key=lambda m: m.name != "ophys")
    for mod in mods:
        for name, obj in mod.data_interfaces.items():
            yield mod, name, obj


def _pick_series(nwbfile, series: str | None, path: Path):
    from pynwb.ophys import DfOverF, Fluorescence

    found = []
    for mod, cname, obj in _containers(nwbfile):
        if isinstance(obj, (Fluorescence, DfOverF)):
            for sname, s in obj.roi_response_series.items():
                found.append((mod, cname, sname, s))
    if not found:
        raise InputError(f"{path} holds no RoiResponseSeries in a Fluorescence container.")
    if series is not None:
        hits = [f for f in found if series in (f[1], f[2])]
        if not hits:
            names = ", ".join(sorted({f"{f[1]}/{f[2]}" for f in found}))
            raise InputError(f"{path} has no RoiResponseSeries named {series!r}; it has {names}.")
        return hits[0], found
    preferred = [f for f in found if f[1] == "Fluorescence"]
    return (preferred or found)[0], found


def _footprints(ps, rows: np.ndarray, yx_order: bool) -> list | None:
    cols = set(ps.colnames)
    out = []
    if "pixel_mask" in cols:
        for r in rows:
            pm = ps["pixel_mask"][int(r)]
            arr = np.array([tuple(p) for p in pm], dtype=float).reshape(-1, 3)
            a, b, w = arr[:, 0], arr[:, 1], arr[:, 2]
            y, x = (a, b) if yx_order else (b, a)
            out.append({"ypix": y.astype(np.int64), "xpix": x.astype(np.int64), "lam": w})
        return out
    if "image_mask" in cols:
        for r in rows:
            m = np.asarray(ps["image_mask"][int(r)], dtype=float)
            if m.ndim != 2:
                return None
            y, x = np.nonzero(m)
            out.append({"ypix": y, "xpix": x, "lam": m[y, x]})
        return out
    return None


def _mean_image(nwbfile) -> np.ndarray | None:
    from pynwb.base import Images

    for _, _, obj in _containers(nwbfile):
        if isinstance(obj, Images):
            for key in ("meanImg", "mean", "mean_image", "meanImgE"):
                if key in obj.images:
                    img = np.asarray(obj.images[key].data[:], dtype=np.float32)
                    if img.ndim == 2:
                        return img
    return None


def read_nwb(path: str | Path, *, series: str | None = None, only_cells: bool = True) -> Recording:
    """Read one session from an NWB file (see the module notes for what is read).

    Parameters
    ----------
    path : path-like
        The ``.nwb`` file.
    series : str, optional
        Name of the RoiResponseSeries (or of its container) to read.
    only_cells : bool
        Keep only ROIs with ``iscell`` true when the segmentation has that column.

    Returns
    -------
    Recording
        Traces (ROIs, frames) float32, neuropil when found, frame rate,
        footprints and mean image when present. ``cell_index`` is the ROI's
        row in the series.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If pynwb is missing, the file cannot be read or holds no usable series.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"NWB file {path} does not exist.")
    pynwb = _import_pynwb()
    io = None
    try:
        io = pynwb.NWBHDF5IO(str(path), "r")
        nwbfile = io.read()
    except Exception as e:  # h5py/hdmf raise many types for a bad file
        if io is not None:
            io.close()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} could not be read as an NWB file: {msg}.") from e
    with io:
        (mod, cname, sname, s), found = _pick_series(nwbfile, series, path)
        data = np.asarray(s.data[:], dtype=np.float32)
        if data.ndim == 1:
            data = data[:, None]
        F = check_traces(data.T, name=f"{path}:{cname}/{sname}")
        rate = float(s.rate) if s.rate is not None else None
        if rate is None and s.timestamps is not None and len(s.timestamps) > 1:
            dt = float(np.median(np.diff(np.asarray(s.timestamps[:]))))
            rate = 1.0 / dt if dt > 0 else None
        Fneu = None
        for _m, c2, _s2, other in found:
            if c2 == "Neuropil" and other is not s and other.data.shape == s.data.shape:
                Fneu = check_traces(
                    np.asarray(other.data[:], dtype=np.float32).T, name=f"{path}:Neuropil"
                )
                break
        rows = np.arange(F.shape[0])
        footprints = None
        keep = np.ones(F.shape[0], dtype=bool)
        if s.rois is not None:
            ps = s.rois.table
            rows = np.asarray(s.rois.data[:], dtype=int)
            suite2p_layout = any(n.startswith("Backgrounds_") for n in mod.data_interfaces)
            footprints = _footprints(ps, rows, yx_order=suite2p_layout)
            if only_cells and "iscell" in ps.colnames:
                lab = np.asarray(ps["iscell"].data[:])
                lab = lab[:, 0] if lab.ndim == 2 else lab
                keep = lab[rows].astype(float) > 0.5
        mean_image = _mean_image(nwbfile)
    if len(rows) != F.shape[0]:
        raise InputError(
            f"{path}: series {sname} has {F.shape[0]} ROIs but points at {len(rows)} ROI rows."
        )
    idx = np.nonzero(keep)[0]
    fps = [footprints[i] for i in idx] if footprints is not None else None
    log.info(
        "read %s (%s/%s): %d of %d ROIs, %d frames",
        path,
        cname,
        sname,
        len(idx),
        len(keep),
        F.shape[1],
    )
    return Recording(
        F[keep],
        None if Fneu is None else Fneu[keep],
        idx,
        rate,
        f"{path}:{cname}/{sname}",
        fps,
        mean_image,
    )
