"""DeepSpeed's checkpoint files read with ``torch.load(weights_only=True)``.

DeepSpeed saves model and optimizer states with ``torch.save`` and reads them back with
``torch.load(weights_only=False)`` in a dozen places (its checkpoint engine, ZeRO's shards,
ds_to_universal), which would run any code a tampered file carries. Around our checkpoint
reads every ``torch.load`` is made a weights-only one, with the few classes DeepSpeed's files
hold allowed (training/engine.py's checkpoint_classes(): this module imports no DeepSpeed);
anything else stops the load with an error naming the file and the class:

    with weights_only_loads(checkpoint_classes()):
        engine.load_checkpoint(...)

    python -m training.safe_load --input_folder ... --output_folder ...   # ds_to_universal, the same way

Model weights never come through here: they are safetensors (training/export.py).
"""
from __future__ import annotations

import pickle
import sys
from contextlib import contextmanager

import torch


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that holds more than tensors and the allowed classes."""


@contextmanager
def weights_only_loads(allowed: list):
    """Every torch.load inside is weights_only=True (whatever its caller asked), with the
    classes in ``allowed`` (DeepSpeed's: training.engine.checkpoint_classes()) permitted."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"{f}: refused to load: it holds objects other than tensors and the classes "
                                   f"r1pipe allows ({str(err).splitlines()[0]})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


if __name__ == "__main__":  # DeepSpeed's ds_to_universal with weights-only loads (its workers fork)
    from training.engine import ds_to_universal_main
    ds_to_universal_main(sys.argv[1:])
