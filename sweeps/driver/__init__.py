"""The orchestration of a sweep: checks before any trial (:mod:`.preflight`), Ray and the Tuner
(:mod:`.tuner`), the trainable each trial runs (:mod:`.trainable`), the run itself and its resume
(:mod:`.run`), how it ends when it does not finish (:mod:`.failure`), the trials' status
(:mod:`.status`) and its progress as it runs (:mod:`.progress`)."""

from .failure import SweepFailed, SweepInterrupted
from .run import SweepOutcome, resume_sweep, run_sweep

__all__ = ["SweepFailed", "SweepInterrupted", "SweepOutcome", "resume_sweep", "run_sweep"]
