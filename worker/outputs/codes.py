"""The coded concepts our outputs use: standard codes where they exist, else the private
``99CXR`` scheme declared in the SR (PS3.3 8.2)."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.coding import Code

from worker.input_check import CLIPPED, UNIFORM
from worker.model import GATE_OOD_SCORE

#: The model reads one frontal view, so the procedure is a single-view chest radiograph.
CHEST_XR_SINGLE_VIEW = Code("36554-4", "LN", "XR Chest Single view")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
#: No standard concept names "probability of pneumonia"; a "99" scheme is private by
#: definition (PS3.3 8.2) and is declared in the SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99CXR"
PNEUMONIA_PROBABILITY = Code("PNEUMONIA-PROB", PRIVATE_SCHEME, "Probability of pneumonia")
#: The finding's value when the model is not asked: SNOMED CT's qualifier "Indeterminate".
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
#: Whether the image is inside what the model was trained on. No standard concept exists for
#: an algorithm's training distribution, so these are private (scheme 99CXR, see README);
#: a viewer shows the value's meaning, which is the sentence itself.
TRAINING_DISTRIBUTION = Code("OOD-STATUS", PRIVATE_SCHEME, "Relation to model's training distribution")
OUTSIDE_DISTRIBUTION = Code("OOD-OUTSIDE", PRIVATE_SCHEME, "Outside the model's training distribution")
WITHIN_DISTRIBUTION = Code("OOD-WITHIN", PRIVATE_SCHEME, "Within the model's training distribution")
OOD_EVIDENCE = Code("OOD-REASON", PRIVATE_SCHEME, "Out-of-distribution evidence")
OOD_REASONS = {
    GATE_OOD_SCORE: Code("OOD-SCORE-HIGH", PRIVATE_SCHEME, "Feature density score above threshold"),
    UNIFORM: Code("INPUT-UNIFORM", PRIVATE_SCHEME, "Image nearly uniform"),
    CLIPPED: Code("INPUT-CLIPPED", PRIVATE_SCHEME, "Image mostly black or white"),
}
OOD_SCORE = Code("OOD-SCORE", PRIVATE_SCHEME, "Out-of-distribution score")
OOD_THRESHOLD = Code("OOD-THRESHOLD", PRIVATE_SCHEME, "Out-of-distribution threshold")
#: cxr_contract.faithfulness: logit drop for the heatmap's hottest cells minus that for random cells.
HEATMAP_FAITHFULNESS = Code("HEATMAP-FAITH", PRIVATE_SCHEME, "Heatmap faithfulness")

#: The SR's TEXT item carrying the dashboard link (worker.links.review_url).
REVIEW_LINK = hd.sr.CodedConcept("REVIEW-LINK", PRIVATE_SCHEME, "Review in the dashboard")
