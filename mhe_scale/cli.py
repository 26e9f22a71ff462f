"""`mhe-scale` console script: `mhe-scale train CONFIG [key=value ...]`, `mhe-scale heads`, `mhe-scale tasks`."""

from __future__ import annotations

import sys


HEAD_ADVICE = ("Choosing: multi-label data (XMC) -> mhc or fc; mhp ranks below the most-frequent-labels "
               "baseline on real multi-label data\n(Delicious P@1 28.0 vs 40.8, docs/benchmarks.md; also Enron, "
               "Corel5k). Single-label, huge C -> mhp, mhs or partial_fc; small C -> fc.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: mhe-scale {train,heads,tasks,plan} ...\n  train CONFIG [key=value ...]   train and evaluate\n  heads                         list registered heads and their arguments\n  tasks [NAME]                  list registered tasks and their config keys\n  plan CONFIG [key=value ...] --gpus N --nodes M --gpu-mem 80GB [--probe]   memory plan + DeepSpeed/accelerate files"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from mhe_scale.train import main as train_main

        return train_main(rest)
    if command == "plan":
        from mhe_scale.plan.cli import main as plan_main

        return plan_main(rest)
    if command == "heads":
        import mhe_scale.heads as heads

        for name in heads.list_heads():
            print(f"{name:12s} {', '.join(heads.head_arguments(name))}")
        print("\n" + HEAD_ADVICE)
        return 0
    if command == "tasks":
        from mhe_scale.config import ConfigError
        from mhe_scale.tasks.registry import describe_schema, get_task, list_tasks

        try:
            tasks = [get_task(rest[0])] if rest else list_tasks()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for task in tasks:
            names = f" (data.name: {', '.join(task.data_names)})" if task.data_names else ""
            print(f"{task.name}: {task.summary}{names}")
            if rest:
                print("\n".join("  " + line for line in describe_schema(task.schema)))
        if not rest:
            print("\n`mhe-scale tasks NAME` prints a task's config keys with their types and defaults")
        return 0
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
