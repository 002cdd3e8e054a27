"""The run config documented by itself and by the repository: `tinymoe config` (full defaults as commented TOML
that loads back to the same config), one example run.toml per dataset kind (each trained here), docs/config.md
naming every key, run folders whose config.json holds only the keys their dataset and model use, and the
packaging floor."""
import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from tinymoe.cli import main
from tinymoe.config import (DATA_KEYS, DATA_KINDS, MODEL_KEYS, DataConfig, MultiGateConfig, load_config, model_config,
                            read_file)
from tinymoe.config_docs import default_config
from tinymoe.model import ModelConfig
from tinymoe.train import OptimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def resolved(cfg):
    """The config as a dict with every model default filled in."""
    return {**cfg.to_dict(), "model": dataclasses.asdict(model_config(cfg, num_tasks=1))}


def printed(capsys, *args):
    assert main(["config", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_config_prints_every_default_key_with_a_comment_and_loads_back(kind, capsys, tmp_path):
    text = printed(capsys, "--data", kind)
    values = tomllib.loads(text)
    expected = default_config(kind)
    path = tmp_path / "run.toml"
    path.write_text(text)
    table = ["data.path=\"data.csv\"", "data.target_columns=[\"target_a\", \"target_b\"]"] if kind == "table" else []
    assert resolved(load_config(str(path))) == resolved(load_config(None, [f"data.kind={kind}", *table]))
    for section in ("data", "model", "optim"):
        shown = set(values[section]) | set(re.findall(r"^# (\w+) = \.\.\.", text.split(f"[{section}]")[1]
                                                      .split("\n[")[0], re.M))
        assert shown == set(expected[section]), section  # every key the run uses, nothing else
    key_lines = [line for line in text.splitlines() if re.match(r"^#? ?\w+ = ", line)]
    assert key_lines and all(re.search(r"  # \S", line) for line in key_lines), [
        line for line in key_lines if not re.search(r"  # \S", line)]


def test_config_keys_follow_the_data_and_model(capsys):
    seq = tomllib.loads(printed(capsys))
    assert "n" not in seq["data"] and "rho" not in seq["data"] and "tasks" in seq["data"]
    assert seq["model"]["router"] == "add" and "family" not in seq["model"]  # the demo's transformer
    ple = tomllib.loads(printed(capsys, "--data", "mmoe", "--set", "model.family=ple"))
    assert set(ple["model"]) == {"family", "seed", *MODEL_KEYS["ple"]} and ple["model"]["family"] == "ple"
    assert set(ple["data"]) == {"kind", "split", "seed", *DATA_KEYS["mmoe"]}


def test_saved_config_holds_only_the_keys_its_dataset_and_model_use(tmp_path):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--quiet", "--set", "backend=numpy", "--set",
                 "data.n_per_task=20", "--set", "data.tasks=[\"copy\", \"sort\"]", "--set", "optim.steps=2"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert set(saved["data"]) == {"kind", "split", "seed", "tasks", "n_per_task", "seq_len", "vocab_size"}
    assert "num_tasks" not in saved["model"]  # decided by the data (2 tasks here), not a config key
    # and it re-runs as it is
    assert main(["train", "--config", str(tmp_path / "r" / "config.json"), "--run-dir", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == saved


EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.toml"))


def test_one_example_per_dataset_kind():
    kinds = {read_file(ROOT / "examples" / name)["data"]["kind"] for name in EXAMPLES}
    assert kinds == set(DATA_KINDS)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains(name, tmp_path, monkeypatch):
    if "digits" in name and importlib.util.find_spec("sklearn") is None:
        pytest.skip("the digits example needs scikit-learn")
    monkeypatch.chdir(ROOT)  # paths in the examples are relative to the repository root, as documented
    values = read_file(ROOT / "examples" / name)
    small = {"sequence": ["data.n_per_task=30"], "table": []}.get(values["data"]["kind"], ["data.n=200"])
    run = tmp_path / "run"
    assert main(["train", "--config", f"examples/{name}", "--run-dir", str(run), "--quiet", "--set", "backend=numpy",
                 "--set", "optim.steps=4", "--set", "optim.eval_every=2", *[a for s in small for a in ("--set", s)]]
                ) == 0
    saved = json.loads((run / "config.json").read_text())
    for section in ("data", "model"):  # what the example sets is what ran
        for key, value in values.get(section, {}).items():
            if not (section == "data" and key in ("n", "n_per_task")):
                assert saved[section][key] == value, (section, key)
    assert (run / "results.json").is_file() and (run / "curves.png").is_file()


def test_docs_config_names_every_key_and_kind():
    text = (ROOT / "docs" / "config.md").read_text()
    for cls in (DataConfig, MultiGateConfig, ModelConfig, OptimConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text, (cls.__name__, f.name)
    for kind in DATA_KINDS:
        assert f"`{kind}`" in text
    assert "tinymoe config" in text and "examples/table.toml" in text


def test_setuptools_floor_matches_the_license_metadata():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in text  # an SPDX string: setuptools >= 77 reads it
    floor = re.search(r'"setuptools>=(\d+)', text)
    assert floor and int(floor.group(1)) >= 77
