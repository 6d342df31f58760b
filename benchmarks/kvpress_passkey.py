"""Passkey retrieval side by side with kvpress, in kvpress's prefill-only setting (see kvpress_compare.py).

Passkey retrieval in the same prefill-only setting, so retrieval accuracy can be compared as well: prompts of
--passkey_length tokens (512) built by dmc_jax.evaluation.passkey.build_prompt (filler from the first training
file, as `compare` uses; depths 0.1, 0.5, 0.9 x --passkey_trials keys, drawn as run_passkey draws them; all the same
length), each run alone (batch 1, no padding) and compressed once to ceil(T / CR) entries, then 6 greedy tokens
appended (our side grows the buffer by 6; kvpress decodes outside the press with explicit positions). Both sides
write the answer token ids; the report decodes and judges both with our tokenizer and passkey rule:
    .venv/bin/python benchmarks/kvpress_passkey.py ids     --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_passkey.py ours    --out runs/kvpress_compare  # a compile per row
    ~/fixture_env/bin/python benchmarks/kvpress_passkey.py kvpress --out runs/kvpress_compare
    .venv/bin/python benchmarks/kvpress_passkey.py report  --out runs/kvpress_compare  # passkey_table.md
Both sides add to an earlier passkey_<side>.json on the same prompts (--methods / --ratios pick the rows).
Models, methods and helpers are kvpress_compare.py's (the same GGUF, presses and cache configs).
"""

from __future__ import annotations

import json
import math
import os
import time

from kvpress_compare import METHODS, command_line, grow, load_kvpress_model, method_pair

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
    model = load_kvpress_model()

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
    ap = command_line(__doc__, " (both sides; default all but h2o_no_recent)", "both sides (ours: each compiles)")
    ap.add_argument("--passkey_length", type=int, default=512, help="tokens per passkey prompt")
    ap.add_argument("--passkey_trials", type=int, default=4, help="prompts per depth")
    ap.add_argument("--answer_tokens", type=int, default=6, help="greedy tokens decoded per passkey prompt")
    ap.add_argument("--seed", type=int, default=0, help="passkey keys and filler offsets")
    args = ap.parse_args()
    {"ids": write_passkey_ids, "ours": run_passkey_ours, "kvpress": run_passkey_kvpress,
     "report": passkey_report}[args.side](args)


if __name__ == "__main__":
    main()
