"""The MoE transformer: token (+ task) embeddings, pre-norm blocks with an MoE FFN every `moe_every` blocks,
and a shared vocabulary head or one head per task.

Task conditioning (Gupta et al. 2022): the task reaches the model through its routers (router="concat" | "add" |
"task" | "multi_gate") and, optionally, a task embedding added to every token (task_embedding=True). With
`task_descriptions`, task embeddings are composed from description parts, so unseen tasks can be routed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import losses as L
from .nn import Embedding, LayerNorm, Linear, MoE, Module, ModuleList, TaskEmbedding, TransformerBlock
from .nn.module import Parameter, make_rng
from .engine import Tensor


@dataclass
class ModelConfig:
    vocab_size: int = 16  # input token vocabulary
    max_seq_len: int = 32  # learned positional embeddings up to this length
    d_model: int = 64  # residual width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads (d_model divisible by it)
    d_ff: int = 128  # FFN width of each expert (and of the dense FFN blocks)
    num_experts: int = 8  # experts per MoE layer
    k: int = 2  # experts per token
    moe_every: int = 2  # block i is MoE when (i + 1) % moe_every == 0 (GShard: every other); 0 = dense model
    gate: str = "top_k"  # softmax | top_k | noisy_top_k | dselect_k | expert_choice | hash
    router: str = "token"  # token | concat | add | task | multi_gate
    capacity_factor: float | None = None  # None = dropless
    priority: str = "slot"  # capacity serving order: slot | weight
    num_shared_experts: int = 0  # always-on FFNs added in each MoE layer
    num_tasks: int = 1  # task ids in [0, num_tasks)
    task_embedding: bool = False  # add a task embedding to every token's input embedding
    task_descriptions: list | None = None  # per task, a list of part ids: composed task embeddings (unseen tasks)
    num_description_parts: int | None = None  # size of the part vocabulary (default: max id + 1)
    causal: bool = False  # causal attention (language modelling) or bidirectional (per-position tasks)
    head: str = "shared"  # shared vocabulary head, or "per_task" (one head per task)
    num_classes: int | None = None  # output classes per position (default vocab_size)
    dropout: float = 0.0
    activation: str = "gelu"
    aux_weights: dict = field(default_factory=dict)  # overrides of tinymoe.losses.DEFAULT_WEIGHTS
    seed: int = 0

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head not in ("shared", "per_task"):
            raise ValueError(f"ModelConfig: head must be 'shared' or 'per_task', got {self.head!r}")
        if self.moe_every < 0:
            raise ValueError(f"ModelConfig: moe_every must be ≥ 0, got {self.moe_every}")
        if self.task_descriptions is not None and len(self.task_descriptions) != self.num_tasks:
            raise ValueError(f"ModelConfig: {len(self.task_descriptions)} task_descriptions for num_tasks={self.num_tasks}")

    def is_moe_block(self, i):
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def to_dict(self):
        return asdict(self)


class MoETransformer(Module):
    """tokens (B, T) ints, task_ids (B,) -> logits (B, T, num_classes)."""

    def __init__(self, config: ModelConfig):
        c = self.config = config
        rng = make_rng(c.seed)
        self.tok_emb = Embedding(c.vocab_size, c.d_model, seed=rng)
        self.pos_emb = Embedding(c.max_seq_len, c.d_model, seed=rng)
        if c.task_embedding:
            self.task_emb = TaskEmbedding(c.num_tasks, c.d_model, c.task_descriptions, c.num_description_parts, rng)
        blocks = []
        for i in range(c.n_layers):
            ffn = None
            if c.is_moe_block(i):
                ffn = MoE(c.d_model, c.d_ff, c.num_experts, gate=c.gate, k=c.k, capacity_factor=c.capacity_factor,
                          router=c.router, num_tasks=c.num_tasks, activation=c.activation, seed=rng,
                          priority=c.priority, num_shared_experts=c.num_shared_experts,
                          task_descriptions=c.task_descriptions, num_description_parts=c.num_description_parts,
                          aux_weights=c.aux_weights)
            blocks.append(TransformerBlock(c.d_model, c.n_heads, c.d_ff, c.causal, c.dropout, c.activation, ffn, rng))
        self.blocks = ModuleList(blocks)
        self.ln_f = LayerNorm(c.d_model)
        n_out = c.num_classes or c.vocab_size
        if c.head == "shared":
            self.head = Linear(c.d_model, n_out, seed=rng)
        else:
            bound = 1 / np.sqrt(c.d_model)
            self.head_weight = Parameter(rng.uniform(-bound, bound, (c.num_tasks, c.d_model, n_out)).astype(np.float32))
            self.head_bias = Parameter(np.zeros((c.num_tasks, n_out), np.float32))

    @property
    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, tokens, task_ids=None, padding_mask=None):
        tokens, task_ids = self._ids(tokens), self._ids(task_ids)
        if tokens.ndim != 2:
            raise ValueError(f"MoETransformer: tokens must be (B, T) integers, got shape {tokens.shape}")
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"MoETransformer: sequence length {T} > max_seq_len={self.config.max_seq_len}")
        if task_ids is None and self.config.num_tasks > 1 and (self.config.task_embedding or self.config.head == "per_task"):
            raise ValueError("MoETransformer: this model is conditioned on the task: pass task_ids of shape (B,)")
        x = self.tok_emb(tokens) + self.pos_emb.weight[:T]  # (B, T, d); positions 0..T-1 are rows :T
        if self.config.task_embedding:
            x = x + self.task_emb(task_ids).reshape(B, 1, -1)
        for block in self.blocks:
            kwargs = {}
            if isinstance(block.ffn, MoE):
                kwargs["task_ids"] = task_ids
                if block.ffn.config.gate == "hash":  # hash layers route each position by its token id
                    kwargs["token_ids"] = tokens.reshape(-1)
            x = block(x, padding_mask=padding_mask, **kwargs)
        x = self.ln_f(x)
        if self.config.head == "shared":
            return self.head(x)  # (B, T, C)
        return x @ self.head_weight[task_ids] + self.head_bias[task_ids].reshape(B, 1, -1)

    def _ids(self, ids):
        """Token or task ids as an array: a Tensor's data, an array as it is (on its own device: an op mixing
        devices says so), Python lists on the model's device; None stays None."""
        if isinstance(ids, Tensor):
            return ids.data
        if ids is None or hasattr(ids, "ndim"):
            return ids
        return self.tok_emb.weight.xp.asarray(ids)

    @property
    def aux_losses(self) -> dict:
        """Each auxiliary loss averaged over the MoE layers (from the last forward)."""
        return L.average_over_layers([m.aux_losses for m in self.moe_layers])

    def aux_loss(self):
        """The weighted total of the layer-averaged auxiliary losses, to add to the task loss."""
        weights = L.aux_weights(self.config.aux_weights, "ModelConfig")
        return L.weighted_total(self.aux_losses, weights)

    def add_task(self, description) -> int:
        """Register an unseen task by its description (composed embeddings only); returns its task id."""
        tables = [m.router.task_embedding for m in self.moe_layers if hasattr(m.router, "task_embedding")]
        if self.config.task_embedding:
            tables.append(self.task_emb)
        if not tables:
            raise ValueError("add_task: this model has no description-composed task embeddings")
        ids = {t.add_task(description) for t in tables}
        for m in self.moe_layers:
            m.config.num_tasks = max(ids) + 1
        # keep the config in step, so a saved model is rebuilt with the added task
        self.config.task_descriptions = [*self.config.task_descriptions, [int(p) for p in description]]
        self.config.num_tasks = max(ids) + 1
        return ids.pop()
