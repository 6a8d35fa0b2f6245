"""The objects the worker sends for one chest X-ray, one module per object as in highdicom:

- :mod:`worker.outputs.sc`: the Grad-CAM Secondary Capture (pixels from :mod:`.render`);
- :mod:`worker.outputs.sr`: the TID 1500 Measurement Report, filled into highdicom's build of its
  shape by :mod:`worker.outputs.sr_template`;
- :mod:`worker.outputs.gsps`: the Grad-CAM outline as a presentation state on the source;
- :mod:`worker.outputs.common`: what they share (UIDs, the trust statement, the decision);
- :mod:`worker.outputs.codes`: the coded concepts.

Each builder takes the source dataset, rejects bad input before building anything, and returns
an object that dciodvfy accepts without errors.
"""

from worker.outputs.common import (
    PATIENT_STUDY_TYPE2,
    BuildSettings,
    OutputUIDs,
    Trust,
    as_reference,
    decision,
    output_uids,
)
from worker.outputs.gsps import build_presentation_state
from worker.outputs.render import (
    WITHHELD_TEXT,
    display_gray,
    faithfulness_line,
    render_heatmap_overlay,
    render_withheld,
)
from worker.outputs.sc import build_secondary_capture
from worker.outputs.sr import build_report

__all__ = [
    "PATIENT_STUDY_TYPE2", "WITHHELD_TEXT", "BuildSettings", "OutputUIDs", "Trust", "as_reference",
    "build_presentation_state", "build_report", "build_secondary_capture", "decision", "display_gray",
    "faithfulness_line", "output_uids", "render_heatmap_overlay", "render_withheld",
]
