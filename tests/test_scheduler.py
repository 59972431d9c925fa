"""The sweep's ASHA never stops a trial at the last epoch it trains (it would only lose its test)."""

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeps.driver.scheduler import FinishingASHA
from trainer.loop import LAST_EPOCH


def _asha(cls):
    # one rung, at epoch 2: the trials' last epoch (grace_period = train.epochs = 2)
    return cls(time_attr="epochs_done", metric="val_f1_macro", mode="max", max_t=3, grace_period=2)


def _rung_at_last_epoch(scheduler, last_epoch_flag: dict) -> str:
    good, weak = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="weak")
    for t in (good, weak):
        scheduler.on_trial_add(None, t)
    for t, f1 in ((good, 0.3), (weak, 0.1)):
        assert scheduler.on_trial_result(None, t, {"epochs_done": 1, "val_f1_macro": f1}) == "CONTINUE"
    assert scheduler.on_trial_result(None, good, {"epochs_done": 2, "val_f1_macro": 0.9}) == "CONTINUE"
    return scheduler.on_trial_result(None, weak, {"epochs_done": 2, "val_f1_macro": 0.1, **last_epoch_flag})


def test_plain_asha_stops_a_weak_trial_at_a_rung_on_its_last_epoch():
    # what the sweep's scheduler guards against: Ray's ASHA stops it before its final report
    assert _rung_at_last_epoch(_asha(ASHAScheduler), {LAST_EPOCH: 1.0}) == TrialScheduler.STOP


@pytest.mark.parametrize(("flag", "action"), [(1.0, TrialScheduler.CONTINUE), (0.0, TrialScheduler.STOP)])
def test_the_sweeps_asha_lets_a_trial_finish_its_last_epoch_and_stops_it_before(flag, action):
    scheduler = _asha(FinishingASHA)
    assert _rung_at_last_epoch(scheduler, {LAST_EPOCH: flag}) == action
    assert scheduler._num_stopped == (action == TrialScheduler.STOP)
