"""Atomic writes and concurrent updaters, without pytest in between."""

import json
import multiprocessing
import os

import pytest

from pytest_kvperf import baselines


def entry(value):
    return baselines.measured_entry(
        {"m": {"value": value, "kind": "accuracy", "better": "lower", "rtol": 0, "atol": 0}}, {}
    )


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
    entries = baselines.load(path)["entries"]
    assert len(entries) == 60
    assert entries["t::test_205"]["metrics"]["m"]["value"] == 205.0


def test_compare_value_directions():
    assert baselines.compare_value(1.2, 1.0, "lower", 0.1, 0) == "regressed"
    assert baselines.compare_value(0.8, 1.0, "lower", 0.1, 0) == "improved"
    assert baselines.compare_value(1.05, 1.0, "lower", 0.1, 0) == "ok"
    assert baselines.compare_value(0.8, 1.0, "higher", 0.1, 0) == "regressed"
    assert baselines.compare_value(1.2, 1.0, "higher", 0.1, 0) == "improved"
    assert baselines.compare_value(0.98, 1.0, "higher", 0.0, 0.05) == "ok"


def test_write_refuses_invalid_content(tmp_path):
    path = tmp_path / "gpu.json"
    bad = {"status": "measured", "metrics": {"m": {"value": float("inf"), "kind": "speed",
                                                   "better": "lower"}}}
    with pytest.raises(baselines.BaselineError, match="finite number"):
        baselines.apply_updates(path, {"key": "gpu"}, {"t::a": bad})
    assert not path.exists()
    json.dumps(entry(1.0))  # entries are plain JSON


def test_new_file_is_readable_by_others_and_mode_is_kept(tmp_path):
    path = tmp_path / "gpu.json"
    baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry(1.0)})
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    path.chmod(0o664)
    baselines.apply_updates(path, {"key": "gpu"}, {"t::b": entry(2.0)})
    assert path.stat().st_mode & 0o777 == 0o664
