"""What a finished sweep is used for: selection on validation (:mod:`.select`), the paper's tables
(:mod:`.report`), model export (:mod:`.export`), prediction with an export (:mod:`.predict`) and
the MLflow UI (:mod:`.ui`). This layer reads runs through :mod:`sweeps.tracking`; it never
imports the orchestrator."""
