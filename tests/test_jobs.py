"""``sweep submit`` / ``logs`` / ``stop`` / ``status --address``: Ray's Jobs API from a workstation.

The refusals run for real (nothing to reach, or nothing listening); what is sent to the cluster is
checked against a recording stand-in for Ray's ``JobSubmissionClient``. The whole path against a
real cluster is in ``tests/stack/test_stack.py`` (the compose stack's dashboard, token auth on).
"""

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.driver import jobs

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CLUSTER = ["--set", "storage_path=/shared/sweeps", "--set", "trial.data.cache=/data/cache/ne"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("sets", "field"),
    [([], "storage_path"), (["--set", "storage_path=/shared/sweeps"], "trial.data.cache")],
)
def test_submit_refuses_paths_that_would_resolve_in_the_jobs_scratch_folder(sets, field):
    demo = ROOT / "search_spaces/demo.yaml"  # storage_path and the cache are relative to it
    result = runner.invoke(app, ["sweep", "submit", str(demo), "--address", "http://127.0.0.1:1", *sets])
    line = _one_error_line(result)
    assert f"{field}: " in line and "is relative" in line and f"--set {field}={jobs.EXAMPLES[field]}" in line


def test_submit_checks_the_file_before_it_reaches_for_the_cluster():
    demo = str(ROOT / "search_spaces/demo.yaml")
    result = runner.invoke(
        app, ["sweep", "submit", demo, "--address", "http://127.0.0.1:1", *CLUSTER, "--set", "num_samples=0"]
    )
    assert result.exit_code == 2 and "invalid sweep file" in result.output, result.output
    assert "num_samples" in result.output and "dashboard" not in result.output


@pytest.mark.parametrize("verb", ["submit", "logs", "stop", "status"])
def test_an_address_that_is_not_a_dashboard_is_one_line(verb):
    args = [str(ROOT / "search_spaces/demo.yaml"), *CLUSTER] if verb == "submit" else ["demo"]
    result = runner.invoke(app, ["sweep", verb, *args, "--address", "ray-head:6379"])
    assert "the Jobs API is the Ray dashboard's URL" in _one_error_line(result)
    port = _free_port()  # nothing listens there
    result = runner.invoke(app, ["sweep", verb, *args, "--address", f"http://127.0.0.1:{port}"])
    assert f"--address http://127.0.0.1:{port}: no Ray dashboard answers there" in _one_error_line(result)


class RecordingClient:
    """What Ray's JobSubmissionClient is asked, with a job list it answers from."""

    def __init__(self, listed=()):
        self.submitted = []
        self.stopped = []
        self.listed = list(listed)

    def submit_job(self, **kw):
        workdir = Path(kw["runtime_env"]["working_dir"])
        kw["files"] = {p.name: p.read_text() for p in workdir.iterdir()}
        self.submitted.append(kw)
        return kw["submission_id"]

    def list_jobs(self):
        return self.listed

    def get_job_logs(self, submission_id):
        return {j.submission_id: j.log for j in self.listed}[submission_id]

    def stop_job(self, submission_id):
        self.stopped.append(submission_id)
        return True


def _job(sid, sweep, status, start, log=""):
    return SimpleNamespace(
        submission_id=sid,
        metadata={jobs.SWEEP_KEY: sweep} if sweep else None,
        status=SimpleNamespace(value=status),
        entrypoint="cxr-sweep sweep run sweep.yaml",
        start_time=start,
        message="",
        log=log,
    )


def test_submit_sends_the_file_alone_with_its_overrides_and_stops_as_a_ctrl_c(monkeypatch, tmp_path):
    client = RecordingClient()
    monkeypatch.setattr(jobs, "_client", lambda address: client)
    space = tmp_path / "mine.yaml"
    raw = yaml.safe_load((ROOT / "search_spaces/demo.yaml").read_text())
    space.write_text(yaml.safe_dump({**raw, "name": "on-cluster"}))
    (tmp_path / "secret-notes.txt").write_text("not for the cluster")
    result = runner.invoke(
        app, ["sweep", "submit", str(space), "--address", "http://head:8265", *CLUSTER, "--smoke"]
    )
    assert result.exit_code == 0, result.output
    (sent,) = client.submitted
    assert sent["files"] == {"sweep.yaml": space.read_text()}  # the sweep file, nothing beside it
    assert sent["metadata"] == {jobs.SWEEP_KEY: "on-cluster"}
    assert sent["submission_id"].startswith("cxr-sweep-on-cluster-")
    assert sent["entrypoint"].startswith("cxr-sweep sweep run sweep.yaml --address auto")
    assert "--set storage_path=/shared/sweeps --set trial.data.cache=/data/cache/ne" in sent["entrypoint"]
    assert "--set trial.train.epochs=1 --set num_samples=2" in sent["entrypoint"]  # --smoke
    assert sent["runtime_env"]["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert "cxr-sweep sweep logs on-cluster --address http://head:8265" in result.output


def test_logs_status_and_stop_find_the_sweeps_newest_job(monkeypatch):
    client = RecordingClient(
        [
            _job("old", "s", "SUCCEEDED", 100, "old log\n"),
            _job("new", "s", "RUNNING", 200, "start\nsweep s: 1 running, 1 pending\ntrial table\n"),
            _job("other", "t", "RUNNING", 300, "t log\n"),
            _job("raw", None, "RUNNING", 400, "a job not submitted by us\n"),
        ]
    )
    monkeypatch.setattr(jobs, "_client", lambda address: client)
    got = runner.invoke(app, ["sweep", "logs", "s", "--address", "http://head:8265"])
    assert got.exit_code == 0 and got.output == "start\nsweep s: 1 running, 1 pending\ntrial table\n"
    status = runner.invoke(app, ["sweep", "status", "s", "--address", "http://head:8265"])
    assert status.exit_code == 0, status.output
    assert status.output.splitlines() == [
        "sweep s: job new RUNNING",
        "sweep s: 1 running, 1 pending",
        "trial table",
    ]
    stopped = runner.invoke(app, ["sweep", "stop", "s", "--address", "http://head:8265"])
    assert stopped.exit_code == 0 and client.stopped == ["new"], stopped.output
    client.listed[1].status.value = "STOPPED"
    again = runner.invoke(app, ["sweep", "stop", "s", "--address", "http://head:8265"])
    assert "its job new has already ended (STOPPED)" in _one_error_line(again)
    missing = runner.invoke(app, ["sweep", "logs", "nope", "--address", "http://head:8265"])
    assert "sweep 'nope': no job of that name on the cluster at http://head:8265" in _one_error_line(missing)
