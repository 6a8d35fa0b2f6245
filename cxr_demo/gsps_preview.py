"""A PNG of an image under a Grayscale Softcopy Presentation State, as a GSPS viewer shows it.

DCMTK's ``dcmp2pgm`` applies the presentation state's grayscale pipeline (modality LUT, VOI,
presentation LUT) but, as its manual says, draws no graphic or text annotations; this draws the
GSPS's POLYLINE graphics and text objects (PIXEL units) on its output in their layers' colours.

    python -m cxr_demo.gsps_preview IMAGE.dcm GSPS.dcm OUT.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from PIL import Image


def _layer_rgb(gsps: Any, layer: str) -> tuple[int, int, int]:
    """The layer's recommended CIELab colour (PS3.3 C.10.7.1.1, scaled to 0-65535) as RGB."""
    for item in gsps.get("GraphicLayerSequence", []):
        if item.GraphicLayer == layer and "GraphicLayerRecommendedDisplayCIELabValue" in item:
            lab_l, lab_a, lab_b = (float(v) for v in item.GraphicLayerRecommendedDisplayCIELabValue)
            lab = np.array([[[lab_l / 65535 * 100, lab_a / 65535 * 255 - 128, lab_b / 65535 * 255 - 128]]],
                           np.float32)
            rgb = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)[0, 0] * 255, 0, 255)
            return int(rgb[0]), int(rgb[1]), int(rgb[2])
    return 255, 255, 0


def render(image: Path, pstate: Path) -> np.ndarray[Any, Any]:
    """uint8 RGB [Rows, Columns, 3]: dcmp2pgm's rendering with the annotations drawn on it."""
    with tempfile.TemporaryDirectory() as tmp:
        pgm = Path(tmp) / "out.pgm"
        run = subprocess.run(["dcmp2pgm", "-p", str(pstate), str(image), str(pgm)], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"dcmp2pgm failed: {run.stderr.strip().splitlines()[-1:]}")
        gray = np.asarray(Image.open(pgm))
    rgb = np.ascontiguousarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
    gsps = pydicom.dcmread(pstate)
    width = max(1, round(min(gray.shape) / 300))
    for annotation in gsps.GraphicAnnotationSequence:
        colour = _layer_rgb(gsps, annotation.GraphicLayer)
        for obj in annotation.get("GraphicObjectSequence", []):
            points = np.asarray(obj.GraphicData, np.float64).reshape(-1, 2) - 0.5  # corner -> pixel centre
            cv2.polylines(rgb, [np.rint(points).astype(np.int32)], False, colour, width, cv2.LINE_AA)
        for text in annotation.get("TextObjectSequence", []):
            x0, y0 = (float(v) for v in text.BoundingBoxTopLeftHandCorner)
            x1, _ = (float(v) for v in text.BoundingBoxBottomRightHandCorner)
            scale = 0.35 * gray.shape[0] / 512
            lines, line = [], ""
            for clause in str(text.UnformattedTextValue).split("; "):  # wrapped at the box's width
                trial = f"{line}; {clause}" if line else clause
                if line and cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > x1 - x0:
                    lines.append(line)
                    trial = clause
                line = trial
            for i, piece in enumerate([*lines, line]):
                y = round(y0 + 30 * scale * (1 + 1.5 * i))
                cv2.putText(rgb, piece, (round(x0), y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return rgb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_demo.gsps_preview", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("image", type=Path)
    p.add_argument("gsps", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    cv2.imwrite(str(args.out), cv2.cvtColor(render(args.image, args.gsps), cv2.COLOR_RGB2BGR))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
