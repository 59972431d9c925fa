"""What a researcher reads: the status rows of a sweep's trials, the live view's lines, and the
``best`` table on an 80- or 100-column terminal and through a pipe (through the real CLI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sweeps.driver.progress import SweepProgress
from sweeps.driver.status import trial_rows
from sweeps.space import load_sweep

from . import _results_fixtures as fx

CLI = [sys.executable, "-c", "from sweeps.cli import app; app()"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nocache")  # load_sweep checks names, not the cache
    spec, _ = load_sweep(
        fx.ROOT / "search_spaces" / "demo.yaml",
        overrides=[f"trial.data.cache={cache}", f"storage_path={tmp_path_factory.mktemp('st')}"],
    )
    return spec


def _trial(tid, status, result=None, config=None, error=None):
    config = config or {
        "attention.lambda": {"kind": "fixed", "value": 0.9},
        "attention.threshold": 0.5,
        "train.lr": 1e-3,
    }
    return SimpleNamespace(
        trial_id=tid,
        status=status,
        last_result={"trial_id": tid, **(result or {})},
        config=config,
        path=f"/st/{tid}",
        get_error=lambda: error,
    )


def test_stopped_trials_show_their_best_epoch_not_their_last(spec):
    # an ASHA-stopped trial whose last epoch was its worst: val_f1_macro 0.369 last, 0.729 best
    stopped = _trial("a", "TERMINATED", {"epochs_done": 4, "val_f1_macro": 0.369, "best_val_f1_macro": 0.729})
    (row,) = trial_rows([stopped], spec, live=False)
    assert row["state"] == "STOPPED" and row["best"] == pytest.approx(0.729) and row["epochs"] == 4


def test_running_trials_are_running_while_the_driver_lives_and_interrupted_after(spec):
    trials = [
        _trial("r", "RUNNING", {"epochs_done": 2, "best_val_f1_macro": 0.6}),
        _trial("z", "RUNNING"),  # started, no epoch yet
        _trial("p", "PENDING"),
        _trial("d", "TERMINATED", {"epochs_done": 6, "best_val_f1_macro": 0.8, "trial_done": 1}),
        _trial("e", "ERROR", {"epochs_done": 1}, error="Traceback ...\nBackboneError: cannot take 50x50"),
    ]
    live = [r["state"] for r in trial_rows(trials, spec, live=True)]
    after = [r["state"] for r in trial_rows(trials, spec, live=False)]
    assert live == ["RUNNING", "RUNNING", "PENDING", "DONE", "ERROR"]
    assert after == ["INTERRUPTED", "INTERRUPTED", "PENDING", "DONE", "ERROR"]
    rows = trial_rows(trials, spec, live=False)
    assert rows[1]["params"] == {"attention.lambda": 0.9, "attention.threshold": 0.5, "train.lr": 1e-3}
    assert rows[4]["error"] == "BackboneError: cannot take 50x50"


def test_progress_snapshot_counts_epochs_best_and_eta(spec):
    progress = SweepProgress(spec)
    progress.setup(total_num_samples=4)
    trials = [
        _trial("a", "RUNNING", {"epochs_done": 2, "best_val_f1_macro": 0.7, "epoch_time_s": 10.0}),
        _trial("b", "RUNNING", {"epochs_done": 1, "best_val_f1_macro": 0.8, "epoch_time_s": 10.0}),
        _trial("c", "TERMINATED", {"epochs_done": 2, "best_val_f1_macro": 0.5}),  # stopped by ASHA
    ]
    progress.on_step_begin(0, trials)  # c had ended before: a resumed sweep
    snap = progress.snapshot(trials)
    assert snap.counts == {"RUNNING": 2, "STOPPED": 1, "PENDING": 1}
    assert (snap.epochs_done, snap.epochs_total) == (5, 6 + 6 + 2 + 6)  # 6 epochs a trial; c stopped at 2
    assert snap.best == 0.8 and snap.best_trial == "b" and snap.best_params["train.lr"] == 1e-3
    assert snap.eta_s == pytest.approx((20 - 5) * 10.0 / 2)  # epochs left × epoch time ÷ trials running
    # Ctrl-C: Ray terminates the running trials without completing them
    for t in trials[:2]:
        t.status = "TERMINATED"
    progress.on_experiment_end(trials)
    from sweeps.driver.progress import last_snapshot

    final = last_snapshot()
    assert final.final and final.interrupted
    assert final.counts == {"INTERRUPTED": 2, "STOPPED": 1, "PENDING": 1}


def test_a_sweep_whose_trials_all_ended_is_not_interrupted(spec):
    from sweeps.driver.progress import last_snapshot

    progress = SweepProgress(spec)
    progress.setup(total_num_samples=2)
    trials = [_trial("a", "RUNNING", {"epochs_done": 1}), _trial("b", "RUNNING", {"epochs_done": 1})]
    progress.on_step_begin(0, trials)
    for t in trials:
        t.status = "TERMINATED"
        t.last_result.update(trial_done=1, best_val_f1_macro=0.5, epochs_done=6)
        progress.on_trial_complete(0, trials, t)
    progress.on_experiment_end(trials)
    assert not last_snapshot().interrupted and last_snapshot().counts == {"DONE": 2}


def test_status_line_says_counts_epochs_eta_and_the_best_configuration(spec):
    from sweeps.cli.live import status_line

    progress = SweepProgress(spec)
    progress.setup(total_num_samples=3)
    trials = [_trial("a", "RUNNING", {"epochs_done": 3, "best_val_f1_macro": 0.866, "epoch_time_s": 4.0})]
    line = status_line(progress.snapshot(trials))
    assert "1 running, 2 pending" in line and "epochs 3/18" in line and "ETA ≤ 1m00s" in line
    assert "best val_f1_macro 0.866 (trial a: lambda=0.9 threshold=0.5 lr=0.001)" in line


# ---- the best table, through the real CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    where = tmp_path_factory.mktemp("two")
    a = fx.build_crafted(where, name="crafted")
    fx.build_crafted(where, name="other")
    return a


def _cli(args, *, columns: int, terminal: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("TTY_COMPATIBLE", None)
    if terminal:
        env["TTY_COMPATIBLE"] = "1"  # rich renders for a terminal of COLUMNS width
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("columns", [80, 100])
def test_best_on_a_terminal_wraps_params_between_values_and_cuts_nothing(two_sweeps, columns):
    c = two_sweeps
    out = _cli(
        ["best", c.experiment, "--tracking-uri", c.uri, "--top", "all"], columns=columns, terminal=True
    )
    assert out.returncode == 0, out.stderr
    body = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)  # colours off: the text as seen
    assert max(len(line) for line in body.splitlines()) <= columns
    assert "…" not in body  # nothing cut to an ellipsis
    for value in ("lambda=adaptive", "threshold=0.3", "lambda=0.5"):
        assert value in body, value  # whole values, each on its own line of a cell
    header = next(line for line in body.splitlines() if "val F1" in line)
    assert header.index("trial") < header.index("val F1") < header.index("F1 ") < header.index("params")
    if columns == 80:  # what does not fit is named, not squeezed
        hidden = re.search(r"not shown at 80 columns: ([\w ,]+?) \(", " ".join(body.split()))
        assert hidden, body
        names = hidden.group(1).split(", ")
        assert {"run", "acc"} <= set(names)  # the least needed go first
        assert not any(re.search(rf"(?<![\w-]){n}(?![\w-])", header) for n in names)


def test_best_piped_is_plain_complete_and_has_a_sweep_column_over_several_sweeps(two_sweeps):
    c = two_sweeps
    out = _cli(
        ["best", "crafted", "other", "--tracking-uri", c.uri, "--top", "all"], columns=80, terminal=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[1]
    assert header.split()[:3] == ["#", "sweep", "trial"]
    rows = lines[2:-1]
    assert len(rows) == 2 * 7  # 7 finished runs each; one line a run, however long
    assert {row.split()[1] for row in rows} == {"crafted", "other"}
    assert all("lambda=" in row and "threshold=" in row for row in rows)
    assert "┃" not in out.stdout and "…" not in out.stdout
    # searched values in one order on every row
    orders = {tuple(w.split("=")[0] for w in row.split() if "=" in w) for row in rows}
    assert orders == {("lambda", "threshold")}


def test_best_json_has_numbers(two_sweeps):
    c = two_sweeps
    out = _cli(["best", "crafted", "--tracking-uri", c.uri, "--json"], columns=80, terminal=False)
    rows = json.loads(out.stdout)
    assert all(
        isinstance(v, float | int | bool) or v == "adaptive" for r in rows for v in r["searched"].values()
    )
    assert rows[0]["searched"]["attention.threshold"] == 0.5


def test_a_cell_is_shown_as_written_not_read_as_markup(monkeypatch):
    """Run names end in a trial id in brackets: rich must not take `[a29f8177]` for a style tag."""
    import io

    from rich.console import Console

    import sweeps.cli.common as common

    out = io.StringIO()
    monkeypatch.setattr(
        common, "console", Console(file=out, force_terminal=True, width=100, color_system=None)
    )
    common.print_table("t", [common.TableColumn("run")], [["soft λ=0.5 t=0.3 [a29f8177]"], ["[bold]x[/]"]])
    assert "soft λ=0.5 t=0.3 [a29f8177]" in out.getvalue() and "[bold]x[/]" in out.getvalue()
