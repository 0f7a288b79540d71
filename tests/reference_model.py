# Plain float64 NumPy reference of the Switch Transformer language model (pyswitch.models.SwitchLM):
# embedding, pre-norm blocks of RoPE causal attention and dense / Switch FFNs, tied head, CE.
"""Float64 reference of ``pyswitch.models.SwitchLM``'s forward and loss.

Written from the definitions, independently of the C++ core, on float64 copies of the model's
parameters (the ``model.params`` dict, same names):

* ``h = embed[inputs]``; per layer ``l``::

      a = rmsnorm(h, attn_norm)            rmsnorm(x, w) = x / sqrt(mean(x^2) + eps) * w
      q, k, v = split(a @ w_qkv)           heads: columns [h*Dh, (h+1)*Dh) of each of q, k, v
      q, k = rope(q), rope(k)              half split: (x1, x2) -> (x1 c - x2 s, x1 s + x2 c),
                                           angle = position * base^(-2i/Dh), i < Dh/2
      h = h + (softmax(q k^T / sqrt(Dh) + causal mask) v) @ w_o
      f = rmsnorm(h, ffn_norm)
      h = h + ffn(f)                       dense: relu(f @ w_in) @ w_out (no bias); Switch layer
                                           ((l + 1) % expert_every == 0): reference_layer's top-k
                                           routing with capacity, one group of all B * S tokens
* ``logits = rmsnorm(h, final_norm) @ embed^T`` (tied head); ``ce = mean over the B * S targets
  of logsumexp(logits) - logits[target]``;
* ``total = ce + sum over Switch layers of aux_loss_coef * aux + z_loss_coef * z``.

Routing uses the training capacity factor when ``training`` (jitter is not modelled: compare
with ``jitter_eps=0`` or in eval mode), else the eval capacity factor. ``forward`` also returns a
*signature*: every routing decision and every relu's on/off pattern, so finite differences can
skip coordinates whose perturbation crosses a kink.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import reference as ref
import reference_layer as rl


def rmsnorm(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, base):
    """Rotary embedding of ``x`` (..., S, Dh) at ``positions`` (S,), half-split layout."""
    dh = x.shape[-1]
    half = dh // 2
    freq = base ** (-2.0 * np.arange(half) / dh)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * freq[None, :]  # (S, half)
    c, s = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def attention(a, w_qkv, w_o, B, S, H, base):
    """Causal multi-head self-attention block output ``(B*S, d)`` (before the residual add)."""
    d = a.shape[1]
    dh = d // H
    qkv = a @ w_qkv  # (T, 3d)
    q = qkv[:, :d].reshape(B, S, H, dh).transpose(0, 2, 1, 3)  # (B, H, S, Dh)
    k = qkv[:, d : 2 * d].reshape(B, S, H, dh).transpose(0, 2, 1, 3)
    v = qkv[:, 2 * d :].reshape(B, S, H, dh).transpose(0, 2, 1, 3)
    pos = np.arange(S)
    q, k = rope(q, pos, base), rope(k, pos, base)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)  # (B, H, S, S)
    mask = np.triu(np.ones((S, S), dtype=bool), k=1)
    scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(B * S, d)
    return out @ w_o


def is_switch_layer(cfg, layer):
    return cfg.num_experts > 0 and (layer + 1) % cfg.expert_every == 0


@dataclass
class ModelForward:
    logits: np.ndarray  # (B, S, V) float64
    ce: float
    aux: float  # scaled, summed over Switch layers
    z: float  # scaled, summed over Switch layers
    total: float
    plans: list  # reference Plan per Switch layer
    signature: tuple  # routing decisions and relu patterns


def forward(params, cfg, tokens, *, training=False, loss_tokens=None) -> ModelForward:
    """The model on tokens ``(B, S + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``.

    ``params``: name -> array (the model's params, any float dtype); ``cfg``: a
    ``SwitchLMConfig``.
    """
    p = {name: np.asarray(v, dtype=np.float64) for name, v in params.items()}
    tokens = np.asarray(tokens, dtype=np.int64)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, S = inputs.shape
    T = B * S
    eps = cfg.norm_eps
    h = p["embed"][inputs.reshape(-1)]
    plans, signature = [], []
    aux = z = 0.0
    for layer in range(cfg.num_layers):
        pre = f"layers.{layer}."
        a = rmsnorm(h, p[pre + "attn_norm"], eps)
        h = h + attention(a, p[pre + "w_qkv"], p[pre + "w_o"], B, S, cfg.num_heads, cfg.rope_base)
        f = rmsnorm(h, p[pre + "ffn_norm"], eps)
        if is_switch_layer(cfg, layer):
            layer_cfg = {
                "k": cfg.k,
                "capacity_factor": cfg.capacity_factor,
                "eval_capacity_factor": cfg.eval_capacity_factor,
                "activation": "relu",
            }
            ffn_params = {
                "router": p[pre + "ffn.router"],
                "w_in": p[pre + "ffn.w_in"],
                "w_out": p[pre + "ffn.w_out"],
            }
            fw = rl.switch_forward(f, ffn_params, layer_cfg, training=training)
            h = h + fw.y
            plans.append(fw.plan)
            aux += cfg.aux_loss_coef * fw.plan.aux_loss
            z += cfg.z_loss_coef * fw.plan.z_loss
            signature.append(fw.plan.expert_index.tobytes() + fw.plan.slot.tobytes())
            signature.extend(np.asarray(kink).tobytes() for kink in fw.kinks)
        else:
            pre_act = f @ p[pre + "ffn.w_in"]
            h = h + np.maximum(pre_act, 0.0) @ p[pre + "ffn.w_out"]
            signature.append((pre_act > 0).tobytes())
    zf = rmsnorm(h, p["final_norm"], eps)
    logits = zf @ p["embed"].T  # (T, V)
    ce_sum = float(np.sum(ref.logsumexp(logits) - logits[np.arange(T), targets.reshape(-1)]))
    ce = ce_sum / (T if loss_tokens is None else loss_tokens)
    return ModelForward(
        logits=logits.reshape(B, S, -1),
        ce=ce,
        aux=aux,
        z=z,
        total=ce + aux + z,
        plans=plans,
        signature=tuple(signature),
    )


def total_loss(params, cfg, tokens, *, training=False):
    fw = forward(params, cfg, tokens, training=training)
    return fw.total, fw.signature


def min_top1_gap(plans) -> float:
    """The smallest gap between the k-th and (k+1)-th router logit over every token and layer
    (how close the routing decisions are to a tie)."""
    gaps = []
    for plan in plans:
        L = np.log(plan.probs)  # log-softmax: same gaps as the logits
        s = np.sort(L, axis=1)[:, ::-1]
        gaps.append(np.min(s[:, plan.k - 1] - s[:, plan.k]))
    return float(min(gaps)) if gaps else float("inf")
