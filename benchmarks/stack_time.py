"""The compose stack's figures (docs/cluster.md): image sizes, time from `compose up` to every service
healthy, and one sweep's wall time inside the stack against the same sweep on the host.

Both sweeps are the stack test's (`tests/stack/test_stack.py`): `search_spaces/demo.yaml` with
test_resnet on 80 phantom patients at 64 px, FIFO, 2 trials at a time, no faults. Inside, the Ray
worker container runs the trials (the head has no CPUs) and the driver logs to MLflow on
PostgreSQL/S3; on the host, a local Ray and a sqlite store. Run them with the machine otherwise
quiet; the images are built first (cached builds take seconds), with the settings the test uses.

    python benchmarks/stack_time.py --out benchmarks/results/stack_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stack import test_stack as stack_test  # noqa: E402  (the stack exactly as the test brings it up)


def image_sizes(docker: str, images: dict[str, str]) -> dict[str, int]:
    out = {}
    for key, tag in images.items():
        got = subprocess.run(
            [docker, "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True
        )
        out[key] = int(got.stdout.strip())
    return out


def host_sweep(trials: int, workdir: Path) -> float:
    cli = str(Path(sys.executable).with_name("cxr-sweep"))
    subprocess.run(
        [cli, "phantoms", "--out", str(workdir / "phantoms"), "--task", "ne", "--patients", "80",
         "--size", "64", "--cache", str(workdir / "cache/ne")],
        check=True, capture_output=True,
    )  # fmt: skip
    sets = stack_test.sweep_sets("stack-time", trials)
    sets.update({"storage_path": str(workdir / "sweeps"), "trial.data.cache": str(workdir / "cache/ne")})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    start = time.monotonic()
    subprocess.run(
        [cli, "sweep", "run", str(ROOT / "search_spaces/demo.yaml"), *args], check=True, capture_output=True
    )
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=stack_test.TRIALS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stack_time_cpu.json")
    args = ap.parse_args()

    env = stack_test.build_env()
    start = time.monotonic()
    images = stack_test.build_images(env)
    build_s = time.monotonic() - start
    with tempfile.TemporaryDirectory(prefix="cxr-stack-time-") as tmp:
        st = stack_test.Stack(Path(tmp), env)
        st.write(images)
        try:
            start = time.monotonic()
            st.compose("up", "-d")
            st.wait_healthy(["postgres", "minio", "mlflow"])
            healthy_s = time.monotonic() - start
            st.wait_nodes(2)
            cluster_s = time.monotonic() - start
            created = st.api(
                "POST",
                "users/create",
                auth=(stack_test.ADMIN, st.passwords["admin"]),
                json={"username": stack_test.USER, "password": st.passwords["user"]},
            )
            assert created.status_code == 200, created.text
            st.exec(
                "ray-head", "cxr-sweep", "phantoms", "--out", "/shared/data/phantoms", "--task", "ne",
                "--patients", "80", "--size", "64", "--cache", "/shared/data/cache/ne",
            )  # fmt: skip
            start = time.monotonic()
            st.exec("ray-head", *stack_test.sweep_cmd("stack-time", args.trials), timeout=1800)
            stack_sweep_s = time.monotonic() - start
        finally:
            st.compose("down", "-v", "--remove-orphans", check=False)
        host_s = host_sweep(args.trials, Path(tmp) / "host")

    result = {
        "benchmark": "stack_time",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "command": f"python benchmarks/stack_time.py --trials {args.trials}",
        "images_bytes": image_sizes(stack_test.docker_cli(env), images),
        "build_s_cached": round(build_s, 1),
        "compose_up_to_healthy_s": round(healthy_s, 1),
        "compose_up_to_ray_cluster_s": round(cluster_s, 1),
        "sweep": {"trials": args.trials, "epochs": stack_test.EPOCHS, "backbone": "test_resnet", "size": 64},
        "sweep_in_stack_s": round(stack_sweep_s, 1),
        "sweep_on_host_s": round(host_s, 1),
        "stack_over_host": round(stack_sweep_s / host_s, 3),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
