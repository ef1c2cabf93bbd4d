"""The pure core of spine analysis: one dendrite's sessions in, detections out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ketamap.invivo.spines.image import (
    Centreline,
    Rigid,
    detect_spines,
    project,
    register_rigid,
    trace_dendrite,
)
from ketamap.invivo.spines.params import SpineParams
from ketamap.invivo.spines.track import confirm_faint

__all__ = ["DendriteResult", "analyse_dendrite", "locate_annotations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DendriteResult:
    """One dendrite analysed: transforms per session, the centreline, detections."""

    transforms: dict
    centreline: Centreline
    detections: pd.DataFrame
    mean_image: np.ndarray


def analyse_dendrite(
    images: dict,
    *,
    pixel_size_um: float,
    params: SpineParams | None = None,
) -> DendriteResult:
    """Register the sessions of one dendrite, trace it and detect spines in every session (pure).

    Parameters
    ----------
    images : dict
        Session label -> image, (y, x) or (z, y, x), in time order. The first
        session is the reference frame.
    pixel_size_um : float
        Pixel size.
    params : SpineParams, optional
        Defaults to ``SpineParams()``.

    Returns
    -------
    DendriteResult
        ``detections`` has ``session, y_px, x_px`` (pixels of that session's
        own image), ``ref_y_px, ref_x_px`` (reference frame), ``s_um, side,
        distance_um, amplitude, snr``.
    """
    p = SpineParams() if params is None else params
    labels = list(images)
    planes = {k: project(v) for k, v in images.items()}
    ref = planes[labels[0]]
    transforms, warped = {}, {}
    for k in labels:
        if planes[k].shape != ref.shape:
            from ketamap.errors import InputError

            raise InputError(
                f'session "{k}" has image shape {planes[k].shape}, '
                f'but "{labels[0]}" has {ref.shape}.'
            )
        tf = (
            Rigid(np.eye(2), np.zeros(2), 0.0, 1.0)
            if k == labels[0]
            else register_rigid(
                ref, planes[k], pixel_size_um=pixel_size_um, max_rotation_deg=p.max_rotation_deg
            )
        )
        transforms[k] = tf
        warped[k] = tf.warp(planes[k])
    mean = np.mean([warped[k] for k in labels], axis=0)
    line = trace_dendrite(mean, pixel_size_um=pixel_size_um, shaft_sigma_um=p.shaft_sigma_um)
    frames = []
    for k in labels:
        # detected down to the confirmation threshold; confirm_faint keeps the faint ones
        # seen above threshold_sd in another session
        det = detect_spines(
            warped[k], line, params=p, threshold_sd=min(p.threshold_sd, p.confirm_threshold_sd)
        )
        det = det.rename(columns={"y_px": "ref_y_px", "x_px": "ref_x_px"})
        own = transforms[k].to_moving(det[["ref_y_px", "ref_x_px"]].to_numpy(float))
        det.insert(0, "x_px", own[:, 1] if len(det) else np.zeros(0))
        det.insert(0, "y_px", own[:, 0] if len(det) else np.zeros(0))
        det.insert(0, "session", k)
        frames.append(det)
    detections = pd.concat(frames, ignore_index=True)
    detections = confirm_faint(
        detections,
        labels,
        threshold_sd=p.threshold_sd,
        confirm_threshold_sd=p.confirm_threshold_sd,
        tolerance_um=p.match_tolerance_um,
    ).reset_index(drop=True)
    return DendriteResult(transforms, line, detections, mean)


def locate_annotations(points: pd.DataFrame, result: DendriteResult) -> pd.DataFrame:
    """Place annotated spines (pixels of each session's image) on the traced dendrite.

    Parameters
    ----------
    points : DataFrame
        ``session, y_px, x_px`` (and optionally ``spine_id``) of one dendrite.
    result : DendriteResult
        The registration and centreline of that dendrite.

    Returns
    -------
    DataFrame
        ``points`` with ``ref_y_px, ref_x_px, s_um, side, distance_um`` added.
    """
    out = []
    for k, g in points.groupby("session", sort=False):
        ref = result.transforms[k].to_reference(g[["y_px", "x_px"]].to_numpy(float))
        s, d = result.centreline.project(ref)
        out.append(
            g.assign(
                ref_y_px=ref[:, 0],
                ref_x_px=ref[:, 1],
                s_um=s,
                side=np.sign(d).astype(int),
                distance_um=np.abs(d),
            )
        )
    return (
        pd.concat(out, ignore_index=True)
        if out
        else points.assign(ref_y_px=[], ref_x_px=[], s_um=[], side=[], distance_um=[])
    )
