"""The embedded local cluster's worker setup hook quiets two Ray Train loggers by name."""
import importlib
import logging
import os

import ray

from cluster.session import quiet_local_workers


def test_quiet_local_workers_targets_loggers_that_exist():
    """Both names point at real Ray modules, so a Ray upgrade that moves them fails here
    instead of bringing back a warning a second through every local training stage."""
    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                           "context.py")
    assert importlib.import_module(cleaner).logger.name == cleaner
    assert importlib.import_module("ray.train.v2._internal.execution.context").logger.name == context
    try:
        quiet_local_workers()
        assert logging.getLogger(cleaner).level == logging.ERROR
        assert logging.getLogger(context).level == logging.WARNING
    finally:
        for name in (cleaner, context):
            logging.getLogger(name).setLevel(logging.NOTSET)
