"""Command-line plumbing shared by the scripts in experiments/: --config, --set, one-line errors."""

from __future__ import annotations

import argparse
import sys

from peerlab.config import Config, ConfigError, load_config


class UsageError(SystemExit):
    """Exit status 2 with a one-line message on stderr, before anything starts."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set train_config.learning_rate=3e-4 (repeatable)",
    )


def config_from_arguments(args: argparse.Namespace) -> Config:
    """The validated config named by --config and --set; a bad one exits 2 with one line."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def checked_data(cfg: Config):
    """Prepare the demo corpus when the config reads it, then check the data; returns the tokenizer.

    Runs before Ray starts; bad data exits 2 with one line.
    """
    from peerlab.data import DataError, TokenizerError, check_data
    from peerlab.data.corpus import prepare_demo_corpus

    if any(str(d.path).startswith("./data/demo") for d in cfg.dataset_config.datasets):
        prepare_demo_corpus("data/demo")
    try:
        return check_data(cfg.dataset_config, cfg.model_config)
    except (DataError, TokenizerError) as err:
        raise UsageError(str(err)) from None


def checked_evals(cfg: Config) -> None:
    """Every name in eval_config.evals is a task lm-eval or the registry knows; else exit 2 with one line.

    Runs before Ray starts, so a misspelt benchmark fails now and not after training.
    """
    if not cfg.eval_config.evals:
        return
    from peerlab.eval.harness import task_manager
    from peerlab.eval.lm import EvalError

    try:
        task_manager(cfg.eval_config.evals, cfg.eval_config.evals_registry_path, cfg.eval_config.eval_data_dir)
    except EvalError as err:
        raise UsageError(str(err)) from None
