"""Model card summaries for the dashboard, by model version: read from the metadata of the model
files beside the configured model (``model.path``), where a site keeps the versions it ran."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from cxr_contract.model import ContractError, ModelInfo
from cxr_contract.prevalence import percent

logger = logging.getLogger(__name__)

#: A version not found is looked for again after this long (a model added since).
RESCAN_S = 60.0


def card_of(info: ModelInfo) -> dict[str, Any]:
    """What the dashboard shows of a model's card: its summary, and the prevalence its
    probability assumes (a site calibration's where it has one)."""
    site = info.site_calibration or {}
    prevalence = site.get("prevalence", info.prevalence)
    shown: dict[str, Any] = {"assumed prevalence": percent(prevalence) if prevalence is not None else "unknown"}
    if info.faithfulness_cutoff is not None:  # the result page judges the stored score by it
        shown["heatmap faithfulness cut-off"] = info.faithfulness_cutoff
    if site:
        shown["site calibration"] = (f"{site.get('images')} labelled images, threshold {site.get('threshold', 0):.4f}")
    for key, value in info.model_card.items():
        if key != "prevalence":
            shown[key.replace("_", " ")] = (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
                                            if isinstance(value, dict) else value)
    return shown


class ModelCards:
    """Version -> card, scanned lazily (loading a model file takes a second) and cached."""

    def __init__(self, model_path: Path | None) -> None:
        self.folder = model_path.parent if model_path is not None else None
        self._cards: dict[str, dict[str, Any]] = {}
        self._scanned = float("-inf")
        self._lock = threading.Lock()

    def get(self, version: str) -> dict[str, Any] | None:
        with self._lock:
            if version not in self._cards and time.monotonic() - self._scanned > RESCAN_S:
                self._scan()
            return self._cards.get(version)

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        if self.folder is None or not self.folder.is_dir():
            return
        import onnxruntime as ort

        from worker.model import ORT_DEFAULT_SEVERITY, quiet_provider_probe

        for path in sorted(self.folder.glob("*.onnx")):
            try:
                with quiet_provider_probe(ort):
                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                info = ModelInfo.from_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
            except (ContractError, Exception) as exc:  # not a model of ours: not shown, said once
                logger.info("dashboard: no model card from %s: %s", path.name, type(exc).__name__)
                continue
            finally:
                ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
            self._cards[info.version] = card_of(info)
