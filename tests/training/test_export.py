import json

import pytest
import torch

from training.export import export_folder, export_hf, load_model, save_model
from training.generate import generate
from training.model import ModelConfig, Transformer
from training.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
# a model without shared experts exports a zero-width shared expert; transformers warns on its init
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def make_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                n_dense_layers=1, dense_hidden=48, n_experts=4, top_k=2, expert_hidden=16,
                n_shared_experts=2, router_temperature=0.7, rope_theta=50000.0, init_std=0.1)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32  # from the exported config, no dtype argument needed
    return model


VARIANTS = {
    "shared2-dense1-temp0.7-gqa": {},
    "no-shared-no-dense-unnormalised": dict(n_shared_experts=0, n_dense_layers=0, norm_topk_prob=False,
                                            n_kv_heads=None, router_temperature=1.3),
    "top1-capacity-uniform-bias": dict(top_k=1, capacity_factor=1.0, balance="bias"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_logits_match_ours(name, tmp_path):
    model = make_model(**VARIANTS[name])
    export_hf(model, tmp_path)
    hf = hf_model(tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    idx = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_transformers(tmp_path):
    model = make_model()
    export_hf(model, tmp_path)
    hf = hf_model(tmp_path)
    idx = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False  # row 1 is a 7-token prompt, left-padded
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(idx, positions_BT=pos, key_mask_BS=mask).logits
        theirs = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
    assert (ours[mask] - theirs[mask]).abs().max().item() <= 1e-4


def test_transformers_greedy_generate_matches_ours(tmp_path):
    model = make_model()
    export_hf(model, tmp_path)
    prompt = [3, 14, 15, 92, 65]
    ours = generate(model, [prompt], max_new_tokens=10).tokens[0].tolist()
    theirs = hf_model(tmp_path).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                         attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert theirs[0, 5:].tolist() == ours


def test_export_refuses_a_selection_bias(tmp_path):
    model = make_model(balance="bias", bias_update_rate=0.1).train()
    model(torch.randint(0, 128, (2, 16)))
    model.update_router_bias()
    with pytest.raises(ValueError, match="expert_bias") as err:
        export_hf(model, tmp_path)
    assert "balance='bias'" in str(err.value) and "Qwen2-MoE" in str(err.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_save_and_load_our_folder(tmp_path):
    model = make_model(balance="bias", bias_update_rate=0.1).train()
    model(torch.randint(0, 128, (2, 16)))
    model.update_router_bias()
    save_model(model, tmp_path)
    again = load_model(tmp_path).eval()
    model.eval()
    idx = torch.randint(0, 128, (2, 10))
    assert torch.equal(model(idx).logits, again(idx).logits)
    assert torch.equal(again.moe_layers()[1].expert_bias, model.moe_layers()[1].expert_bias)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))


def test_export_folder_with_tokenizer(tmp_path):
    tok = train_tokenizer(["the model thinks then answers. " * 20], TokenizerConfig(vocab_size=300))
    model = make_model(vocab_size=300)
    save_model(model, tmp_path / "stage")
    save_tokenizer(tok, tmp_path / "stage")
    export_folder(tmp_path / "stage", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert gen["eos_token_id"] == [2, tok.token_to_id("</answer>")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.decode(hf_tok("<think>a</think>")["input_ids"]) == "<think>a</think>"
    hf_model(tmp_path / "hf")
    with pytest.raises(ValueError, match="transformers export"):
        load_model(tmp_path / "hf")
