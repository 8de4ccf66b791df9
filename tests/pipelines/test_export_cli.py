"""`r1pipe export` of a tiny model loads in transformers and matches our logits."""
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from training.export import save_model
from training.model import ModelConfig, Transformer
from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def test_export_stage_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = train_tokenizer(["a tiny corpus of words to learn from"] * 20 + ["more words, more merges"] * 20,
                          TokenizerConfig(vocab_size=300, min_frequency=1))
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2,
                                  router_temperature=0.8)
    model = Transformer(cfg).eval()
    stage = tmp_path / "runs" / "r" / "pretrain"
    save_model(model, stage / "model")
    save_tokenizer(tok, tmp_path / "runs" / "r" / "tokenizer")  # the run's tokenizer stage

    out = tmp_path / "hf"
    res = runner.invoke(app, ["export", str(stage), str(out)])
    assert res.exit_code == 0, res.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok("more words to learn", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4

    again = runner.invoke(app, ["export", str(stage), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_export_refuses_missing_model(tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "out")])
    assert res.exit_code == 2 and "model.safetensors" in res.output
    assert not (tmp_path / "out").exists()
