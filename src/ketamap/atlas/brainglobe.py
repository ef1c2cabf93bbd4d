"""BrainGlobe atlas folders: read them, write them, and pick a loader from a spec.

The classic BrainGlobe layout (read by brainglobe-atlasapi 2.3.x) is a folder
``<name>_v<version>/`` holding ``metadata.json``, ``structures.json``,
``annotation.tiff`` (uint32), ``reference.tiff`` (uint16),
``hemispheres.tiff`` (uint8, 1 = left, 2 = right) and ``meshes/``.
Everything here is local: no function downloads or checks for updates.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.atlas.allen import load_allen
from ketamap.atlas.core import Atlas
from ketamap.atlas.ontology import Ontology
from ketamap.atlas.phantom import make_phantom
from ketamap.errors import AtlasError, AtlasNotFoundError, InputError, ParameterError
from ketamap.io.atomic import atomic_dir

__all__ = [
    "load_brainglobe",
    "write_brainglobe",
    "load_atlas",
    "default_brainglobe_dir",
    "resolve_brainglobe_folder",
]

logger = logging.getLogger(__name__)

ALLEN_ANNOTATION = "ABA_25um_2017_annotation.tif.lzma"
ALLEN_STRUCTURES = "structure_tree_safe_2017.csv"
ALLEN_HEMISPHERES = "ABA_25um_2017_hemispheres.tif.lzma"
SYNTHETIC_REFERENCE_NOTE = (
    "synthetic: derived from the annotation by ketamap (one grey level per region), "
    "not an image; the source atlas had no intensity template"
)


def default_brainglobe_dir() -> Path:
    """Return the folder where BrainGlobe keeps atlases, without creating anything.

    Reads ``bg_config.conf`` (in ``$BRAINGLOBE_CONFIG_DIR`` or
    ``~/.config/brainglobe``) when it exists, else ``~/.brainglobe``.

    Returns
    -------
    Path
    """
    conf_dir = Path(os.environ.get("BRAINGLOBE_CONFIG_DIR", Path.home() / ".config" / "brainglobe"))
    conf_path = conf_dir / "bg_config.conf"
    if conf_path.is_file():
        conf = configparser.ConfigParser()
        conf.read(conf_path)
        value = conf.get("default_dirs", "brainglobe_dir", fallback=None)
        if value:
            return Path(value)
    return Path.home() / ".brainglobe"


# ----------------------------------------------------------------------------- write
def _synthetic_reference(annotation: np.ndarray, ontology: Ontology) -> np.ndarray:
    """One stable grey level per region (uint16), 0 outside the brain."""
    ids = np.sort(ontology.ids)
    levels = (2000 + (ids * 2654435761) % 4000).astype(np.uint16)
    pos = np.clip(np.searchsorted(ids, annotation), 0, len(ids) - 1)
    return np.where(annotation > 0, levels[pos], 0).astype(np.uint16)


def _reference_uint16(reference: np.ndarray) -> tuple[np.ndarray, float]:
    if reference.dtype == np.uint16:
        return reference, 1.0
    ref = np.nan_to_num(reference.astype(np.float64), nan=0.0)
    top = float(ref.max()) if ref.size else 0.0
    scale = 60000.0 / top if top > 0 else 1.0
    return np.clip(np.rint(ref * scale), 0, 65535).astype(np.uint16), scale


def _to_asr(atlas: Atlas):
    """Stacks and resolution of an atlas mapped to "asr" with brainglobe-space."""
    stacks = [atlas.annotation, atlas.hemispheres, atlas.reference]
    if atlas.orientation == "asr":
        return stacks, atlas.resolution_um
    from brainglobe_space import AnatomicalSpace

    space = AnatomicalSpace(atlas.orientation, shape=atlas.shape, resolution=atlas.resolution_um)
    order, _, _, _ = space.map_to("asr")
    res = tuple(atlas.resolution_um[i] for i in order)
    mapped = [None if s is None else space.map_stack_to("asr", s, copy=True) for s in stacks]
    return mapped, res


def write_brainglobe(
    atlas: Atlas,
    out_dir: str | os.PathLike,
    *,
    version: str = "1.0",
    citation: str = "unpublished",
    atlas_link: str = "",
    species: str = "Mus musculus",
) -> Path:
    """Write an atlas as a classic BrainGlobe folder, atomically.

    Parameters
    ----------
    atlas : Atlas
        Any orientation; stacks are mapped to ``"asr"`` with brainglobe-space.
    out_dir : path-like
        Parent folder (a BrainGlobe ``brainglobe_dir``); created if needed.
    version : str
        ``"major.minor"``; the folder is ``<atlas.name>_v<version>``.
    citation, atlas_link, species : str
        Written to ``metadata.json``.

    Returns
    -------
    Path
        The atlas folder ``out_dir/<atlas.name>_v<version>``. Open it with
        ``BrainGlobeAtlas(atlas.name, brainglobe_dir=out_dir, check_latest=False)``.

    Raises
    ------
    ParameterError
        If ``version`` is not ``"major.minor"``.

    Notes
    -----
    The format requires ``reference.tiff`` as uint16: a float reference is
    rescaled (its maximum becomes 60000; the factor is recorded as
    ``ketamap_reference_scale``), and an atlas without reference gets a
    synthetic one derived from the annotation, recorded in
    ``metadata["ketamap_reference"]``. ``meshes/`` is left empty.

    Examples
    --------
    >>> import tempfile
    >>> from ketamap.atlas import make_phantom
    >>> folder = write_brainglobe(make_phantom(resolution_um=200), tempfile.mkdtemp())
    >>> folder.name
    'ketamap_phantom_200um_v1.0'
    """
    import tifffile

    if not re.fullmatch(r"[0-9]+\.[0-9]+", str(version)):
        raise ParameterError(f'write_brainglobe version must look like "1.0", got {version!r}.')
    (annotation, hemispheres, reference), res = _to_asr(atlas)
    meta_ref = "template"
    scale = 1.0
    if reference is None:
        reference = _synthetic_reference(annotation, atlas.ontology)
        meta_ref = SYNTHETIC_REFERENCE_NOTE
    else:
        reference, scale = _reference_uint16(reference)

    table = atlas.ontology.table
    structures = []
    for row in table.itertuples(index=False):
        color = row.color_hex
        structures.append(
            {
                "acronym": row.acronym,
                "id": int(row.id),
                "name": row.name,
                "structure_id_path": [int(x) for x in row.structure_id_path.strip("/").split("/")],
                "rgb_triplet": [int(color[i : i + 2], 16) for i in (0, 2, 4)],
            }
        )
    metadata = {
        "name": atlas.name,
        "citation": citation,
        "atlas_link": atlas_link,
        "species": species,
        "symmetric": False,
        "resolution": [float(r) for r in res],
        "orientation": "asr",
        "version": str(version),
        "shape": [int(s) for s in annotation.shape],
        "trasform_to_bg": np.eye(4).tolist(),
        "additional_references": [],
        "atlas_packager": "ketamap",
        "ketamap_reference": meta_ref,
        "ketamap_reference_scale": scale,
    }
    final = Path(out_dir) / f"{atlas.name}_v{version}"
    with atomic_dir(final) as tmp:
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (tmp / "structures.json").write_text(json.dumps(structures) + "\n")
        tifffile.imwrite(tmp / "annotation.tiff", np.ascontiguousarray(annotation, dtype=np.uint32))
        tifffile.imwrite(tmp / "reference.tiff", np.ascontiguousarray(reference))
        hemi = np.ascontiguousarray(hemispheres, dtype=np.uint8)
        tifffile.imwrite(tmp / "hemispheres.tiff", hemi)
        (tmp / "meshes").mkdir()
    logger.info("wrote BrainGlobe atlas %s", final)
    return final


# ----------------------------------------------------------------------------- read
def _atlas_folders_in(folder: Path) -> list[Path]:
    """BrainGlobe atlas folders directly inside ``folder`` (those holding ``metadata.json``)."""
    if not folder.is_dir():
        return []
    return sorted(p.parent for p in folder.glob("*/metadata.json") if p.is_file())


def _metadata_resolution(folder: Path) -> tuple[float, ...] | None:
    try:
        meta = json.loads((folder / "metadata.json").read_text())
        return tuple(float(r) for r in meta["resolution"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _listing(folders: list[Path]) -> str:
    names = [str(f) for f in folders[:4]]
    more = f" ({len(folders) - 4} more)" if len(folders) > 4 else ""
    return (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]) + more


def resolve_brainglobe_folder(
    path: str | os.PathLike, *, resolution_um: float | None = None
) -> Path | None:
    """Find the BrainGlobe atlas folder a path means, or say which one to pass.

    ``ketamap atlas build --out DIR`` (and :func:`write_brainglobe`) write the
    atlas into ``DIR/<name>_v<version>/`` and report that folder; either
    folder is accepted as the atlas.

    Parameters
    ----------
    path : path-like
        An atlas folder (holding ``metadata.json``), or a folder holding
        atlas folders (``DIR`` above).
    resolution_um : float, optional
        When ``path`` holds several atlases, keep only those of this resolution
        (on every axis).

    Returns
    -------
    Path or None
        The atlas folder, or None when ``path`` is neither an atlas folder nor
        near one.

    Raises
    ------
    AtlasNotFoundError
        When ``path`` is one level off an atlas folder: a folder holding several
        atlases, a file or folder inside an atlas folder, or a folder that does
        not exist beside atlas folders; the message names the folder to pass.

    Examples
    --------
    >>> import tempfile
    >>> from ketamap.atlas import make_phantom
    >>> out = tempfile.mkdtemp()
    >>> folder = write_brainglobe(make_phantom(resolution_um=200), out)
    >>> resolve_brainglobe_folder(out) == resolve_brainglobe_folder(folder) == folder
    True
    """
    path = Path(path).expanduser()
    spec = os.fspath(path)
    if (path / "metadata.json").is_file():
        return path
    inside = _atlas_folders_in(path)
    if len(inside) > 1 and resolution_um is not None:
        fitting = [
            f
            for f in inside
            if (res := _metadata_resolution(f)) is not None
            and all(abs(r - float(resolution_um)) <= 1e-6 for r in res)
        ]
        inside = fitting or inside
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise AtlasNotFoundError(
            f'Atlas "{spec}" is a folder that holds {len(inside)} atlases, not one; '
            f"did you mean {_listing(inside)}?"
        )
    parent = path.parent
    if path.exists() and parent != path and (parent / "metadata.json").is_file():
        raise AtlasNotFoundError(
            f'Atlas "{spec}" is inside the BrainGlobe atlas folder {parent}; pass {parent} '
            "(or the folder that holds it)."
        )
    if not path.exists() and parent != path:
        near = [f for f in _atlas_folders_in(parent) if f.name.startswith(f"{path.name}_v")]
        near = near or _atlas_folders_in(parent)
        if near:
            raise AtlasNotFoundError(
                f'Atlas "{spec}" does not exist; did you mean {_listing(near)}?'
            )
    return None


def _find_local(name: str, brainglobe_dir: Path) -> Path | None:
    candidates = sorted(brainglobe_dir.glob(f"{name}_v*")) if brainglobe_dir.is_dir() else []
    candidates = [c for c in candidates if (c / "metadata.json").is_file()]
    if len(candidates) > 1:
        raise AtlasError(
            f'Several versions of atlas "{name}" are installed in {brainglobe_dir}: '
            f"{', '.join(c.name for c in candidates)}; keep one or pass the folder."
        )
    return candidates[0] if candidates else None


def _read_folder(folder: Path) -> Atlas:
    import warnings

    from brainglobe_atlasapi.core import Atlas as BGAtlas

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This atlas seems to be outdated")
            bg = BGAtlas(folder)
            annotation = np.asarray(bg.annotation)
            hemispheres = np.asarray(bg.hemispheres)
            reference = np.asarray(bg.reference) if (folder / "reference.tiff").is_file() else None
    except (OSError, ValueError, KeyError) as e:
        raise AtlasError(f"BrainGlobe atlas folder {folder} cannot be read: {e}") from e
    rows = [
        {
            "id": int(s["id"]),
            "acronym": s["acronym"],
            "name": s["name"],
            "parent_id": (
                int(s["structure_id_path"][-2]) if len(s["structure_id_path"]) > 1 else None
            ),
            "color_hex": "".join(f"{int(c):02X}" for c in s.get("rgb_triplet", [255, 255, 255])),
        }
        for s in bg.structures_list
    ]
    table = pd.DataFrame(rows)
    table["parent_id"] = pd.array(table["parent_id"], dtype="Int64")
    if reference is not None and reference.dtype not in (np.float32, np.uint16):
        reference = reference.astype(np.float32)
    name = re.sub(r"_v[0-9]+(\.[0-9]+)*$", "", folder.name)
    return Atlas(
        name=name,
        annotation=annotation,
        hemispheres=hemispheres,
        resolution_um=tuple(float(r) for r in bg.resolution),
        orientation=str(bg.metadata.get("orientation", "asr")),
        ontology=Ontology(table),
        reference=reference,
        synthetic_reference=str(bg.metadata.get("ketamap_reference", "")).startswith("synthetic"),
    )


def load_brainglobe(
    name_or_path: str | os.PathLike, *, brainglobe_dir: str | os.PathLike | None = None
) -> Atlas:
    """Load a BrainGlobe atlas from a folder or by name, locally only.

    Parameters
    ----------
    name_or_path : str or path-like
        An atlas folder (holding ``metadata.json``), the folder
        :func:`write_brainglobe` wrote one atlas into, or an atlas name such as
        ``"allen_mouse_25um"``, looked up as ``<brainglobe_dir>/<name>_v*``.
    brainglobe_dir : path-like, optional
        Where installed atlases live; default :func:`default_brainglobe_dir`.

    Returns
    -------
    Atlas
        Named after the folder without its ``_v<version>`` suffix.

    Raises
    ------
    AtlasNotFoundError
        If the atlas is neither a folder nor installed (nothing is downloaded),
        or the path is one level off an atlas folder (see
        :func:`resolve_brainglobe_folder`; the message names the folder to pass).
    AtlasError
        If the folder cannot be read or several versions are installed.

    Examples
    --------
    >>> import tempfile
    >>> from ketamap.atlas import make_phantom
    >>> out = tempfile.mkdtemp()
    >>> _ = write_brainglobe(make_phantom(resolution_um=200), out)
    >>> load_brainglobe("ketamap_phantom_200um", brainglobe_dir=out).shape
    (66, 40, 57)
    """
    path = Path(name_or_path)
    text = os.fspath(name_or_path)
    if (path / "metadata.json").is_file():
        return _read_folder(path)
    if path.is_dir() or "/" in text or os.sep in text:  # a path, not a name
        folder = resolve_brainglobe_folder(path)
        if folder is None:
            raise AtlasNotFoundError(
                f"{text} is not a BrainGlobe atlas folder (no metadata.json in it or in a "
                "folder inside it); ketamap never downloads."
            )
        return _read_folder(folder)
    root = Path(brainglobe_dir) if brainglobe_dir is not None else default_brainglobe_dir()
    folder = _find_local(str(name_or_path), root)
    if folder is None:
        raise AtlasNotFoundError(
            f'BrainGlobe atlas "{name_or_path}" is not installed in {root} '
            f"(no folder {name_or_path}_v*) and is not an atlas folder; ketamap never downloads."
        )
    return _read_folder(folder)


# ----------------------------------------------------------------------------- dispatch
def _allen_folder(folder: Path, resolution_um: float | None) -> Atlas:
    refs = sorted(
        p for p in folder.glob("reference*.tif*") if p.suffix.lower() in (".tif", ".tiff")
    )
    if len(refs) > 1:
        raise InputError(
            f"Allen folder {folder} holds several reference images "
            f"({', '.join(p.name for p in refs)}); keep one."
        )
    hemi = folder / ALLEN_HEMISPHERES
    return load_allen(
        folder / ALLEN_ANNOTATION,
        folder / ALLEN_STRUCTURES,
        hemispheres_path=hemi if hemi.is_file() else None,
        reference_path=refs[0] if refs else None,
        resolution_um=50.0 if resolution_um is None else resolution_um,
    )


def load_atlas(spec: str | os.PathLike, *, resolution_um: float | None = None) -> Atlas:
    """Load an atlas from a short specification.

    Parameters
    ----------
    spec : str or path-like
        ``"phantom"`` or ``"phantom:<µm>"`` (the synthetic atlas); a BrainGlobe
        atlas folder (holds ``metadata.json``) or the folder holding it (what
        ``ketamap atlas build --out DIR`` wrote into; with several atlases in
        it, the one of ``resolution_um`` if that is unique); a folder with the Allen 2017
        files (``ABA_25um_2017_annotation.tif.lzma`` and
        ``structure_tree_safe_2017.csv``, optionally the hemispheres file and
        one ``reference*.tif[f]``); or the name of a BrainGlobe atlas
        installed under ``~/.brainglobe``.
    resolution_um : float, optional
        For the phantom (default 50) and the Allen files (25, 50 or 100;
        default 50). For a BrainGlobe atlas it must equal the atlas' own.

    Returns
    -------
    Atlas

    Raises
    ------
    AtlasNotFoundError
        If the spec matches nothing; the message lists what was tried, or, for a
        path one level off an atlas folder, names the folder to pass.
    ParameterError
        For an impossible or contradictory resolution.

    Examples
    --------
    >>> load_atlas("phantom:200").shape
    (66, 40, 57)
    """
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = text.decode()
    match = re.fullmatch(r"phantom(?::\s*([0-9]*\.?[0-9]+)\s*(?:um|µm)?)?", text.strip(), re.I)
    if match:
        res = float(match.group(1)) if match.group(1) else None
        if res is not None and resolution_um is not None and res != float(resolution_um):
            raise ParameterError(
                f'Atlas spec "{text}" asks for {res:g} µm but resolution_um is {resolution_um!r}.'
            )
        res = res if res is not None else (50.0 if resolution_um is None else resolution_um)
        return make_phantom(resolution_um=res)

    path = Path(text).expanduser()
    tried = ['"phantom[:µm]"', f"a BrainGlobe folder {path}/metadata.json"]
    if path.is_dir() and (path / "metadata.json").is_file():
        atlas = load_brainglobe(path)
        _check_resolution(atlas, resolution_um, text)
        return atlas
    tried.append(f"Allen files {path}/{ALLEN_ANNOTATION} + {ALLEN_STRUCTURES}")
    allen_files = (path / ALLEN_ANNOTATION, path / ALLEN_STRUCTURES)
    if path.is_dir() and all(f.is_file() for f in allen_files):
        return _allen_folder(path, resolution_um)
    is_path = path.is_dir() or "/" in text or os.sep in text
    # the folder that "ketamap atlas build --out DIR" (write_brainglobe) wrote into, or a
    # path one level off an atlas folder (the error then names the folder to pass)
    folder = resolve_brainglobe_folder(path, resolution_um=resolution_um) if is_path else None
    if folder is not None:
        atlas = _read_folder(folder)
        _check_resolution(atlas, resolution_um, text)
        return atlas
    if not is_path:
        root = default_brainglobe_dir()
        tried.append(f"an installed BrainGlobe atlas {root / (text + '_v*')}")
        folder = _find_local(text, root)
        if folder is not None:
            atlas = _read_folder(folder)
            _check_resolution(atlas, resolution_um, text)
            return atlas
    raise AtlasNotFoundError(f'Atlas "{text}" was not found; tried {", ".join(tried)}.')


def _check_resolution(atlas: Atlas, resolution_um: float | None, spec: str) -> None:
    if resolution_um is not None and any(
        abs(r - float(resolution_um)) > 1e-6 for r in atlas.resolution_um
    ):
        raise ParameterError(
            f'Atlas "{spec}" has resolution {atlas.resolution_um} µm, not the requested '
            f"{resolution_um!r} µm; BrainGlobe atlases are not resampled."
        )
