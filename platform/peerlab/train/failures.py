"""Which failures of a training run Ray Train restarts the workers for: lost workers, not our own errors.

Ray Train V2 restarts the worker group after any worker error, up to
`FailureConfig.max_failures` times. An error of the run itself (its config, data, tokenizer or
checkpoint, a non-finite loss) comes back on every restart, so those end the run at once:
`Trainer` is Ray Train's TorchTrainer with a failure policy that raises on them and leaves
everything else (a killed worker, a lost node, a preemption) to Ray's DefaultFailurePolicy.

Ray Train has no public way to tell worker errors apart, so two private parts of Ray 2.60 are
used, here and nowhere else (tests/test_train.py checks both still hold):
`TorchTrainer._initialize_and_run_controller` receives the failure policy the controller
runs, and a worker's exception reaches it wrapped in a UserExceptionWithTraceback whose
`_base_exc` is the exception itself. This module imports nothing of peerlab's: the policy is
sent to Ray Train's controller process, which should not pay for torch to load it.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

# By class name: the controller checks them without importing torch or lm-eval.
NOT_RETRIED = frozenset(
    {
        "peerlab.train.worker.TrainingError",
        "peerlab.config.ConfigError",
        "peerlab.data.sources.DataError",
        "peerlab.data.tokenizer.TokenizerError",
        "peerlab.train.checkpoint.CheckpointError",
        "peerlab.eval.lm.EvalError",
    }
)


def not_retried(error: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in NOT_RETRIED for c in type(error).__mro__)


def own_error(error: BaseException) -> BaseException | None:
    """The first NOT_RETRIED error a worker raised, out of Ray Train's WorkerGroupError (None if none)."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        original = getattr(failure, "_base_exc", failure)  # private: UserExceptionWithTraceback's wrapped error
        if not_retried(original):
            return original
    return None


class StopOnOwnErrors(DefaultFailurePolicy):
    """Ray's default policy, except that a worker group failing with one of our own errors is not restarted."""

    def make_decision(self, training_failed_error):
        if own_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """TorchTrainer whose controller runs StopOnOwnErrors."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):  # private hook (module docstring)
        controller_init_kwargs["failure_policy"] = StopOnOwnErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
