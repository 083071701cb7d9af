"""A tiny Vision Transformer (Dosovitskiy et al. 2021) in timm's layout, for small images.

Patch embedding by a strided conv, a learned position embedding, pre-norm encoder blocks (multi-head
self-attention and a GELU MLP, each with a residual), a final LayerNorm and mean pooling over the tokens
(timm's `global_pool="avg"`: no class token) into a linear head. Attention is written out as the exporters
write it: one qkv projection, heads split by Reshape/Transpose, Q·K^T scaled, Softmax, ·V.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from models.graph_builder import BATCH_DIM, INPUT_NAME, OUTPUT_NAME, GraphBuilder, image_shape, require_positive_int

POS_EMBED_STD = 0.02
MLP_RATIO = 2


def _attention(gb: GraphBuilder, x: str, tokens: int, dim: int, heads: int, prefix: str) -> str:
    head_dim = dim // heads
    qkv = gb.linear(x, 3 * dim, f"{prefix}.qkv")
    split = gb.constant(f"{prefix}.qkv_shape", np.array([0, tokens, 3, heads, head_dim], np.int64))
    qkv = gb.op("Reshape", [qkv, split], None, f"{prefix}.qkv_heads")
    qkv = gb.op("Transpose", [qkv], None, f"{prefix}.qkv_perm", perm=[2, 0, 3, 1, 4])  # [3, N, heads, T, hd]
    q, k, v = (gb.op("Gather", [qkv, gb.constant(f"{prefix}.{n}_index", np.array(i, np.int64))], None,
                     f"{prefix}.{n}", axis=0) for i, n in enumerate("qkv"))
    kt = gb.op("Transpose", [k], None, f"{prefix}.k_t", perm=[0, 1, 3, 2])
    scale = gb.constant(f"{prefix}.scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    scores = gb.op("Mul", [gb.op("MatMul", [q, kt], None, f"{prefix}.qk"), scale], None, f"{prefix}.scaled")
    attn = gb.op("Softmax", [scores], None, f"{prefix}.softmax", axis=-1)
    out = gb.op("MatMul", [attn, v], None, f"{prefix}.av")  # [N, heads, T, hd]
    out = gb.op("Transpose", [out], None, f"{prefix}.heads_last", perm=[0, 2, 1, 3])
    merge = gb.constant(f"{prefix}.merge_shape", np.array([0, tokens, dim], np.int64))
    out = gb.op("Reshape", [out, merge], dim, f"{prefix}.merge")
    return gb.linear(out, dim, f"{prefix}.proj")


def vit_tiny(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, patch: int = 4, dim: int = 64,
             depth: int = 4, heads: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Build a tiny ViT: (input_size / patch)^2 tokens of width dim, depth blocks of heads heads."""
    for arg, value in [("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size),
                       ("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads)]:
        require_positive_int(arg, value)
    if input_size % patch or dim % heads:
        raise ValueError(f"input_size {input_size} must be a multiple of patch {patch}, dim {dim} of heads {heads}")
    tokens = (input_size // patch) ** 2
    gb = GraphBuilder("vit_tiny", seed)
    x = gb.input(INPUT_NAME, image_shape(in_channels, input_size))
    y = gb.conv(x, dim, patch, patch, bias=True, name="patch_embed.proj")
    y = gb.op("Reshape", [y, gb.constant("patch_embed.flat_shape", np.array([0, dim, tokens], np.int64))], dim,
              "patch_embed.flatten")
    y = gb.op("Transpose", [y], dim, "patch_embed.tokens", perm=[0, 2, 1])  # [N, T, dim]
    pos = gb.parameter("pos_embed", gb.rng.normal(0.0, POS_EMBED_STD, (1, tokens, dim)))
    y = gb.add(y, pos, name="pos_add")
    for i in range(depth):
        p = f"blocks.{i}"
        y = gb.add(y, _attention(gb, gb.layernorm(y, f"{p}.norm1"), tokens, dim, heads, f"{p}.attn"), name=f"{p}.res1")
        h = gb.gelu(gb.linear(gb.layernorm(y, f"{p}.norm2"), MLP_RATIO * dim, f"{p}.mlp.fc1"), f"{p}.mlp.act")
        y = gb.add(y, gb.linear(h, dim, f"{p}.mlp.fc2"), name=f"{p}.res2")
    y = gb.layernorm(y, "norm")
    y = gb.op("ReduceMean", [y], dim, "pool", axes=[1], keepdims=0)  # opset 17: axes as an attribute
    gb.gemm(y, num_classes, name="head", output=OUTPUT_NAME)
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, num_classes])])
