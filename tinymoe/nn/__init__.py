"""Modules (PyTorch-like): layers, attention, and the MoE layers."""
from .attention import MultiHeadAttention, TransformerBlock
from .layers import Dropout, Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from .moe import MoE, MultiGateMoE
from .module import Module, ModuleList, Parameter
from .ple import CGC, PLE

__all__ = ["Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout",
           "FeedForward", "MultiHeadAttention", "TransformerBlock", "MoE", "MultiGateMoE", "CGC", "PLE"]
