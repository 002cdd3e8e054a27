"""The MoE layer: each token goes to k of E expert FFNs, chosen by a learned router and a gate.

    moe = tm.nn.MoE(d_model=32, d_ff=64, num_experts=8, gate="top_k", k=2, capacity_factor=None, router="token")
    y = moe(x, task_ids=None)        # x (N, d) or (B, T, d)
    moe.aux_losses                   # {"load_balance": Tensor, "z_loss": Tensor, ...} for the last call
    moe.last_routing                 # RoutingStats: per-expert counts, drops, the routing itself

Read top to bottom: `Experts` (the E FFNs, stacked), `RoutingStats` (what a forward did), `MoEConfig` (every
option, with why), `GATE_SPECS` (what each gate needs from the layer), then `MoE`, whose forward is

    h       = router(x, task)                       # tinymoe.nn.routers: what the gate sees
    routing = GATE_SPECS[gate].route(h, ...)        # tinymoe.gates: which experts, with what weights
    keep    = capacity_keep(routing)                # drop what overflows an expert (capacity mode only)
    y       = sparse_mixture(x, routing, keep)      # tinymoe.moe_ops: gather, expert FFNs, combine
    y      += shared experts (x)

The math of gates, capacity and the auxiliary losses is written out in docs/design.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass
from typing import Callable

import numpy as np

from .. import backends, gates
from .. import dispatch as reference
from .. import losses as L
from ..arrays import array_module, host_min_max, to_host
from ..moe_ops import sparse_mixture
from ..engine import Tensor, check_device
from .layers import FeedForward
from .module import Module, ModuleList, Parameter, make_rng
from .routers import Router


class Experts(Module):
    """E independent FFNs stored stacked: w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out).

    Each expert is initialised like a Linear pair: U(−1/√d, 1/√d) and U(−1/√f, 1/√f), biases zero.
    """

    def __init__(self, num_experts, d_model, d_ff, d_out=None, seed=None, dtype=np.float32):
        rng = make_rng(seed)
        d_out = d_out or d_model
        self.w1 = Parameter(rng.uniform(-1, 1, (num_experts, d_model, d_ff)).astype(dtype) / np.sqrt(d_model).astype(dtype))
        self.b1 = Parameter(np.zeros((num_experts, d_ff), dtype))
        self.w2 = Parameter(rng.uniform(-1, 1, (num_experts, d_ff, d_out)).astype(dtype) / np.sqrt(d_ff).astype(dtype))
        self.b2 = Parameter(np.zeros((num_experts, d_out), dtype))

    def extra_repr(self):
        E, d, f = self.w1.shape
        return f"num_experts={E}, d={d}, f={f}, d_out={self.w2.shape[2]}"


class RoutingStats:
    """What the last forward did: the routing and per-expert counts (for logs, plots and tests).

    Fields (host NumPy arrays): expert_idx (T, k_slots); weights (T, k_slots); keep (T, k_slots) bool, the
    assignments actually computed; chosen (T, k_slots) bool, the ones the gate asked for (before capacity drops);
    counts (E,) assignments computed per expert; dropped (E,) assignments dropped by capacity per expert;
    task_ids (T,) or None; num_experts. A forward on a GPU keeps its arrays there: each field is copied to the
    host the first time it is read, so recording them costs a training step nothing."""

    FIELDS = ("expert_idx", "weights", "keep", "chosen", "counts", "dropped", "task_ids")

    def __init__(self, expert_idx, weights, keep, chosen, counts, dropped, task_ids, num_experts):
        self._arrays = dict(zip(self.FIELDS, (expert_idx, weights, keep, chosen, counts, dropped, task_ids)))
        self.num_experts = num_experts

    def __getattr__(self, name):
        arrays = self.__dict__.get("_arrays")
        if arrays is None or name not in arrays:
            raise AttributeError(f"RoutingStats has no attribute {name!r}")
        value = arrays[name]
        if value is not None and not isinstance(value, np.ndarray):
            arrays[name] = value = to_host(value)  # the first read copies it from the device
        return value

    def __repr__(self):
        return f"RoutingStats(num_experts={self.num_experts}, counts={self.counts.tolist()}, dropped={self.dropped.tolist()})"

    def expert_load(self):
        """f_i: the share of computed assignments that went to each expert (E,); uniform is 1/E."""
        return self.counts / max(self.counts.sum(), 1)

    def task_expert_load(self, num_tasks=None):
        """(num_tasks, E) count of computed assignments per task and expert (needs task ids)."""
        if self.task_ids is None:
            raise ValueError("task_expert_load: the last forward had no task_ids")
        num_tasks = num_tasks or int(self.task_ids.max()) + 1
        table = np.zeros((num_tasks, self.num_experts), dtype=np.int64)
        tasks = np.broadcast_to(self.task_ids[:, None], self.keep.shape)
        np.add.at(table, (tasks[self.keep], self.expert_idx[self.keep]), 1)
        return table

    @property
    def tokens_dropped(self):
        """Tokens that the gate routed somewhere but that no expert computed (their MoE output is 0)."""
        return int((self.chosen.any(axis=1) & ~self.keep.any(axis=1)).sum())


# ---- the configuration --------------------------------------------------------------------------------------------


@dataclass
class MoEConfig:
    """Every option of an MoE layer. `MoE(...)` takes these fields as its keywords (the first ten also by position)."""

    d_model: int  # token width d: the layer maps (·, d) -> (·, d)
    d_ff: int  # hidden width f of each expert's FFN d -> f -> d
    num_experts: int  # E: more experts, more parameters, the same compute per token
    gate: str = "top_k"  # how the routing is made from h: a key of GATE_SPECS (tinymoe.gates)
    k: int = 2  # experts per token (a dense gate uses all E)
    capacity_factor: float | None = None  # None: dropless; c: the capacity C = ⌈c·T·k/E⌉ (docs/design.md §3)
    router: str = "token"  # what the router sees: token | concat | add | task | multi_gate (tinymoe.nn.routers)
    num_tasks: int | None = None  # task ids lie in [0, num_tasks); the task-aware routers need it
    activation: str = "gelu"  # of the expert FFNs: relu | gelu | silu
    seed: int | None = 0  # weights and noise are drawn from this (None when built from a parent's Generator)
    _: KW_ONLY
    priority: str = "slot"  # who is served first when an expert overflows: slot (GShard) | weight (BPR)
    num_shared_experts: int = 0  # always-on dense FFNs added to the output (DeepSeekMoE's shared experts)
    task_dim: int | None = None  # width of the task embedding (default d_model)
    task_descriptions: list | None = None  # per task, part ids: task embeddings composed from parts (unseen tasks)
    num_description_parts: int | None = None  # size of the part vocabulary (default: the largest id + 1)
    gamma: float = 1.0  # DSelect-k's smooth-step width γ
    renormalize: bool | None = None  # top-k weights: softmax over the k (True) or full-softmax p_i (False)
    aux_weights: dict | None = None  # overrides of tinymoe.losses.DEFAULT_WEIGHTS for this layer
    dtype: str = "float32"  # parameter dtype ("float64" for gradient checks)


# ---- what each gate needs from the layer ---------------------------------------------------------------------------


@dataclass
class GateInputs:
    """What a gate may use besides the router's output h: the layer's settings and this call's extras."""

    k: int
    num_experts: int
    training: bool
    gamma: float = 1.0  # DSelect-k
    renormalize: bool | None = None  # top-k
    noise_logits: Tensor | None = None  # noisy top-k: the noise router's output
    noise_rng: np.random.Generator | None = None  # noisy top-k: the layer's own noise stream
    ids: np.ndarray | None = None  # hash: one token (or task) id per token
    capacity: int | None = None  # expert choice: the tokens each expert takes
    dtype: object = np.float32  # hash: the dtype of its constant weights


@dataclass(frozen=True)
class GateSpec:
    """How the MoE layer uses one gate. Adding a gate = one function in tinymoe.gates + one entry of GATE_SPECS."""

    route: Callable  # (h, GateInputs) -> gates.Routing
    width: Callable | None = lambda num_experts, k: num_experts  # router outputs; None: the gate has no router
    init: Callable | None = None  # (layer, rng) -> None: the paper's router initialisation (default U(±1/√d))
    aux: tuple = ("load_balance", "z_loss")  # losses the layer computes from the routing (a gate adds its own)
    capacity: str = "drop"  # "drop": C caps each expert after the gate | "choose": the gate takes C per expert
    dense: bool = False  # every expert computes: k is E
    noise_router: bool = False  # a second router whose output scales the noise (noisy top-k)


def init_dselect_k_(arrays, k, num_experts, gamma, rng):
    """DSelect-k's initialisation (Hazimeh et al. 2021, official code), in place on arrays whose last axis holds
    [z (k·m) | α (k)]: z ~ U(±γ/100), so every smooth step starts at S(z) ≈ ½ and all experts weigh the same
    (dense-to-sparse training), and α ~ U(±0.05)."""
    km = k * gates.binary_codes(num_experts).shape[1]
    for a in arrays:
        a[..., :km] = rng.uniform(-gamma / 100, gamma / 100, a[..., :km].shape)
        a[..., km:] = rng.uniform(-0.05, 0.05, a[..., km:].shape)


def _zero_routers(layer, rng):
    """Shazeer et al. 2017: W_g and W_noise start at zero (every expert ties; the noise breaks the ties)."""
    for router in (layer.router, layer.noise):
        for p in router.linear_parameters():
            p.data[...] = 0


def _init_dselect_router(layer, rng):
    c = layer.config
    init_dselect_k_([p.data for p in layer.router.linear_parameters()], c.k, c.num_experts, c.gamma, rng)


def _dselect_width(num_experts, k):
    """k selectors of m = ⌈log2 E⌉ logits each, then k selector weights α."""
    return k * gates.binary_codes(num_experts).shape[1] + k


GATE_SPECS = {
    "softmax": GateSpec(lambda h, g: gates.softmax_gate(h), aux=("z_loss",), dense=True),
    "top_k": GateSpec(lambda h, g: gates.top_k_gate(h, g.k, g.renormalize)),
    "noisy_top_k": GateSpec(lambda h, g: gates.noisy_top_k_gate(h, g.noise_logits, g.k, g.noise_rng, g.training,
                                                                 g.renormalize),
                            init=_zero_routers, noise_router=True),
    "dselect_k": GateSpec(lambda h, g: gates.dselect_k_gate(h, g.num_experts, g.k, g.gamma, g.training),
                          width=_dselect_width, init=_init_dselect_router, aux=("load_balance",)),
    "expert_choice": GateSpec(lambda h, g: gates.expert_choice_gate(h, g.capacity), aux=("z_loss",),
                              capacity="choose"),
    "hash": GateSpec(lambda h, g: gates.hash_gate(g.ids, g.num_experts, g.k, dtype=g.dtype), width=None, aux=()),
}


def check_k(name, k, num_experts):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name}: k must be an integer ≥ 1, got {k!r}")
    if k > num_experts:
        raise ValueError(f"{name}: k={k} > num_experts={num_experts}; choose k ≤ num_experts")


def _validated(c: MoEConfig) -> MoEConfig:
    if c.gate not in GATE_SPECS:
        raise ValueError(f"unknown gate {c.gate!r}; choose one of {list(GATE_SPECS)}")
    if c.num_experts < 1:
        raise ValueError(f"MoE: num_experts must be ≥ 1, got {c.num_experts}")
    if GATE_SPECS[c.gate].dense:
        c.k = c.num_experts
    check_k("MoE", c.k, c.num_experts)
    if c.capacity_factor is not None and not c.capacity_factor > 0:
        raise ValueError(f"MoE: capacity_factor must be > 0 (or None for dropless), got {c.capacity_factor}")
    if c.priority not in ("slot", "weight"):
        raise ValueError(f"MoE: priority must be 'slot' or 'weight', got {c.priority!r}")
    c.dtype = np.dtype(c.dtype).name
    if isinstance(c.seed, np.random.Generator):
        c.seed = None  # the config stays JSON; the weights come from the parent's stream (and from checkpoints)
    return c


# ---- the layer --------------------------------------------------------------------------------------------------


class MoE(Module):
    """A sparsely activated FFN layer (Shazeer et al. 2017; GShard; Switch): y = Σ_j w_j · FFN_{e_j}(x) + shared.

    MoE(d_model, d_ff, num_experts, gate="top_k", k=2, ...) with the fields of `MoEConfig` as keywords, or
    MoE(MoEConfig(...)). Parameters: router `gate.weight` (d, n) [+ `gate.bias`, task parts], `noise.*` (noisy
    top-k), `experts.w1` (E, d, f), `experts.b1`, `experts.w2` (E, f, d), `experts.b2`, `shared.i.*`.
    """

    def __init__(self, *args, **kwargs):
        given = len(args) == 1 and not kwargs and isinstance(args[0], MoEConfig)
        config = args[0] if given else MoEConfig(*args, **kwargs)
        rng = make_rng(config.seed)  # an int seed, or a parent module's Generator used as is
        c = self.config = _validated(dataclasses.replace(config))
        spec = self.spec = GATE_SPECS[c.gate]
        dtype = np.dtype(c.dtype).type
        self.aux_weights = L.aux_weights(c.aux_weights, type(self).__name__)
        self.noise_rng = np.random.default_rng(rng.integers(2**63))  # noisy top-k's own stream

        self.router = self.noise = None
        if spec.width is not None:
            def make_router():
                return Router(c.d_model, spec.width(c.num_experts, c.k), router=c.router, num_tasks=c.num_tasks,
                              task_dim=c.task_dim, task_descriptions=c.task_descriptions,
                              num_description_parts=c.num_description_parts, seed=rng, dtype=dtype)

            self.router = make_router()
            if spec.noise_router:
                self.noise = make_router()
        if spec.init is not None:
            spec.init(self, rng)
        self.experts = Experts(c.num_experts, c.d_model, c.d_ff, seed=rng, dtype=dtype)
        self.shared = ModuleList([FeedForward(c.d_model, c.d_ff, c.activation, rng, dtype)
                                  for _ in range(c.num_shared_experts)])
        self.aux_losses: dict = {}
        self.last_routing: RoutingStats | None = None

    def named_children(self):
        # the router's parameters keep the names checkpoints and the API know them by: gate.weight, gate.bias
        for name, child in super().named_children():
            yield ("gate" if name == "router" else name), child

    @property
    def gate(self):
        """The router, under the name its parameters carry (`moe.gate.weight`); prefer `moe.router`."""
        return self.router

    @property
    def num_experts(self):
        return self.config.num_experts

    @property
    def k(self):
        return self.config.k

    def extra_repr(self):
        c = self.config
        return f"gate={c.gate!r}, router={c.router!r}, E={c.num_experts}, k={c.k}, capacity_factor={c.capacity_factor}"

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x, task_ids=None, token_ids=None):
        c = self.config
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.shape[-1] != c.d_model or x.ndim not in (2, 3):
            raise ValueError(f"MoE: x must be (N, {c.d_model}) or (B, T, {c.d_model}), got {x.shape}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, c.d_model)  # (N, d)
        task_tok = self._token_task_ids(task_ids, lead)  # (N,) or None
        routing = self._route(tokens, task_tok, token_ids)

        xp = tokens.xp
        chosen = xp.ones(routing.expert_idx.shape, bool) if routing.keep is None else routing.keep  # (N, k_slots)
        keep = self._capacity_keep(routing, chosen)  # (N, k_slots) the assignments computed
        y, counts = self._mixture(tokens, routing, keep)  # (N, d), (E,)
        for ffn in self.shared:
            y = y + ffn(tokens)

        self.aux_losses = self._aux_losses(routing, chosen)
        E = c.num_experts
        dropped = xp.bincount(routing.expert_idx.reshape(-1), weights=(chosen & ~keep).reshape(-1).astype(np.float64),
                               minlength=E)  # (E,) counted by weight: no boolean selection
        self.last_routing = RoutingStats(routing.expert_idx, routing.weights.data, keep, chosen, counts,
                                         dropped.astype(np.int64), task_tok, E)  # (on the device until read)
        return y.reshape(*lead, -1)

    def _capacity_keep(self, routing: gates.Routing, chosen):
        """Capacity mode: each expert computes at most C = ⌈c·N·k/E⌉ of the chosen assignments (docs/design.md §3)."""
        c = self.config
        if c.capacity_factor is None or self.spec.capacity != "drop":
            return chosen
        C = reference.capacity(c.capacity_factor, routing.expert_idx.shape[0], c.k, c.num_experts)
        priority = routing.weights.data if c.priority == "weight" else None
        be = backends.for_arrays(routing.expert_idx, chosen)  # the backend for where the routing lives
        return be.capacity_keep(routing.expert_idx, c.num_experts, C, priority, chosen)

    def _mixture(self, tokens, routing: gates.Routing, keep):
        """y = Σ_j w_j · FFN_{e_j}(x) over the kept assignments, on the current backend; returns (y, counts (E,))."""
        c = self.config
        y, plan = sparse_mixture(tokens, routing.expert_idx, routing.weights, keep, self.experts, c.num_experts,
                                 c.activation)  # (N, d)
        return y, plan.counts

    def _route(self, tokens, task_tok, token_ids) -> gates.Routing:
        """The gate's routing of tokens (N, d): router output h, then GATE_SPECS[gate].route."""
        c, spec = self.config, self.spec
        g = GateInputs(c.k, c.num_experts, self.training, c.gamma, c.renormalize, noise_rng=self.noise_rng,
                       dtype=tokens.dtype)
        if spec.noise_router:
            g.noise_logits = self.noise(tokens, task_tok)
        if spec.capacity == "choose":
            g.capacity = reference.capacity(c.capacity_factor or 1.0, tokens.shape[0], c.k, c.num_experts)
        if self.router is None:  # routes by id (hash)
            ids = token_ids if token_ids is not None else task_tok
            if ids is None:
                raise ValueError(f"MoE: gate={c.gate!r} routes by id: pass token_ids= (vocabulary ids) or task_ids=")
            check_device("MoE (token_ids)", tokens, ids)
            g.ids = tokens.xp.asarray(ids).reshape(-1)
            if g.ids.size != tokens.shape[0]:
                raise ValueError(f"MoE: token_ids must have one id per token ({tokens.shape[0]}), got {g.ids.size}")
            return spec.route(None, g)
        return spec.route(self.router(tokens, task_tok), g)

    def _token_task_ids(self, task_ids, lead):
        """Task id per token (N,), from (N,) or (B,) ids; validated when the router needs them."""
        needs = self.router is not None and self.router.needs_tasks  # (a hash layer checks its ids in _route)
        if task_ids is None:
            if needs:
                raise ValueError(f"MoE: router={self.config.router!r} needs task_ids of shape {lead[:1]}")
            return None
        ids = task_ids.data if isinstance(task_ids, Tensor) else task_ids
        check_device("MoE (task_ids)", self._device_array(), ids)
        ids = array_module(self._device_array()).asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"MoE: task_ids must be integers, got dtype {ids.dtype}")
        if ids.shape != lead[:1] and ids.shape != lead:
            raise ValueError(f"MoE: task_ids must have shape {lead[:1]} (one per example), got {ids.shape}")
        emb = getattr(self.router, "task_embedding", None)
        limit = emb.num_tasks if emb is not None else self.config.num_tasks  # (a composed embedding can grow)
        if ids.size and limit is not None and needs:  # (ids only recorded for RoutingStats need no check here)
            low, high = host_min_max(ids)  # one copy of two numbers from the device
            if low < 0 or high >= limit:
                raise ValueError(f"MoE: task_ids must lie in [0, {limit}), got [{low}, {high}]")
        xp = array_module(ids)
        return xp.broadcast_to(ids.reshape(ids.shape + (1,) * (len(lead) - ids.ndim)), lead).reshape(-1)

    def _device_array(self):
        """An array on this layer's device (its first expert weight)."""
        return self.experts.w1.data

    def _aux_losses(self, routing: gates.Routing, chosen) -> dict:
        """The gate's own losses (routing.aux), then the ones the spec lists, computed from the routing."""
        out = dict(routing.aux)
        if "load_balance" in self.spec.aux:
            out["load_balance"] = L.load_balance(routing.probs, routing.expert_idx, chosen)
        if "z_loss" in self.spec.aux:
            out["z_loss"] = L.z_loss(routing.logits)
        return out

    def aux_loss(self):
        """Σ weight · loss over this layer's auxiliary losses (0.0 if it has none)."""
        return L.weighted_total(self.aux_losses, self.aux_weights)
