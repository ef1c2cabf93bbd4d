"""The study manifest: one TOML file describing a whole-brain census study.

A manifest names the study, the atlas and marker, how the brains were imaged,
the treatment groups (dose and schedule) and every subject with its data.
:func:`load_study` turns it into validated, typed, immutable objects; every
mistake is reported as one :class:`~ketamap.errors.ManifestError` sentence
that says what is wrong and where. Validation never writes anything.

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

from ketamap.errors import InputError, InputNotFoundError, KetamapError, ManifestError
from ketamap.params import did_you_mean
from ketamap.space import check_orientation, check_voxel_size
from ketamap.tomlfile import check_keys, data_path, read_toml

__all__ = [
    "Imaging",
    "Group",
    "Subject",
    "Study",
    "load_study",
    "parse_study",
    "study_to_toml",
    "SCHEDULES",
]

#: Dosing schedules a group may declare.
SCHEDULES = ("single", "daily", "twice daily", "every other day", "weekly")



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

    name: str
    dose_mg_per_kg: float
    schedule: str = "single"
    duration_days: int = 1
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
    """

    id: str
    group: str
    signal: Path
    background: Path | None
    voxel_size_um: tuple[float, float, float]
    orientation: str
    covariates: Mapping[str, Any] = field(default_factory=dict)


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
    def covariates(self) -> tuple[str, ...]:
        """Covariate names present for every subject."""
        names = [set(s.covariates) for s in self.subjects]
        common = set.intersection(*names) if names else set()
        return tuple(sorted(common))


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = ("study", "imaging", "groups", "subjects", "detection", "registration", "stats")
_STUDY_KEYS = ("name", "atlas", "marker", "reference_group", "classifier", "key_regions")

#: The report's key regions when ``[study]`` names none: where the TH+ changes after
#: ketamine were reported (midbrain dopaminergic nuclei, dorsal raphe, hypothalamus;
#: Datta et al., Cell Reports 2023).
DEFAULT_KEY_REGIONS = ("VTA", "SNc", "SNr", "ZI", "DR", "DMH", "MPN", "PVH", "ARH", "VMH", "LHA")
_IMAGING_KEYS = ("voxel_size_um", "orientation", "signal_channel", "background_channel")
_GROUP_KEYS = ("name", "dose_mg_per_kg", "schedule", "duration_days", "description")
_SUBJECT_KEYS = (
    "id",
    "group",
    "signal",
    "background",
    "voxel_size_um",
    "orientation",
    "sex",
    "batch",
    "covariates",
)


def _require(table: Mapping, key: str, where: str) -> Any:
    if key not in table:
        raise ManifestError(f'Missing required key "{key}" in {where}.')
    return table[key]


def _typed(value: Any, kind: type | tuple, what: str, where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join("number" if k in (int, float) else k.__name__ for k in kinds)
        names = {
            "str": "a string",
            "number or number": "a number",
            "number": "a number",
            "table": "a table",
            "list": "a list",
        }.get(names, names)
        raise ManifestError(f"{what} in {where} must be {names}, got {value!r}.")
    return value


def _voxel_size(value: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3:
        raise ManifestError(
            f"voxel_size_um in {where} must be a list of three numbers (z, y, x) in µm, "
            f"got {value!r}."
        )
    try:
        return check_voxel_size(value, where=f"voxel_size_um in {where}")
    except InputError as e:  # the one rule for voxel sizes, reported as a manifest error
        raise ManifestError(str(e)) from None


def _path(value: Any, root: Path, what: str, where: str, *, check_exists: bool) -> Path:
    _typed(value, str, what, where)
    return data_path(value, root, what, where, check_exists=check_exists, folder="study")


def parse_study(
    data: Mapping[str, Any], *, root: str | os.PathLike, check_paths: bool = True
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

    Returns
    -------
    Study

    Raises
    ------
    ManifestError
        One sentence for the first mistake found.
    """
    root = Path(root).resolve()
    check_keys(data, _TOP_KEYS, "the manifest")
    st = _typed(_require(data, "study", "the manifest"), dict, "[study]", "the manifest")
    check_keys(st, _STUDY_KEYS, "[study]")
    name = _typed(_require(st, "name", "[study]"), str, "name", "[study]")
    atlas = _typed(st.get("atlas", "phantom"), str, "atlas", "[study]")
    marker = _typed(st.get("marker", "TH"), str, "marker", "[study]")
    classifier = (
        None
        if st.get("classifier") is None
        else _path(st["classifier"], root, "classifier", "[study]", check_exists=check_paths)
    )
    key_regions = _typed(
        st.get("key_regions", list(DEFAULT_KEY_REGIONS)), list, "key_regions", "[study]"
    )
    for acronym in key_regions:
        _typed(acronym, str, "each of key_regions", "[study]")

    im = _typed(_require(data, "imaging", "the manifest"), dict, "[imaging]", "the manifest")
    check_keys(im, _IMAGING_KEYS, "[imaging]")
    imaging = Imaging(
        voxel_size_um=_voxel_size(_require(im, "voxel_size_um", "[imaging]"), "[imaging]"),
        orientation=check_orientation(
            _require(im, "orientation", "[imaging]"), where="orientation in [imaging]"
        ),
        signal_channel=_typed(im.get("signal_channel", marker), str, "signal_channel", "[imaging]"),
        background_channel=(
            None
            if im.get("background_channel") is None
            else _typed(im["background_channel"], str, "background_channel", "[imaging]")
        ),
    )

    raw_groups = _typed(
        _require(data, "groups", "the manifest"), list, "[[groups]]", "the manifest"
    )
    if len(raw_groups) < 1:
        raise ManifestError("The manifest declares no [[groups]].")
    groups: list[Group] = []
    for i, g in enumerate(raw_groups, 1):
        where = f"[[groups]] #{i}"
        _typed(g, dict, "each group", "[[groups]]")
        check_keys(g, _GROUP_KEYS, where)
        gname = _typed(_require(g, "name", where), str, "name", where)
        where = f'group "{gname}"'
        if any(x.name == gname for x in groups):
            raise ManifestError(f'Group name "{gname}" is declared twice.')
        dose = _typed(_require(g, "dose_mg_per_kg", where), (int, float), "dose_mg_per_kg", where)
        if dose < 0:
            raise ManifestError(f"dose_mg_per_kg of {where} must be 0 or more, got {dose!r}.")
        schedule = _typed(g.get("schedule", "single"), str, "schedule", where)
        if schedule not in SCHEDULES:
            raise ManifestError(
                f'schedule of {where} must be one of {", ".join(SCHEDULES)}, got "{schedule}"'
                f"{did_you_mean(schedule, SCHEDULES)}."
            )
        days = _typed(g.get("duration_days", 1), int, "duration_days", where)
        if days < 1:
            raise ManifestError(f"duration_days of {where} must be at least 1, got {days}.")
        desc = _typed(g.get("description", ""), str, "description", where)
        groups.append(Group(gname, float(dose), schedule, days, desc))
    group_names = [g.name for g in groups]

    reference = _typed(st.get("reference_group", groups[0].name), str, "reference_group", "[study]")
    if reference not in group_names:
        raise ManifestError(
            f'reference_group "{reference}" in [study] is not a declared group'
            f"{did_you_mean(reference, group_names)}; groups are: {', '.join(group_names)}."
        )

    raw_subjects = _typed(
        _require(data, "subjects", "the manifest"), list, "[[subjects]]", "the manifest"
    )
    subjects: list[Subject] = []
    for i, s in enumerate(raw_subjects, 1):
        where = f"[[subjects]] #{i}"
        _typed(s, dict, "each subject", "[[subjects]]")
        check_keys(s, _SUBJECT_KEYS, where)
        sid = _require(s, "id", where)
        if isinstance(sid, int) and not isinstance(sid, bool):
            sid = str(sid)
        sid = _typed(sid, str, "id", where)
        if not sid or any(c in sid for c in '/\\:*?"<>|') or sid in (".", ".."):
            raise ManifestError(
                f'Subject id "{sid}" in {where} must be a non-empty name '
                'without / \\ : * ? " < > |.'
            )
        where = f'subject "{sid}"'
        if any(x.id == sid for x in subjects):
            raise ManifestError(f'Subject id "{sid}" appears twice in [[subjects]].')
        group = _typed(_require(s, "group", where), str, "group", where)
        if group not in group_names:
            raise ManifestError(
                f'{where} belongs to unknown group "{group}"{did_you_mean(group, group_names)}; '
                f"declared groups are: {', '.join(group_names)}."
            )
        signal = _path(
            _require(s, "signal", where), root, "signal", where, check_exists=check_paths
        )
        background = (
            None
            if s.get("background") is None
            else _path(s["background"], root, "background", where, check_exists=check_paths)
        )
        vox = (
            _voxel_size(s["voxel_size_um"], where)
            if "voxel_size_um" in s
            else imaging.voxel_size_um
        )
        orient = (
            check_orientation(s["orientation"], where=f"orientation of {where}")
            if "orientation" in s
            else imaging.orientation
        )
        cov: dict[str, Any] = {}
        for key in ("sex", "batch"):
            if key in s:
                cov[key] = _typed(s[key], (str, int), key, where)
        extra = _typed(s.get("covariates", {}), dict, "covariates", where)
        for key, value in extra.items():
            if key in ("subject", "group", "dose_mg_per_kg") or key in cov:
                raise ManifestError(f'Covariate "{key}" of {where} clashes with a reserved name.')
            cov[key] = _typed(value, (str, int, float), f'covariate "{key}"', where)
        subjects.append(Subject(sid, group, signal, background, vox, orient, cov))

    for g in groups:
        if not any(s.group == g.name for s in subjects):
            raise ManifestError(f'Group "{g.name}" has no subjects in [[subjects]].')

    params = {}
    for stage in ("detection", "registration", "stats"):
        if stage in data:
            params[stage] = dict(_typed(data[stage], dict, f"[{stage}]", "the manifest"))

    return Study(
        name=name,
        atlas=atlas,
        marker=marker,
        reference_group=reference,
        imaging=imaging,
        groups=tuple(groups),
        subjects=tuple(subjects),
        root=root,
        params=params,
        classifier=classifier,
        key_regions=tuple(key_regions),
    )


def load_study(path: str | os.PathLike, *, check_paths: bool = True) -> Study:
    """Read and validate a study manifest (TOML).

    Parameters
    ----------
    path : path-like
        The manifest file.
    check_paths : bool
        Check that every data path exists.

    Returns
    -------
    Study

    Raises
    ------
    ManifestError
        If the file is missing, is not valid TOML, or any entry is invalid.

    Examples
    --------
    >>> study = load_study("study.toml")  # doctest: +SKIP
    >>> [g.name for g in study.groups]  # doctest: +SKIP
    ['saline', 'ket30', 'ket100']
    """
    path = Path(path)
    try:
        data = read_toml(path, what="Study manifest")
    except InputNotFoundError as e:
        raise ManifestError(str(e)) from e
    try:
        return parse_study(data, root=path.parent, check_paths=check_paths)
    except KetamapError as e:
        raise ManifestError(f"{path.name}: {e}") from e


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
    for key in _STUDY_KEYS:
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
