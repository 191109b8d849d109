"""The example scripts run end to end (tiny settings; the real runs take minutes)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of compare_fcn_variants.py: (its folder, what it printed)."""
    out = tmp_path_factory.mktemp("compare")
    script = load("examples/compare_fcn_variants.py")
    printed = []
    script.say = printed.append     # the script prints through say()
    assert script.main(["--quick", "--out", str(out), "--no-progress", "--processes", "1"]) == 0
    return out, "\n".join(printed)


def test_compare_fcn_variants_quick(quick_run):
    out, printed = quick_run
    for variant in ("32s", "16s", "8s"):
        assert f"FCN-{variant}" in printed
        assert (out / f"fcn{variant}.npz").exists()
    assert "bar IU" in printed and "boundary IU" in printed
    assert (out / "comparison.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"32s", "16s", "8s"}
    history = json.loads((out / "history.json").read_text())
    # every net trained the same number of iterations, the finer ones inheriting the coarser history
    assert {v: sum("loss" in r for r in history[v]) for v in history} == {"32s": 6, "16s": 6, "8s": 6}


def test_compare_fcn_variants_scratch(tmp_path):
    script = load("examples/compare_fcn_variants.py")
    script.say = lambda text: None
    assert script.main(["--quick", "--schedule", "scratch", "--iterations", "3", "--out", str(tmp_path),
                        "--no-progress", "--processes", "1"]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert {v: sum("loss" in r for r in history[v]) for v in history} == {"32s": 3, "16s": 3, "8s": 3}


def test_make_figures_from_a_run(quick_run, tmp_path):
    out, _ = quick_run
    figures = load("docs/make_figures.py")
    figures.print = lambda *args: None
    assert figures.main(["--run", str(out), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in figures.DRAW)
