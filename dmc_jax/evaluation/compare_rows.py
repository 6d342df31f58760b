"""Compare's rows on disk: each row keyed 'model|method|CR', rows.json rewritten after every row, and a rerun with
the same settings reusing the rows already measured (compare.resume) and keeping the earlier rows its grid does not
name (a second run with other extra models adds to the directory's rows).

A row depends on the run-wide settings (measure_settings) and on its own method's cache section: each row records
that section (`cache_section`), so adding a method to the registry, or changing another method's fields, does not
invalidate the rows already measured. An extra model's rows also record its directory's fingerprint (file names,
sizes and modification times): a model retrained under the same label (a resumed retrofit) is measured again."""

from __future__ import annotations

import json
import os
from typing import Optional

from dmc_jax.evaluation import compare_report


def plain(x):
    """JSON-ready copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy and jax arrays and scalars
        return plain(x.tolist())
    return x


def row_key(key: tuple) -> str:
    """'model|method|nominal CR' (CR '-' when none: adaptive methods, KV-head conversions)."""
    label, method, ratio = key
    return f"{label}|{method}|{'-' if ratio is None else format(float(ratio), 'g')}"


ROWS_FILE = "rows.json"
# Settings that change what a row measures: a resumed run reuses rows only if these are unchanged.
MEASURE_FIELDS = ("evals", "text_files", "context", "prefix", "ppl_sequences", "passkey_lengths", "passkey_depths",
                  "passkey_trials", "mc_tasks", "mc_items", "mc_context", "min_budget")


def measure_settings(config) -> dict:
    """Everything that changes what a row measures (JSON-normalised)."""
    cache = {k: v for k, v in config.cache.to_dict().items() if not isinstance(v, dict)}  # sections: per row
    want = {"compare": {k: config.compare[k] for k in MEASURE_FIELDS}, "cache": cache,
            "kv_heads": config.kv_heads.to_dict(), "model": config.model.to_dict(), "seed": config.seed}
    return json.loads(json.dumps(want, default=list))


def previous_rows(config) -> dict:
    """{row key: row} of <output_dir>/rows.json (written after every row) when it was measured with the same
    settings, else {}."""
    path = os.path.join(config.output_dir, ROWS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        old = json.load(open(path))
    except (OSError, json.JSONDecodeError):
        print(f"[compare] {path} is unreadable; measuring every row again (it will be replaced)", flush=True)
        return {}
    if old.get("settings") != measure_settings(config):
        print(f"[compare] {path} was measured with other settings; measuring every row again", flush=True)
        return {}
    return {r["key"]: r for r in old.get("rows", []) if r.get("key") and not r.get("ppl_skipped")}


def source_fingerprint(source: str) -> str:
    """What a row of an extra model depends on beyond its label: names, sizes and mtimes of the model directory's
    files (or of the file), else the source string itself (e.g. 'smollm2')."""
    import hashlib

    if os.path.isdir(source):
        entries = sorted((name, os.stat(os.path.join(source, name))) for name in os.listdir(source)
                         if os.path.isfile(os.path.join(source, name)))
        text = ";".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in entries)
    elif os.path.isfile(source):
        st = os.stat(source)
        text = f"{os.path.basename(source)}:{st.st_size}:{st.st_mtime_ns}"
    else:
        text = source
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Rows(list):
    """The rows so far; the table is rewritten after each one so a long run shows partial results. With rows of an
    earlier run with the same settings (compare.resume), a row already measured is taken from there."""

    def __init__(self, out_dir: str, mc_tasks, settings: dict, previous: Optional[dict] = None,
                 cache_section=lambda method: None):
        super().__init__()
        self.out_dir, self.mc_tasks, self.settings, self.previous = out_dir, mc_tasks, settings, previous or {}
        self.cache_section = cache_section  # method -> its cache section as JSON (what a row of it depends on)

    def kept(self) -> list:
        """Rows of the earlier run (same settings) that this grid has neither reused nor measured again: kept, so a run
        with other methods or extra models in the same directory adds its rows to the earlier ones instead of
        dropping them (a row of the same key is replaced)."""
        have = {r.get("key") for r in self}
        return [r for key, r in self.previous.items() if key not in have]

    def all(self) -> list:
        """This grid's rows, then the kept ones: what rows.json and the tables hold."""
        return list(self) + self.kept()

    def write(self) -> dict:
        rows = self.all()
        dense_bytes = rows[0].get("bytes_per_seq") if rows else None
        for r in rows:
            if r.get("bytes_per_seq") and dense_bytes:
                r["bytes_cr"] = dense_bytes / r["bytes_per_seq"]
        path = os.path.join(self.out_dir, ROWS_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": self.settings, "rows": plain(rows)}, f, indent=1)
        os.replace(path + ".tmp", path)
        return compare_report.write_all(self.out_dir, rows, self.mc_tasks)

    def reuse(self, key: tuple, fingerprint: Optional[str] = None) -> bool:
        """Appends the earlier run's row for key, if there is one (of the same model: `fingerprint`)."""
        row = self.previous.get(row_key(key))
        if row is None or row.get("cache_section") != self.cache_section(key[1]) or \
                row.get("fingerprint") != fingerprint:
            return False
        print(f"[compare] {row_key(key)}: measured in the earlier run, reused", flush=True)
        self.append(row)
        return True

    def add(self, key: tuple, measure, fingerprint: Optional[str] = None) -> None:
        if not self.reuse(key, fingerprint):
            row = measure()
            row["key"], row["cache_section"] = row_key(key), self.cache_section(key[1])
            if fingerprint is not None:
                row["fingerprint"] = fingerprint
            self.append(row)

    def append(self, row) -> None:
        super().append(row)
        self.write()
