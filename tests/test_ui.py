"""`cxr-sweep ui`: the MLflow UI on a sweep's store, opened in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no extra
Python package, no port). The MLflow UI is a React app that nests child runs under their parent
collapsed, so the test waits for the parent row, clicks its expander and waits for every child.
The REST API cross-checks the same runs. ``CXR_UI_SCREENSHOTS=DIR`` keeps the screenshots (those in
docs/img/ were made so).
"""

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from . import _results_fixtures as fx

real_sweep = fx.real_sweep  # the fixture
pytestmark = pytest.mark.slow
EXPANDER = "button[data-component-id*='runnamecellrenderer']"  # the +/- beside a parent run's name


@pytest.fixture(scope="module")
def chromium_binary():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI runs .ci/setup.d/chromium.sh)")
        pytest.skip("chromium is not installed (apt-get install chromium, or run .ci/setup.d/chromium.sh)")
    return path


class _Chromium:
    """Headless Chromium; DevTools protocol messages are JSON + NUL over fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900) -> None:
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on the fds Chromium reads and writes
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)
            os.set_inheritable(3, True)  # dup2 onto itself (pipe() gave 3 or 4) keeps it non-inheritable
            os.set_inheritable(4, True)

        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe"]
        self.proc = subprocess.Popen(
            [binary, *args, f"--window-size={width},{height}", "about:blank"],
            preexec_fn=wire,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buf = 0, b""
        page = next(t for t in self._send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self._send("Target.attachToTarget", targetId=page["targetId"], flatten=True)[
            "sessionId"
        ]

    def _send(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        msg = {
            "id": self._id,
            "method": method,
            "params": params,
            **({"sessionId": session} if session else {}),
        }
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(method)
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def goto(self, url: str) -> None:
        self._send("Page.navigate", self.session, url=url)

    def js(self, expression: str):
        r = self._send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"):
                return True
            time.sleep(0.5)
        return False

    def text(self) -> str:
        return self.js("document.body.innerText") or ""

    def screenshot(self, path: Path) -> None:
        data = self._send("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self._send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _start_cli_ui(sweep) -> tuple[subprocess.Popen, dict[str, str]]:
    """``cxr-sweep ui SWEEP --storage ... --port 0`` as a user runs it; the URLs it prints."""
    cli = [sys.executable, "-c", "from sweeps.cli import app; app()"]
    cmd = [*cli, "ui", sweep.name, "--storage", str(sweep.storage), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, urls = [], {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("open http://127.0.0.1:"):
            urls["trials"] = line.split()[1]
        elif line.startswith("parallel coordinates: "):
            urls["charts"] = line.split()[-1]
        elif line.startswith("compare the top runs: "):
            urls["compare"] = line.split()[-1]
        elif line.startswith("every run (parent, trials): "):
            urls["runs"] = line.split()[-1]
            return proc, urls
    proc.kill()
    proc.wait()
    raise AssertionError(f"cxr-sweep ui (exit {proc.returncode}) printed no URLs:\n" + "".join(lines))


def _shot(browser, tmp_path, name: str) -> None:
    """A screenshot, kept in $CXR_UI_SCREENSHOTS (docs/img was made so); it must not be blank."""
    where = Path(os.environ.get("CXR_UI_SCREENSHOTS") or tmp_path)
    shot = where / name
    browser.screenshot(shot)
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and len(im.getcolors(1 << 16) or range(1 << 16)) > 10  # not blank


def test_ui_shows_the_sweep_parent_and_child_runs(real_sweep, chromium_binary, tmp_path):
    client = MlflowClient(real_sweep.uri)
    runs = client.search_runs([client.get_experiment_by_name(real_sweep.name).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cxr.kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    proc, urls = _start_cli_ui(real_sweep)
    browser = None
    try:
        base = urls["trials"].split("/#/")[0]
        eid = parent.info.experiment_id
        assert urls["runs"] == f"{base}/#/experiments/{eid}/runs"
        assert urls["trials"] == f"{base}/#/experiments/{eid}/runs?viewStateShareKey=cxr-{real_sweep.name}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            assert resp.status == 200
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [eid]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            served = {r["info"]["run_id"] for r in json.loads(resp.read())["runs"]}
        assert served == {r.info.run_id for r in [parent, *children]}  # the REST API behind the page
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={eid}") as resp:
            tags = {t["key"]: t["value"] for t in json.loads(resp.read())["experiment"]["tags"]}
        view = json.loads(tags[f"mlflow.sharedViewState.cxr-{real_sweep.name}"])  # the view the URL names
        assert "params.`attention.lambda`" in view["selectedColumns"]
        assert "metrics.`test_youden_index`" in view["selectedColumns"]

        browser = _Chromium(chromium_binary, width=2200)  # wide: the chosen columns all in view
        # the plain runs page: the parent, its trials nested under it (collapsed)
        browser.goto(urls["runs"])
        assert browser.wait_for(f"document.body.innerText.includes({json.dumps(parent.info.run_name)})"), (
            browser.text()[:2000]
        )
        assert browser.wait_for(f"document.querySelector({json.dumps(EXPANDER)})")
        browser.js(f"document.querySelector({json.dumps(EXPANDER)}).click()")
        names = [c.info.run_name for c in children]
        shown = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in names)
        assert browser.wait_for(shown), browser.text()[:2000]
        _shot(browser, tmp_path, "ui-runs.png")

        # the sweep's view: the trials flat (no expander to click), best first, with the chosen columns
        browser.goto("about:blank")
        browser.goto(urls["trials"])
        assert browser.wait_for(shown), browser.text()[:2000]
        for column in ("attention.lambda", "attention.mode", "test_youden_index", "test_discriminant_power"):
            assert browser.wait_for(f"document.body.innerText.includes({json.dumps(column)})"), column
        text = browser.text()
        at = [(c.data.metrics["best_val_f1_macro"], text.index(c.info.run_name)) for c in children]
        for va, ia in at:  # a better run is listed above a worse one (ties: either way)
            assert all(ia < ib for vb, ib in at if va > vb), (at, text[:2000])
        _shot(browser, tmp_path, "ui-trials.png")

        # the chart view of the same runs: a parallel-coordinates chart of the searched values
        assert urls["charts"] == urls["trials"] + "&compareRunsMode=CHART"
        browser.goto("about:blank")
        browser.goto(urls["charts"])
        chart = " && ".join(
            f"document.body.innerText.includes({json.dumps(t)})"
            for t in ("Parallel Coordinates", "search.train.lr", "test_f1_macro")  # its axes
        )
        assert browser.wait_for(chart), browser.text()[:2000]
        _shot(browser, tmp_path, "ui-charts.png")

        if "compare" in urls:  # two or more finished trials: side by side, parallel coordinates first
            browser.goto("about:blank")
            browser.goto(urls["compare"])
            assert browser.wait_for("document.body.innerText.includes('Parallel Coordinates')"), (
                browser.text()[:2000]
            )
            assert browser.wait_for(f"document.body.innerText.includes('Comparing {len(children)} Runs')")
            _shot(browser, tmp_path, "ui-compare.png")
    finally:
        if browser is not None:
            browser.close()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the command stops its server
        proc.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health", timeout=5)
