"""Bad input gives a clear error: the right exception type, and a message that names the problem (and, where there
is one, the allowed choice). Each `match` is a regular expression searched in the message."""
import numpy as np
import pytest

import tinymoe as tm

MoE = tm.nn.MoE
X = np.zeros((3, 8), np.float32)


@pytest.mark.parametrize("gate", ["top_k", "noisy_top_k", "dselect_k", "expert_choice", "hash"])
def test_k_greater_than_num_experts(gate):
    with pytest.raises(ValueError, match=r"k=5 > num_experts=4"):
        MoE(8, 16, 4, gate=gate, k=5)
    with pytest.raises(ValueError, match=r"k=5 > num_experts=4"):
        tm.MoETransformer(tm.ModelConfig(d_model=16, n_heads=2, num_experts=4, k=5, gate=gate))


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_k_not_a_positive_integer(k):
    with pytest.raises(ValueError, match=r"k must be an integer ≥ 1, got " + str(k)):
        MoE(8, 16, 4, k=k)


@pytest.mark.parametrize("c", [0, 0.0, -1.0, float("nan")])
def test_capacity_factor_must_be_positive(c):
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0"):
        MoE(8, 16, 4, capacity_factor=c)


def test_num_experts_must_be_positive():
    with pytest.raises(ValueError, match=r"num_experts must be ≥ 1, got 0"):
        MoE(8, 16, 0)


def test_unknown_gate_router_activation_priority():
    with pytest.raises(ValueError, match=r"unknown gate 'topk'.*top_k"):
        MoE(8, 16, 4, gate="topk")
    with pytest.raises(ValueError, match=r"unknown gate 'nope'"):
        tm.MoETransformer(tm.ModelConfig(d_model=16, n_heads=2, gate="nope"))
    with pytest.raises(ValueError, match=r"unknown router 'tsk'.*'task'"):
        MoE(8, 16, 4, router="tsk", num_tasks=2)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*gelu"):
        MoE(8, 16, 4, activation="swish")(X)  # at construction or, at the latest, at the first call
    with pytest.raises(ValueError, match=r"priority must be 'slot' or 'weight', got 'random'"):
        MoE(8, 16, 4, capacity_factor=1.0, priority="random")
    with pytest.raises(ValueError, match=r"gate must be 'softmax', 'top_k' or 'dselect_k', got 'noisy_top_k'"):
        tm.nn.MultiGateMoE(4, 3, 4, 2, gate="noisy_top_k")


@pytest.mark.parametrize("router", ["concat", "add", "task", "multi_gate"])
def test_task_router_needs_num_tasks_and_task_ids(router):
    with pytest.raises(ValueError, match=rf"router='{router}'.*num_tasks"):
        MoE(8, 16, 4, router=router)
    moe = MoE(8, 16, 4, router=router, num_tasks=2)
    with pytest.raises(ValueError, match=rf"router='{router}' needs task_ids"):
        moe(X)
    model = tm.MoETransformer(tm.ModelConfig(d_model=16, n_heads=2, num_tasks=2, router=router, moe_every=1))
    with pytest.raises(ValueError, match=r"task_ids"):
        model(np.zeros((1, 5), int))


@pytest.mark.parametrize("ids,shown", [([0, 1, 2], r"\[0, 2\]"), ([0, -1, 1], r"\[-1, 1\]")])
def test_task_ids_out_of_range(ids, shown):
    moe = MoE(8, 16, 4, router="add", num_tasks=2)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\), got " + shown):
        moe(X, task_ids=np.array(ids))
    model = tm.MoETransformer(tm.ModelConfig(d_model=16, n_heads=2, num_tasks=2, router="task", moe_every=1))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        model(np.zeros((1, 5), int), task_ids=np.array([2]))


def test_task_ids_must_be_integers_of_the_right_shape():
    moe = MoE(8, 16, 4, router="add", num_tasks=2)
    with pytest.raises(TypeError, match=r"task_ids must be integers, got dtype float64"):
        moe(X, task_ids=np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"task_ids must have shape \(3,\).*got \(2,\)"):
        moe(X, task_ids=np.array([0, 1]))


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9)])
def test_wrong_input_width(shape):
    with pytest.raises(ValueError, match=r"x must be \(N, 8\) or \(B, T, 8\), got " + str(shape).replace("(", r"\(").replace(")", r"\)")):
        MoE(8, 16, 4)(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"x must be \(N, 4\), got"):
        tm.nn.MultiGateMoE(4, 3, 4, 2)(np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("shape", [(8,), (1, 2, 3, 8)])
def test_wrong_input_rank(shape):
    with pytest.raises(ValueError, match=r"x must be \(N, 8\) or \(B, T, 8\)"):
        MoE(8, 16, 4)(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"MultiGateMoE: x must be \(N, 4\)"):
        tm.nn.MultiGateMoE(4, 3, 4, 2)(np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        tm.MoETransformer(tm.ModelConfig(d_model=16, n_heads=2))(np.zeros(5, int))


def test_hash_gate_without_ids():
    moe = MoE(8, 16, 4, gate="hash", k=2)
    with pytest.raises(ValueError, match=r"gate='hash' routes by id: pass token_ids="):
        moe(X)
    with pytest.raises(ValueError, match=r"one id per token \(3\), got 2"):
        moe(X, token_ids=[1, 2])


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model=30 must be divisible by n_heads=4"):
        tm.ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by num_heads=4"):
        tm.nn.MultiHeadAttention(30, 4)


def test_sequence_longer_than_max_seq_len():
    model = tm.MoETransformer(tm.ModelConfig(max_seq_len=4, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match=r"sequence length 5 > max_seq_len=4"):
        model(np.zeros((1, 5), int))
    model(np.zeros((1, 4), int))  # the limit itself is fine


def test_task_descriptions_must_match_num_tasks():
    with pytest.raises(ValueError, match=r"2 task_descriptions for num_tasks=3"):
        tm.ModelConfig(num_tasks=3, task_descriptions=[[0], [1]])


def test_misspelled_aux_weight_is_an_error():
    with pytest.raises(ValueError, match="unknown aux_weights.*load_balence"):
        tm.nn.MoE(8, 16, 4, aux_weights={"load_balence": 0.1})
