"""Synthetic chest-radiograph phantoms with known opacity masks.

SYNTHETIC DATA, NOT PATIENT IMAGES. They exist so that every trainer command, and the
worker's tests, run on a machine without the 45 GB ChestX-ray14 release, and so that
heatmap localisation can be scored against exact ground truth.

Each phantom has soft tissue, two lung fields, ribs, mediastinum and heart shadow,
quantum-like noise and a random exposure. Positives carry one to three patchy
opacities in the lungs, weighted towards the lower zones, some faint. A few extra
negatives with an enlarged heart ("Cardiomegaly") form the hard-negative set, and every
phantom carries synthetic view, sex and age values so that the subgroup code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trainer.errors import DataError
from trainer.records import (
    NEGATIVE_FINDING,
    POSITIVE_FINDING,
    SPLITS,
    Box,
    Record,
    split_by_patient,
    summarize,
    write_split_folder,
)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray[Any, Any]:
    """Low-frequency noise in [0, 1]: uniform noise blurred at ``scale`` of the image."""
    small = max(2, int(size / max(scale, 1)))
    noise = rng.random((small, small)).astype(np.float32)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _lung_masks(rng: np.random.Generator, s: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Right and left lung fields as filled ellipses (image left = patient's right)."""
    masks = []
    for side in (-1, 1):
        cx = s / 2 + side * s * rng.uniform(0.21, 0.24)
        cy = s * rng.uniform(0.47, 0.52)
        ax = s * rng.uniform(0.12, 0.15)
        ay = s * rng.uniform(0.26, 0.30)
        m = np.zeros((s, s), np.uint8)
        cv2.ellipse(m, (int(cx), int(cy)), (int(ax), int(ay)), side * rng.uniform(2, 8), 0, 360, 1, -1)
        masks.append(m.astype(bool))
    return masks[0], masks[1]


def _opacity(rng: np.random.Generator, s: int, lungs: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """One patchy opacity inside the lungs, centred more often in the lower zones."""
    ys, xs = np.nonzero(lungs)
    weights = (ys - ys.min() + 1.0) ** 2  # lower-zone weighted
    i = rng.choice(len(ys), p=weights / weights.sum())
    radius = s * rng.uniform(0.06, 0.11)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    blob = np.exp(-(((xx - xs[i]) ** 2) / (2 * radius**2) + ((yy - ys[i]) ** 2) / (2 * (1.3 * radius) ** 2)))
    patchy = blob * (0.55 + 0.45 * _smooth_noise(rng, s, s / 16))
    return np.asarray(patchy * lungs, dtype=np.float32)


def make_phantom(
    rng: np.random.Generator, size: int, positive: bool, *, cardiomegaly: bool = False
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """One phantom; ``cardiomegaly`` widens the heart shadow by half (a finding that is not
    pneumonia, for hard negatives).

    Returns:
        (image uint8 [size, size], opacity mask bool [size, size]; all False when negative).
    """
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    # Attenuation map: higher = more absorbing = brighter on a MONOCHROME2 display.
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1.0
    att = 0.15 + 0.45 * body + 0.08 * _smooth_noise(rng, s, s / 6)
    right, left = _lung_masks(rng, s)
    lungs = right | left
    att = att - 0.32 * cv2.GaussianBlur(lungs.astype(np.float32), (0, 0), s / 60)
    # Ribs: bright arcs across each lung field.
    ribs = np.zeros((s, s), np.float32)
    for k in range(9):
        y0 = 0.22 + 0.065 * k + rng.normal(0, 0.005)
        for side in (-1, 1):
            cx = 0.5 + side * 0.06
            axes = (int(s * 0.28), int(s * 0.09))
            start, end = (180, 300) if side < 0 else (240, 360)
            cv2.ellipse(ribs, (int(cx * s), int(y0 * s)), axes, 0, start, end, 1.0, max(1, s // 90))
    att += 0.10 * cv2.GaussianBlur(ribs, (0, 0), max(0.6, s / 256)) * body
    # Mediastinum and heart shadow (heart bulges to the patient's left = image right).
    med = (np.abs(xx - 0.5) < 0.08) & (yy > 0.12) & (yy < 0.85)
    heart_width = rng.uniform(0.13, 0.17) * (1.5 if cardiomegaly else 1.0)
    heart = ((xx - 0.56) / heart_width) ** 2 + ((yy - 0.66) / 0.13) ** 2 < 1.0
    att += 0.30 * cv2.GaussianBlur((med | heart).astype(np.float32), (0, 0), s / 70)
    mask = np.zeros((s, s), bool)
    if positive:
        total = np.zeros((s, s), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            total = np.maximum(total, _opacity(rng, s, lungs))
        strength = rng.uniform(0.15, 0.38)  # some faint
        att += strength * total
        mask = total > 0.35
        if not mask.any():
            mask = total >= total.max() * 0.5
    # Exposure and detector: random gamma and contrast, then noise.
    att = att.clip(0, None)
    att = (att / att.max()) ** rng.uniform(0.8, 1.25)
    att = att * rng.uniform(0.75, 1.0) + rng.uniform(0.0, 0.12)
    att = att + rng.normal(0, rng.uniform(0.01, 0.03), att.shape)
    return (att.clip(0, 1) * 255).astype(np.uint8), mask


def _bbox(mask: np.ndarray[Any, Any], image_id: str) -> list[Box]:
    """Bounding boxes of the connected opacity regions, NIH BBox_List style."""
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    return [
        Box(image_id, "Pneumonia", float(x), float(y), float(w), float(h))
        for x, y, w, h, _area in stats[1:n]
    ]


def write_phantoms(
    out: Path,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.5,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> dict[str, Any]:
    """Write ``n`` phantoms as a data folder that every trainer command reads."""
    if n < 6:
        raise DataError(f"--n must be at least 6 so that every split holds both classes, received {n}")
    if not 32 <= size <= 4096:
        raise DataError(f"--size must be between 32 and 4096, received {size}")
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels = np.zeros(n, int)
    labels[: round(n * positive_fraction)] = 1
    rng.shuffle(labels)
    records: list[Record] = []
    boxes: list[Box] = []
    # Synthetic view (40% AP, as bedside films are common) from its own generator, so that
    # the images stay those of earlier versions for the same seed.
    meta = np.random.default_rng([seed, 1])
    for i, label in enumerate(labels):
        image_id = f"phantom_{i:05d}.png"
        image, mask = make_phantom(rng, size, bool(label))
        cv2.imwrite(str(out / "images" / image_id), image)
        mask_rel = ""
        if label:
            mask_rel = f"masks/{image_id}"
            cv2.imwrite(str(out / mask_rel), mask.astype(np.uint8) * 255)
            boxes += _bbox(mask, image_id)
        records.append(
            Record(
                path=f"images/{image_id}",
                label=int(label),
                patient_id=f"P{i:05d}",
                view="PA",
                image_id=image_id,
                age=str(int(rng.integers(18, 90))),
                sex=str(rng.choice(["M", "F"])),
                mask=mask_rel,
                findings=POSITIVE_FINDING if label else NEGATIVE_FINDING,
            )
        )
        records[-1].view = "AP" if meta.random() < 0.4 else "PA"
    assignment = split_by_patient({r.patient_id: bool(r.label) for r in records}, fractions, seed)
    splits = {name: [r for r in records if assignment[r.patient_id] == name] for name in SPLITS}
    hard: list[Record] = []
    for i in range(max(2, round(n * fractions[2] * (1 - positive_fraction)))):
        image_id = f"phantom_hard_{i:05d}.png"
        image, _ = make_phantom(rng, size, False, cardiomegaly=True)
        cv2.imwrite(str(out / "images" / image_id), image)
        hard.append(Record(path=f"images/{image_id}", label=0, patient_id=f"H{i:05d}",
                           view="AP" if meta.random() < 0.4 else "PA", image_id=image_id,
                           age=str(int(meta.integers(18, 90))), sex=str(meta.choice(["M", "F"])),
                           findings="Cardiomegaly"))
    notes = [f"SYNTHETIC chest phantoms (seed {seed}, {size} px): not patient data, not for clinical use.",
             f"{len(hard)} hard negatives (synthetic cardiomegaly, no opacity) in hard_negatives.csv."]
    summary = summarize(splits, notes)
    summary.update({"source": "cxr-train phantoms", "seed": seed, "synthetic": True, "size": size,
                    "hard_negatives": len(hard)})
    write_split_folder(out, splits, summary, boxes, hard_negatives=hard)
    return summary
