"""tm.load(path, which=...): the best-on-validation weights by default (what `tinymoe eval` reports), the last
step's with which="last"; and a run that stops on bad input leaves no folder behind."""
import json

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.cli import main
from tinymoe.config import load_config
from tinymoe.runs import load_run, train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose best validation eval is not its last one (so best and last weights differ)."""
    folder = tmp_path_factory.mktemp("which") / "run"
    assert main(["train", "--run-dir", str(folder), "--quiet", "--set", "backend=numpy", "--set",
                 "data.n_per_task=40", "--set", "data.tasks=[\"copy\", \"reverse\"]", "--set", "optim.steps=4",
                 "--set", "optim.eval_every=2", "--set", "optim.warmup_steps=1"]) == 0
    means = [json.loads(line)["val"]["mean"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert means.index(max(means)) < len(means) - 1
    return folder


def weights(model):
    return model.state_dict()


def test_default_is_the_best_on_validation_model(run):
    path = run / "checkpoint.safetensors"
    best, last = tm.load(path), tm.load(path, which="last")
    assert weights(best).keys() == weights(last).keys()
    assert any(not np.array_equal(weights(best)[k], weights(last)[k]) for k in weights(best))
    _, evaluated, _ = load_run(run)  # what `tinymoe eval` uses
    for k, v in weights(evaluated).items():
        np.testing.assert_array_equal(weights(best)[k], v)
    assert all(np.array_equal(weights(tm.load(path, which="best"))[k], v) for k, v in weights(best).items())


def test_a_plain_saved_model_has_one_set_of_weights(tmp_path):
    model = tm.nn.MultiGateMoE(4, 3, 3, 2, seed=4)
    tm.save(tmp_path / "m.safetensors", model)
    for which in ("best", "last"):
        loaded = weights(tm.load(tmp_path / "m.safetensors", which=which))
        assert all(np.array_equal(loaded[k], v) for k, v in weights(model).items())
    with pytest.raises(ValueError, match=r"which must be one of \('best', 'last'\)"):
        tm.load(tmp_path / "m.safetensors", which="final")


def test_resume_without_a_run_leaves_no_folder(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume", "--quiet"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_bad_input_found_during_training_removes_the_new_folder(tmp_path, monkeypatch):
    import tinymoe.train

    def refuse(*args, **kwargs):
        raise ValueError("fit: the training set is empty")

    monkeypatch.setattr(tinymoe.train, "fit", refuse)
    cfg = load_config(None, ["backend=numpy", "data.n_per_task=20", f"out={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="training set is empty"):
        train_run(cfg, log=lambda *a: None, progress=False)
    assert list((tmp_path / "runs").iterdir()) == []
    existing = tmp_path / "mine"  # a folder the user made is never removed
    existing.mkdir()
    with pytest.raises(ValueError):
        train_run(cfg, run_dir=str(existing), log=lambda *a: None, progress=False)
    assert existing.is_dir()
