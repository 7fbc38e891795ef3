"""The samples a model-quality benchmark runs on: the same flags and the same reading for each."""

from __future__ import annotations

from lcflow.tasks import SPLITS, TASK_NAMES, QASample, get_task, load_task_file


def add_sample_flags(parser, n_default: int) -> None:
    """--task / --task-file / --split / --n, as `bench oracles` and `bench packets` take them."""
    parser.add_argument("--task", default="facts-cross", choices=TASK_NAMES, help="built-in task")
    parser.add_argument("--task-file", help="a JSONL task file instead of --task (e.g. the unseen family)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split of the built-in task")
    parser.add_argument("--n", type=int, default=n_default, help="samples")


def samples_from_flags(args) -> list[QASample]:
    """The first --n samples of --task-file, or of the built-in --task's --split."""
    if args.task_file:
        return load_task_file(args.task_file)[: args.n]
    return get_task(args.task).samples(args.split, args.n)


def samples_label(args) -> str:
    """Where the samples came from, for a report's meta."""
    return args.task_file or f"{args.task}/{args.split}"
