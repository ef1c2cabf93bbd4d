"""The region hierarchy of an atlas: ids, acronyms, names and the parent tree.

An :class:`Ontology` is built once from a table (one row per region) and
checked on construction: unique ids, unique acronyms, exactly one root, every
parent present and no cycles. Everything else (depth, the path from the root,
ancestors at a given level) is derived from that table, so every loader
(Allen CSV, BrainGlobe ``structures.json``, the phantom) only has to supply
``id``, ``acronym``, ``name`` and ``parent_id``.

Region ids are int64 throughout: the Allen ontology has ids above 65535
(up to 614454277), so 16-bit label images must never be used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from ketamap.errors import AtlasError, ParameterError
from ketamap.params import did_you_mean

__all__ = ["Ontology"]

logger = logging.getLogger(__name__)

_REQUIRED = ("id", "acronym", "name", "parent_id")


def _default_color(region_id: int) -> str:
    """Return a stable pseudo-random colour (hex, no ``#``) for an id."""
    value = (int(region_id) * 2654435761) % (1 << 24)
    return f"{value:06X}"


def _clean_color(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip().lstrip("#").upper()
    if len(text) != 6 or any(c not in "0123456789ABCDEF" for c in text):
        return None
    return text


class Ontology:
    """A validated tree of atlas regions.

    Parameters
    ----------
    table : DataFrame
        One row per region with columns ``id`` (int), ``acronym`` (str),
        ``name`` (str) and ``parent_id`` (int, NA/None for the root). An
        optional ``color_hex`` column (``"RRGGBB"``) is kept; missing colours
        get a stable colour derived from the id.

    Attributes
    ----------
    table : DataFrame
        Columns ``id`` (int64), ``acronym``, ``name``, ``parent_id`` (Int64,
        NA at the root), ``depth`` (int64, root = 0), ``structure_id_path``
        (``"/997/8/.../id/"``) and ``color_hex``, in the input row order.
    root_id : int
        Id of the root region.
    ids : ndarray of int64
        All region ids, in table order.
    max_depth : int
        Depth of the deepest region (root = 0).

    Raises
    ------
    AtlasError
        If a column is missing, an id or acronym is duplicated, there is not
        exactly one root, a parent is missing, or the parents form a cycle.

    Examples
    --------
    >>> import pandas as pd
    >>> onto = Ontology(pd.DataFrame({
    ...     "id": [997, 8, 315], "acronym": ["root", "grey", "Isocortex"],
    ...     "name": ["root", "Basic cell groups and regions", "Isocortex"],
    ...     "parent_id": [None, 997, 8]}))
    >>> onto.ancestors(315)
    [997, 8]
    >>> onto.lookup("isocortex")
    315
    """

    def __init__(self, table: pd.DataFrame):
        if not isinstance(table, pd.DataFrame):
            raise AtlasError(f"An ontology is built from a DataFrame, got {type(table).__name__}.")
        missing = [c for c in _REQUIRED if c not in table.columns]
        if missing:
            raise AtlasError(
                f"The ontology table lacks the column(s) {', '.join(missing)}; "
                f"it has {', '.join(map(str, table.columns))}."
            )
        if len(table) == 0:
            raise AtlasError("The ontology table is empty; it needs at least a root region.")
        try:
            ids = pd.to_numeric(table["id"], errors="raise").to_numpy(dtype=np.int64)
            parent = pd.array(pd.to_numeric(table["parent_id"], errors="raise"), dtype="Int64")
        except (ValueError, TypeError) as e:
            raise AtlasError(f"Ontology ids and parent ids must be integers ({e}).") from e
        acronyms = table["acronym"].astype(str).to_numpy()
        names = table["name"].astype(str).to_numpy()

        dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
        if len(dup):
            listed = ", ".join(map(str, dup[:5]))
            raise AtlasError(f"The ontology has duplicated region ids: {listed}.")
        dup = pd.Series(acronyms)[pd.Series(acronyms).duplicated()].unique()
        if len(dup):
            raise AtlasError(f"The ontology has duplicated acronyms: {', '.join(dup[:5])}.")
        if (ids <= 0).any():
            raise AtlasError(
                f"Region ids must be positive (0 means outside the brain), got {ids[ids <= 0][0]}."
            )
        roots = np.flatnonzero(parent.isna())
        if len(roots) != 1:
            raise AtlasError(
                f"The ontology must have exactly one root (a region without parent), "
                f"found {len(roots)}: {', '.join(acronyms[roots][:5]) or 'none'}."
            )

        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        parent_vals = parent.to_numpy(dtype=np.int64, na_value=-1)
        pos = np.searchsorted(sorted_ids, parent_vals)
        pos_c = np.clip(pos, 0, len(ids) - 1)
        found = sorted_ids[pos_c] == parent_vals
        found[roots] = True
        if not found.all():
            bad = np.flatnonzero(~found)[0]
            raise AtlasError(
                f'Region {ids[bad]} ("{acronyms[bad]}") has parent {parent_vals[bad]}, '
                "which is not in the ontology."
            )
        parent_idx = np.where(parent.isna(), -1, order[pos_c])

        # Depth by propagation from the root; whatever is never reached sits on a cycle.
        depth = np.full(len(ids), -1, dtype=np.int64)
        depth[roots[0]] = 0
        for _ in range(len(ids)):
            todo = (depth < 0) & (parent_idx >= 0)
            ready = todo & (depth[np.maximum(parent_idx, 0)] >= 0)
            if not ready.any():
                break
            depth[ready] = depth[parent_idx[ready]] + 1
        if (depth < 0).any():
            lost = depth < 0
            cyc = ", ".join(f"{i} ({a})" for i, a in zip(ids[lost][:5], acronyms[lost][:5]))
            raise AtlasError(f"The ontology parents form a cycle involving regions {cyc}.")

        # Path matrix: row i holds the ids from the root down to region i, padded with -1.
        max_depth = int(depth.max())
        paths = np.full((len(ids), max_depth + 1), -1, dtype=np.int64)
        for d in range(max_depth + 1):
            rows = np.flatnonzero(depth == d)
            if d > 0:
                paths[rows, :d] = paths[parent_idx[rows], :d]
            paths[rows, d] = ids[rows]

        colors = table["color_hex"] if "color_hex" in table.columns else [None] * len(ids)
        colors = [_clean_color(c) or _default_color(i) for c, i in zip(colors, ids)]
        path_str = ["/" + "/".join(map(str, row[: d + 1])) + "/" for row, d in zip(paths, depth)]

        self.table = pd.DataFrame(
            {
                "id": ids,
                "acronym": acronyms,
                "name": names,
                "parent_id": parent,
                "depth": depth,
                "structure_id_path": path_str,
                "color_hex": colors,
            }
        )
        self.root_id = int(ids[roots[0]])
        self.ids = ids.copy()
        self.max_depth = max_depth
        self._order = order
        self._sorted_ids = sorted_ids
        self._depth = depth
        self._parent_idx = parent_idx
        self._paths = paths
        self._acronyms = acronyms
        self._names = names
        self._by_acronym = {a: int(i) for a, i in zip(acronyms, ids)}
        lower: dict[str, list[int]] = {}
        for a, i in zip(acronyms, ids):
            lower.setdefault(a.lower(), []).append(int(i))
        self._by_acronym_lower = lower
        by_name: dict[str, list[int]] = {}
        for n, i in zip(names, ids):
            by_name.setdefault(n.lower(), []).append(int(i))
        self._by_name_lower = by_name
        self._children: dict[int, list[int]] = {int(i): [] for i in ids}
        for i, p in zip(ids, parent_idx):
            if p >= 0:
                self._children[int(ids[p])].append(int(i))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key) -> bool:
        try:
            self.lookup(key)
        except AtlasError:
            return False
        return True

    def __eq__(self, other) -> bool:
        if not isinstance(other, Ontology):
            return NotImplemented
        cols = ["id", "acronym", "name", "parent_id"]
        a = self.table[cols].sort_values("id").reset_index(drop=True)
        b = other.table[cols].sort_values("id").reset_index(drop=True)
        return a.equals(b)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ontology({len(self)} regions, root={self.root_id}, max_depth={self.max_depth})"

    def _index(self, region_id) -> int:
        """Row index of a region id; AtlasError if unknown."""
        rid = int(region_id)
        pos = int(np.searchsorted(self._sorted_ids, rid))
        if pos >= len(self._sorted_ids) or self._sorted_ids[pos] != rid:
            raise AtlasError(
                f"Region id {rid} is not in the ontology"
                f"{did_you_mean(str(rid), [str(i) for i in self.ids])}."
            )
        return int(self._order[pos])

    # ------------------------------------------------------------------ lookup
    def lookup(self, key: int | str) -> int:
        """Return the region id for an id, an acronym or a full name.

        Parameters
        ----------
        key : int or str
            A region id, an acronym (matched case-sensitively first, then
            case-insensitively) or a full region name (case-insensitive).
            A string of digits is read as an id.

        Returns
        -------
        int
            The region id.

        Raises
        ------
        AtlasError
            If nothing matches (the message suggests the closest acronym or
            name), or a case-insensitive match is ambiguous.

        Examples
        --------
        >>> from ketamap.atlas import make_phantom
        >>> onto = make_phantom(resolution_um=200).ontology
        >>> onto.lookup("VTA"), onto.lookup("ventral tegmental area"), onto.lookup(749)
        (749, 749, 749)
        """
        if isinstance(key, (bool, np.bool_)):
            raise AtlasError(f"A region key must be an id or a name, got {key!r}.")
        if isinstance(key, (int, np.integer)):
            return self.ids[self._index(key)].item()
        if not isinstance(key, str):
            raise AtlasError(f"A region key must be an int id or a str, got {type(key).__name__}.")
        text = key.strip()
        if text in self._by_acronym:
            return self._by_acronym[text]
        if text.isdigit():
            return self.ids[self._index(int(text))].item()
        for table, what in ((self._by_acronym_lower, "acronym"), (self._by_name_lower, "name")):
            hits = table.get(text.lower(), [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                options = ", ".join(self.acronym(h) for h in hits)
                raise AtlasError(f'Region {what} "{key}" is ambiguous: it matches {options}.')
        candidates = list(self._acronyms) + list(self._names)
        raise AtlasError(f'Region "{key}" is not in the ontology{did_you_mean(text, candidates)}.')

    def acronym(self, region_id: int) -> str:
        """Return the acronym of a region id (AtlasError if unknown)."""
        return str(self._acronyms[self._index(region_id)])

    def name(self, region_id: int) -> str:
        """Return the full name of a region id (AtlasError if unknown)."""
        return str(self._names[self._index(region_id)])

    def parent(self, region_id: int) -> int | None:
        """Return the parent id of a region, or ``None`` for the root."""
        p = self._parent_idx[self._index(region_id)]
        return None if p < 0 else int(self.ids[p])

    def children(self, region_id: int) -> list[int]:
        """Return the ids of the direct children of a region (table order)."""
        self._index(region_id)
        return list(self._children[int(region_id)])

    def depth(self, region_id: int) -> int:
        """Return the depth of a region (root = 0)."""
        return int(self._depth[self._index(region_id)])

    def ancestors(self, region_id: int, *, include_self: bool = False) -> list[int]:
        """Return the ancestors of a region, root first.

        Parameters
        ----------
        region_id : int
            The region.
        include_self : bool
            Append the region itself at the end.

        Returns
        -------
        list of int
            Ids from the root down to the parent (or the region itself).

        Raises
        ------
        AtlasError
            If the id is unknown.
        """
        i = self._index(region_id)
        d = int(self._depth[i])
        path = self._paths[i, : d + 1 if include_self else d]
        return [int(x) for x in path]

    def descendants(self, region_id: int, *, include_self: bool = False) -> list[int]:
        """Return every region below a region (depth-first, parents before children).

        Parameters
        ----------
        region_id : int
            The region.
        include_self : bool
            Put the region itself first.

        Returns
        -------
        list of int
            Descendant ids.

        Raises
        ------
        AtlasError
            If the id is unknown.
        """
        self._index(region_id)
        out: list[int] = [int(region_id)] if include_self else []
        stack = list(reversed(self._children[int(region_id)]))
        while stack:
            rid = stack.pop()
            out.append(rid)
            stack.extend(reversed(self._children[rid]))
        return out

    def leaves(self) -> list[int]:
        """Return the ids of regions without children (table order)."""
        return [int(i) for i in self.ids if not self._children[int(i)]]

    # ------------------------------------------------------------------ arrays
    def _positions(self, labels: np.ndarray) -> np.ndarray:
        """Row indices of every label (0 -> -1); AtlasError for unknown labels."""
        pos = np.searchsorted(self._sorted_ids, labels)
        pos_c = np.minimum(pos, len(self._sorted_ids) - 1)
        known = self._sorted_ids[pos_c] == labels
        outside = labels == 0
        bad = ~(known | outside)
        if bad.any():
            unknown = np.unique(labels[bad])
            raise AtlasError(
                f"{len(unknown)} label(s) are not in the ontology, e.g. "
                f"{', '.join(map(str, unknown[:5]))}."
            )
        return np.where(outside, -1, self._order[pos_c])

    def rollup(self, labels: ArrayLike, level: int) -> np.ndarray:
        """Replace every label by its ancestor at a hierarchy level.

        Parameters
        ----------
        labels : array_like of int, any shape
            Region ids; 0 means outside the brain and stays 0.
        level : int
            Target depth (root = 0). A label deeper than ``level`` becomes its
            ancestor at depth ``level``; a label at or above it stays itself.

        Returns
        -------
        ndarray
            Same shape as ``labels``; same integer dtype when it can hold every
            region id, else int64.

        Raises
        ------
        ParameterError
            If ``level`` is not a non-negative int.
        AtlasError
            If a label is not in the ontology.

        Examples
        --------
        >>> from ketamap.atlas import make_phantom
        >>> onto = make_phantom(resolution_um=200).ontology
        >>> onto.acronym(int(onto.rollup([749], 3)[0]))   # VTA -> Midbrain
        'MB'
        """
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
            raise ParameterError(f"rollup level must be a non-negative int, got {level!r}.")
        arr = np.asarray(labels)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise AtlasError(f"Region labels must be integers, got dtype {arr.dtype}.")
        flat = arr.reshape(-1).astype(np.int64, copy=False)
        pos = self._positions(flat)
        col = min(int(level), self.max_depth)
        mapped = np.where(self._depth > col, self._paths[:, col], self.ids)
        out = np.where(pos >= 0, mapped[np.maximum(pos, 0)], 0)
        dtype = arr.dtype if arr.size and np.issubdtype(arr.dtype, np.integer) else np.int64
        if np.iinfo(dtype).max < int(self._sorted_ids[-1]):
            dtype = np.int64
        return out.astype(dtype, copy=False).reshape(arr.shape)

    def ancestor_pairs(self) -> pd.DataFrame:
        """Return every (region, ancestor-or-self) pair.

        Returns
        -------
        DataFrame
            Columns ``id`` and ``ancestor_id`` (int64), one row per pair,
            including ``(id, id)``. Merge a table of per-leaf counts on ``id``
            and group by ``ancestor_id`` to aggregate to every level at once.

        Examples
        --------
        >>> from ketamap.atlas import make_phantom
        >>> pairs = make_phantom(resolution_um=200).ontology.ancestor_pairs()
        >>> sorted(pairs.loc[pairs.id == 749, "ancestor_id"])
        [8, 313, 323, 343, 749, 997]
        """
        mask = self._paths >= 0
        rows = np.repeat(self.ids, mask.sum(axis=1))
        return pd.DataFrame({"id": rows, "ancestor_id": self._paths[mask]})

    def subset(self, region_ids: Iterable[int]) -> Ontology:
        """Return the ontology restricted to some regions and all their ancestors.

        Parameters
        ----------
        region_ids : iterable of int
            Regions to keep (their ancestors are kept too).

        Returns
        -------
        Ontology
            A smaller, valid ontology in the same row order.
        """
        keep = set()
        for rid in region_ids:
            keep.update(self.ancestors(int(rid), include_self=True))
        rows = self.table[self.table["id"].isin(keep)]
        return Ontology(rows[["id", "acronym", "name", "parent_id", "color_hex"]])
