"""Datasets: shapes and dtypes, determinism, and each generator against the formula it claims to implement."""
import csv
import itertools

import numpy as np
import pytest

from tinymoe.data import (PRIMITIVES, SequenceTasks, TabularTasks, all_compositions, cluster_of_tasks,
                          clustered_synthetic, load_table, make_task, mmoe_synthetic, multi_digits,
                          random_mapping_tasks, sequence_tasks, train_val_test_split)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- MMoE synthetic (Ma et al. 2018)

def test_mmoe_shapes_and_dtypes():
    ds = mmoe_synthetic(50, rho=0.5, d=20, m=3)
    assert isinstance(ds, TabularTasks) and len(ds) == 50 and ds.num_tasks == 2
    assert ds.x.shape == (50, 20) and ds.x.dtype == np.float32
    assert ds.y.shape == (50, 2) and ds.y.dtype == np.float32
    assert ds.task_type == "regression" and ds.task_names == ["task0", "task1"] and ds.clusters is None


def test_mmoe_deterministic_in_seed():
    a, b, c = mmoe_synthetic(30, 0.3, seed=1), mmoe_synthetic(30, 0.3, seed=1), mmoe_synthetic(30, 0.3, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x) and not np.array_equal(a.y, c.y)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 0.5, 0.9, 1.0])
def test_mmoe_weights_have_cosine_rho_and_norm_c(rho):
    w = mmoe_synthetic(1, rho, c=2.0, seed=3).meta["weights"]  # (2, d)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), [2.0, 2.0], atol=1e-12)
    assert cosine(w[0], w[1]) == pytest.approx(rho, abs=1e-12)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 0.5, 0.9])
def test_mmoe_measured_correlation_of_linear_parts_is_rho(rho):
    # Pearson r of w1ᵀx and w2ᵀx over 20,000 samples: its standard error is (1 − ρ²)/sqrt(n) ≤ 0.007, tolerance 0.03
    ds = mmoe_synthetic(20_000, rho, seed=4)
    z = ds.x.astype(np.float64) @ ds.meta["weights"].T  # (n, 2)
    assert np.corrcoef(z[:, 0], z[:, 1])[0, 1] == pytest.approx(rho, abs=0.03)


def test_mmoe_targets_follow_the_formula():
    # y_t = w_tᵀx + Σ_i sin(α_i·w_tᵀx + β_i) + ε, written here again term by term
    exact = mmoe_synthetic(200, 0.7, d=10, m=4, noise_std=0.0, seed=5)
    w, alpha, beta = exact.meta["weights"], exact.meta["alpha"], exact.meta["beta"]
    x = exact.x.astype(np.float64)
    for t in range(2):
        z = x @ w[t]
        expected = z + sum(np.sin(alpha[i] * z + beta[i]) for i in range(4))
        np.testing.assert_allclose(exact.y[:, t], expected, rtol=1e-5, atol=1e-5)
    # with noise: the residual has the stated standard deviation (0.1 ± 10% on 4,000 draws)
    noisy = mmoe_synthetic(2000, 0.7, d=10, m=4, noise_std=0.1, seed=5)
    z = noisy.x.astype(np.float64) @ noisy.meta["weights"].T
    clean = z + np.sin(z[:, :, None] * alpha + beta).sum(-1)
    assert np.std(noisy.y - clean) == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("kwargs, word", [
    (dict(n=10, rho=1.5), "rho"), (dict(n=10, rho=-1.01), "rho"), (dict(n=0, rho=0.5), "n"),
    (dict(n=10, rho=0.5, d=1), "d"), (dict(n=10, rho=0.5, m=-1), "m"), (dict(n=10, rho=0.5, noise_std=-1), "noise"),
])
def test_mmoe_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        mmoe_synthetic(**kwargs)


# ---------------------------------------------------------------- clustered many-task variant

def test_cluster_assignment_is_contiguous_blocks():
    np.testing.assert_array_equal(cluster_of_tasks(8, 3), [0, 0, 0, 1, 1, 1, 2, 2])
    counts = np.bincount(cluster_of_tasks(128, 8))
    np.testing.assert_array_equal(counts, [16] * 8)


def test_clustered_exact_cosines_when_directions_fit():
    # K + T ≤ d: cos = ρ² within a cluster and 0 across, exactly
    rho = 0.8
    ds = clustered_synthetic(100, num_tasks=12, num_clusters=3, rho=rho, d=40, m=2, seed=1)
    assert ds.y.shape == (100, 12) and ds.y.dtype == np.float32 and ds.clusters.dtype == np.int64
    np.testing.assert_array_equal(ds.clusters, cluster_of_tasks(12, 3))
    w = ds.meta["weights"]
    for s, t in itertools.combinations(range(12), 2):
        expected = rho**2 if ds.clusters[s] == ds.clusters[t] else 0.0
        assert cosine(w[s], w[t]) == pytest.approx(expected, abs=1e-10)


def test_clustered_128_tasks_high_within_cluster_low_across():
    # 128 tasks do not fit in d = 100, so v_t are random unit vectors of the 92-dim complement:
    # within-cluster cos = 0.81 + 0.19·v_sᵀv_t with |v_sᵀv_t| ≲ 0.5, across-cluster cos = 0.19·v_sᵀv_t
    ds = clustered_synthetic(64, num_tasks=128, num_clusters=8, rho=0.9, seed=2)
    w = ds.meta["weights"]
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-10)
    cos = w @ w.T
    same = ds.clusters[:, None] == ds.clusters[None, :]
    off_diagonal = ~np.eye(128, dtype=bool)
    assert cos[same & off_diagonal].min() > 0.65
    assert np.abs(cos[~same]).max() < 0.15
    # the cluster base vectors are orthonormal: the cluster means of w are mutually ≈ orthogonal
    means = np.stack([w[ds.clusters == k].mean(0) for k in range(8)])
    gram = means @ means.T / np.outer(np.linalg.norm(means, axis=1), np.linalg.norm(means, axis=1))
    assert np.abs(gram - np.eye(8)).max() < 0.1


def test_clustered_measured_target_correlation_follows_clusters():
    ds = clustered_synthetic(5000, num_tasks=6, num_clusters=2, rho=0.9, seed=3)
    r = np.corrcoef(ds.y, rowvar=False)
    same = ds.clusters[:, None] == ds.clusters[None, :]
    assert r[same & ~np.eye(6, dtype=bool)].min() > 0.5 and np.abs(r[~same]).max() < 0.1


def test_clustered_deterministic_and_validated():
    a, b = clustered_synthetic(20, 4, 2, seed=7), clustered_synthetic(20, 4, 2, seed=7)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.y, clustered_synthetic(20, 4, 2, seed=8).y)
    with pytest.raises(ValueError, match="num_clusters"):
        clustered_synthetic(10, num_tasks=3, num_clusters=4)
    with pytest.raises(ValueError, match="d=5"):
        clustered_synthetic(10, num_tasks=8, num_clusters=5, d=5)
    with pytest.raises(ValueError, match="num_tasks"):
        clustered_synthetic(10, num_tasks=0, num_clusters=1)


# ---------------------------------------------------------------- composed sequence tasks (Gupta et al. 2022)

@pytest.mark.parametrize("name, x, expected", [
    ("copy", [4, 0, 7], [4, 0, 7]),
    ("reverse", [1, 2, 3], [3, 2, 1]),
    ("sort", [3, 1, 2, 1], [1, 1, 2, 3]),
    ("shift", [1, 2, 3, 4], [4, 1, 2, 3]),           # roll right by one
    ("cumsum", [5, 6, 7, 2], [5, 1, 8, 0]),          # 5, 11, 18, 20 mod 10
    ("increment", [9, 0, 3], [0, 1, 4]),
    ("negate", [0, 3, 9], [0, 7, 1]),
    ("cummax", [2, 5, 1, 7, 3], [2, 5, 5, 7, 7]),
])
def test_primitives_on_hand_written_examples(name, x, expected):
    out = PRIMITIVES[name](np.array([x]), 10)
    np.testing.assert_array_equal(out, [expected])
    task = make_task((name,), seq_len=len(x), vocab_size=10)
    np.testing.assert_array_equal(task(np.array([x])), [expected])


def test_primitives_respect_vocab_size():
    np.testing.assert_array_equal(PRIMITIVES["cumsum"](np.array([[2, 2, 2]]), 3), [[2, 1, 0]])
    np.testing.assert_array_equal(PRIMITIVES["increment"](np.array([[2, 0]]), 3), [[0, 1]])


def test_composition_applies_parts_left_to_right():
    x = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(make_task(("reverse", "cumsum"), seq_len=3)(x), [[3, 5, 6]])
    np.testing.assert_array_equal(make_task(("cumsum", "reverse"), seq_len=3)(x), [[6, 3, 1]])
    np.testing.assert_array_equal(make_task("cumsum+reverse", seq_len=3)(x), [[6, 3, 1]])
    np.testing.assert_array_equal(make_task(("sort", "shift", "increment"), seq_len=3)(np.array([[3, 1, 2]])),
                                  [[4, 2, 3]])


def test_make_task_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'rotate'.*known primitives.*cumsum"):
        make_task(("reverse", "rotate"))
    with pytest.raises(ValueError, match="non-empty"):
        make_task(())
    with pytest.raises(ValueError, match="vocab_size"):
        make_task(("copy",), vocab_size=1)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        make_task(("copy",))(np.zeros((2, 5), dtype=int))


def test_all_compositions_are_distinct_functions():
    depth1 = all_compositions(max_depth=1)
    assert depth1 == [(p,) for p in PRIMITIVES]
    tasks = all_compositions(max_depth=2)
    assert tasks[:len(depth1)] == depth1 and len(tasks) > 30
    assert all(len(t) <= 2 and ("copy" not in t or len(t) == 1) for t in tasks)
    assert ("sort", "sort") not in tasks and ("reverse", "reverse") not in tasks  # = sort, = copy
    assert ("reverse", "cumsum") in tasks and ("cumsum", "reverse") in tasks
    probe = np.random.default_rng(0).integers(0, 10, (300, 8))
    outputs = {make_task(t)(probe).tobytes() for t in tasks}
    assert len(outputs) == len(tasks)


def test_sequence_tasks_shapes_counts_and_targets():
    tasks = [("reverse",), ("reverse", "cumsum"), ("sort", "increment")]
    ds = sequence_tasks(tasks, n_per_task=[300, 300, 6], seq_len=6, vocab_size=7, seed=0)
    assert isinstance(ds, SequenceTasks) and len(ds) == 606 and ds.seq_len == 6 and ds.vocab_size == 7
    for array in (ds.tokens, ds.targets, ds.task_ids):
        assert array.dtype == np.int64
    assert ds.tokens.shape == ds.targets.shape == (606, 6)
    np.testing.assert_array_equal(np.bincount(ds.task_ids), [300, 300, 6])
    assert ds.tokens.min() >= 0 and ds.tokens.max() < 7
    assert ds.task_names == ["reverse", "reverse+cumsum", "sort+increment"]
    assert ds.task_descriptions == tasks
    # every target is its task's function of its tokens
    for t, parts in enumerate(tasks):
        rows = ds.task_ids == t
        np.testing.assert_array_equal(ds.targets[rows], make_task(parts, 6, 7)(ds.tokens[rows]))
    # the examples are shuffled, not grouped by task
    assert not np.all(np.diff(ds.task_ids) >= 0)


def test_sequence_tasks_description_vocab_is_stable():
    a = sequence_tasks([("reverse", "cumsum")], 5)
    b = sequence_tasks([("sort",), ("cumsum", "reverse")] + random_mapping_tasks(2), 5)
    assert a.description_vocab == sorted(PRIMITIVES) == b.description_vocab[:len(PRIMITIVES)]
    assert b.description_vocab[len(PRIMITIVES):] == sorted({d[0] for d in b.task_descriptions[2:]},
                                                           key=lambda p: int(p[len("random"):]))
    np.testing.assert_array_equal(a.description_ids(0), [a.description_vocab.index("reverse"),
                                                         a.description_vocab.index("cumsum")])
    np.testing.assert_array_equal(b.description_ids(1), a.description_ids(0)[::-1])


def test_sequence_tasks_deterministic_and_validated():
    a, b = sequence_tasks([("sort",), ("shift",)], 20, seed=3), sequence_tasks([("sort",), ("shift",)], 20, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.task_ids, b.task_ids)
    assert not np.array_equal(a.tokens, sequence_tasks([("sort",), ("shift",)], 20, seed=4).tokens)
    with pytest.raises(ValueError, match="2 counts for 1 tasks"):
        sequence_tasks([("sort",)], [1, 2])
    with pytest.raises(ValueError, match="more than once"):
        sequence_tasks([("sort",), "sort"], 3)
    with pytest.raises(ValueError, match="known primitives"):
        sequence_tasks([("sortt",)], 3)
    with pytest.raises(ValueError, match="tasks is empty"):
        sequence_tasks([], 3)
    with pytest.raises(ValueError, match="seq_len"):
        sequence_tasks([("sort",)], 3, seq_len=0)


def test_random_mapping_tasks_are_fixed_different_functions():
    tasks = random_mapping_tasks(4, seq_len=8, vocab_size=10, seed=0)
    assert len(tasks) == 4 and all(len(t) == 1 and t[0].startswith("random") for t in tasks)
    assert tasks == random_mapping_tasks(4, seed=0) and tasks != random_mapping_tasks(4, seed=1)
    probe = np.random.default_rng(1).integers(0, 10, (200, 8))
    outputs = [make_task(t)(probe) for t in tasks]
    for out, task in zip(outputs, tasks):
        np.testing.assert_array_equal(out, make_task(task)(probe))      # same input, same output
        assert not np.array_equal(out, probe)                           # not the identity
        # a permutation of positions then of values: one token changed changes exactly one output position
        changed = probe.copy()
        changed[:, 0] = (changed[:, 0] + 1) % 10
        assert np.all((make_task(task)(changed) != out).sum(axis=1) == 1)
    for a, b in itertools.combinations(outputs, 2):
        assert not np.array_equal(a, b)
    # the mapping is a function of its name alone: the dataset's targets agree with make_task
    ds = sequence_tasks(tasks, 50, seed=9)
    for t, task in enumerate(tasks):
        rows = ds.task_ids == t
        np.testing.assert_array_equal(ds.targets[rows], make_task(task)(ds.tokens[rows]))


def test_random_mapping_tasks_fail_clearly_when_too_few_exist():
    # L = 1, V = 2: the only non-identity mapping swaps the two values
    assert len(random_mapping_tasks(1, seq_len=1, vocab_size=2)) == 1
    with pytest.raises(ValueError, match="could not find 2"):
        random_mapping_tasks(2, seq_len=1, vocab_size=2)


# ---------------------------------------------------------------- multi-digits (scikit-learn's 8×8 digits)

@pytest.mark.parametrize("mode", ["side_by_side", "overlay"])
def test_multi_digits_images_and_labels_match_the_sources(mode):
    datasets = pytest.importorskip("sklearn.datasets")
    source = datasets.load_digits()
    ds = multi_digits(mode, n=200, seed=0)
    width = 128 if mode == "side_by_side" else 64
    assert ds.x.shape == (200, width) and ds.x.dtype == np.float32 and 0 <= ds.x.min() and ds.x.max() <= 1
    assert ds.y.shape == (200, 2) and ds.y.dtype == np.int64 and ds.num_classes == 10
    assert ds.task_type == "classification" and set(np.unique(ds.y)) <= set(range(10))
    index = ds.meta["source_index"]
    np.testing.assert_array_equal(ds.y, source.target[index])
    a, b = source.images[index[:, 0]] / 16, source.images[index[:, 1]] / 16
    expected = np.concatenate([a, b], axis=2) if mode == "side_by_side" else np.maximum(a, b)
    np.testing.assert_allclose(ds.x, expected.reshape(200, -1), atol=1e-7)


def test_multi_digits_deterministic_and_source_split_is_disjoint():
    pytest.importorskip("sklearn")
    a, b = multi_digits(n=50, seed=1), multi_digits(n=50, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, multi_digits(n=50, seed=2).x)
    train = multi_digits(n=2000, source="train").meta["source_index"]
    test = multi_digits(n=500, source="test").meta["source_index"]
    assert not set(train.ravel()) & set(test.ravel())
    with pytest.raises(ValueError, match="mode"):
        multi_digits("stacked")


def test_multi_digits_without_sklearn_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    with pytest.raises(ImportError, match=r"pip install 'tinymoe\[digits\]'"):
        multi_digits(n=5)


# ---------------------------------------------------------------- CSV / .npz loader

def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_load_csv(tmp_path):
    path = write_csv(tmp_path / "t.csv", [["id", "a", "b", "y1", "y2"], ["u1", 1, 2.5, 0.5, 3],
                                          ["u2", -1, 0, 1.5, 4], ["u3", 3, 1e-3, -2, 5]])
    ds = load_table(path, ["y1", "y2"], feature_columns=["a", "b"])
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.float32 and len(ds) == 3
    np.testing.assert_allclose(ds.x, [[1, 2.5], [-1, 0], [3, 1e-3]])
    np.testing.assert_allclose(ds.y, [[0.5, 3], [1.5, 4], [-2, 5]])
    assert ds.task_names == ["y1", "y2"] and ds.num_classes is None
    cls = load_table(path, "y2", feature_columns=["a", "b", "y1"], task_type="classification")
    assert cls.y.dtype == np.int64 and cls.y[:, 0].tolist() == [3, 4, 5] and cls.num_classes == 6


def test_load_csv_default_features_are_the_other_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", [["a", "y", "b"], [1, 2, 3], [4, 5, 6], []])  # trailing blank line
    ds = load_table(path, ["y"])
    np.testing.assert_allclose(ds.x, [[1, 3], [4, 6]])
    assert ds.meta["feature_names"] == ["a", "b"]


@pytest.mark.parametrize("rows, kwargs, pattern", [
    ([["a", "y"], [1, 2], [3, ""]], {}, r"column 'y' is empty at row 1 \(line 3"),
    ([["a", "y"], [1, 2], ["nan", 4]], {}, r"column 'a' has a missing \(NaN\).*row 1 \(line 3"),
    ([["a", "y"], [1, "two"], [3, 4]], {}, r"column 'y', row 0 \(line 2.*'two' is not a number"),
    ([["a", "y"], [1, 2], [3, 4.5]], dict(task_type="classification"), r"target 'y' has 4.5 at row 1.*integers"),
    ([["a", "y"], [1, -1]], dict(task_type="classification"), r"target 'y' has -1.0 at row 0"),
    ([["a", "y"], [1, 2]], dict(feature_columns=["a", "zz"]), r"no column \['zz'\]; available columns: \['a', 'y'\]"),
    ([["a", "y"], [1, 2, 3]], {}, r"line 2: 3 fields"),
])
def test_load_csv_errors_name_column_and_row(tmp_path, rows, kwargs, pattern):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=pattern) as info:
        load_table(path, ["y"], **kwargs)
    assert "bad.csv" in str(info.value)


def test_load_table_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_table(tmp_path / "missing.csv", ["y"])
    (tmp_path / "t.xlsx").write_text("a,y\n1,2\n")
    with pytest.raises(ValueError, match=r"'\.xlsx'.*\.csv.*\.npz"):
        load_table(tmp_path / "t.xlsx", ["y"])
    path = write_csv(tmp_path / "t.csv", [["a", "y"], [1, 2]])
    with pytest.raises(ValueError, match=r"target_columns.*\['a', 'y'\]"):
        load_table(path)
    with pytest.raises(ValueError, match="task_type"):
        load_table(path, ["y"], task_type="ranking")


def test_load_npz_by_column(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, a=np.array([1.0, 2.0, 3.0]), b=np.array([0, 1, 0]), label=np.array([2, 0, 1]),
             name=np.array(["x", "y", "z"]))
    ds = load_table(path, ["label"], feature_columns=["a", "b"], task_type="classification")
    np.testing.assert_allclose(ds.x, [[1, 0], [2, 1], [3, 0]])
    assert ds.y[:, 0].tolist() == [2, 0, 1] and ds.num_classes == 3
    with pytest.raises(ValueError, match=r"column 'name' has dtype <U1, not numbers"):
        load_table(path, ["label"])                       # default features include the text column
    np.savez(path, a=np.array([1.0, np.nan]), y=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"column 'a' has a missing \(NaN\).*row 1"):
        load_table(path, ["y"])


def test_load_npz_x_y_layout(tmp_path):
    path = tmp_path / "xy.npz"
    x, y = np.arange(12.0).reshape(4, 3), np.arange(8.0).reshape(4, 2)
    np.savez(path, x=x, y=y, task_names=np.array(["ctr", "cvr"]))
    ds = load_table(path)                                 # every task by default
    np.testing.assert_allclose(ds.x, x)
    np.testing.assert_allclose(ds.y, y)
    assert ds.task_names == ["ctr", "cvr"]
    one = load_table(path, "cvr")
    np.testing.assert_allclose(one.y[:, 0], y[:, 1])
    np.testing.assert_allclose(one.x, x)                  # features default to x, never the other task
    assert one.meta["feature_names"] == ["x0", "x1", "x2"] and one.task_names == ["cvr"]
    with pytest.raises(ValueError, match=r"no column \['ctrr'\].*available columns: \['x0', 'x1', 'x2', 'ctr'"):
        load_table(path, "ctrr")


# ---------------------------------------------------------------- containers and splits

def test_tabular_subset_and_validation():
    ds = mmoe_synthetic(10, 0.5, d=4, m=1)
    sub = ds.subset([2, 5])
    np.testing.assert_array_equal(sub.x, ds.x[[2, 5]])
    assert len(sub) == 2 and sub.task_names == ds.task_names
    with pytest.raises(ValueError, match="task names"):
        TabularTasks(x=np.zeros((3, 2)), y=np.zeros((3, 2)), task_names=["only one"])


@pytest.mark.parametrize("make", [lambda: mmoe_synthetic(101, 0.5, d=5, m=1),
                                  lambda: sequence_tasks([("sort",), ("reverse",), ("shift",)], [60, 30, 11])])
def test_splits_are_disjoint_and_cover_the_data(make):
    ds = make()
    parts = train_val_test_split(ds, (0.8, 0.1, 0.1), seed=0)
    assert set(parts) == {"train", "val", "test"}

    def rows(d):  # each example as bytes, to compare the parts as sets
        table = d.x if isinstance(d, TabularTasks) else np.concatenate([d.tokens, d.task_ids[:, None]], axis=1)
        return {r.tobytes() for r in table}

    sizes = [len(parts[k]) for k in ("train", "val", "test")]
    assert sum(sizes) == len(ds) and sizes[0] > sizes[1] > 0 and sizes[2] > 0
    everything = rows(ds)
    assert len(everything) == len(ds)                     # rows are unique, so set algebra checks the split
    train, val, test = rows(parts["train"]), rows(parts["val"]), rows(parts["test"])
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == everything
    again = train_val_test_split(ds, seed=0)["test"]
    assert rows(again) == test and rows(train_val_test_split(ds, seed=1)["test"]) != test


def test_sequence_split_is_stratified_by_task():
    ds = sequence_tasks([("sort",), ("cumsum",)], [200, 20])
    parts = train_val_test_split(ds, (0.5, 0.25, 0.25))
    np.testing.assert_array_equal(np.bincount(parts["train"].task_ids, minlength=2), [100, 10])
    np.testing.assert_array_equal(np.bincount(parts["test"].task_ids, minlength=2), [50, 5])
    with pytest.raises(ValueError, match="summing to 1"):
        train_val_test_split(ds, (0.5, 0.5, 0.5))
