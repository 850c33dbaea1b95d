"""GGUF export: a tiny Llama with a byte-level BPE tokenizer, full and depth-pruned,
written as GGUF and read back by transformers' GGUF loader with the same logits (f32
exactly up to float rounding, f16 / bf16 / q8_0 within their rounding), and refusals."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import prunekit
from prunekit.data import load_text
from prunekit.export.gguf import block_shapes, export_gguf
from prunekit.methods import PruneRequest, get_method
from prunekit.models.families import adapter_for
from prunekit.models.loading import LoadedModel
from prunekit.surgery.width import update_config_widths


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = load_text("tinyshakespeare", purpose="calib").text[:20000]
    bpe.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def _tiny(tokenizer, seed=0) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, adapter_for(model), source="tiny")


IDS = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "quant, tol", [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)]
)
def test_gguf_reloads_with_the_same_logits(tokenizer, tmp_path, quant, tol):
    lm = _tiny(tokenizer)
    path = export_gguf(lm, tmp_path / "tiny.gguf", quant)
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected, got = lm.model(IDS).logits, back(IDS).logits
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_depth_pruned_model_exports(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    lm = _tiny(tokenizer, seed=1)
    from prunekit.surgery.depth import remove_blocks

    remove_blocks(lm.adapter, [1, 2])
    path = export_gguf(lm, tmp_path / "depth.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert back.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, lm.model(IDS).logits, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "To be, or not to be"
    assert tok(text, add_special_tokens=False).input_ids == tokenizer(text).input_ids


def test_refusals(tokenizer, tmp_path, stories):
    lm = _tiny(tokenizer)
    with pytest.raises(prunekit.PrunekitError, match="unknown --quant 'q4_k_m'"):
        export_gguf(lm, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(prunekit.PrunekitError, match="byte fallback"):
        export_gguf(stories, tmp_path / "x.gguf", "f32")
    assert not list(tmp_path.glob("*x.gguf*"))


def test_cli_export_refuses_bad_input_in_one_line(tmp_path):
    from helpers import run_cli

    done = run_cli("export", "stories260k", "--gguf", str(tmp_path / "s.gguf"), "--quant", "q2",
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "valid: f32, f16, bf16, q8_0" in done.stderr
    done = run_cli("export", "stories260k", "--gguf", str(tmp_path / "s.gguf"), cwd=tmp_path)
    assert done.returncode == 2 and "byte fallback" in done.stderr
    assert not list(tmp_path.glob("*s.gguf*"))


def test_speed_in_llamacpp(tokenizer, tmp_path):
    """`prunekit speed --engine llamacpp` times a tiny exported model (where llama-cpp-python
    is installed); batch sizes other than 1 are refused everywhere."""
    from helpers import run_cli

    bad = run_cli("speed", "stories260k", "--engine", "llamacpp", "--batch", "8", cwd=tmp_path)
    assert bad.returncode == 2 and "valid: --batch 1" in bad.stderr
    pytest.importorskip("llama_cpp")
    lm = _tiny(tokenizer)
    lm.model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "speed.json"
    done = run_cli(
        "speed", str(tmp_path / "tiny"), "--engine", "llamacpp", "--prefill", "16",
        "--decode", "4", "--repeats", "1", "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import json

    row = json.loads(out.read_text())["speed"]["model"]["batch 1"]
    assert row["prefill_tok_s"]["median"] > 0 and row["decode_tok_s"]["median"] > 0


def _llamacpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [L, vocab] of llama.cpp at every position of `ids` [1, L]."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids[0].tolist())
    return torch.tensor(llm.scores[: ids.shape[1]], dtype=torch.float32)


@pytest.mark.parametrize("selection, arch", [("global", "deci"), ("uniform", "llama")])
def test_flap_pruned_models_run_in_llamacpp(tokenizer, tmp_path, selection, arch):
    """FLAP with global selection leaves different KV heads and MLP widths per block: the
    export writes llama.cpp's `deci` architecture with per-block arrays. Uniform selection
    stays `llama`. Both carry FLAP's o / down bias compensation, and llama.cpp computes
    the transformers model's logits."""
    pytest.importorskip("llama_cpp")
    import gguf

    lm = _tiny(tokenizer, seed=2)
    ids = torch.randint(2, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    flap = get_method("flap")
    flap(flap.Config(selection=selection)).run(lm, ids, PruneRequest(sparsity=0.4))
    update_config_widths(lm.adapter)
    shapes = block_shapes(lm)
    uniform = all(len(set(v)) == 1 for v in shapes.values())
    assert uniform == (arch == "llama")
    path = export_gguf(lm, tmp_path / "flap.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    assert any(t.name.endswith((".attn_output.bias", ".ffn_down.bias")) for t in reader.tensors)
    counts = reader.fields[f"{arch}.attention.head_count_kv"]
    assert [int(counts.parts[i][0]) for i in counts.data] == (
        shapes["kv_heads"][:1] if uniform else shapes["kv_heads"]
    )
    with torch.no_grad():
        expected = lm.model(IDS).logits[0]
    torch.testing.assert_close(_llamacpp_logits(path, IDS), expected, atol=1e-3, rtol=1e-3)


def test_q8_0_falls_back_to_f16_for_widths_its_blocks_do_not_divide(tokenizer, tmp_path):
    """A pruned MLP width of 70 is no multiple of q8_0's 32-value blocks: those matrices
    are written in f16 (llama.cpp's converter does the same) and the file reloads."""
    import gguf

    from prunekit.surgery.width import keep_channels

    lm = _tiny(tokenizer)
    for block in lm.adapter.blocks:
        keep_channels(lm.adapter, block, list(range(70)))
    update_config_widths(lm.adapter)
    path = export_gguf(lm, tmp_path / "odd.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, lm.model(IDS).logits, atol=1e-1, rtol=1e-1)
