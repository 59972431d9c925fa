"""cxr-attention-sweeps driver: CLI, MLflow tracking, and (next) Ray Tune sweeps."""

__all__: list[str] = []
