"""The Llama forward pass as pure functions over the parameter pytree; layers run under `jax.lax.scan`.

Four entry points share one layer stack and differ only in how attention sees the past:
    forward_aux    a whole sequence, no cache, with a SequenceAttention (vanilla causal, or DMC's training form)
    prefill        a right-padded batch of prompts through a cache method, which builds its cache
    decode_step    one token per sequence through a cache method
    decode_forced  N known tokens per sequence through a cache method, layer by layer (teacher forcing)

A model with DMS decision adapters (cfg.dms_adapter) also computes, per layer, the adapter's raw logits
adapter_BTK from the layer's input (before its attention norm); an attention or cache method that reads them
(`reads_adapter = True`: DMS's) gets them as the keyword adapter_BTK, every other one never sees them.

Shape letters: B batch, T time, D model width, H query heads, K KV heads, Dh head dim, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import CacheMethod, State
from dmc_jax.errors import UserError
from dmc_jax.model.attention import causal_mask, grouped_attention
from dmc_jax.model.config import ModelConfig
from dmc_jax.model import remat, shard
from dmc_jax.model.layers import Rope, rms_norm, swiglu
from dmc_jax.model.linear import dense, dense_transposed
from dmc_jax.model.params import Params

# (layer, q_BTHD, k_BTKD, v_BTKD, state, **extra) -> (out_BTHD, state, aux); q/k before RoPE; aux is stacked over
# layers; extra: adapter_BTK with DMS adapters (see the module docstring).
AttendFn = Callable[..., tuple]


def _extra_for(target, extra: dict) -> dict:
    """The layer's extra inputs for an attention / cache method that reads them, else none."""
    return extra if getattr(target, "reads_adapter", False) else {}


class SequenceAttention(Protocol):
    """Attention over a whole sequence without a cache (training, perplexity): vanilla causal or DMC's form.

    Returns the attention output and an aux pytree (e.g. DMC decisions) that forward_aux stacks over layers.
    """

    def __call__(self, layer: jax.Array, q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array,
                 positions_BT: jax.Array, segment_ids_BT: Optional[jax.Array], rope: Rope,
                 rng: Optional[jax.Array]) -> tuple[jax.Array, Any]:
        ...


def causal_attention(layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng):
    """The vanilla SequenceAttention: RoPE, causal softmax attention reset at segment boundaries; no aux."""
    B, T = q_BTHD.shape[:2]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_B1TT = causal_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
    return grouped_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TT), None


def unstack_layers(params: Params) -> Params:
    """The decoding layout: params['layers'] as a tuple of per-layer dicts (separate buffers).

    Decoding is memory bound. Under `lax.scan` XLA (CPU at least) copies each layer's weights out of the stacked
    array before the matmul reads them, which triples weight traffic per token; separate per-layer buffers are
    read in place (measured on SmolLM2, 2-core CPU: decode +40%, prefill at T=512 +65%). Training keeps the
    stacked layout (one scanned layer to compile, remat, sharding rules with a `layers` axis).
    """
    if isinstance(params["layers"], tuple):
        return params
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    layers = tuple(jax.tree.map(lambda a: a[i], params["layers"]) for i in range(num_layers))
    return {**params, "layers": layers}


def stack_layers(params: Params) -> Params:
    """The training layout again: params['layers'] as one dict of arrays stacked over layers."""
    if not isinstance(params["layers"], tuple):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}


def layers_for(params: Params, method, otherwise=None) -> Params:
    """The layout to prefill and decode through `method` with: stacked (scanned) if the method sets scan_layers (its
    unrolled program compiles for much longer than it saves; see the protocol), else otherwise(params) (e.g.
    unstack_layers), or the layout given."""
    if getattr(method, "scan_layers", False):
        return stack_layers(params)
    return params if otherwise is None else otherwise(params)


def compute_dtype_weights(params: Params, cfg: ModelConfig) -> Params:
    """params with the matmul weights (and the embedding table) cast once to the compute dtype, for inference;
    the RMSNorm scales stay as stored (rms_norm computes in fp32).

    The results are bit-identical (dense and _embed cast them to cfg.dtype anyway), but a decode loop no longer
    converts them at every token: XLA hoists that convert out of the token loop for unrolled layers, not for a
    scanned stack, where each layer's fp32 slice is converted again per token (measured on SmolLM2-135M, 2-core
    CPU, bf16, 480 decode steps at batch 4 with scanned layers: 31 s -> 20 s). Not for training (the fp32 master
    weights are what the optimizer updates). fp32 compute: params unchanged."""
    dtype = jnp.dtype(cfg.dtype)
    if dtype == jnp.float32:
        return params

    def cast_layer(w: dict) -> dict:  # every layer weight but the RMSNorm scales (params.param_shapes: '*norm')
        return {name: (a if name.endswith("norm") else a.astype(dtype)) for name, a in w.items()}

    layers = params["layers"]
    layers = tuple(cast_layer(w) for w in layers) if isinstance(layers, tuple) else cast_layer(layers)
    embed = {**params["embed"], "embedding": params["embed"]["embedding"].astype(dtype)}
    out = {**params, "layers": layers, "embed": embed}
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"].astype(dtype)
    return out


def _layer_stack(params: Params, x_BTD: jax.Array, cfg: ModelConfig, attend: AttendFn, state: State):
    """Runs every layer with `attend` as its attention: scanned over stacked weights, or unrolled over a tuple."""
    dtype = cfg.dtype

    def layer_fn(carry, layer_in):
        x_BTD, state = carry
        x_BTD = shard.constrain(x_BTD, ("batch", None, None))  # rows over data/fsdp, like the batch
        w, layer = layer_in
        # Weights are cast to the compute dtype inside dense (fused with the transposes of its backward).
        h_BTD = rms_norm(x_BTD, w["attn_norm"], cfg.norm_eps)
        q_BTHD = dense(h_BTD, w["q"], dtype)
        k_BTKD = dense(h_BTD, w["k"], dtype)
        v_BTKD = dense(h_BTD, w["v"], dtype)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before the cache method sees them
            q_BTHD = rms_norm(q_BTHD, w["q_norm"], cfg.norm_eps)
            k_BTKD = rms_norm(k_BTKD, w["k_norm"], cfg.norm_eps)
        extra = {}
        if "dms_adapter" in w:  # the reference reads the residual stream with the adapter's own norm
            a_BTD = rms_norm(x_BTD, w["dms_adapter_norm"], cfg.norm_eps)
            extra["adapter_BTK"] = dense(a_BTD, w["dms_adapter"], dtype, out_dtype=jnp.float32)
        attn_BTHD, state, aux = attend(layer, q_BTHD, k_BTKD, v_BTKD, state, **extra)
        x_BTD = x_BTD + dense(attn_BTHD, w["o"], dtype, n_in=2).astype(x_BTD.dtype)
        h_BTD = rms_norm(x_BTD, w["mlp_norm"], cfg.norm_eps)
        x_BTD = x_BTD + swiglu(h_BTD, w["gate"], w["up"], w["down"], dtype).astype(x_BTD.dtype)
        return (x_BTD, state), aux

    layer_fn = remat.wrap(layer_fn, cfg.remat, cfg.remat_policy)
    if isinstance(params["layers"], tuple):
        carry, auxes = (x_BTD, state), []
        for i, w in enumerate(params["layers"]):
            carry, aux = layer_fn(carry, (w, jnp.int32(i)))
            auxes.append(aux)
        return carry[0], carry[1], jax.tree.map(lambda *a: jnp.stack(a), *auxes)
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x_BTD, state), aux = jax.lax.scan(layer_fn, (x_BTD, state), (params["layers"], layers))
    return x_BTD, state, aux


def _embed(params: Params, tokens_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], tokens_BT, axis=0).astype(cfg.dtype)


def output_logits(params: Params, x_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and the (tied or untied) output projection of hidden states [B, T, D]; logits [B, T, V] in fp32."""
    h_BTD = rms_norm(x_BTD, params["final_norm"], cfg.norm_eps)
    if cfg.tie_embeddings:
        logits_BTV = dense_transposed(h_BTD, params["embed"]["embedding"], cfg.dtype, out_dtype=jnp.float32)
    else:
        logits_BTV = dense(h_BTD, params["lm_head"], cfg.dtype, out_dtype=jnp.float32)
    return shard.constrain(logits_BTV, ("batch", None, "vocab"))


def forward_aux(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, positions_BT: Optional[jax.Array] = None,
                segment_ids_BT: Optional[jax.Array] = None, attention: SequenceAttention = causal_attention,
                rng: Optional[jax.Array] = None) -> tuple[jax.Array, Any]:
    """Logits [B, T, V] (fp32) of a full pass with `attention` in every layer, and its aux stacked over layers.

    Segment ids (packed documents) reset attention at boundaries; positions default to 0..T-1.
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rope = Rope(cfg)

    def attend(layer, q_BTHD, k_BTKD, v_BTKD, state, **extra):
        layer_rng = None if rng is None else jax.random.fold_in(rng, layer)
        out_BTHD, aux = attention(layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, layer_rng,
                                  **_extra_for(attention, extra))
        return out_BTHD, state, aux

    x_BTD, _, aux = _layer_stack(params, _embed(params, tokens_BT, cfg), cfg, attend, None)
    return output_logits(params, x_BTD, cfg), aux


def forward(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, positions_BT: Optional[jax.Array] = None,
            segment_ids_BT: Optional[jax.Array] = None) -> jax.Array:
    """Logits [B, T, V] (fp32) of a full causal forward pass."""
    return forward_aux(params, tokens_BT, cfg, positions_BT, segment_ids_BT)[0]


def prefill(params: Params, tokens_BT: jax.Array, lengths_B: jax.Array, state: State, method: CacheMethod,
            cfg: ModelConfig, starts_B: Optional[jax.Array] = None) -> tuple[jax.Array, State]:
    """Runs right-padded prompts through `method`; returns the logits after each prompt's last token [B, V].
    starts_B: the prompts continue rows that already hold starts_B tokens (methods with supports_prefill_start)."""
    rope = Rope(cfg)
    if starts_B is not None and not getattr(method, "supports_prefill_start", False):
        raise UserError(f"cache method {method.name} cannot continue rows already in its cache (prefill with a "
                        f"start position); prefill whole sequences, or use a method that can (e.g. dense)")
    extra = {} if starts_B is None else {"starts_B": starts_B}

    def attend(layer, q_BTHD, k_BTKD, v_BTKD, state, **layer_extra):
        return (*method.prefill(state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope, **extra,
                                **_extra_for(method, layer_extra)), None)

    x_BTD, state, _ = _layer_stack(params, _embed(params, tokens_BT, cfg), cfg, attend, state)
    last_B1D = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
    return output_logits(params, last_B1D, cfg)[:, 0], state


def decode_step(params: Params, tokens_B: jax.Array, positions_B: jax.Array, state: State, method: CacheMethod,
                cfg: ModelConfig) -> tuple[jax.Array, State]:
    """One token per sequence at absolute positions_B; returns logits [B, V] and the updated cache."""
    rope = Rope(cfg)

    def attend(layer, q_BTHD, k_BTKD, v_BTKD, state, **extra):
        out_BHD, state = method.decode(state, layer, q_BTHD[:, 0], k_BTKD[:, 0], v_BTKD[:, 0], positions_B, rope,
                                       **_extra_for(method, extra))  # adapter_BTK with T = 1
        return out_BHD[:, None], state, None

    x_BTD, state, _ = _layer_stack(params, _embed(params, tokens_B[:, None], cfg), cfg, attend, state)
    return output_logits(params, x_BTD, cfg)[:, 0], state


def layers_independent(method: CacheMethod) -> bool:
    """True when the method declares its state layout (RowOps) and every leaf is per layer ([L, B, ...]): no page
    pool shared across layers (the paged DMC and DMS caches share one, so the order in which layers take pages
    changes what a full pool forces out). Such a method can be decoded layer by layer (decode_forced); one without
    a declared layout (a wrapper such as kv_heads' RopeProjected) is decoded token by token."""
    layout = getattr(method, "layout", None)
    return layout is not None and not layout.shared


def decode_forced(params: Params, tokens_BN: jax.Array, positions_BN: jax.Array, state: State,
                  method: CacheMethod, cfg: ModelConfig) -> tuple[jax.Array, State]:
    """N known tokens per sequence decoded through the cache (teacher forcing), LAYER by layer: the final hidden
    states [B, N, D] (output_logits gives their logits) and the cache after the N tokens.

    The computation of N calls of decode_step in another order (fp32: equal to rounding, tested; bf16 rounds its
    products differently, so an eviction policy's choices can differ): a layer's input for every token is known
    once the layer below has run them all, so each layer projects all N tokens at once (matrix products with N x B
    rows instead of B: bandwidth-bound decode matmuls become compute-bound ones) and only its cache update and
    attention run token by token, in an inner scan where the layer's weights are loop-invariant (a token-major
    scanned decode copies every layer's weights out of the stack at every token). Needs layers_independent(method);
    the weights are scanned (a tuple layout is stacked once)."""
    if not layers_independent(method):
        raise ValueError(f"cache method {method.name} shares state across layers; decode it token by token")
    rope = Rope(cfg)

    def attend(layer, q_BNHD, k_BNKD, v_BNKD, state, **extra):
        def step(state, xs):
            q_BHD, k_BKD, v_BKD, pos_B, step_extra = xs
            out_BHD, state = method.decode(state, layer, q_BHD, k_BKD, v_BKD, pos_B, rope,
                                           **_extra_for(method, step_extra))
            return state, out_BHD

        per_token = {name: jnp.swapaxes(a, 0, 1)[:, :, None] for name, a in extra.items()}  # [N, B, 1, ...]
        xs = (jnp.swapaxes(q_BNHD, 0, 1), jnp.swapaxes(k_BNKD, 0, 1), jnp.swapaxes(v_BNKD, 0, 1),
              jnp.swapaxes(positions_BN, 0, 1), per_token)
        state, out_NBHD = jax.lax.scan(step, state, xs)
        return jnp.swapaxes(out_NBHD, 0, 1), state, None

    x_BND, state, _ = _layer_stack(stack_layers(params), _embed(params, tokens_BN, cfg), cfg, attend, state)
    return x_BND, state
