"""Entry point: `python -m dmc_jax.main --config configs/<name>.py [--config.key=value ...]`.

Loads and validates the config once, runs config.task, writes <run dir>/results.json and prints its path.
Bad input exits with code 2 and one line on stderr; Ctrl-C exits with code 130 and one line saying where the run
stopped and how to resume.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from dmc_jax import host_memory
from dmc_jax.config_loader import parse_argv
from dmc_jax.config_schema import validate
from dmc_jax.errors import UserError

# task -> (module, needs the model loaded[, parameter layout for load_model: 'inference' unless given])
_TASKS = {"demo": ("dmc_jax.tasks.demo", True), "generate": ("dmc_jax.tasks.generate", True),
          "eval": ("dmc_jax.tasks.evaluate", True), "bench": ("dmc_jax.tasks.bench", True),
          "prepare_data": ("dmc_jax.tasks.prepare_data", False), "train": ("dmc_jax.tasks.train", True, "training"),
          "retrofit": ("dmc_jax.tasks.retrofit", True, "training"), "plan": ("dmc_jax.tasks.plan", False),
          "convert_kv_heads": ("dmc_jax.tasks.convert_kv_heads", True), "compare": ("dmc_jax.tasks.compare", True),
          "methods": ("dmc_jax.tasks.methods", False), "serve": ("dmc_jax.tasks.serve", True),
          "convert_megatron": ("dmc_jax.tasks.convert_megatron", False)}


def run(argv: Sequence[str]) -> str:
    """Runs the task the command line asks for; returns the path of its results.json."""
    import importlib

    from dmc_jax.cache import model_method
    from dmc_jax.tasks import common

    config = parse_argv(argv)
    validate(config)
    if config.get("keep_freed_memory", False):  # before XLA allocates anything (no backend has started yet)
        print(host_memory.keep_freed_memory())
    from dmc_jax.training import distributed  # before anything touches a device: joins the process group

    if distributed.initialize(config).multi_process:
        if not config.get("output_dir"):
            raise UserError("a multi-process run needs the same output_dir in every process; set output_dir")
        print(distributed.describe(), flush=True)
    module_name, needs_model, *layout = _TASKS[config.task]
    task = importlib.import_module(module_name)
    out_dir = common.run_dir(config)
    config.output_dir = out_dir  # tasks that write more than results.json (train) use the same directory
    common.check_outputs(config)  # every output location writable, before any work
    start = time.perf_counter()
    if needs_model:
        model = common.load_model(config, *layout)
        print(f"model: {model.source} ({model.cfg.num_params() / 1e6:.1f}M parameters, "
              f"{model.cfg.num_layers} layers, {model.cfg.param_dtype})")
        note = model_method.serving_note(config) if "cache" in config else None
        if note:
            print(note)
        results = task.run(config, model)
    else:
        results = task.run(config)
    results["wall_seconds"] = time.perf_counter() - start
    if not distributed.is_main_process():  # process 0 writes results.json
        return f"{out_dir}/results.json"
    return common.write_results(out_dir, results, config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        path = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # errors.Interrupted says where; elsewhere nothing was written yet
        print(str(e) or "interrupted before the task finished; results.json was not written: run the same command "
              "again", file=sys.stderr)
        return 130
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
