"""What a trial sends Tune (:mod:`sweeps.reports`): the numbers Tune schedules on, the rest packed,
and every value back for the callback; Tune then tracks only those few per trial."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ray.tune.experiment import Trial

from sweeps.driver.trainable import scheduling_keys
from sweeps.reports import PACKED_KEY, pack, unpack
from sweeps.space import FINAL_KEY, load_sweep
from trainer.loop import LAST_EPOCH

ROOT = Path(__file__).resolve().parents[1]


def _report() -> dict:
    values = {f"val_{m}_{c}": 0.25 * i for i, (m, c) in enumerate((m, c) for m in "abcde" for c in "xyz")}
    return values | {"val_f1_macro": 0.5, "best_val_f1_macro": 0.6, "epoch": 2, "epochs_done": 3}


def test_only_the_kept_numbers_stay_numbers_and_unpack_gives_every_value_back():
    values = _report() | {
        "train_loss": math.nan,
        "val_auc": math.inf,
        "node_id": "abc",
        "seeds": [{"x": 1.0}],
    }
    packed = pack(values, {"val_f1_macro", "best_val_f1_macro", "epoch", "epochs_done"})
    numbers = {k for k, v in packed.items() if isinstance(v, int | float)}
    assert numbers == {"val_f1_macro", "best_val_f1_macro", "epoch", "epochs_done"}
    assert packed["node_id"] == "abc" and packed["seeds"] == [{"x": 1.0}]  # non-numbers as they are
    assert isinstance(packed[PACKED_KEY], str)
    back = unpack(packed)
    assert back.keys() == values.keys()
    assert math.isnan(back.pop("train_loss")) and math.isnan(values.pop("train_loss"))
    assert back == values  # ±inf too
    assert unpack(values) == values  # a result that was not packed: as it is


def test_a_reported_value_may_not_take_the_packed_name():
    with pytest.raises(ValueError, match=PACKED_KEY):
        pack({PACKED_KEY: 1.0}, set())


def test_the_scheduling_keys_hold_every_objective_and_what_status_shows():
    spec, _ = load_sweep(ROOT / "search_spaces/decision.yaml")  # metric: [val_f1_macro, val_outside_evidence]
    keys = scheduling_keys(spec)
    assert {"val_f1_macro", "val_outside_evidence", "best_val_f1_macro", "best_val_outside_evidence"} <= keys
    assert {"epochs_done", "epoch_time_s", FINAL_KEY, LAST_EPOCH} <= keys  # LAST_EPOCH: FinishingASHA


def test_tune_tracks_only_the_numbers_it_schedules_on():
    """Tune keeps min/max/avg/last and windows per numeric value a trial ever sent, for every trial
    the whole sweep long: ~110 values a report made that ~1 MiB per trial."""
    keep = {"val_f1_macro", "best_val_f1_macro", "epoch", "epochs_done"}
    tracked = {}
    for name, send in (("all", lambda r: r), ("packed", lambda r: pack(r, keep))):
        trial = Trial("t", stub=True)
        for i in range(3):
            trial.update_last_result(send(_report() | {"training_iteration": i + 1}))
        tracked[name] = set(trial.run_metadata.metric_analysis)
        assert unpack(trial.last_result)["val_a_x"] == 0.0  # every value still in its last result
    assert len(tracked["all"]) >= len(_report()) and "val_a_x" in tracked["all"]
    assert tracked["packed"] == keep
