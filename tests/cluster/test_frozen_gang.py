"""A frozen model under ZeRO-3 on a real 2-worker Ray Train gang (gloo): each rank holds half of
the weights, and both compute the same log-probabilities as the whole model in one process.
The gang runs through run_gang, the runner every training stage uses."""
import torch

from cluster.gang import GangConfig
from cluster.session import RaySettings, connect
from cluster.train import run_gang
from training.config import EngineConfig
from training.engine import FrozenModel
from training.export import load_model, save_model
from training.logprobs import completion_logprobs
from training.model import ModelConfig, Transformer


def frozen_worker(payload: dict, hooks) -> dict:
    import torch.distributed as dist
    frozen = FrozenModel.from_folder(payload["model"], EngineConfig(zero_stage=3))
    ids = torch.tensor(payload["ids"])
    logp, _ = completion_logprobs(frozen, ids, torch.ones_like(ids, dtype=torch.bool))
    local = torch.tensor([frozen.local_numel()])
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return {"local_numel": [int(t) for t in gathered], "logp": logp.tolist(),
            "requires_grad": any(p.requires_grad for p in frozen.module.parameters())}


def test_zero3_frozen_model_is_sharded_over_the_gang(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                                n_kv_heads=1, dense_hidden=48, expert_hidden=16, max_seq_len=32))
    folder = save_model(model, tmp_path / "model")
    ids = torch.randint(3, 64, (2, 8))
    connect(RaySettings(num_cpus=2))
    out = run_gang(frozen_worker, {"model": str(folder), "ids": ids.tolist()}, GangConfig(num_workers=2),
                   checkpoints=tmp_path / "checkpoints", work=tmp_path / "work", name="frozen")
    total = sum(p.numel() for p in model.parameters())
    assert sum(out["local_numel"]) >= total and max(out["local_numel"]) <= total // 2 + 64  # halves (+ padding)
    assert not out["requires_grad"]
    want, _ = completion_logprobs(load_model(folder).eval(), ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(torch.tensor(out["logp"]), want, atol=1e-5, rtol=0)
