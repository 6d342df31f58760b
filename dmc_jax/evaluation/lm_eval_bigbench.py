"""Local lm-eval tasks from BIG-bench multiple-choice tasks (the PyPI sdist bigbench==1.0.0, fetched once).

    python -m dmc_jax.evaluation.lm_eval_bigbench --tasks strategyqa,date_understanding --out runs/lm_eval_tasks
    dmc-lm-eval --model dmc_jax --model_args source=smollm2,cache=h2o,ratio=4 \
        --tasks bigbench_local_strategyqa --include_path runs/lm_eval_tasks --num_fewshot 3

For each task, writes <out>/bigbench_local_<task>.yaml and its data: the examples in a fixed random order, the
first `--shots` of them in <task>.train.jsonl (few-shot examples, never scored) and the rest in <task>.test.jsonl.
The prompt is task compare's ("Q: <input>\\nA: <choice>", shots separated by a blank line); each choice is scored
by its summed log-likelihood (lm-eval's acc) and per byte (acc_norm). No network at evaluation time.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from dmc_jax.evaluation import bigbench

YAML = """# BIG-bench {task} (bigbench==1.0.0 sdist), local copy written by dmc_jax.evaluation.lm_eval_bigbench
task: bigbench_local_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{input}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(task_json: str, task: str, out_dir: str, shots: int, seed: int = 0) -> str:
    """Writes the task's YAML and JSON-lines splits into out_dir; returns the YAML's path."""
    examples = bigbench.load_examples(task_json)
    order = np.random.default_rng(seed).permutation(len(examples))
    rows = [{"input": q, "choices": c, "label": g} for q, c, g in (examples[i] for i in order)]
    paths = {}
    for split, part in (("train", rows[:shots]), ("test", rows[shots:])):
        paths[split] = os.path.abspath(os.path.join(out_dir, f"{task}.{split}.jsonl"))
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    yaml_path = os.path.join(out_dir, f"bigbench_local_{task}.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        f.write(YAML.format(task=task, train=json.dumps(paths["train"]), test=json.dumps(paths["test"])))
    return yaml_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="date_understanding,physical_intuition,strategyqa")
    p.add_argument("--out", default="runs/lm_eval_tasks")
    p.add_argument("--cache_dir", default="data_cache/bigbench", help="where the tasks' task.json files are kept")
    p.add_argument("--shots", type=int, default=16, help="examples kept apart as few-shot examples")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task, path in bigbench.ensure_tasks(args.cache_dir, tasks).items():
        print(write_task(path, task, args.out, args.shots))


if __name__ == "__main__":
    main()
