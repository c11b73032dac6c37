"""An independent float64 numpy forward of MiniMax-Text-01, written from the spec and the official tensor names.

Token-by-token loops, explicit kv-head repetition, a per-token MoE loop: slow but plain, so that it can check the
scanned, blocked, ragged JAX model. Also helpers to write small random checkpoints.
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.numpy

from minimax_jax.checkpoint import official_tensor_mappings
from minimax_jax.config import LIGHTNING, ModelConfig


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, positions, rotary_dim, theta):
    """x [T, H, D]; rotate-half on the first rotary_dim dims."""
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = positions[:, None] * inv_freq[None, :]
    emb = np.concatenate([ang, ang], axis=-1)[:, None, :]
    rot = x[..., :rotary_dim]
    half = rotary_dim // 2
    rotated_half = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return np.concatenate([rot * np.cos(emb) + rotated_half * np.sin(emb), x[..., rotary_dim:]], axis=-1)


def segment_starts(segment_ids):
    """True where a new contiguous segment starts (position 0 included)."""
    return np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])


def lightning_recurrence(q, k, v, s, segment_ids):
    """q, k, v [T, H, D]; s [H]: S = exp(-s) S + k^T v (reset at segment starts), o = q S."""
    t_len, h, d = q.shape
    state = np.zeros((h, d, d))
    out = np.zeros_like(q)
    starts = segment_starts(segment_ids)
    for t in range(t_len):
        if starts[t]:
            state = np.zeros((h, d, d))
        state = np.exp(-s)[:, None, None] * state + np.einsum("hd,he->hde", k[t], v[t])
        out[t] = np.einsum("hd,hde->he", q[t], state)
    return out


def softmax_attention(q, k, v, segment_ids):
    """q [T, H, D], k/v [T, KVH, D]; causal, within-segment, GQA by explicit repetition."""
    t_len, h, d = q.shape
    group = h // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    run = np.cumsum(segment_starts(segment_ids))
    allowed = np.tril(np.ones((t_len, t_len), bool)) & (run[:, None] == run[None, :])
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    logits = np.where(allowed[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def moe(x, gate, w1, w2, w3, k):
    """Per-token loop; returns (y, router probs [T, E], routed token-slots per expert [E])."""
    num_experts = gate.shape[0]
    z = x @ gate.T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    counts = np.zeros(num_experts, np.int64)
    for t in range(x.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:k]
        weights = p[t, top] / p[t, top].sum()
        for weight, e in zip(weights, top, strict=True):
            counts[e] += 1
            y[t] += weight * (w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
    return y, p, counts


def switch_aux_loss(probs, counts):
    """E * sum_e (fraction of routed token-slots of e) * (mean router prob of e)."""
    return probs.shape[-1] * np.sum(counts / counts.sum() * probs.mean(0))


def slopes_power_of_two(num_heads):
    return 2.0 ** (-8.0 * (np.arange(num_heads) + 1) / num_heads)


def forward(config: ModelConfig, tensors: dict[str, np.ndarray], input_ids, segment_ids=None, positions=None):
    """Logits [B, T, V] float64, per-layer aux losses [L] and expert counts [L, E] over the whole batch."""
    w = {name: np.asarray(a, np.float64) for name, a in tensors.items()}
    batch, t_len = input_ids.shape
    segment_ids = np.zeros_like(input_ids) if segment_ids is None else segment_ids
    positions = np.broadcast_to(np.arange(t_len), input_ids.shape) if positions is None else positions
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    num_layers = config.num_hidden_layers
    all_logits = []
    probs = [[] for _ in range(num_layers)]
    counts = np.zeros((num_layers, config.num_local_experts), np.int64)
    for b in range(batch):
        h = w["model.embed_tokens.weight"][input_ids[b]]
        for i, attn_type in enumerate(config.attn_type_list):
            p = f"model.layers.{i}."
            xn = rms_norm(h, w[p + "input_layernorm.weight"], config.rms_norm_eps)
            if attn_type == LIGHTNING:
                qkv = silu(xn @ w[p + "self_attn.qkv_proj.weight"].T).reshape(t_len, heads, 3 * d)
                q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
                s = slopes_power_of_two(heads) * (1 - i / (num_layers - 1) + 1e-5)
                o = lightning_recurrence(q, k, v, s, segment_ids[b]).reshape(t_len, heads * d)
                o = rms_norm(o, w[p + "self_attn.norm.weight"], 1e-6)
                o = sigmoid(xn @ w[p + "self_attn.output_gate.weight"].T) * o
                mixed = o @ w[p + "self_attn.out_proj.weight"].T
                alpha, beta = config.layernorm_linear_attention_alpha, config.layernorm_linear_attention_beta
            else:
                q = (xn @ w[p + "self_attn.q_proj.weight"].T).reshape(t_len, heads, d)
                k = (xn @ w[p + "self_attn.k_proj.weight"].T).reshape(t_len, kv_heads, d)
                v = (xn @ w[p + "self_attn.v_proj.weight"].T).reshape(t_len, kv_heads, d)
                q = rope(q, positions[b], config.rotary_dim, config.rope_theta)
                k = rope(k, positions[b], config.rotary_dim, config.rope_theta)
                o = softmax_attention(q, k, v, segment_ids[b]).reshape(t_len, heads * d)
                mixed = o @ w[p + "self_attn.o_proj.weight"].T
                alpha, beta = config.layernorm_full_attention_alpha, config.layernorm_full_attention_beta
            hn = rms_norm(alpha * xn + beta * mixed, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
            experts = range(config.num_local_experts)
            e = p + "block_sparse_moe.experts."
            y, layer_probs, layer_counts = moe(hn, w[p + "block_sparse_moe.gate.weight"],
                                 np.stack([w[f"{e}{j}.w1.weight"] for j in experts]),
                                 np.stack([w[f"{e}{j}.w2.weight"] for j in experts]),
                                 np.stack([w[f"{e}{j}.w3.weight"] for j in experts]), config.num_experts_per_tok)
            h = config.layernorm_mlp_alpha * hn + config.layernorm_mlp_beta * y
            probs[i].append(layer_probs)
            counts[i] += layer_counts
        h = rms_norm(h, w["model.norm.weight"], config.rms_norm_eps)
        all_logits.append(h @ w["lm_head.weight"].T)
    aux = np.array([switch_aux_loss(np.concatenate(probs[i]), counts[i]) for i in range(num_layers)])
    return np.stack(all_logits), aux, counts


def random_official_tensors(config: ModelConfig, seed: int = 0, std: float = 0.1,
                            dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights under the official names; norm scales are 1 + noise so that they matter."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in official_tensor_mappings(config):
        if len(m.official_shape) == 1:
            tensors[m.name] = (1.0 + std * rng.standard_normal(m.official_shape)).astype(dtype)
        else:
            tensors[m.name] = (std * rng.standard_normal(m.official_shape)).astype(dtype)
    return tensors


def write_checkpoint(folder, config: ModelConfig, tensors: dict[str, np.ndarray], num_shards: int = 1) -> None:
    """config.json (official format) plus one model.safetensors, or ``num_shards`` files with an index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_official_dict(), f)
    if num_shards == 1:
        safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[shard::num_shards]}
        safetensors.numpy.save_file(part, os.path.join(folder, file_name))
        weight_map.update(dict.fromkeys(part, file_name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
