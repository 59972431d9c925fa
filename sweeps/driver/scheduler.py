"""The sweep's ASHA: Ray's, except that it never stops a trial at the last epoch it trains.

Imported only when a tuner is built (it imports Ray).
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainer.loop import LAST_EPOCH

__all__ = ["FinishingASHA"]


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial finish once it has trained its last epoch (by ``train.epochs`` or by
    early stopping; the trial's report says so in ``last_epoch``). That epoch's result still counts
    in its rung, so other trials are judged against it; but stopping this trial then would save no
    training, only lose its test evaluation and final report. It happens whenever a rung falls on
    the last epoch (``grace_period`` equal to ``train.epochs``, or a multiple of it by the reduction
    factor), to the trials below the rung's cutoff."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(LAST_EPOCH) == 1.0:
            self._num_stopped -= 1  # ASHA counted it stopped
            return TrialScheduler.CONTINUE
        return action
