"""Video metrics: frame prediction against the truth and its three floors; generated clips in the image
metrics' feature space, cut to the object's window.

Prediction (`prediction_metrics`), on frames in [0, 1], as OpenSTL reports them:
    mse, mae   the squared (absolute) error summed over a frame's pixels, averaged over frames and clips
    psnr       10 log10(1 / mean squared error) per frame, averaged (dB)
    ssim       structural similarity per frame (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged:
               torchmetrics' structural_similarity_index_measure
`floors` scores three predictions that learn nothing about motion: the last context frame copied, black
frames, and the mean training frame. A predictor counts only where it beats every floor on every metric (a
probe found black frames score the best SSIM of the three on moving Fashion-MNIST).

Generation (`object_windows`): the object of a one-object clip is found in each frame as the centre of its
brightness, and the window of the object's size around it is cut out, from generated and real clips alike, so
per-frame FID and the classifier's labels (class consistency: the same label in every frame) are measured on
the window the image metrics know (28 x 28 for Fashion-MNIST).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FLOORS = ("copy_last", "black", "mean_frame")
METRICS = ("mse", "mae", "psnr", "ssim")
BETTER = {"mse": "lower", "mae": "lower", "psnr": "higher", "ssim": "higher"}
SSIM_MIN_SIDE = 5  # torchmetrics' SSIM pads a frame by 5 pixels by reflection: a side must be longer


def prediction_metrics(pred: Tensor, truth: Tensor) -> dict:
    """pred, truth: (N, F, C, H, W) in [0, 1]. Returns mse, mae, psnr, ssim (see the module docstring) and
    mse_per_frame (the MSE at each of the F predicted steps)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if pred.shape != truth.shape or pred.ndim != 5:
        raise ValueError(f"pred and truth must both be (N, F, C, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(truth.shape)}")
    pred, truth = pred.double(), truth.double()
    err = pred - truth
    per_frame = err.pow(2).sum(dim=(2, 3, 4))  # (N, F): summed over pixels
    mean_sq = err.pow(2).mean(dim=(2, 3, 4)).clamp(min=1e-10)
    frames_pred, frames_true = pred.flatten(0, 1).float(), truth.flatten(0, 1).float()  # (N * F, C, H, W)
    ssim = torch.cat([structural_similarity_index_measure(frames_pred[i:i + 500], frames_true[i:i + 500],
                                                          data_range=1.0, reduction="none")
                      for i in range(0, len(frames_pred), 500)])
    return {"mse": per_frame.mean().item(), "mae": err.abs().sum(dim=(2, 3, 4)).mean().item(),
            "psnr": (10 * torch.log10(1.0 / mean_sq)).mean().item(), "ssim": ssim.mean().item(),
            "mse_per_frame": per_frame.mean(dim=0).tolist()}


def floors(context: Tensor, truth: Tensor, mean_frame: Tensor) -> dict[str, dict]:
    """The metrics of the three floors for the future `truth` (N, F, C, H, W) of `context` (N, K, C, H, W), all in
    [0, 1]; mean_frame (C, H, W) is the mean training frame."""
    copy_last = context[:, -1:].expand_as(truth)
    black = torch.zeros_like(truth)
    mean = mean_frame.to(truth)[None, None].expand_as(truth)
    return {name: prediction_metrics(pred, truth) for name, pred in
            (("copy_last", copy_last), ("black", black), ("mean_frame", mean))}


def beats_floors(metrics: dict, floor_metrics: dict[str, dict]) -> bool:
    """Whether the metrics beat every floor on every metric."""
    for floor in floor_metrics.values():
        for key in METRICS:
            better = metrics[key] < floor[key] if BETTER[key] == "lower" else metrics[key] > floor[key]
            if not better:
                return False
    return True


def object_windows(clips: np.ndarray, side: int) -> np.ndarray:
    """The side x side window around the brightness centre of every frame: clips uint8 (N, T, H, W, C) ->
    (N, T, side, side, C). A black frame's window is its centre."""
    n, t, h, w, c = clips.shape
    mass = clips.astype(np.float64).sum(axis=4)  # (N, T, H, W)
    total = mass.sum(axis=(2, 3))
    safe = np.where(total > 0, total, 1.0)
    cy = np.where(total > 0, (mass.sum(axis=3) * np.arange(h)).sum(axis=2) / safe, (h - 1) / 2)
    cx = np.where(total > 0, (mass.sum(axis=2) * np.arange(w)).sum(axis=2) / safe, (w - 1) / 2)
    top = np.clip(np.rint(cy - (side - 1) / 2).astype(np.int64), 0, h - side)
    left = np.clip(np.rint(cx - (side - 1) / 2).astype(np.int64), 0, w - side)
    rows = top[..., None] + np.arange(side)  # (N, T, side)
    cols = left[..., None] + np.arange(side)
    i, j = np.arange(n)[:, None, None, None], np.arange(t)[None, :, None, None]
    return clips[i, j, rows[..., :, None], cols[..., None, :]]  # (N, T, side, side, C)


def class_consistency(labels: np.ndarray) -> dict:
    """labels (N, T): a classifier's label of each frame's window. Returns the share of clips whose label is the
    same in every frame, and the mean share of a clip's frames that carry its most common label."""
    same = (labels == labels[:, :1]).all(axis=1).mean()
    majority = np.mean([np.bincount(row).max() / len(row) for row in labels])
    return {"class_consistency": float(same), "majority_share": float(majority)}


def motion(clips: np.ndarray) -> dict:
    """Motion statistics of uint8 clips (N, T, H, W, C): the mean speed of the brightness centre (pixels per frame)
    and the mean absolute change of a pixel from one frame to the next (in [0, 1])."""
    mass = clips.astype(np.float64).sum(axis=4)
    total = np.maximum(mass.sum(axis=(2, 3)), 1e-9)
    cy = (mass.sum(axis=3) * np.arange(mass.shape[2])).sum(axis=2) / total
    cx = (mass.sum(axis=2) * np.arange(mass.shape[3])).sum(axis=2) / total
    speed = np.hypot(np.diff(cy, axis=1), np.diff(cx, axis=1)).mean()
    change = np.abs(np.diff(clips.astype(np.float64) / 255.0, axis=1)).mean()
    return {"speed": float(speed), "frame_change": float(change)}
