"""`peerlab-lm-eval`: lm-eval's own command line with the `peerlab` model registered.

lm-eval 0.4 has no plugin entry point for models, so this console script imports the
adapter (which registers itself as `peerlab`) and hands every argument to lm-eval:

    peerlab-lm-eval --model peerlab --model_args checkpoint=PATH --tasks peerlab_demo --include_path evals/registry
"""

from __future__ import annotations

import json
import sys


def checkpoint_argument(argv: list[str]) -> str | None:
    """The checkpoint=PATH of `--model peerlab --model_args ...` ("k=v,k=v" or JSON), else None."""
    value = model = None
    for i, arg in enumerate(argv):
        for flag in ("--model_args", "--model"):
            if arg == flag and i + 1 < len(argv):
                value, model = (argv[i + 1], model) if flag == "--model_args" else (value, argv[i + 1])
            elif arg.startswith(flag + "="):
                rest = arg.split("=", 1)[1]
                value, model = (rest, model) if flag == "--model_args" else (value, rest)
    if model != "peerlab" or not value:
        return None
    try:
        pairs = (
            json.loads(value)
            if value.lstrip().startswith("{")
            else dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        )
    except (ValueError, TypeError):
        return None  # lm-eval reports it
    return pairs.get("checkpoint") if isinstance(pairs, dict) else None


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from peerlab.eval.lm import EvalError, find_checkpoint

    try:
        path = checkpoint_argument(sys.argv[1:])
        if path:  # a missing checkpoint fails now, not after lm-eval has indexed every task (15 s and more)
            find_checkpoint(path)
        cli_evaluate()
    except EvalError as err:  # a missing checkpoint, bad model arguments: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
