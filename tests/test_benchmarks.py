import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_step_time_smoke(tmp_path):
    import step_time

    out = tmp_path / "st.json"
    assert step_time.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["backbone"] == "test_resnet" and r["median_s"]["ce"] > 0
    assert r["ratio_soft_over_ce"] == r["median_s"]["soft"] / r["median_s"]["ce"]


@pytest.mark.slow
def test_sweep_efficiency_smoke(tmp_path):
    import sweep_efficiency

    out = tmp_path / "se.json"
    assert sweep_efficiency.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["grid"]["trials"] == 2 and report["optuna_asha"]["trials"] == 2
    over = report["overhead"]
    assert over["reuse_actors"]["ratio"] > 0 and over["fresh_actors"]["trials"] == 2
