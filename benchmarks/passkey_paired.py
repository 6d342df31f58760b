"""Passkey rows of task compare compared prompt by prompt: each row's answers checked against the keys its seed drew
(evaluation/passkey.draw_keys, the same draws run_passkey made), pooled over prompt sets, with the exact two-sided
sign test on the prompts where exactly one of two rows is right.

    .venv/bin/python benchmarks/passkey_paired.py --baseline tova \\
        --row tova=0:runs/pk2k_cr8/rows.json:base:tova --row dms=0:runs/pk2k_cr8_w64m/rows.json:390:dms_paged \\
        --row tova=1:... --row dms=1:... [--length 2048 --depths 0.1,0.5,0.9 --trials 16] [--json out.json]

--row NAME=SEED:ROWS_JSON:MODEL_SUBSTRING:METHOD picks the one passkey row of that compare run directory's rows.json
whose model label contains MODEL_SUBSTRING and whose method is METHOD; the prompts are rebuilt from the SEED the run
used (compare's --config.seed) and checked against the row's own accuracy. A name given for several seeds pools them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", action="append", default=[], help="NAME=SEED:ROWS_JSON:MODEL_SUBSTRING:METHOD")
    ap.add_argument("--baseline", default="tova")
    ap.add_argument("--model", default="smollm2", help="whose tokenizer built the prompts")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    specs = []
    for spec in a.row:
        name, _, rest = spec.partition("=")
        parts = rest.split(":")
        if not name or len(parts) != 4 or not parts[0].isdigit():
            print(f"error: --row looks like NAME=SEED:ROWS_JSON:MODEL_SUBSTRING:METHOD; got {spec!r}", file=sys.stderr)
            return 2
        specs.append((name, int(parts[0]), *parts[1:]))
    if a.baseline not in {s[0] for s in specs}:
        print(f"error: --baseline {a.baseline!r} names none of the --row entries", file=sys.stderr)
        return 2
    depths = tuple(float(d) for d in a.depths.split(","))

    from dmc_jax.evaluation.passkey import row_hits, sign_test
    from dmc_jax.tasks.compare import passkey_filler
    from dmc_jax.weights.load import load_model

    filler_len = len(passkey_filler(load_model(a.model).tokenizer))
    hits, depth_of, per_seed = {}, {}, {}
    for name, seed, path, model, method in specs:
        try:
            rows = json.loads(pathlib.Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: cannot read the rows of {path} ({e}); give a compare run's rows.json", file=sys.stderr)
            return 2
        found = [r for r in rows if model in r["model"] and r["method"] == method and "passkey" in r]
        if len(found) != 1:
            print(f"error: {path} has {len(found)} passkey rows of a model containing {model!r} with method "
                  f"{method!r}; make MODEL_SUBSTRING pick exactly one", file=sys.stderr)
            return 2
        cells = found[0]["passkey"]
        # row_hits' order: lengths as the row lists them, then each length's cells and answers
        order = [(c["length"], c["depth"]) for n in dict.fromkeys(c["length"] for c in cells)
                 for c in cells if c["length"] == n for _ in c["answers"]]
        try:
            every = row_hits(cells, filler_len, seed)
        except ValueError:
            every = None
        got = [h for h, (n, _) in zip(every or [], order) if n == a.length]
        depth = [d for n, d in order if n == a.length]
        if every is None or len(got) != len(depths) * a.trials or sorted(set(depth)) != sorted(depths):
            print(f"error: the answers of {path} ({model}, {method}) do not match seed {seed}'s "
                  f"{len(depths) * a.trials} prompts; check SEED, --length, --depths and --trials", file=sys.stderr)
            return 2
        hits.setdefault(name, {})[seed] = got
        depth_of[seed] = depth
        per_seed.setdefault(seed, {})[name] = sum(got)
    seeds = sorted(hits[a.baseline])
    for name, by_seed in hits.items():
        if sorted(by_seed) != seeds:
            print(f"error: {name} has seeds {sorted(by_seed)}, the baseline {seeds}; give every row on every seed",
                  file=sys.stderr)
            return 2
    flat = {name: [h for s in seeds for h in by_seed[s]] for name, by_seed in hits.items()}
    depth = [d for s in seeds for d in depth_of[s]]
    out = {"length": a.length, "seeds": seeds, "prompts": len(depth), "per_seed": per_seed,
           "totals": {n: sum(v) for n, v in flat.items()},
           "by_depth": {n: {str(d): sum(h for h, dd in zip(v, depth) if dd == d) for d in depths}
                        for n, v in flat.items()},
           "against_baseline": {n: sign_test(v, flat[a.baseline]) for n, v in flat.items() if n != a.baseline}}
    print(f"{len(depth)} prompts of {a.length} tokens (seeds {seeds}); by depth {', '.join(map(str, depths))}:")
    for n, v in flat.items():
        line = f"  {n:<12} {sum(v):4d}   " + " / ".join(str(out["by_depth"][n][str(d)]) for d in depths)
        if n != a.baseline:
            t = out["against_baseline"][n]
            line += (f"   against {a.baseline}: {t['only_this']} prompts only it, {t['only_baseline']} only "
                     f"{a.baseline} (sign test p = {t['p_two_sided']:.2g})")
        print(line)
    if a.json:
        path = pathlib.Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
