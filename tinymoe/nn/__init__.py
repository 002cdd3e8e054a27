"""Modules (PyTorch-like): layers, attention, routers, the MoE layer and the multi-task models."""
from .attention import MultiHeadAttention, TransformerBlock
from .layers import Dropout, Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from .module import Module, ModuleList, Parameter
from .moe import GATE_SPECS, GateSpec, MoE, MoEConfig
from .multitask import MultiGateMoE, SharedBottom, Tower
from .ple import CGC, PLE
from .routers import Router, TaskEmbedding

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout",
           "FeedForward", "MultiHeadAttention", "TransformerBlock", "MoE", "MoEConfig", "GateSpec", "GATE_SPECS",
           "MultiGateMoE", "SharedBottom", "Tower", "CGC", "PLE", "Router", "TaskEmbedding"]
