"""The orchestration of a sweep: checks before any trial (:mod:`.preflight`), Ray and the Tuner
(:mod:`.tuner`), the trainable each trial runs (:mod:`.trainable`), the run itself and its resume
(:mod:`.run`), and the trials' status (:mod:`.status`)."""

from .run import SweepOutcome, resume_sweep, run_sweep

__all__ = ["SweepOutcome", "resume_sweep", "run_sweep"]
