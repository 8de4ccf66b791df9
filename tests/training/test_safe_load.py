"""DeepSpeed's checkpoint files are read with torch.load(weights_only=True): every ZeRO stage and
precision round-trips through it, and a checkpoint file carrying code is refused, naming the
file, without running it."""
import pytest
import torch

from tests.training.test_engine import batches, tiny_engine
from training.engine import checkpoint_classes
from training.safe_load import UnsafeCheckpoint, weights_only_loads


class RunsCode:
    """Unpickling it calls open(path, "w"): the marker file appears if the load runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("variant", [dict(zero_stage=0), dict(zero_stage=1), dict(zero_stage=2, precision="bf16"),
                                     dict(zero_stage=2, offload_optimizer=True), dict(zero_stage=3),
                                     dict(zero_stage=3, precision="bf16")])
def test_every_zero_stage_and_precision_resumes_through_weights_only_loads(variant, tmp_path):
    a = tiny_engine(**variant)
    a.train_step(batches(0))
    a.save(tmp_path / "ck")
    expected = [a.train_step(batches(s)).loss for s in (1, 2)]
    b = tiny_engine(**variant)
    b.load(tmp_path / "ck")  # Engine.load reads inside weights_only_loads()
    assert [b.train_step(batches(s)).loss for s in (1, 2)] == expected


def test_a_checkpoint_file_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    engine = tiny_engine(1)
    engine.train_step(batches(0))
    engine.save(tmp_path / "ck")
    [states] = (tmp_path / "ck" / "ds").glob("mp_rank_00_model_states.pt")
    torch.save({"module": {}, "payload": RunsCode(marker)}, states)
    with pytest.raises(UnsafeCheckpoint, match=r"mp_rank_00_model_states\.pt: refused to load"):
        tiny_engine(1).load(tmp_path / "ck")
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint), weights_only_loads(checkpoint_classes()):
        torch.load(states, weights_only=False)  # any caller inside, whatever it asks for
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # the original is back after the block
