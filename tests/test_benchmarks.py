import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_step_time_smoke(tmp_path):
    import step_time

    out = tmp_path / "st.json"
    assert step_time.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["backbone"] == "test_resnet" and r["median_s"]["ce"] > 0
    assert r["ratio_soft_over_ce"] == r["median_s"]["soft"] / r["median_s"]["ce"]
