"""GGUF export for llama.cpp (sparsemoe.hf.gguf) and the whole-model inference benchmark (bench --inference)."""

import json

import pytest
import torch

from sparsemoe.bench.quant import decode_bytes_per_token
from sparsemoe.hf.io import HFFormatError
from sparsemoe.model import MoETransformer
from sparsemoe.model.config import preset
from sparsemoe.model.rope import apply_rope, rope_table

gguf = pytest.importorskip("gguf")

from sparsemoe.hf.gguf import decode_bytes_of_gguf, export_gguf, gguf_tensors, rope_pairs_adjacent  # noqa: E402


def _model(name: str = "tiny", **overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(preset(name, **overrides)).eval()


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.STRING:
            out[name] = field.parts[field.data[0]][0].item()
    return out


def _rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE: dims 2i and 2i + 1 rotate together by angle i. x [..., S, Hd], cos/sin [S, Hd/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def test_reordered_q_and_k_give_the_same_attention_scores_under_llama_cpp_rope():
    torch.manual_seed(1)
    heads, kv_heads, Hd, D, S = 4, 2, 8, 16, 5
    wq, wk = torch.randn(heads * Hd, D), torch.randn(kv_heads * Hd, D)
    x = torch.randn(S, D)
    cos, sin = rope_table(Hd, S, 10000.0)
    q = apply_rope((x @ wq.t()).view(S, heads, Hd).transpose(0, 1), cos, sin)
    k = apply_rope((x @ wk.t()).view(S, kv_heads, Hd).transpose(0, 1), cos, sin)
    half_cos, half_sin = cos[:, : Hd // 2], sin[:, : Hd // 2]
    q2 = _rope_adjacent((x @ rope_pairs_adjacent(wq, heads).t()).view(S, heads, Hd).transpose(0, 1), half_cos, half_sin)
    k2 = _rope_adjacent((x @ rope_pairs_adjacent(wk, kv_heads).t()).view(S, kv_heads, Hd).transpose(0, 1), half_cos, half_sin)
    for h in range(heads):
        g = h // (heads // kv_heads)
        torch.testing.assert_close(q2[h] @ k2[g].t(), q[h] @ k[g].t(), rtol=1e-5, atol=1e-4)
    # Without the reordering the scores differ: the test can tell.
    q3 = _rope_adjacent((x @ wq.t()).view(S, heads, Hd).transpose(0, 1), half_cos, half_sin)
    assert not torch.allclose(q3[0] @ k2[0].t(), q[0] @ k[0].t(), atol=1e-2)


def test_f32_file_holds_every_tensor_exactly_in_llama_cpp_layout(tmp_path):
    model = _model()
    c = model.config
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    reader, tensors = _read(path)
    expected = gguf_tensors(model, "f32")
    assert [name for name, _, _ in expected] == [t.name for t in reader.tensors]
    F = c.moe_hidden_dim
    w_in = model.layers[1].ffn.experts.w_in.detach()
    got = torch.from_numpy(tensors["blk.1.ffn_up_exps.weight"].data.copy())
    torch.testing.assert_close(got, w_in[:, F:], rtol=0, atol=0)
    got_q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy())
    torch.testing.assert_close(got_q, rope_pairs_adjacent(model.layers[0].attn.q_proj.weight.detach(), c.n_heads), rtol=0, atol=0)
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [F, c.dim, c.num_experts]  # ggml lists dims reversed
    fields = _fields(reader)
    assert fields["llama.expert_count"] == c.num_experts and fields["llama.expert_used_count"] == c.top_k
    assert fields["llama.attention.head_count_kv"] == c.n_kv_heads and fields["llama.block_count"] == c.n_layers
    assert fields["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert decode_bytes_of_gguf(path, c.top_k, c.num_experts) == decode_bytes_per_token(model)
    assert not list(tmp_path.glob("*.partial"))


def test_bf16_and_quantized_files(tmp_path):
    model = _model("demo")  # D = F = 128: whole blocks of 32
    F = model.config.moe_hidden_dim
    w_gate = model.layers[0].ffn.experts.w_in.detach()[:, :F]
    bf16 = _read(export_gguf(model, tmp_path / "b.gguf", "bf16"))[1]["blk.0.ffn_gate_exps.weight"]
    assert bf16.tensor_type == gguf.GGMLQuantizationType.BF16
    got = torch.from_numpy(bf16.data.copy().view("int16")).view(torch.bfloat16)
    assert torch.equal(got, w_gate.to(torch.bfloat16))
    for weights, qtype, tolerance in (("q8_0", "Q8_0", 0.01), ("q4_0", "Q4_0", 0.2)):
        _, tensors = _read(export_gguf(model, tmp_path / f"{weights}.gguf", weights))
        t = tensors["blk.0.ffn_gate_exps.weight"]
        assert t.tensor_type.name == qtype
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w_gate.shape)
        assert ((back - w_gate).abs().max() / w_gate.abs().max()).item() < tolerance
        assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="weights="):
        export_gguf(_model(), tmp_path / "a.gguf", "q5_k")
    with pytest.raises(ValueError, match="multiples of 32"):
        export_gguf(_model(moe_hidden_dim=48), tmp_path / "b.gguf", "q8_0")
    with pytest.raises(HFFormatError, match="llama.cpp"):
        export_gguf(_model(num_shared_experts=1), tmp_path / "c.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_llama_cpp_runs_the_file_to_our_logits(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    model = _model("demo")
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, verbose=False, type_k=0, type_v=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-3
    text = b"def f(a,  b):\n\treturn a\n"  # a byte-level model's text: llama.cpp reads it as our bytes
    assert llm.tokenize(text, add_bos=False) == list(text) and llm.detokenize(list(text)) == text


def test_inference_bench_runs_every_engine_it_has_and_checks_the_logits(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from sparsemoe.bench import inference
    from sparsemoe.cli import main

    monkeypatch.setattr(inference, "llama_cpp_available", lambda: "llama_cpp is not installed (test)")
    out = tmp_path / "out"
    code = main(["bench", "--inference", "--models", "tiny", "--schemes", "float32,bfloat16,int8", "--repeats", "1",
                 "--decode-tokens", "3", "--prefill", "24", "--prompt", "4", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads((out / "inference.json").read_text())
    assert result["skipped"] == {"llama.cpp": "llama_cpp is not installed (test)"}
    by_scheme = {case["scheme"]: case for case in result["cases"]}
    engines = [row["engine"] for row in by_scheme["float32"]["rows"]]
    assert engines == ["sparsemoe", "transformers eager", "transformers grouped_mm"]
    assert [row["engine"] for row in by_scheme["int8"]["rows"]] == ["sparsemoe"]  # transformers: float only
    for row in by_scheme["float32"]["rows"][1:]:
        assert row["logits_vs_sparsemoe"] < 1e-4
    f32, bf16 = by_scheme["float32"]["rows"][0], by_scheme["bfloat16"]["rows"][0]
    assert bf16["decode_bytes"] * 2 == pytest.approx(f32["decode_bytes"], rel=0.01)  # norms stay float32
    assert by_scheme["float32"]["prefill_tokens"] == 24 and f32["prefill_ms"] > 0
    text = (out / "inference.md").read_text()
    assert "## tiny" in text and "Skipped llama.cpp" in text


def test_inference_bench_refusals(tmp_path):
    from sparsemoe.cli import main

    assert main(["bench", "--inference", "--train", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--inference", "--decode-tokens", "1", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--inference", "--models", "nope"])


def test_cli_converts_a_checkpoint_to_gguf(tmp_path, capsys):
    from sparsemoe.cli import main
    from sparsemoe.train.checkpoint import save_checkpoint

    model = _model("demo")
    ckpt = save_checkpoint(tmp_path / "run", 1, model.state_dict(), None, {"model_config": model.config.to_dict()})
    out = tmp_path / "m.gguf"
    assert main(["convert", str(ckpt), str(out), "--to", "gguf", "--gguf-weights", "q8_0"]) == 0
    assert "wrote GGUF (q8_0)" in capsys.readouterr().out
    _, tensors = _read(out)
    assert tensors["blk.3.ffn_down_exps.weight"].tensor_type.name == "Q8_0"
    assert main(["convert", str(ckpt), str(out), "--to", "gguf"]) == 2  # exists: --overwrite to replace it
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(out), "--to", "gguf", "--overwrite"]) == 0
    assert _read(out)[1]["blk.3.ffn_down_exps.weight"].tensor_type.name == "BF16"
    assert main(["convert", str(ckpt), str(tmp_path), "--to", "gguf"]) == 2  # a folder: refused
