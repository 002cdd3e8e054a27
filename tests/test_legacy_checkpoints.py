"""Checkpoints written by an older tinymoe still load and compute what they computed then.

tests/legacy/*.safetensors were written by tinymoe at commit bc0f03f (tests/legacy/make_checkpoints.py), before
the MoE layer was rebuilt around per-gate specs: every gate and router of `MoE`, each `MultiGateMoE` gate, the
shared-bottom baseline (saved under its old registry name) and a transformer. Each holds a fixed input and the
output that version computed; these tests rebuild the model from the file alone and compare."""
import glob
import os

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import checkpoint as ckpt

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "legacy")
FILES = sorted(glob.glob(os.path.join(HERE, "*.safetensors")))


def name_of(path):
    return os.path.basename(path).removesuffix(".safetensors")


def test_the_legacy_files_are_there():
    assert len(FILES) == 15, "tests/legacy/ lost a checkpoint: restore it from git, never regenerate it"


@pytest.fixture(autouse=True)
def numpy_backend():
    with tm.use_backend("numpy"):
        yield


@pytest.mark.parametrize("path", [f for f in FILES if name_of(f).startswith("moe_")], ids=name_of)
def test_an_old_moe_layer_loads_and_computes_the_same(path):
    ck = ckpt.load_checkpoint(path)
    moe, ex = ck.model, ck.extra_tensors
    assert isinstance(moe, tm.nn.MoE) and ck.model_class == "tinymoe.nn.MoE"
    call = {"token_ids": ex["token_ids"]} if "token_ids" in ex else {"task_ids": ex["task_ids"]}
    moe.eval()
    with tm.no_grad():
        y = moe(ex["x"], **call).numpy()
        aux = moe.aux_loss()
    np.testing.assert_allclose(y, ex["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(getattr(aux, "data", aux)), ex["aux"], rtol=1e-5, atol=1e-7)
    if "y_train" in ex:  # noisy top-k: the saved noise generator draws the same noise as the old layer did
        moe.train()
        with tm.no_grad():
            np.testing.assert_allclose(moe(ex["x"], **call).numpy(), ex["y_train"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [f for f in FILES if name_of(f).startswith(("multigate_", "shared_bottom"))],
                         ids=name_of)
def test_an_old_multitask_model_loads_and_computes_the_same(path):
    ck = ckpt.load_checkpoint(path)
    model, ex = ck.model, ck.extra_tensors
    model.eval()
    with tm.no_grad():
        outs = model(ex["x"])
    assert len(outs) == 2
    for t, out in enumerate(outs):
        np.testing.assert_allclose(out.numpy(), ex[f"y{t}"], rtol=1e-5, atol=1e-6)


def test_the_old_shared_bottom_name_still_resolves():
    ck = ckpt.load_checkpoint(os.path.join(HERE, "shared_bottom.safetensors"))
    assert ck.model_class == "tinymoe.experiments.SharedBottom"
    assert type(ck.model).__name__ == "SharedBottom"


def test_an_old_transformer_loads_and_computes_the_same():
    ck = ckpt.load_checkpoint(os.path.join(HERE, "transformer_add.safetensors"))
    model, ex = ck.model, ck.extra_tensors
    model.eval()
    with tm.no_grad():
        y = model(ex["tokens"], task_ids=ex["task_ids"]).numpy()
    np.testing.assert_allclose(y, ex["y"], rtol=1e-5, atol=1e-5)
