"""The model contract: what a model's metadata must say, read the same way by every consumer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_contract import faithfulness
from cxr_contract.model import CONTRACT_VERSION, ContractError, Meta, ModelInfo, required_outputs

V1 = {Meta.NAME: "m", Meta.VERSION: "1", Meta.INPUT_SIZE: "224", Meta.THRESHOLD: "0.4",
      Meta.WEIGHTS_SHA256: "ab" * 32}
V2 = {**V1, Meta.CONTRACT_VERSION: "2", Meta.OOD_THRESHOLD: "12.5", Meta.HEATMAP_SCALE: "0.8"}


def test_a_version_1_model_loads_without_a_gate() -> None:
    info = ModelInfo.from_metadata(V1, "old.onnx")
    assert info.contract_version == 1 and not info.has_ood_gate and info.heatmap_scale is None
    assert required_outputs(1) == ("probability", "gradcam")


def test_a_version_2_model_has_its_gate_and_scale() -> None:
    info = ModelInfo.from_metadata(V2, "new.onnx")
    assert (info.contract_version, info.ood_threshold, info.heatmap_scale) == (2, 12.5, 0.8)
    assert set(required_outputs(2)) == {"probability", "gradcam", "logit", "ood_score"}


def test_precision_is_read_and_defaults_to_fp32_for_models_exported_before_it() -> None:
    assert ModelInfo.from_metadata(V2, "old.onnx").precision == "fp32"
    assert ModelInfo.from_metadata({**V2, Meta.PRECISION: "int8"}, "q.onnx").precision == "int8"


#: The faithfulness metadata of a 224-px model: a cut-off and its healthy reference.
FAITH = {Meta.FAITHFULNESS_CUTOFF: "2.75",
         Meta.FAITHFULNESS_REFERENCE: faithfulness.encode_reference(np.full((224, 224), 0.25, np.float32))}


def test_the_faithfulness_cut_off_is_read_and_absent_means_no_statement() -> None:
    assert ModelInfo.from_metadata(V2, "old.onnx").faithfulness_cutoff is None
    info = ModelInfo.from_metadata({**V2, **FAITH}, "m.onnx")
    assert info.faithfulness_cutoff == 2.75 and info.faithfulness_reference == FAITH[Meta.FAITHFULNESS_REFERENCE]


def test_a_cut_off_without_its_reference_came_from_an_earlier_score_and_states_nothing() -> None:
    older = ModelInfo.from_metadata({**V2, Meta.FAITHFULNESS_CUTOFF: "3.48"}, "older.onnx")
    assert older.faithfulness_cutoff is None and older.faithfulness_reference is None


@pytest.mark.parametrize(("meta", "words"), [
    ({**V2, Meta.CONTRACT_VERSION: str(CONTRACT_VERSION + 1)}, "newer than this software"),
    ({k: v for k, v in V2.items() if k != Meta.OOD_THRESHOLD}, "lack ood_threshold"),
    ({**V2, Meta.HEATMAP_SCALE: "0"}, "must be > 0"),
    ({**V2, Meta.THRESHOLD: "nan"}, "not finite"),
    ({**V2, Meta.INPUT_SIZE: "big"}, "not a number"),
    ({**V2, Meta.LABELS: json.dumps(["Pneumonia", "No Finding"])}, "are not"),
    ({**V2, Meta.LABELS: "[unclosed"}, "not a JSON list"),
    ({**V2, Meta.PRECISION: "int4"}, "precision='int4' is not one of fp32, int8, fp16"),
    ({**V2, Meta.FAITHFULNESS_CUTOFF: "inf"}, "faithfulness_cutoff='inf' is not finite"),
    ({**V2, **FAITH, Meta.FAITHFULNESS_REFERENCE: "not base64!"}, "faithfulness_reference is not base64"),
    ({**V2, **FAITH, Meta.FAITHFULNESS_REFERENCE: faithfulness.encode_reference(np.zeros((64, 64), np.float32))},
     "faithfulness_reference is not a 224x224 16-bit PNG (uint16 (64, 64))"),
])
def test_bad_metadata_is_one_error_naming_the_model_and_key(meta: dict[str, str], words: str) -> None:
    with pytest.raises(ContractError) as err:
        ModelInfo.from_metadata(meta, "bad.onnx")
    assert str(err.value).startswith("bad.onnx: ") and words in str(err.value)
