"""Atomic writes and concurrent updaters, without pytest in between."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pytest_kvperf import baselines, jsonfile
from pytest_kvperf.compare import compare_value
from pytest_kvperf.metric import Metric, MetricError


def entry(value):
    return baselines.measured_entry({"m": Metric(value, "accuracy", "lower", 0, 0)}, {})


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "gpu.json"
    baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry(1.0)})
    before = path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C or a kill between write and rename looks like

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry(2.0)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _writer(path, start):
    for i in range(start, start + 20):
        baselines.apply_updates(path, {"key": "gpu"}, {f"t::test_{i}": entry(float(i))})


def test_concurrent_writers_lose_no_entries(tmp_path):
    path = tmp_path / "gpu.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, 100 * k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = baselines.load(path).entries
    assert len(entries) == 60
    assert entries["t::test_205"].metrics["m"].value == 205.0
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]  # no temp or lock file left


def _killed_mid_write(path):
    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # after the temp file is complete, before rename

    os.replace = kill
    baselines.apply_updates(path, {"key": "gpu"}, {"t::b": entry(2.0)})


def test_next_writer_removes_a_killed_writers_temp_file(tmp_path):
    path = tmp_path / "gpu.json"
    baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry(1.0)})
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(path,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".gpu.json.*.tmp")
    assert "t::b" in json.loads(stale.read_text())["entries"]  # what the killed writer left
    baselines.apply_updates(path, {"key": "gpu"}, {"t::c": entry(3.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]
    assert sorted(baselines.load(path).entries) == ["t::a", "t::c"]


def _write_when_set(path, go):
    go.wait(60)
    jsonfile.write(path, {"writer": "waiting"})


def test_a_waiting_writer_leaves_the_lock_holders_temp_file_alone(tmp_path):
    path = tmp_path / "gpu.json"
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    # forked before the lock is taken: a child must not inherit the holder's lock
    waiting = ctx.Process(target=_write_when_set, args=(path, go))
    waiting.start()
    with jsonfile.locked(path):
        live = tmp_path / ".gpu.json.live.tmp"  # the holder's write in progress
        live.write_text("{}")
        go.set()
        time.sleep(0.5)
        assert waiting.is_alive() and live.exists() and not path.exists()
    waiting.join(60)
    assert waiting.exitcode == 0
    assert json.loads(path.read_text()) == {"writer": "waiting"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]  # stale once released


def test_git_ignores_temp_files_in_baselines():
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs the project's git checkout")
    for name in ("baselines/.cpu.json.k3j_x9a1.tmp", "baselines/cpu.json.lock"):
        assert subprocess.run(["git", "check-ignore", "-q", name], cwd=root).returncode == 0, name


def test_compare_value_directions():
    assert compare_value(1.2, 1.0, "lower", 0.1, 0) == "regressed"
    assert compare_value(0.8, 1.0, "lower", 0.1, 0) == "improved"
    assert compare_value(1.05, 1.0, "lower", 0.1, 0) == "ok"
    assert compare_value(0.8, 1.0, "higher", 0.1, 0) == "regressed"
    assert compare_value(1.2, 1.0, "higher", 0.1, 0) == "improved"
    assert compare_value(0.98, 1.0, "higher", 0.0, 0.05) == "ok"


def test_write_refuses_invalid_content(tmp_path):
    path = tmp_path / "gpu.json"
    with pytest.raises(MetricError, match="finite number"):  # cannot even be built
        Metric(float("inf"), "speed", "lower", 0, 0)
    bad = baselines.Entry("n/a", hw_skip_reason="")
    with pytest.raises(baselines.BaselineError, match="non-empty 'hw_skip_reason'"):
        baselines.apply_updates(path, {"key": "gpu"}, {"t::a": bad})
    assert not path.exists()
    json.dumps(baselines.encode(baselines.BaselineFile({}, {"t::a": entry(1.0)})))  # plain JSON


def test_new_file_is_readable_by_others_and_mode_is_kept(tmp_path):
    path = tmp_path / "gpu.json"
    baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry(1.0)})
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    path.chmod(0o664)
    baselines.apply_updates(path, {"key": "gpu"}, {"t::b": entry(2.0)})
    assert path.stat().st_mode & 0o777 == 0o664
