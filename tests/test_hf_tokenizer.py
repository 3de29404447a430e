"""A converted Hugging Face checkpoint keeps its tokenizer, and `sparsemoe generate` prompts it."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

from sparsemoe.cli import main  # noqa: E402
from sparsemoe.hf.tokenizer import TOKENIZER_DIR  # noqa: E402

TEXT = ["def read_config(path):\n    return open(path).read()\n", "class Expert:\n    pass\n"] * 20


def _tiny_hf_folder(tmp_path):
    """A random tiny Mixtral with a BPE tokenizer trained offline on a few lines."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    config = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_generate_prompts_a_converted_checkpoint_with_its_tokenizer(tmp_path, capsys):
    folder, hf_model, tok = _tiny_hf_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["convert", str(folder), str(out)]) == 0
    assert (out / TOKENIZER_DIR / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def read", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    ids = tok("def read", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = hf_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert printed == tok.decode(expected[0]) + "\n"


def test_generate_without_a_tokenizer_refuses_a_non_byte_model(tmp_path, capsys):
    folder, _, _ = _tiny_hf_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["convert", str(folder), str(out)]) == 0
    shutil.rmtree(out / TOKENIZER_DIR)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "x"]) == 2
    assert "not a byte-level model" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--tokenizer", str(folder), "--prompt", "class",
                 "--max-new-tokens", "2"]) == 0
