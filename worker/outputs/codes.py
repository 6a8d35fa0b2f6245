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
#: The finding's value when the answer is withheld: the model's answer was not given, which
#: SNOMED CT 373121007 says ("Not Evaluated" in DICOM's CID 3703; "Test not done" in SNOMED CT).
#: Not "Indeterminate" (82334004), which reads as an equivocal finding (docs/conformance.md).
NOT_EVALUATED = Code("373121007", "SCT", "Not Evaluated")
#: Whether the image is inside what the model was trained on. No standard concept exists for
#: an algorithm's training distribution, so these are private (scheme 99CXR, see docs/conformance.md);
#: a viewer shows the value's meaning, which is the sentence itself.
TRAINING_DISTRIBUTION = Code("OOD-STATUS", PRIVATE_SCHEME, "Relation to model's training distribution")
OUTSIDE_DISTRIBUTION = Code("OOD-OUTSIDE", PRIVATE_SCHEME, "Outside the model's training distribution")
#: A passed gate: it found no evidence, which is not proof that the image is like the training data.
NO_OOD_EVIDENCE = Code("OOD-NONE-DETECTED", PRIVATE_SCHEME, "No out-of-distribution evidence detected")
#: TEXT: the gate's finding in a sentence, with the score and threshold (Trust.ood_statement).
OOD_STATEMENT = hd.sr.CodedConcept("OOD-STATEMENT", PRIVATE_SCHEME, "Out-of-distribution check")
OOD_EVIDENCE = Code("OOD-REASON", PRIVATE_SCHEME, "Out-of-distribution evidence")
OOD_REASONS = {
    GATE_OOD_SCORE: Code("OOD-SCORE-HIGH", PRIVATE_SCHEME, "Feature density score above threshold"),
    UNIFORM: Code("INPUT-UNIFORM", PRIVATE_SCHEME, "Image nearly uniform"),
    CLIPPED: Code("INPUT-CLIPPED", PRIVATE_SCHEME, "Image mostly black or white"),
}
OOD_SCORE = Code("OOD-SCORE", PRIVATE_SCHEME, "Out-of-distribution score")
OOD_THRESHOLD = Code("OOD-THRESHOLD", PRIVATE_SCHEME, "Out-of-distribution threshold")
#: The prevalence the reported probability assumes (cxr_contract.prevalence), in percent.
ASSUMED_PREVALENCE = Code("PREVALENCE", PRIVATE_SCHEME, "Assumed prevalence of pneumonia")
#: cxr_contract.faithfulness: how much more the calibrated logit drops when the heatmap's hottest
#: region is removed than when the same region moved elsewhere is (mean of the moved copies), in
#: logits; its cut-off is the model's null quantile.
HEATMAP_FAITHFULNESS = Code("HEATMAP-FAITH", PRIVATE_SCHEME, "Heatmap faithfulness")
HEATMAP_FAITHFULNESS_CUTOFF = Code("FAITH-CUTOFF", PRIVATE_SCHEME, "Heatmap faithfulness cut-off")
#: The verdict: the model depends on the highlighted region more than chance (NOT: the region is the disease).
HEATMAP_FAITHFULNESS_VERDICT = Code("FAITH-VERDICT", PRIVATE_SCHEME, "Model depends on highlighted region")
ABOVE_CHANCE = Code("ABOVE-CHANCE", PRIVATE_SCHEME, "Above chance")
NOT_ABOVE_CHANCE = Code("NOT-ABOVE-CHANCE", PRIVATE_SCHEME, "Not above chance")

#: The SR's TEXT item carrying the dashboard link (worker.links.review_url).
REVIEW_LINK = hd.sr.CodedConcept("REVIEW-LINK", PRIVATE_SCHEME, "Review in the dashboard")
