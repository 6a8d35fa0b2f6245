"""The model card: what ``evaluate`` measured, in one markdown page a site reads before go-live
(Mitchell et al., "Model Cards for Model Reporting", FAT* 2019), and its summary, which
``export`` stores in the model's metadata and the worker and dashboard show."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cxr_contract.model import RESEARCH_USE, SYNTHETIC_USE
from cxr_contract.prevalence import percent

CARD_FILE = "model_card.md"

#: What the evaluation cannot show, whatever its numbers.
KNOWN_LIMITS = (
    "The probability assumes the prevalence above; at another prevalence set model.site_prevalence "
    "(or run cxr-train recalibrate on the site's own labelled images).",
    "The out-of-distribution gate bounds how often it fires on images like the validation split; how much "
    "unusual input (other body parts, devices, paediatric images) it catches has not been measured.",
    "One frontal view (PA or AP) per answer; lateral views, priors and the clinical question are not used.",
    "Groups marked \"too few to estimate\" were not assessed: the model may behave differently there.",
)


def _value(entry: Any) -> str:
    """``0.912 (0.85-0.95)`` from ``{"value", "ci95"}``; ``-`` when absent."""
    if not isinstance(entry, dict) or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "-"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _subgroup_rows(groups: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| group | patients (with / without pneumonia) | sensitivity | specificity | AUC | ECE |",
            "|---|---|---|---|---|---|"]
    for attribute, values in groups.items():
        for value, g in values.items():
            counts = f"{g['patients']} ({g['positive_patients']} / {g['negative_patients']})"
            if "estimate" in g:
                rows.append(f"| {attribute} {value} | {counts} | {g['estimate']} | | | |")
            else:
                rows.append(f"| {attribute} {value} | {counts} | {_value(g['sensitivity'])} | "
                            f"{_value(g['specificity'])} | {_value(g['auc'])} | {_value(g['ece'])} |")
    return rows


def summary(result: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The card's headline numbers, small enough for the model's metadata and a log line."""
    op = result["operating_point"]
    groups = result["subgroups"]["at_operating_point"]
    estimated = sum("estimate" not in g for values in groups.values() for g in values.values())
    total = sum(len(values) for values in groups.values())
    train = data.get("splits", {}).get("train", {})
    gate = result.get("gate", {})
    return {
        "card": CARD_FILE,
        "intended_use": SYNTHETIC_USE if data.get("synthetic") else RESEARCH_USE,
        "training_images": train.get("images"), "training_patients": train.get("patients"),
        "prevalence": result["prevalence"]["value"],
        "operating_point": {"threshold": round(op["threshold"], 6), "val_sensitivity": round(op["sensitivity"], 4),
                            "val_specificity": round(op["specificity"], 4)},
        f"{result['split']}_auc": result["metrics"]["auc"],
        "subgroups_estimated": f"{estimated} of {total}",
        "gate_fires_on_hard_negatives": (gate.get("hard_negatives") or {}).get("value"),
    }


def render(result: dict[str, Any], data: dict[str, Any]) -> str:
    """The card as markdown."""
    s = summary(result, data)
    op, m, ci = result["operating_point"], result["metrics"], result.get("ci95", {})
    gate = result.get("gate", {})
    lines = [
        "# Model card", "",
        "## Intended use", "",
        f"{s['intended_use']}. Flags pneumonia on one frontal chest radiograph (PA or AP) for a radiologist who "
        "reads the image; it does not replace the reading.", "",
        "## Training data", "",
    ]
    for name, split in data.get("splits", {}).items():
        classes = split.get("by_class", {})
        lines.append(f"- {name}: {split.get('images')} images of {split.get('patients')} patients "
                     f"({classes.get('1', {}).get('images', '?')} with pneumonia)")
    lines += [
        "", "## Prevalence", "",
        f"The probability assumes {percent(s['prevalence'])} of images show pneumonia (the validation split, where "
        "the temperature was fitted). At another prevalence it is not \"N in 100\"; see docs/trust.md.", "",
        "## Operating point", "",
        f"Threshold {op['threshold']:.4f} on the calibrated probability: sensitivity {op['sensitivity']:.3f} and "
        f"specificity {op['specificity']:.3f} on the validation split ({op['positives']} / {op['negatives']} "
        f"images). On the {result['split']} split (n={result['n']}, {result['patients']} patients): "
        f"sensitivity {m['recall']:.3f}, specificity {m['specificity']:.3f}, AUC {m['auc']:.3f}"
        + (f" (95% CI {ci['auc'][0]:.3f}-{ci['auc'][1]:.3f})" if ci.get("auc") else "") + ".", "",
        "## Subgroups", "",
        f"Intervals resample patients ({result['bootstrap']} draws). A group needs at least "
        f"{result['subgroups']['min_patients_per_class']} patients with and as many without pneumonia.", "",
        *_subgroup_rows(result["subgroups"]["at_operating_point"]), "",
        "## Out-of-distribution gate", "",
    ]
    if gate:
        split_rate, hard = _value(gate.get("split")), _value(gate.get("hard_negatives"))
        lines.append(f"Fitted as export fits it (false-gate rate {gate['false_gate_rate']:g} on the validation "
                     f"split): fires on {split_rate} of the {result['split']} split and on {hard} of the hard "
                     "negatives (other findings, no pneumonia).")
    else:
        lines.append("Not measured in this evaluation.")
    lines += ["", "## Known limits", "", *(f"- {limit}" for limit in KNOWN_LIMITS), ""]
    return "\n".join(lines)


def write(run: Path, result: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Write ``RUN/model_card.md``; return its summary."""
    (run / CARD_FILE).write_text(render(result, data))
    return summary(result, data)
