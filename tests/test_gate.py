"""The validation gate (spec §7.6) on real features of the tiny synthetic nut: a verdict with
reasons for every candidate, never an exception, and no candidate that scores NaN passes."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from glad.features import feature_batches
from glad.model import GladModel
from online.gate import CANARY_SUFFIX, Example, Gate, GateConfig, scores, threshold_shift


@pytest.fixture(scope="module")
def production(pipeline_model: Path) -> GladModel:
    return GladModel.load(pipeline_model)


def examples(model: GladModel, images: list[np.ndarray], prefix: str) -> list[Example]:
    """Registered images as the updater keeps them: float16 features and validity."""
    registered, valid, _ = model.register(images)
    batch = next(iter(feature_batches(model.backbone_, registered, len(registered), False, "")))
    return [Example(f"{prefix}{i}", [f[i].to(torch.float16).numpy() for f in batch], valid[i])
            for i in range(len(images))]


@pytest.fixture(scope="module")
def frames(production: GladModel, tiny_dataset: Path) -> dict[str, list[Example]]:
    from glad.datasets import MVTecCategory
    from glad.images import read_image

    nut = MVTecCategory(tiny_dataset / "nut")
    normal = [read_image(p) for p in nut.train_paths()][:6]
    defects = [read_image(i.path) for i in nut.test_items() if i.label == 1][:4]
    return {"normal": examples(production, normal, "held"),
            "defect": examples(production, defects, "defect")}


def gate_with(frames: dict[str, list[Example]], extra: list[Example] = ()) -> Gate:
    gate = Gate(GateConfig(min_held_back=4, held_back=10, canaries=10))
    gate.held_back.extend(frames["normal"] + list(extra))
    gate.canaries.extend(frames["defect"])
    return gate


def base_components(model: GladModel) -> list[int]:
    return [layer.mixture.n_components for layer in model.layers_]


def test_production_against_itself_passes(production, frames) -> None:
    threshold, record = gate_with(frames).evaluate(copy.copy(production), production,
                                                   base_components(production))
    assert record["passed"], record["reasons"]
    assert record["unscorable"] == [] and threshold >= production.threshold_


def test_the_threshold_follows_the_candidates_scores_down_as_well_as_up(production,
                                                                        frames) -> None:
    """A candidate that scores every frame lower (here: a higher image-score quantile) gets a
    threshold lowered by the fall of its median held-back score, so recall is not lost."""
    candidate = copy.copy(production)
    candidate.quantile = 0.05
    threshold, record = gate_with(frames).evaluate(candidate, production,
                                                   base_components(production))
    assert record["threshold_shift"] < 0
    assert threshold == pytest.approx(production.threshold_ + record["threshold_shift"])


@pytest.mark.parametrize(("candidate", "production", "expected_shift"), [
    ([90, 95, 100], [100, 105, 110], -10.0),  # normals production accepts, re-scored lower: down
    ([130, 140, 150], [100, 105, 110], 35.0),  # scored higher: up, as before
    ([90, 95, 100], [300, 320, 340], 0.0),  # a new look production flags, now learned: kept
    ([90, 95, 300], [100, 105, 340], -10.0),  # only the accepted frames move it down
])
def test_threshold_moves_down_only_by_frames_production_accepts(candidate, production,
                                                                expected_shift) -> None:
    shift = threshold_shift(200.0, np.array(candidate, float), np.array(production, float))
    assert shift == expected_shift


def test_a_candidate_that_scores_nan_fails_with_a_reason(production, frames) -> None:
    """Before, `image_auroc` raised "scores contain NaN" inside the gate (and the updater died)."""
    candidate = copy.copy(production)
    candidate.roi_ = torch.zeros_like(production.roi_)  # nothing left to score
    gate = gate_with(frames)
    assert np.isnan(scores(candidate, frames["normal"])).all()
    _, record = gate.evaluate(candidate, production, base_components(production))
    assert not record["passed"]
    assert any("NaN or infinite where production's scores are finite" in r
               for r in record["reasons"])


def test_a_candidate_too_narrow_for_float32_fails_before_it_is_scored(production, frames) -> None:
    """Finite factors that overflow float32 costs score NaN (see test_online_kmle); the gate's
    structural check names them instead of scoring them."""
    layer = production.layers_[1]
    narrow = replace(layer.factors, whiteners=layer.factors.whiteners * 1e20,
                     offsets=layer.factors.offsets * 1e20)
    candidate = copy.copy(production)
    candidate.layers_ = [production.layers_[0], replace(layer, factors=narrow),
                         production.layers_[2]]
    _, record = gate_with(frames).evaluate(candidate, production, base_components(production))
    assert not record["passed"]
    assert any(r.startswith("layer 2: ") and "float32" in r for r in record["reasons"])


def test_a_frame_no_model_can_score_is_set_aside(production, frames) -> None:
    """The held-back category's crash: a canary whose re-registration failed had no valid pixel,
    so both models scored it NaN. It says nothing about the candidate."""
    empty = replace(frames["defect"][0], frame_id="held9" + CANARY_SUFFIX,
                    valid=np.zeros_like(frames["defect"][0].valid))
    gate = gate_with(frames)
    gate.canaries.append(empty)
    assert np.isnan(scores(production, [empty])).all()
    _, record = gate.evaluate(copy.copy(production), production, base_components(production))
    assert record["passed"], record["reasons"]
    assert record["unscorable"] == [empty.frame_id]
    assert record["canaries"] == len(frames["defect"]) + 1


def test_too_few_scorable_held_back_frames_fail(production, frames) -> None:
    unscorable = [replace(e, frame_id=f"blank{i}", valid=np.zeros_like(e.valid))
                  for i, e in enumerate(frames["normal"][:4])]
    gate = Gate(GateConfig(min_held_back=4, held_back=10, canaries=10))
    gate.held_back.extend(frames["normal"][:2] + unscorable)
    gate.canaries.extend(frames["defect"])
    _, record = gate.evaluate(copy.copy(production), production, base_components(production))
    assert not record["passed"]
    assert record["reasons"] == ["only 2 held-back normal frames can be scored, 4 needed to "
                                 "measure false alarms"]


def test_an_error_while_checking_is_a_failed_verdict(production, frames) -> None:
    _, record = gate_with(frames).evaluate(copy.copy(production), production, [8, 8])
    assert not record["passed"]
    assert record["reasons"][0].startswith("the gate failed: ValueError")
