"""The project's claim checked from task compare's rows: in each cell (a context length and a CR), does the learned
model beat EVERY training-free method on decoded perplexity AND on passkey, at the same cache bytes?

    .venv/bin/python benchmarks/claim_table.py --spec docs/results/claim/cells.json \\
        [--markdown docs/results/claim/claim_table.md] [--json docs/results/claim/claim_table.json] [--paired smollm2]

The spec is a JSON list of cells:
    {"cell": "2k, CR 8", "ratio": 8.0, "learned": ["model390 dms query prompt"],
     "ppl": ["runs/c2k_all/rows.json"], "passkey": ["0:runs/pk2k_h2o_seed0/rows.json", "1:...", ...],
     "methods": ["h2o", "tova", "streaming_llm", "snapkv", "corm_capped"]}
`learned`: the model label(s) of the learned row (compare's extra_models label; several when runs named the same
configuration differently); the training-free rows are the base model's rows of each method at `ratio` (compare
sizes their budgets to those bytes). Perplexity: the first ppl file that has the row. Passkey: "SEED:ROWS_JSON", one
or more files per prompt set (compare's --config.seed); a row counts once per prompt set (the first file of that
seed that has it), and prompts found are summed over the sets; the learned row beats a method on passkey when it
finds more on the prompt sets both have (the prompts column shows how many each has). Nothing is measured here:
every number comes from a rows.json. --paired also checks passkey prompt by prompt: each row's answers against the
keys its seed drew (evaluation/passkey.row_hits), and the exact sign test of the learned row against each method on
the prompt sets both have.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

NAMES = {"dense": "original, dense", "h2o": "H2O", "tova": "TOVA", "streaming_llm": "StreamingLLM",
         "snapkv": "SnapKV", "corm_capped": "CORM (capped)", "corm": "CORM"}


class SpecError(Exception):
    """A spec or rows file this script cannot use (one line, exit 2)."""


def _rows(path: str) -> list:
    try:
        return json.loads(pathlib.Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"cannot read the rows of {path} ({e}); give a compare run's rows.json") from None


def _pick(rows: list, models: tuple, method: str | None, ratio: float | None, field: str):
    for r in rows:
        if r.get(field) is None or r["model"] not in models:
            continue
        if method is None or (r["method"] == method and (ratio is None or abs(r["ratio"] - ratio) < 1e-6)):
            return r
    return None


def _seed_file(entry: str) -> tuple:
    seed, sep, path = entry.partition(":")
    if not sep or not seed.isdigit():
        raise SpecError(f"a passkey entry looks like SEED:ROWS_JSON; got {entry!r}")
    return int(seed), path


def _found(row: dict) -> tuple:
    cells = row["passkey"]
    n = sum(len(c["answers"]) for c in cells)
    return round(sum(c["accuracy"] * len(c["answers"]) for c in cells)), n


FIELDS = ("cell", "ratio", "learned", "ppl", "passkey", "methods")


def measure_cell(cell: dict, filler_len: int = 0) -> dict:
    missing = [f for f in FIELDS if f not in cell]
    if missing:
        raise SpecError(f"the cell {cell.get('cell', '?')!r} lacks {', '.join(missing)}; each cell needs "
                        f"{', '.join(FIELDS)} (see --help)")
    learned = cell["learned"] if isinstance(cell["learned"], list) else [cell["learned"]]
    ppl_rows = [_rows(p) for p in cell["ppl"]]
    pk_rows = [(seed, _rows(p)) for seed, p in map(_seed_file, cell["passkey"])]
    entries = [("dense", ("base",), "dense", None)] + [(m, ("base",), m, cell["ratio"]) for m in cell["methods"]] + \
              [("learned", tuple(learned), None, None)]
    out, cells_by_seed = [], {}
    for name, models, method, ratio in entries:
        e = {"name": name, "label": NAMES.get(name, learned[0])}
        for rows in ppl_rows:
            r = _pick(rows, models, method, ratio, "ppl")
            if r:
                e.update(ppl=r["ppl"], logical_cr=r.get("logical_cr"), mb=r.get("bytes_per_seq", 0) / 2 ** 20,
                         bytes_cr=r.get("bytes_cr"), model=r["model"])
                break
        found = total = 0
        seeds = {}
        for seed, rows in pk_rows:
            r = None if seed in seeds else _pick(rows, models, method, ratio, "passkey")
            if r:
                f, n = _found(r)
                found, total = found + f, total + n
                seeds[seed] = r["passkey"]
        sets = len(seeds)
        cells_by_seed[name] = seeds
        if sets:
            e.update(passkey_found=found, passkey_prompts=total, passkey_seeds=sorted(seeds))
        out.append(e)
    mine = out[-1]
    verdict = {}
    for e in out[1:-1]:
        ppl = "ppl" in e and "ppl" in mine and mine["ppl"] < e["ppl"]
        pk = None
        common = sorted(set(cells_by_seed[e["name"]]) & set(cells_by_seed["learned"]))
        if common:  # on the prompt sets both rows have
            f_l, n_l = map(sum, zip(*(_found({"passkey": cells_by_seed["learned"][sd]}) for sd in common)))
            f_m, n_m = map(sum, zip(*(_found({"passkey": cells_by_seed[e["name"]][sd]}) for sd in common)))
            pk = f_l / n_l > f_m / n_m
        verdict[e["name"]] = {"ppl": ppl if "ppl" in e else None, "passkey": pk}
        if "mb" in e and "mb" in mine and e["mb"]:
            verdict[e["name"]]["bytes_ratio"] = mine["mb"] / e["mb"]  # the learned row's bytes / the method's
    if filler_len:  # prompt by prompt on the prompt sets both rows have: the sign test of learned against each
        from dmc_jax.evaluation.passkey import row_hits, sign_test

        def hits(name, seeds):
            try:
                return [h for sd in seeds for h in row_hits(cells_by_seed[name][sd], filler_len, sd)]
            except ValueError as err:
                raise SpecError(f"{cell['cell']}, {name}: {err}; check the SEED of its passkey files") from None

        for name, v in verdict.items():
            common = sorted(set(cells_by_seed[name]) & set(cells_by_seed["learned"]))
            if common:
                v["paired"] = {"seeds": common, **sign_test(hits("learned", common), hits(name, common))}
    missing = [f"{name} {m}" for name, v in verdict.items() for m in ("ppl", "passkey") if v[m] is None]
    wins = not missing and all(v["ppl"] and v["passkey"] for v in verdict.values())
    return {"cell": cell["cell"], "ratio": cell["ratio"], "rows": out, "beats": verdict, "beats_every_method": wins,
            "not_measured": missing}


def markdown(cells: list) -> str:
    lines = ["| cell | method | decoded ppl | logical CR | cache MB/seq | passkey found | learned beats it (ppl, passkey) |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        for e in c["rows"]:
            ppl = f"{e['ppl']:.3f}" if "ppl" in e else "-"
            cr = f"{e['logical_cr']:.2f}" if e.get("logical_cr") else "-"
            mb = f"{e['mb']:.2f}" if "mb" in e else "-"
            pk = f"{e['passkey_found']} / {e['passkey_prompts']}" if "passkey_found" in e else "-"
            v = c["beats"].get(e["name"])
            yes = lambda x: "-" if x is None else ("yes" if x else "**no**")
            verdict = f"{yes(v['ppl'])}, {yes(v['passkey'])}" if v else ""
            if v and "paired" in v:
                t = v["paired"]
                verdict += f" ({t['only_this']} prompts only learned, {t['only_baseline']} only it, p = {t['p_two_sided']:.2g})"
            label = f"**{e['label']}**" if e["name"] == "learned" else e["label"]
            if e["name"] == "learned":
                ppl, pk = f"**{ppl}**", f"**{pk}**"
            lines.append(f"| {c['cell']} | {label} | {ppl} | {cr} | {mb} | {pk} | {verdict} |")
        gap = f" (not measured: {', '.join(c['not_measured'])})" if c["not_measured"] else ""
        ratios = [v["bytes_ratio"] for v in c["beats"].values() if "bytes_ratio" in v]
        span = f"; its bytes / theirs {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        lines.append(f"| {c['cell']} | *beats every training-free method on both* | | | | | "
                     f"**{'yes' if c['beats_every_method'] else 'no'}**{gap}{span} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--markdown", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--paired", default="", metavar="MODEL",
                    help="also check passkey prompt by prompt (sign test), the prompts rebuilt with MODEL's tokenizer "
                         "(the model.source the rows ran with, e.g. smollm2)")
    a = ap.parse_args(argv)
    try:
        spec = json.loads(pathlib.Path(a.spec).read_text())
        filler_len = 0
        if a.paired:
            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
            from dmc_jax.errors import UserError
            from dmc_jax.tasks.compare import passkey_filler
            from dmc_jax.weights.load import load_model
            try:
                filler_len = len(passkey_filler(load_model(a.paired).tokenizer))
            except UserError as e:
                raise SpecError(str(e)) from None
        cells = [measure_cell(c, filler_len) for c in spec]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError) as e:
        print(f"error: cannot read the spec {a.spec} ({e}); give a JSON list of cells (see --help)", file=sys.stderr)
        return 2
    md = markdown(cells)
    print(md)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(md)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
