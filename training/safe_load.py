"""DeepSpeed's checkpoint files read with ``torch.load(weights_only=True)``.

DeepSpeed saves model and optimizer states with ``torch.save`` and reads them back with
``torch.load(weights_only=False)`` in a dozen places (its checkpoint engine, ZeRO's shards,
ds_to_universal), which would run any code a tampered file carries. Around our checkpoint
reads every ``torch.load`` is made a weights-only one, with the few classes DeepSpeed's files
hold allowed by name (TRUSTED); anything else stops the load with an error naming the file
and the class:

    with weights_only_loads():
        engine.load_checkpoint(...)

    python -m training.safe_load --input_folder ... --output_folder ...   # ds_to_universal, the same way

Model weights never come through here: they are safetensors (training/export.py).
"""
from __future__ import annotations

import importlib
import pickle
from contextlib import contextmanager

import torch

# (module, name) of the classes DeepSpeed's checkpoint files hold besides tensors and containers
TRUSTED = (
    ("training.engine", "_SkipFlag"),                                   # our optimizer's skip flag
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that holds more than tensors and the TRUSTED classes."""


def trusted() -> list:
    return [getattr(importlib.import_module(module), name) for module, name in TRUSTED]


@contextmanager
def weights_only_loads():
    """Every torch.load inside is weights_only=True (whatever its caller asked) with TRUSTED allowed."""
    original = torch.load
    allowed = trusted()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"{f}: refused to load: it holds objects other than tensors and the classes "
                                   f"training/safe_load.py trusts ({str(err).splitlines()[0]})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


if __name__ == "__main__":  # DeepSpeed's ds_to_universal with weights-only loads (its workers fork)
    from deepspeed.checkpoint import ds_to_universal
    with weights_only_loads():
        ds_to_universal.main(ds_to_universal.parse_arguments())
