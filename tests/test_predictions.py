"""Per-image predictions of every finished trial: the artifact later comparisons read.

Known answers: the rows are the cache's validation and test rows in order, the labels are the
cache's, and the metrics recomputed from the stored probabilities are the run's own
``best_val_*`` and ``test_*`` (no retraining needed to compare runs after the fact).
"""

import csv
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sweeps.tracking.runs import PREDICTIONS_FILE
from trainer.data.cache import open_cache
from trainer.loop import PREDICTIONS_FILE as WRITTEN
from trainer.metrics import compute_metrics

from . import _results_fixtures as fx

real_sweep = fx.real_sweep  # the fixture
pytestmark = pytest.mark.slow


def test_every_finished_trial_stores_its_predictions_keyed_by_cache_row(real_sweep, tmp_path):
    assert PREDICTIONS_FILE == WRITTEN
    cache = open_cache(real_sweep.cache)
    client = MlflowClient(real_sweep.uri)
    exp = client.get_experiment_by_name(real_sweep.name)
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("cxr.kind") == "trial"]
    assert len(trials) == 2
    for run in trials:
        where = client.download_artifacts(run.info.run_id, f"predictions/{PREDICTIONS_FILE}", str(tmp_path))
        with open(where, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["split", "row", "label", "p_No Finding", "p_Effusion"]  # nothing else
        for split, key in (("val", "best_val_f1_macro"), ("test", "test_f1_macro")):
            got = [r for r in rows if r["split"] == split]
            idx = np.array([int(r["row"]) for r in got])
            np.testing.assert_array_equal(idx, cache.split_indices(split))
            labels = np.array([int(r["label"]) for r in got])
            np.testing.assert_array_equal(labels, cache.labels[idx])
            probs = np.array([[float(r["p_No Finding"]), float(r["p_Effusion"])] for r in got])
            assert np.allclose(probs.sum(1), 1.0)
            again = compute_metrics(labels, probs)["f1_macro"]
            assert math.isclose(again, run.data.metrics[key], abs_tol=1e-9), (
                split,
                again,
                run.data.metrics[key],
            )
