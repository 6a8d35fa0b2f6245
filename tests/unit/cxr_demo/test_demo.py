"""The demo's table says which outputs arrived for each image and whether the RIS acknowledged
its ORU^R01 (read from what the receiving SCP stored and from the worker's log)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr_demo.demo import outputs_arrived, sent_to_ris
from tests.dicom_outputs import MODEL_V2, hot_gradcam, synthetic_cr
from worker.outputs import (
    BuildSettings,
    build_presentation_state,
    build_report,
    build_secondary_capture,
    output_uids,
    render_heatmap_overlay,
)


def test_the_table_names_each_output_that_arrived(tmp_path: Path) -> None:
    source, settings = synthetic_cr(), BuildSettings()
    uids = output_uids(source, MODEL_V2.version)
    rgb = render_heatmap_overlay(np.full((64, 64), 0.5), hot_gradcam(), probability=0.9, threshold=0.5,
                                 model_name="m", model_version="v", heatmap_scale=4.0)
    sc = build_secondary_capture(source, rgb, uids, MODEL_V2, settings)
    built = {"sc": sc, "sr": build_report(source, sc, 0.9, MODEL_V2, uids, settings),
             "gsps": build_presentation_state(source, hot_gradcam(), 0.9, MODEL_V2, uids, settings)}
    received = tmp_path / "received"
    received.mkdir()
    assert outputs_arrived(source, None, tmp_path) == []
    for name in ("sc", "sr"):
        built[name].save_as(received / f"{name}.dcm", enforce_file_format=True)
    assert outputs_arrived(source, None, tmp_path) == ["SC", "SR"]
    built["gsps"].save_as(received / "gsps.dcm", enforce_file_format=True)
    assert outputs_arrived(source, None, tmp_path) == ["SC", "SR", "GSPS"]


def test_an_oru_counts_as_acknowledged_only_when_the_worker_logged_it_sent(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("\n".join([
        json.dumps({"message": "sent", "destination": "mllp://127.0.0.1:2575", "sop_instance_uid": "1.2.3"}),
        json.dumps({"message": "send failed, retrying in 10 s", "destination": "mllp://127.0.0.1:2575",
                    "sop_instance_uid": "1.2.4"}),
        json.dumps({"message": "sent", "destination": "PACS@127.0.0.1:4242", "sop_instance_uid": "1.2.5"}),
        "not json",
    ]))
    assert sent_to_ris(log, ["mllp://127.0.0.1:2575"]) == {"1.2.3"}
    assert sent_to_ris(log, []) == set()
