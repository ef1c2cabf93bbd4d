"""The study manifest: one TOML file describing a whole-brain census study.

A manifest names the study, the atlas and marker, how the brains were imaged,
the treatment groups (dose and schedule) and every subject with its data.
:func:`load_study` turns it into validated, typed, immutable objects by the one
mechanism of :mod:`ketamap.manifest.base`; every mistake is reported as one
sentence that says what is wrong and where. Validation never writes anything.

A full, commented example is in ``docs/manifest.md``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ketamap.errors import ManifestError
from ketamap.manifest.base import read_toml, source
from ketamap.params import bounds, did_you_mean, from_mapping, tables
from ketamap.space import check_orientation, check_voxel_size

__all__ = [
    "Imaging",
    "Group",
    "Subject",
    "Study",
    "load_study",
    "parse_study",
    "study_to_toml",
    "SCHEDULES",
    "DEFAULT_KEY_REGIONS",
]

#: Dosing schedules a group may declare.
SCHEDULES = ("single", "daily", "twice daily", "every other day", "weekly")

#: The report's key regions when ``[study]`` names none: where the TH+ changes after
#: ketamine were reported (midbrain dopaminergic nuclei, dorsal raphe, hypothalamus;
#: Datta et al., Cell Reports 2023).
DEFAULT_KEY_REGIONS = ("VTA", "SNc", "SNr", "ZI", "DR", "DMH", "MPN", "PVH", "ARH", "VMH", "LHA")


@dataclass(frozen=True)
class Imaging:
    """How the brains were imaged (defaults for every subject).

    Attributes
    ----------
    voxel_size_um : tuple of float
        Voxel size along (z, y, x) in µm.
    orientation : str
        BrainGlobe orientation code of the raw volume axes (z, y, x).
    signal_channel : str
        Name of the marker channel (e.g. ``"TH"``); used in outputs.
    background_channel : str or None
        Name of the autofluorescence channel, if acquired.
    """

    voxel_size_um: tuple[float, float, float]
    orientation: str
    signal_channel: str = "signal"
    background_channel: str | None = None


@dataclass(frozen=True)
class Group:
    """A treatment group.

    Attributes
    ----------
    name : str
        Group name used in contrasts (e.g. ``"ket30"``).
    dose_mg_per_kg : float
        Dose per administration in mg/kg (0 for vehicle).
    schedule : str
        One of :data:`SCHEDULES`.
    duration_days : int
        Days of treatment.
    description : str
        Free text, e.g. ``"ketamine 30 mg/kg i.p."``.
    """

    name: str = field(metadata=bounds(nonempty=True))
    dose_mg_per_kg: float = field(metadata=bounds(ge=0))
    schedule: str = field(default="single", metadata=bounds(choices=SCHEDULES))
    duration_days: int = field(default=1, metadata=bounds(ge=1))
    description: str = ""


@dataclass(frozen=True)
class Subject:
    """One mouse and its data.

    Attributes
    ----------
    id : str
        Unique subject id.
    group : str
        Name of its :class:`Group`.
    signal : Path
        Marker channel volume (absolute path).
    background : Path or None
        Autofluorescence volume (absolute path), if any.
    voxel_size_um, orientation
        The imaging of this subject (the study default unless overridden).
    covariates : dict
        Optional covariates such as ``sex`` or ``batch``.
    fibres : Path or None
        The channel whose fibres are measured (absolute path), when it is not the
        signal (``fibres`` in ``[[subjects]]``; used when the manifest has ``[fibres]``).
    proofread : Path or None
        Proofread labels of this subject's candidates (``labels.csv``: ``z_vox, y_vox,
        x_vox, label``), applied before counting (``proofread`` in ``[[subjects]]``).
    """

    id: str
    group: str
    signal: Path
    background: Path | None
    voxel_size_um: tuple[float, float, float]
    orientation: str
    covariates: Mapping[str, Any] = field(default_factory=dict)
    fibres: Path | None = None
    proofread: Path | None = None

    @property
    def fibre_channel(self) -> Path:
        """The volume whose fibres are measured: ``fibres`` if given, else the signal."""
        return self.signal if self.fibres is None else self.fibres


@dataclass(frozen=True)
class Study:
    """A validated study manifest.

    Attributes
    ----------
    name, atlas, marker : str
        Study name, atlas specification (see :func:`ketamap.atlas.load_atlas`)
        and the marker counted (e.g. ``"TH"``).
    reference_group : str
        The group every other group is compared with.
    imaging : Imaging
    groups : tuple of Group
    subjects : tuple of Subject
    root : Path
        The folder of the manifest; outputs are written under it.
    params : dict
        Per-stage parameter tables (``detection``, ``registration``,
        ``stats``), validated by each stage's parameters class.
    classifier : Path or None
        A trained candidate classifier (``ketamap detect train``) that the detect
        stage applies as a second pass (``classifier`` in ``[study]``).
    key_regions : tuple of str
        Atlas acronyms the report always shows (density of every mouse, dose-response),
        beside the strongest hits (``key_regions`` in ``[study]``; default
        :data:`DEFAULT_KEY_REGIONS`).
    """

    name: str
    atlas: str
    marker: str
    reference_group: str
    imaging: Imaging
    groups: tuple[Group, ...]
    subjects: tuple[Subject, ...]
    root: Path
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    classifier: Path | None = None
    key_regions: tuple[str, ...] = ()

    def group(self, name: str) -> Group:
        """Return the group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise ManifestError(
            f'No group "{name}"{did_you_mean(name, [g.name for g in self.groups])}.'
        )

    def subjects_table(self) -> pd.DataFrame:
        """Return one row per subject: subject, group, dose_mg_per_kg and covariates."""
        rows = []
        for s in self.subjects:
            g = self.group(s.group)
            rows.append(
                {"subject": s.id, "group": s.group, "dose_mg_per_kg": g.dose_mg_per_kg}
                | dict(s.covariates)
            )
        return pd.DataFrame(rows)

    @property
    def atlas_spec(self) -> str:
        """The atlas specification for :func:`~ketamap.atlas.load_atlas`.

        A folder named relative to the manifest (``atlas = "atlases"``) is resolved
        against the study's folder; an atlas name or absolute path is returned as is.
        """
        path = Path(self.atlas)
        if not path.is_absolute() and (self.root / path).exists():
            return str(self.root / path)
        return self.atlas

    @property
    def covariates(self) -> tuple[str, ...]:
        """Covariate names present for every subject."""
        names = [set(s.covariates) for s in self.subjects]
        common = set.intersection(*names) if names else set()
        return tuple(sorted(common))


# --------------------------------------------------------------------------- schema


def _subject_id(value: Any, *, where: str) -> str:
    r"""Return a subject id as a folder name, or raise: no / \ : * ? " < > | in it."""
    sid = str(value)
    if not sid.strip() or any(c in sid for c in '/\\:*?"<>|') or sid in (".", ".."):
        raise ManifestError(
            f'{where} must be a non-empty name without / \\ : * ? " < > |, got "{sid}".'
        )
    return sid


@dataclass(frozen=True, kw_only=True)
class StudyTable:
    """``[study]``."""

    name: str = field(metadata=bounds(nonempty=True))
    atlas: str = "phantom"
    marker: str = "TH"
    reference_group: str | None = None
    classifier: Path | None = None
    key_regions: tuple[str, ...] = DEFAULT_KEY_REGIONS


@dataclass(frozen=True, kw_only=True)
class ImagingTable:
    """``[imaging]``: the defaults of every subject (the signal channel defaults to the marker)."""

    voxel_size_um: tuple[float, float, float] = field(metadata=bounds(check=check_voxel_size))
    orientation: str = field(metadata=bounds(check=check_orientation))
    signal_channel: str | None = None
    background_channel: str | None = None


@dataclass(frozen=True, kw_only=True)
class SubjectTable:
    """One ``[[subjects]]`` table."""

    id: str | int = field(metadata=bounds(check=_subject_id))
    group: str
    signal: Path
    background: Path | None = None
    voxel_size_um: tuple[float, float, float] | None = field(
        default=None, metadata=bounds(check=check_voxel_size)
    )
    orientation: str | None = field(default=None, metadata=bounds(check=check_orientation))
    sex: str | int | None = None
    batch: str | int | None = None
    covariates: dict[str, str | int | float] = field(default_factory=dict)
    fibres: Path | None = None
    proofread: Path | None = None


@dataclass(frozen=True, kw_only=True)
class StudyFile:
    """The whole manifest; the stage tables are checked by each stage's parameters class."""

    study: StudyTable
    imaging: ImagingTable
    groups: tuple[Group, ...] = field(
        default=(), metadata=tables("group", label="name", unique=True, at_least=1)
    )
    subjects: tuple[SubjectTable, ...] = field(
        default=(), metadata=tables("subject", label="id", unique=True, at_least=1)
    )
    detection: dict[str, Any] | None = None
    registration: dict[str, Any] | None = None
    fibres: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None


#: The stage parameter tables a manifest may carry (``[fibres]`` also turns the stage on).
STAGE_TABLES = ("detection", "registration", "fibres", "stats")

#: Covariate names that would clash with the columns of the subjects table.
_RESERVED = ("subject", "group", "dose_mg_per_kg")


# --------------------------------------------------------------------------- parsing


def parse_study(
    data: Mapping[str, Any],
    *,
    root: str | os.PathLike,
    check_paths: bool = True,
    where: str = "the manifest",
) -> Study:
    """Validate a parsed manifest (a dict as read from TOML) into a :class:`Study`.

    Parameters
    ----------
    data : mapping
        The manifest content.
    root : path-like
        Folder that relative data paths are resolved against (the manifest's).
    check_paths : bool
        Check that every data path exists.
    where : str
        The manifest's name, for the messages.

    Returns
    -------
    Study

    Raises
    ------
    ManifestError
        One sentence for the first mistake found.
    InputNotFoundError
        If a data path does not exist (with ``check_paths``).
    """
    root = Path(root).resolve()
    doc = from_mapping(
        StudyFile, data, where=where, source=source(root, folder="study", check_exists=check_paths)
    )
    st, im = doc.study, doc.imaging
    imaging = Imaging(
        voxel_size_um=im.voxel_size_um,
        orientation=im.orientation,
        signal_channel=st.marker if im.signal_channel is None else im.signal_channel,
        background_channel=im.background_channel,
    )
    group_names = [g.name for g in doc.groups]
    reference = group_names[0] if st.reference_group is None else st.reference_group
    if reference not in group_names:
        raise ManifestError(
            f'reference_group "{reference}" in [study] of {where} is not a declared group'
            f"{did_you_mean(reference, group_names)}; groups are: {', '.join(group_names)}."
        )
    subjects = []
    for s in doc.subjects:
        at = f'subject "{s.id}" of {where}'
        if s.group not in group_names:
            raise ManifestError(
                f'{at} belongs to unknown group "{s.group}"{did_you_mean(s.group, group_names)}; '
                f"declared groups are: {', '.join(group_names)}."
            )
        cov: dict[str, Any] = {
            k: getattr(s, k) for k in ("sex", "batch") if getattr(s, k) is not None
        }
        for key, value in s.covariates.items():
            if key in _RESERVED or key in cov:
                raise ManifestError(f'Covariate "{key}" of {at} clashes with a reserved name.')
            cov[key] = value
        subjects.append(
            Subject(
                id=str(s.id),
                group=s.group,
                signal=s.signal,
                background=s.background,
                voxel_size_um=imaging.voxel_size_um if s.voxel_size_um is None else s.voxel_size_um,
                orientation=imaging.orientation if s.orientation is None else s.orientation,
                covariates=cov,
                fibres=s.fibres,
                proofread=s.proofread,
            )
        )
    for g in doc.groups:
        if not any(s.group == g.name for s in subjects):
            raise ManifestError(f'Group "{g.name}" has no subjects in [[subjects]] of {where}.')
    params = {
        stage: dict(getattr(doc, stage))
        for stage in STAGE_TABLES
        if getattr(doc, stage) is not None
    }
    return Study(
        name=st.name,
        atlas=st.atlas,
        marker=st.marker,
        reference_group=reference,
        imaging=imaging,
        groups=doc.groups,
        subjects=tuple(subjects),
        root=root,
        params=params,
        classifier=st.classifier,
        key_regions=st.key_regions,
    )


def load_study(path: str | os.PathLike, *, check_paths: bool = True) -> Study:
    """Read and validate a study manifest.

    Parameters
    ----------
    path : path-like
        The ``study.toml`` file.
    check_paths : bool
        Check that every data path exists.

    Returns
    -------
    Study

    Raises
    ------
    ManifestError
        If the file is missing, is not valid TOML, or any entry is invalid.
    InputNotFoundError
        If a data path does not exist (with ``check_paths``).

    Examples
    --------
    >>> study = load_study("study.toml")  # doctest: +SKIP
    >>> [g.name for g in study.groups]  # doctest: +SKIP
    ['saline', 'ket30', 'ket100']
    """
    path = Path(path)
    data = read_toml(path, what="Study manifest")
    return parse_study(data, root=path.parent, check_paths=check_paths, where=str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def study_to_toml(study: Study) -> str:
    """Write a :class:`Study` back as manifest text, paths relative to its root."""

    def rel(p: Path | None) -> str | None:
        if p is None:
            return None
        try:
            return p.relative_to(study.root).as_posix()
        except ValueError:
            return str(p)

    lines = ["[study]"]
    for key in (f.name for f in dataclasses.fields(StudyTable)):
        value = getattr(study, key)
        if value is not None:
            lines.append(f"{key} = {_toml_value(rel(value) if key == 'classifier' else value)}")
    lines.append("\n[imaging]")
    for f in dataclasses.fields(study.imaging):
        value = getattr(study.imaging, f.name)
        if value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for g in study.groups:
        lines.append("\n[[groups]]")
        for f in dataclasses.fields(g):
            lines.append(f"{f.name} = {_toml_value(getattr(g, f.name))}")
    for s in study.subjects:
        lines.append("\n[[subjects]]")
        lines.append(f"id = {_toml_value(s.id)}")
        lines.append(f"group = {_toml_value(s.group)}")
        lines.append(f"signal = {_toml_value(rel(s.signal))}")
        if s.background is not None:
            lines.append(f"background = {_toml_value(rel(s.background))}")
        for key in ("fibres", "proofread"):
            if getattr(s, key) is not None:
                lines.append(f"{key} = {_toml_value(rel(getattr(s, key)))}")
        if s.voxel_size_um != study.imaging.voxel_size_um:
            lines.append(f"voxel_size_um = {_toml_value(s.voxel_size_um)}")
        if s.orientation != study.imaging.orientation:
            lines.append(f"orientation = {_toml_value(s.orientation)}")
        for key, value in s.covariates.items():
            if key in ("sex", "batch"):
                lines.append(f"{key} = {_toml_value(value)}")
        extra = {k: v for k, v in s.covariates.items() if k not in ("sex", "batch")}
        if extra:
            lines.append(f"covariates = {_toml_value(extra)}")
    for stage, table in study.params.items():
        lines.append(f"\n[{stage}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
