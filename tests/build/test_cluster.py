"""Building on a Ray or Dask cluster (``build.backend=ray|dask``), read as usage examples.

    python -m furiosa_build model=tiny-llama buckets=tiny build.backend=ray                 # a local Ray cluster
    python -m furiosa_build model=tiny-llama buckets=tiny build.backend=dask \\
        build.cluster.address=tcp://127.0.0.1:8786                                         # a running scheduler

Each backend gets one real cluster on this host for the module, two worker processes
(``ray start --head`` and a ``distributed.LocalCluster``), which the builds join through
``build.cluster.address``; one test per backend lets the build start and stop its own.
Units reach the workers as the build ships them, so a test replaces the compile function
with one of this module's (importable on the workers) to make a unit fail or kill its
worker.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from furiosa_build import __main__ as entry
from furiosa_build import compile as compile_stage
from furiosa_build.config import ConfigError
from tests.helpers import REPO, build, compose_spec

TINY = ["model=tiny-llama", "buckets=tiny"]
SMALL = [*TINY, "buckets.prefill=[[1,32]]", "buckets.decode=[[2,64]]"]  # two captures
BACKENDS = ["ray", "dask"]
START_SECONDS = 60  # the longest a test cluster may take to come up


PACKAGES = {"ray": "ray", "dask": "distributed"}  # what each backend imports


def _need(backend: str) -> None:
    if importlib.util.find_spec(PACKAGES[backend]) is None:
        pytest.skip(f"{PACKAGES[backend]} is not installed (pip install -e '.[cluster]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the test cluster did not open port {port} within {START_SECONDS} s")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory) -> Iterator[str]:
    """A Ray head node with two worker CPUs, its own auth token, stopped after the module."""
    _need("ray")
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
               "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # the builds of this process join with the same token
        head = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            _wait_for_port(port, head)
            yield f"127.0.0.1:{port}"
        finally:
            _stop_process_group(head)


def _stop_process_group(process: subprocess.Popen) -> None:
    """End ``ray start --block``, which stops its node on SIGTERM, then anything of its session left."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """A Dask scheduler with two single-threaded worker processes on 127.0.0.1."""
    _need("dask")
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.ERROR) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.fixture(params=BACKENDS)
def on_cluster(request) -> list[str]:
    """The overrides that send a build's units to the module's cluster of each backend."""
    address = request.getfixturevalue(f"{request.param}_address")
    return [f"build.backend={request.param}", f"build.cluster.address={address}"]


@pytest.fixture(scope="module")
def loky_build(tmp_path_factory) -> tuple[Path, Path]:
    """The reference: tiny-llama built with the local loky pool; its artifact and cache."""
    root = tmp_path_factory.mktemp("loky")
    build(SMALL, root / "artifact", root / "cache")
    return root / "artifact", root / "cache"


def _same_artifact(a: Path, b: Path) -> None:
    """Byte-identical files, artifact id and build time aside."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        one, two = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.name == "artifact.json":
            one, two = (_without_identity(json.loads(x)) for x in (one, two))
        assert one == two, rel


def _without_identity(doc: dict) -> dict:
    doc["metadata"].pop("artifact_id")
    doc["metadata"].pop("timestamp")
    return doc


def _captures_only(cache: Path, into: Path) -> Path:
    """A copy of ``cache`` without its compiled programs: the build compiles everything again."""
    shutil.copytree(cache, into, ignore=lambda folder, names: ["programs"] if Path(folder) == cache else [])
    return into


# --------------------------------------------------------------------------- functions the workers run


def fail_the_head(unit: compile_stage.CompileUnit) -> bytes:
    """A compile function whose head units raise."""
    if unit.kind == "head":
        raise ValueError("no head today\n(second line that the report leaves out)")
    return compile_stage.compile_unit(unit)


def die_once(marker: str, unit: compile_stage.CompileUnit) -> bytes:
    """A compile function whose first call (across all workers) kills its own process."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return compile_stage.compile_unit(unit)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- tests


def test_a_build_on_the_cluster_is_the_loky_build(on_cluster, loky_build, tmp_path) -> None:
    report = build([*SMALL, *on_cluster], tmp_path / "artifact", tmp_path / "cache")
    _same_artifact(loky_build[0], tmp_path / "artifact")
    assert report.compile.compiled == report.compile.unique > 0
    backend = on_cluster[0].partition("=")[2]
    assert report.pools["compile"].note == f"on the {backend} cluster at {on_cluster[1].partition('=')[2]}"
    assert report.pools["capture"].used == 2  # both workers of the cluster


def test_a_unit_that_raises_is_named_in_one_line(on_cluster, loky_build, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(compile_stage, "compile_unit", fail_the_head)
    cache = _captures_only(loky_build[1], tmp_path / "cache")
    spec = compose_spec([*SMALL, *on_cluster, f"build.save_dir={tmp_path / 'out'}", f"build.cache_dir={cache}",
                         "build.progress=false"])  # fmt: skip
    assert entry.run(spec) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"error: compile unit (prefill|decode) head \(batch=\d, attention=\d+, kv_cache=\d+\) "
                        r"[0-9a-f]{12}: ValueError: no head today\n", err), err  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_local_cluster_retries_the_unit_of_a_killed_worker(backend, loky_build, tmp_path, monkeypatch) -> None:
    """Without an address the build starts a cluster of its own (here 2 workers) and stops it."""
    _need(backend)
    marker = tmp_path / "a-worker-died"
    monkeypatch.setattr(compile_stage, "compile_unit", functools.partial(die_once, str(marker)))
    cache = _captures_only(loky_build[1], tmp_path / "cache")
    report = build([*SMALL, f"build.backend={backend}", "build.cluster.num_workers=2"], tmp_path / "artifact", cache)
    assert marker.exists()  # one unit's worker was killed, and the unit ran again elsewhere
    _same_artifact(loky_build[0], tmp_path / "artifact")
    assert report.pools["compile"].note == f"on a local {backend} cluster"
    if backend == "ray":
        import ray

        assert not ray.is_initialized()  # the local cluster was stopped with the build


@pytest.mark.parametrize(("backend", "address"), [("ray", "127.0.0.1:{port}"), ("dask", "tcp://127.0.0.1:{port}")])
def test_an_unreachable_address_is_one_line(backend, address, tmp_path, capsys) -> None:
    _need(backend)
    address = address.format(port=_free_port())  # nothing listens there
    with pytest.raises(SystemExit) as exit_:
        entry.main([*TINY, f"build.backend={backend}", f"build.cluster.address={address}", f"build.save_dir={tmp_path / 'a'}",
                    f"build.cache_dir={tmp_path / 'cache'}", "build.progress=false"])  # fmt: skip
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: build.cluster.address: cannot reach {address} (connection refused)\n"
    assert not (tmp_path / "a").exists()


class _QuietWebHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep the test's stderr for the build's own message."""


def test_an_address_that_answers_but_is_not_ray_is_one_line(tmp_path, capsys) -> None:
    """A web server on the port answers TCP but not gRPC: refused at once, not after
    ``ray.init``'s minutes of retries."""
    _need("ray")
    with socketserver.TCPServer(("127.0.0.1", 0), _QuietWebHandler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        address = f"127.0.0.1:{web.server_address[1]}"
        with pytest.raises(SystemExit) as exit_:
            entry.main([*TINY, "build.backend=ray", f"build.cluster.address={address}", f"build.save_dir={tmp_path / 'a'}",
                        f"build.cache_dir={tmp_path / 'cache'}", "build.progress=false"])  # fmt: skip
        web.shutdown()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: build.cluster.address: {address} answers, but not as a Ray cluster (no gRPC reply)\n"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["build.cluster.address=127.0.0.1:6379"], "build.cluster.address: used only with build.backend=ray or dask, not 'loky'"),
        (["build.backend=dask", "build.cluster.address=127.0.0.1:8786"],
         "build.cluster.address: expected tcp://host:port for build.backend=dask, got '127.0.0.1:8786'"),
        (["build.backend=ray", "build.cluster.address=tcp://127.0.0.1:6379"],
         "build.cluster.address: expected ray://host:port or host:port for build.backend=ray, got 'tcp://127.0.0.1:6379'"),
        (["build.backend=ray", "build.cluster.address=127.0.0.1:6379", "build.cluster.num_workers=2"],
         "build.cluster.num_workers: sizes the local cluster; the cluster at build.cluster.address has its own workers (leave it null)"),
        (["build.cluster.num_workers=2"], "build.cluster.num_workers: used only with build.backend=ray or dask, not 'loky'"),
        (["build.backend=dask", "build.cluster.retries=-1"], "build.cluster.retries: must be greater than or equal to 0, got -1"),
    ],
)  # fmt: skip
def test_a_bad_cluster_setting_is_one_line(overrides, message) -> None:
    _need("ray")
    _need("dask")
    with pytest.raises(ConfigError) as error:
        compose_spec([*TINY, *overrides])
    assert str(error.value) == message


@pytest.mark.slow
def test_a_bucket_sweep_runs_every_job_on_the_cluster(dask_address, loky_build, tmp_path) -> None:
    """Four jobs, one decode bucket set each, all sent to the same Dask scheduler."""
    entry.main(["-m", *TINY, "buckets.prefill=[[1,32]]", "buckets.decode=[[1,64]],[[2,64]],[[1,32]],[[2,32]]", "build.backend=dask",
                f"build.cluster.address={dask_address}", f"build.cache_dir={loky_build[1]}", "build.progress=false",
                f"hydra.sweep.dir={tmp_path}", "sweep.workload=fixed:8:16", "sweep.num_prompts=8"])  # fmt: skip
    built = sorted(p.parent.name for p in tmp_path.glob("*/artifact.json"))
    assert len(built) == 4, built
    assert not [name for name in built if "cluster" in name or "backend" in name]  # how a job ran is not in its folder name
    with (tmp_path / "sweep.csv").open() as f:  # the sweep report, ranked, one row per job
        ranked = list(csv.DictReader(f))
    assert sorted(Path(row["artifact"]).name for row in ranked) == built
    assert all(float(row["output_tokens_per_s"]) > 0 for row in ranked)
    assert (tmp_path / "sweep.md").is_file() and (tmp_path / "sweep.png").stat().st_size > 0
