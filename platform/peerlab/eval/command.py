"""`peerlab-lm-eval`: lm-eval's own command line with the `peerlab` model registered.

lm-eval 0.4 has no plugin entry point for models, so this console script imports the
adapter (which registers itself as `peerlab`) and hands every argument to lm-eval:

    peerlab-lm-eval --model peerlab --model_args checkpoint=PATH --tasks peerlab_demo --include_path evals/registry
"""

from __future__ import annotations

import sys


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from peerlab.eval.lm import EvalError

    try:
        cli_evaluate()
    except EvalError as err:  # a missing checkpoint, bad model arguments: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
