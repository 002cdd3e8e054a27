"""A family of sequence tasks that share parts: compositions of primitive operations on digit sequences.

Built to test the three claims of Gupta et al. 2022, "Sparsely Activated Mixture-of-Experts are Robust
Multi-Task Learners" (arXiv 2204.07689): (i) transfer to a low-resource task from related tasks, (ii) few-shot
generalisation to unseen compositions by reusing the routing of their parts, (iii) robustness to adding
unrelated tasks. An input is L tokens from a vocabulary of V digits; a task maps it to L per-position targets.

* A primitive is one operation on a batch of sequences, (N, L) -> (N, L), all arithmetic mod V.
* A task is a composition of primitives applied left to right: ("reverse", "cumsum") first reverses, then takes
  the cumulative sum. Its name is "reverse+cumsum" and its description is the tuple of parts.
* An unrelated task "random<k>" is a fixed random mapping drawn from k alone: a permutation of the positions
  followed by a permutation of the vocabulary, so it shares no structure with the primitives.
* Two kinds of unrelated task that conflict with the primitives rather than sit beside them: "value<k>" keeps
  every position and maps each value through a fixed random permutation of the vocabulary (the same inputs as
  increment / negate, a different answer), and "memorise<k>" gives every whole input sequence its own
  pseudo-random labels (a hash of the sequence and k): nothing to generalise, only to memorise.
"""
from __future__ import annotations

import itertools
import re

import numpy as np

from .containers import SequenceTasks


def _copy(x, V):
    return x.copy()


def _reverse(x, V):
    return x[:, ::-1].copy()


def _sort(x, V):
    return np.sort(x, axis=1)


def _shift(x, V):
    return np.roll(x, 1, axis=1)                # roll right by one: out[i] = x[i − 1], out[0] = x[L − 1]


def _cumsum(x, V):
    return np.cumsum(x, axis=1) % V             # out[i] = (x[0] + ... + x[i]) mod V


def _increment(x, V):
    return (x + 1) % V


def _negate(x, V):
    return (-x) % V                             # the additive inverse mod V: out[i] + x[i] ≡ 0


def _cummax(x, V):
    return np.maximum.accumulate(x, axis=1)     # running maximum: out[i] = max(x[0], ..., x[i])


# name -> f(x, V): x (N, L) int64 with ids in [0, V) -> (N, L) int64 with ids in [0, V)
PRIMITIVES = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "shift": _shift,
    "cumsum": _cumsum,
    "increment": _increment,
    "negate": _negate,
    "cummax": _cummax,
}

_RANDOM_PART = re.compile(r"(random|value|memorise)(\d+)")


def _check_sizes(fn, seq_len, vocab_size):
    if not (isinstance(seq_len, (int, np.integer)) and seq_len >= 1):
        raise ValueError(f"{fn}: seq_len must be an int ≥ 1, got {seq_len!r}")
    if not (isinstance(vocab_size, (int, np.integer)) and vocab_size >= 2):
        raise ValueError(f"{fn}: vocab_size must be an int ≥ 2, got {vocab_size!r}")


def _random_mapping(k, seq_len, vocab_size):
    """The permutations of "random<k>": positions (L,) and values (V,), drawn from k (and the sizes) alone."""
    rng = np.random.default_rng([k, seq_len, vocab_size])
    return rng.permutation(seq_len), rng.permutation(vocab_size)


def _part_function(part, seq_len, vocab_size):
    if part in PRIMITIVES:
        return lambda x: PRIMITIVES[part](x, vocab_size)
    match = _RANDOM_PART.fullmatch(part)
    if match:
        kind, k = match.group(1), int(match.group(2))
        positions, values = _random_mapping(k, seq_len, vocab_size)
        if kind == "random":
            return lambda x: values[x[:, positions]]   # (N, L): out[:, j] = values[x[:, positions[j]]]
        if kind == "value":
            return lambda x: values[x]                 # (N, L): out[:, j] = values[x[:, j]]
        return lambda x: _memorise(x, k, vocab_size)
    raise ValueError(f"unknown task part {part!r}; known primitives: {sorted(PRIMITIVES)}, or 'random<k>', "
                     f"'value<k>', 'memorise<k>' (k an integer) for the unrelated tasks")


def _memorise(x, k, V):
    """Pseudo-random labels per whole sequence: a 64-bit mix (splitmix64 finaliser) of the sequence, k and the
    position, mod V. (N, L) -> (N, L); two different sequences get independent-looking labels."""
    x = np.asarray(x, dtype=np.uint64)
    h = np.full(x.shape[0], np.uint64(k * 0x9E3779B97F4A7C15 % 2**64), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(x.shape[1]):
            h = (h ^ (x[:, j] + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2))))
        out = np.empty(x.shape, dtype=np.int64)
        for j in range(x.shape[1]):
            z = h + np.uint64(j + 1) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            out[:, j] = (z % np.uint64(V)).astype(np.int64)
    return out


def parse_task(task) -> tuple[str, ...]:
    """A description tuple from a tuple / list of parts or a name such as "reverse+cumsum"."""
    parts = tuple(task.split("+")) if isinstance(task, str) else tuple(task)
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError(f"a task must be a non-empty composition of part names, e.g. ('reverse', 'cumsum') or "
                         f"'reverse+cumsum'; got {task!r}")
    return parts


def task_name(parts) -> str:
    return "+".join(parse_task(parts))


def make_task(parts, seq_len=8, vocab_size=10):
    """The function of a task: applies its parts left to right, (N, L) int -> (N, L) int64.

    make_task(("reverse", "cumsum"))(x) == PRIMITIVES["cumsum"](PRIMITIVES["reverse"](x, V), V).
    seq_len and vocab_size matter to "random<k>" parts (their permutations have those sizes) and for checking x.
    """
    _check_sizes("make_task", seq_len, vocab_size)
    functions = [_part_function(p, seq_len, vocab_size) for p in parse_task(parts)]

    def task(x):
        x = np.asarray(x, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != seq_len or x.min(initial=0) < 0 or x.max(initial=0) >= vocab_size:
            raise ValueError(f"task {task_name(parts)!r}: expected (N, {seq_len}) ids in [0, {vocab_size}), "
                             f"got shape {x.shape}")
        for f in functions:
            x = f(x)
        return x

    return task


def _probe(seq_len, vocab_size, n=512):
    """A fixed batch of random sequences used to tell task functions apart. (n, L)"""
    return np.random.default_rng(12345).integers(0, vocab_size, (n, seq_len))


def all_compositions(max_depth=2, seq_len=8, vocab_size=10, primitives=None) -> list[tuple[str, ...]]:
    """Every composition of 1..max_depth primitives that computes a new function, shortest first.

    Depth 1 is every primitive; longer compositions leave out "copy" (it changes nothing) and any composition
    whose function equals an earlier one's on a fixed probe batch of 512 random sequences (e.g. "sort+sort" is
    "sort", "increment+shift" is "shift+increment"), so no two returned tasks are the same function.
    """
    if not (isinstance(max_depth, (int, np.integer)) and max_depth >= 1):
        raise ValueError(f"all_compositions: max_depth must be an int ≥ 1, got {max_depth!r}")
    _check_sizes("all_compositions", seq_len, vocab_size)
    names = list(PRIMITIVES) if primitives is None else list(primitives)
    unknown = [p for p in names if p not in PRIMITIVES]
    if unknown:
        raise ValueError(f"all_compositions: unknown primitives {unknown}; known: {sorted(PRIMITIVES)}")
    probe = _probe(seq_len, vocab_size)
    seen, tasks = set(), []
    for depth in range(1, max_depth + 1):
        pool = names if depth == 1 else [p for p in names if p != "copy"]
        for parts in itertools.product(pool, repeat=depth):
            signature = make_task(parts, seq_len, vocab_size)(probe).tobytes()
            if signature not in seen:
                seen.add(signature)
                tasks.append(parts)
    return tasks


def random_mapping_tasks(num, seq_len=8, vocab_size=10, seed=0, kind="random") -> list[tuple[str, ...]]:
    """`num` unrelated tasks [("random<k>",), ...] for claim (iii), with k drawn from `seed`.

    Each "random<k>" is a fixed function of k (for the given seq_len and vocab_size): a random permutation of the
    positions, then a random permutation of the vocabulary at every position. The returned mappings are pairwise
    different and none is the identity. kind="value" returns value-only maps "value<k>" (positions kept) and
    kind="memorise" per-sequence random labels "memorise<k>" (see the module docstring).
    """
    if kind not in ("random", "value", "memorise"):
        raise ValueError(f"random_mapping_tasks: kind must be 'random', 'value' or 'memorise', got {kind!r}")
    _check_sizes("random_mapping_tasks", seq_len, vocab_size)
    if not (isinstance(num, (int, np.integer)) and num >= 0):
        raise ValueError(f"random_mapping_tasks: num must be an int ≥ 0, got {num!r}")
    rng = np.random.default_rng(seed)
    tasks, seen = [], {(tuple(range(seq_len)), tuple(range(vocab_size)))}  # the identity is not unrelated
    for _ in range(100 * num + 100):
        if len(tasks) == num:
            return tasks
        k = int(rng.integers(0, 10_000))
        positions, values = _random_mapping(k, seq_len, vocab_size)
        if kind == "value":
            positions = np.arange(seq_len)          # value maps keep the positions
        key = (tuple(positions.tolist()), tuple(values.tolist()))
        if kind == "memorise" or key not in seen:  # distinct (positions, values) pairs are distinct functions
            seen.add(key)
            tasks.append((f"{kind}{k}",))
    raise ValueError(f"random_mapping_tasks: could not find {num} different mappings for seq_len={seq_len}, "
                     f"vocab_size={vocab_size}; ask for fewer or use longer sequences / a larger vocabulary")


def sequence_tasks(tasks, n_per_task, seq_len=8, vocab_size=10, seed=0, description_vocab=None) -> SequenceTasks:
    """A SequenceTasks with n_per_task[t] examples of task t, inputs uniform over [0, V)^L, examples shuffled.

    tasks: description tuples (or names "a+b"), e.g. [("reverse",), ("reverse", "cumsum"), ("random17",)].
    n_per_task: one int for every task, or a list with one count per task (e.g. 1% of the data for one task, a
    low-resource task; 0 keeps a task in the list without examples, e.g. a held-out task).
    description_vocab: defaults to every primitive (sorted) followed by the random parts used (sorted), so a
    primitive has the same id in every dataset; pass a list to share one vocabulary across datasets.
    """
    fn = "sequence_tasks"
    _check_sizes(fn, seq_len, vocab_size)
    descriptions = [parse_task(t) for t in tasks]
    if not descriptions:
        raise ValueError(f"{fn}: tasks is empty; pass a list of description tuples, e.g. all_compositions()")
    names = [task_name(d) for d in descriptions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{fn}: tasks {duplicates} appear more than once")
    counts = [n_per_task] * len(descriptions) if np.isscalar(n_per_task) else list(n_per_task)
    if len(counts) != len(descriptions):
        raise ValueError(f"{fn}: n_per_task has {len(counts)} counts for {len(descriptions)} tasks")
    if any(not isinstance(c, (int, np.integer)) or c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"{fn}: n_per_task must be ints ≥ 0 with a positive total, got {n_per_task!r}")
    functions = [make_task(d, seq_len, vocab_size) for d in descriptions]  # raises on unknown parts

    used = {p for d in descriptions for p in d}
    if description_vocab is None:
        extra = sorted(used - set(PRIMITIVES), key=lambda p: (_RANDOM_PART.fullmatch(p).group(1),
                                                               int(_RANDOM_PART.fullmatch(p).group(2))))
        description_vocab = sorted(PRIMITIVES) + extra
    elif not used <= set(description_vocab):
        raise ValueError(f"{fn}: parts {sorted(used - set(description_vocab))} are missing from description_vocab")

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (sum(counts), seq_len))            # (N, L)
    task_ids = np.repeat(np.arange(len(descriptions)), counts)             # (N,) grouped by task
    targets = np.empty_like(tokens)                                         # (N, L)
    for t, f in enumerate(functions):
        rows = task_ids == t
        targets[rows] = f(tokens[rows])
    order = rng.permutation(len(tokens))                                   # shuffle so batches mix tasks
    return SequenceTasks(tokens=tokens[order], targets=targets[order], task_ids=task_ids[order], task_names=names,
                         task_descriptions=descriptions, description_vocab=list(description_vocab),
                         vocab_size=vocab_size)
