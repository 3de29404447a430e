"""FP8 block-quantised Hugging Face checkpoints: dequantised on load, checked against the definition.

The checkpoints are made here: a tiny transformers model is saved as usual, then its linear weights
(attention projections, dense MLP, routed and shared experts) are rewritten as float8 E4M3 with one
amax/448 scale per block, in blocks that do not divide the shapes (hidden size 40), as DeepSeek-V3's
and Qwen3's FP8 releases store them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_hf_load import VOCAB, save_hf, tiny_hf_model  # noqa: E402

import sparsemoe.hf.fp8 as fp8  # noqa: E402
from sparsemoe.cli import main  # noqa: E402
from sparsemoe.hf import HFFormatError, load_hf, read_sparsemoe_checkpoint  # noqa: E402
from sparsemoe.hf.fp8 import dequantize_fp8_blocks  # noqa: E402
from sparsemoe.train.checkpoint import load_model  # noqa: E402

FP8_MAX = 448.0  # the largest float8 E4M3 value


def reference_dequantize(w, scale, block):
    """w[i, j] = float(fp8[i, j]) * scale_inv[i // bo, j // bi], written out block by block."""
    bo, bi = block
    out = torch.empty(w.shape, dtype=torch.float32)
    for lead in itertools.product(*map(range, w.shape[:-2])):
        for a in range(scale.shape[-2]):
            for b in range(scale.shape[-1]):
                rows, cols = slice(a * bo, (a + 1) * bo), slice(b * bi, (b + 1) * bi)
                out[lead][rows, cols] = w[lead][rows, cols].to(torch.float32) * scale[lead][a, b].to(torch.float32)
    return out


def quantize(w, block, scale_dtype=torch.float32):
    """(float8 weights, per-block scales amax/448) of a float weight [..., out, in]."""
    bo, bi = block
    *lead, rows, cols = w.shape
    scale = torch.empty(*lead, -(-rows // bo), -(-cols // bi))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for idx in itertools.product(*map(range, lead)):
        for a in range(scale.shape[-2]):
            for b in range(scale.shape[-1]):
                part = (slice(a * bo, (a + 1) * bo), slice(b * bi, (b + 1) * bi))
                s = w[idx][part].abs().amax().clamp(min=1e-12) / FP8_MAX
                scale[idx][a, b] = s
                q[idx][part] = (w[idx][part] / s).to(torch.float8_e4m3fn)
    return q, scale.to(scale_dtype)


# --- the block dequantisation against its definition ------------------------------------------------------

SHAPES = [((200, 96), (32, 32)), ((200, 96), (128, 128)), ((200, 96), (7, 5)), ((3, 50, 40), (16, 32))]


@pytest.mark.parametrize("shape,block", SHAPES, ids=["32x32", "128x128", "7x5", "3d-16x32"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["f32-scale", "bf16-scale"])
def test_dequantize_matches_the_definition_exactly(shape, block, scale_dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 200).to(torch.float8_e4m3fn)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = (torch.rand(grid, generator=g) * 0.01 + 1e-4).to(scale_dtype)
    expected = reference_dequantize(w, scale, block)
    assert torch.equal(dequantize_fp8_blocks(w, scale, block, torch.float32), expected)
    assert torch.equal(dequantize_fp8_blocks(w, scale, block), expected.to(torch.bfloat16))  # cast once
    monkeypatch.setattr(fp8, "_CHUNK", 1)  # one row of blocks per step: the same values
    out = torch.full(shape, float("nan"), dtype=torch.float16)
    assert dequantize_fp8_blocks(w, scale, list(block), out=out) is out
    assert torch.equal(out, expected.to(torch.float16))


def test_dequantize_refuses_bad_scales_and_blocks():
    w = torch.zeros(40, 70).to(torch.float8_e4m3fn)
    with pytest.raises(HFFormatError, match=r"has shape \(2, 2\), but .* of shape \(40, 70\) .* needs \(2, 3\)"):
        dequantize_fp8_blocks(w, torch.ones(2, 2), (32, 32))
    with pytest.raises(HFFormatError, match="stored as torch.int32; accepted: float32, bfloat16 or float16"):
        dequantize_fp8_blocks(w, torch.ones(2, 3, dtype=torch.int32), (32, 32))
    for block in [(32,), (0, 32), (32.0, 32), (True, 32), "32"]:
        with pytest.raises(HFFormatError, match="expected two positive integers"):
            dequantize_fp8_blocks(w, torch.ones(2, 3), block)
    with pytest.raises(HFFormatError, match="expected float8_e4m3fn weights"):
        dequantize_fp8_blocks(torch.zeros(40, 70), torch.ones(2, 3), (32, 32))


# --- whole checkpoints ----------------------------------------------------------------------------------

# family -> (block size, per-expert tensors (else transformers 5's fused 3-D ones)); blocks are not square,
# so a swapped (rows, columns) fails, and hidden_size=40 leaves partial blocks in both directions.
FP8_CASES = {"deepseek_v3": ((32, 16), True), "qwen3_moe": ((16, 32), False)}
QUANTISED = ("_proj.weight", "kv_a_proj_with_mqa.weight", "experts.gate_up_proj", "experts.down_proj")


def write_fp8_checkpoint(family, root):
    """(FP8 folder, float folder of its exact dequantisation, {key: dequantised float32 weight})."""
    block, per_expert = FP8_CASES[family]
    src = save_hf(tiny_hf_model(family, hidden_size=40), root / "fp8", save_original_format=per_expert)
    weights = src / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    floats, dequantised = dict(tensors), {}
    for key, w in list(tensors.items()):
        if key.endswith(QUANTISED):
            q, scale = quantize(w, block, torch.bfloat16 if "shared_experts" in key else torch.float32)
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            floats[key] = dequantised[key] = reference_dequantize(q, scale, block)
            assert not torch.equal(floats[key], w)  # the quantisation does change the weights
    ref = root / "dequantised"
    shutil.copytree(src, ref)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    save_file(floats, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(cfg))
    return src, ref, dequantised


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    return write_fp8_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek"))


@pytest.mark.parametrize("family", list(FP8_CASES))
def test_fp8_checkpoint_loads_its_exact_dequantisation(family, tmp_path, deepseek_fp8):
    src, ref, dequantised = deepseek_fp8 if family == "deepseek_v3" else write_fp8_checkpoint(family, tmp_path)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(dequantised))).dtype == torch.float8_e4m3fn
    loaded = load_hf(src, dtype="float32")
    got, want = loaded.model.state_dict(), load_hf(ref).model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]
    F = loaded.model.config.moe_hidden_dim
    experts = loaded.model.layers[1].ffn.experts
    if family == "deepseek_v3":  # per expert: expert 2's gate rows, then its down projection
        assert torch.equal(experts.w_in[2, :F], dequantised["model.layers.1.mlp.experts.2.gate_proj.weight"])
        assert torch.equal(experts.w_out[2], dequantised["model.layers.1.mlp.experts.2.down_proj.weight"])
    else:  # fused [E, 2F, D] with one scale grid per expert
        assert torch.equal(experts.w_in, dequantised["model.layers.1.mlp.experts.gate_up_proj"])
    n = len(dequantised)
    assert any(f"{n} float8 weights dequantised" in note and "into float32" in note for note in loaded.mapped.notes)

    # Logits: those of transformers' model of the dequantised weights.
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-4)

    # By default (and with "auto") an FP8 checkpoint becomes bfloat16: the same values, cast once.
    for dtype in (None, "auto"):
        half = load_hf(src, dtype=dtype)
        assert half.model.embed.weight.dtype == torch.bfloat16
        assert any("into bfloat16" in note for note in half.mapped.notes)
        for k, v in half.model.state_dict().items():
            assert torch.equal(v, got[k].to(v.dtype)), k


def test_cli_converts_an_fp8_checkpoint(deepseek_fp8, tmp_path, capsys):
    src, _, _ = deepseek_fp8
    assert main(["convert", str(src), str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "read deepseek_v3" in printed and "note: FP8 block-quantised checkpoint" in printed
    assert any("into bfloat16" in note for note in load_model(tmp_path / "run")[1]["converted_from"]["notes"])
    model = read_sparsemoe_checkpoint(tmp_path / "run")  # in the dtype it was written in
    assert model.embed.weight.dtype == torch.bfloat16
    expected = load_hf(src).model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert main(["convert", str(src), str(tmp_path / "run32"), "--dtype", "float32"]) == 0
    assert "into float32" in capsys.readouterr().out


def test_fp8_checkpoint_quantized_to_int8(deepseek_fp8, tmp_path, capsys):
    """`sparsemoe quantize` reads an FP8 folder (dequantised tensor by tensor) and keeps its experts int8: the
    model computes what its float model computes with the int8-rounded experts."""
    from sparsemoe.quant import QuantizedExperts, dequantize_weight

    src, _, _ = deepseek_fp8
    assert main(["quantize", str(src), str(tmp_path / "q"), "--to", "int8"]) == 0
    quantized, meta = load_model(tmp_path / "q")
    assert meta["quantization"]["scheme"] == "int8" and meta["quantized_from"]["format"] == "huggingface"
    reference = load_hf(src, dtype="float32").model
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedExperts):
            target = reference.get_submodule(name)
            with torch.no_grad():
                for attr in ("w_in", "w_out"):
                    w = getattr(module, attr)
                    getattr(target, attr).copy_(dequantize_weight(w.data, w.scale, w.scheme, w.shape[2]))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    for layer in quantized.moe_layers:  # the dequantizing backend: no activation rounding (the VNNI path's)
        layer.config = dataclasses.replace(layer.config, backend="grouped")
    with torch.no_grad():  # 9 tokens: the shared experts' kernel takes its float path (more than 8 rows)
        torch.testing.assert_close(quantized(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


# --- errors: one line each ---------------------------------------------------------------------------------


def _broken_copy(deepseek_fp8, tmp_path, config=None, replace=None, drop=()):
    """A copy of the FP8 folder with quantization_config keys changed (or "drop"ped), tensors replaced or dropped."""
    src = shutil.copytree(deepseek_fp8[0], tmp_path / "broken")
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        if config == "drop":
            del cfg["quantization_config"]
        else:
            cfg["quantization_config"].update(config)
        (src / "config.json").write_text(json.dumps(cfg))
    if replace or drop:
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        save_file({**tensors, **(replace or {})}, str(src / "model.safetensors"))
    return src


KEY = "model.layers.1.mlp.experts.3.up_proj.weight"  # [16, 40] in blocks of 32x16: its scale is [1, 3]
BROKEN = {
    "scale-shape": (
        dict(replace={KEY + "_scale_inv": torch.ones(1, 2)}),
        rf"scale '{KEY}_scale_inv' has shape \(1, 2\), but a weight of shape \(16, 40\) in blocks of 32x16 needs "
        r"\(1, 3\) \(check config.json's quantization_config.weight_block_size\)",
    ),
    "scale-missing": (dict(drop=[KEY + "_scale_inv"]), rf"weight '{KEY}' is stored as float8 .* is missing"),
    "scale-int": (dict(replace={KEY + "_scale_inv": torch.ones(1, 3, dtype=torch.int32)}), "stored as torch.int32"),
    "gptq": (dict(config={"quant_method": "gptq", "bits": 4}), "quant_method 'gptq' is not supported"),
    "block-one-int": (dict(config={"weight_block_size": [32]}), r"weight_block_size \[32\] is not a block size"),
    "block-zero": (dict(config={"weight_block_size": [0, 16]}), "expected two positive integers"),
    "block-null": (dict(config={"weight_block_size": None}), "weight_block_size None is not a block size"),
    "static-activations": (dict(config={"activation_scheme": "static"}), "activation_scheme 'static'"),
    # Without a quantization_config the block size is the default 128x128, which these scales do not fit.
    "no-config": (dict(config="drop"), r"in blocks of 128x128 needs .* no quantization_config"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_fp8_checkpoints_are_refused_with_one_clear_line(case, deepseek_fp8, tmp_path, capsys):
    change, message = BROKEN[case]
    src = _broken_copy(deepseek_fp8, tmp_path, **change)
    with pytest.raises(HFFormatError, match=message):
        load_hf(src)
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
