"""Faults injected into Ray worker processes (``runtime_env.worker_process_setup_hook``)."""

from __future__ import annotations


def nan_loss_when_threshold_is_07() -> None:
    """Trials with ``attention.threshold == 0.7`` get a NaN attention loss: they must diverge."""
    import trainer.attention_loss as al

    real = al.attention_loss

    def poisoned(cam, region, labels, mode, threshold, *args, **kwargs):
        out = real(cam, region, labels, mode, threshold, *args, **kwargs)
        return out * float("nan") if abs(threshold - 0.7) < 1e-9 else out

    al.attention_loss = poisoned
