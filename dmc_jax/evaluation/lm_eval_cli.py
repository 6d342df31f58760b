"""`dmc-lm-eval` (or `python -m dmc_jax.evaluation.lm_eval_cli`): lm-eval's own command line with the dmc_jax
backend registered, for lm-eval releases that do not yet load backends from the `lm_eval.models` entry point.

    dmc-lm-eval --model dmc_jax --model_args source=smollm2,cache=tova,ratio=4 --tasks ... --include_path DIR

Same arguments and output as `lm_eval`; a bad argument of ours ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval is not installed; pip install -e '.[eval]'", file=sys.stderr)
        raise SystemExit(2) from None
    import dmc_jax.evaluation.lm_eval_backend  # noqa: F401  (registers --model dmc_jax)
    from dmc_jax.errors import UserError

    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
