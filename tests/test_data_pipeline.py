"""The language-model data pipeline: tokenizers (bytes, BPE), token shards, streaming, bits per byte, and
the commands that use them (prepare-data, train --tokenizer, generate, inspect, convert)."""

import json
import math
import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemoe.cli import main
from sparsemoe.model import ModelConfig, preset
from sparsemoe.train import DataError, RandomBatches, TrainConfig, eval_batches, load_corpus
from sparsemoe.train.data import BUILTIN, is_val, iter_documents
from sparsemoe.train.run import run_training
from sparsemoe.train.shards import ShardSplit, is_shard_folder, open_shards, prepare_data, read_index, shard_tokenizer
from sparsemoe.train.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer, parse_spec, train_bpe

TEXT_BYTES = 200_000  # of the standard-library corpus, for the tests that train


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "bpe"
    return prepare_data(None, out, "bpe:512", max_bytes=TEXT_BYTES, shard_tokens=10_000, log=quiet)


def tiny_train_config(**changes) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_interval=3, eval_batches=2,
                log_interval=3, checkpoint_interval=3)  # fmt: skip
    return TrainConfig(**{**base, **changes})


def write_docs(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# --- tokenizers ----------------------------------------------------------------------------------------
def test_tokenizer_specs():
    assert parse_spec(None) == ("bytes", None) and parse_spec("bytes") == ("bytes", None)
    assert parse_spec("bpe:8192") == ("bpe", 8192)
    assert parse_spec("some/folder") == ("path", None)
    for bad in ("bpe:", "bpe:12", "bpe:x", "bpe:99999999"):
        with pytest.raises(TokenizerError, match="bpe:N"):
            parse_spec(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("no/such/tokenizer.json")
    with pytest.raises(TokenizerError, match="trained on a corpus first"):
        load_tokenizer("bpe:1000")


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200))
def test_bpe_round_trips_any_text(text):
    tok = _small_bpe()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


_BPE = []


def _small_bpe():
    if not _BPE:
        texts = [data.decode() for _, data in iter_documents(None, 100_000)]
        _BPE.append(train_bpe(texts, 400))
    return _BPE[0]


def test_bpe_saves_loads_and_transformers_reads_it(tmp_path):
    tok = _small_bpe()
    assert tok.vocab_size == 400 and tok.eos_id is not None
    tok.save(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.fingerprint() == tok.fingerprint()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def main(argv):\n    return 0  # fin\u00e9\n"
    assert hf.encode(text) == tok.encode(text) and hf.decode(tok.encode(text)) == text
    assert hf.eos_token == "<|endoftext|>"


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / ".." ))


# --- documents and the split ---------------------------------------------------------------------------
def test_jsonl_folder_and_builtin_documents(tmp_path):
    lines = [json.dumps({"text": f"document number {i}\n"}) for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("plain text\n", encoding="utf-8")
    docs = list(iter_documents(str(tmp_path)))
    assert [k for k, _ in docs][:2] == ["a.jsonl:1", "a.jsonl:2"] and docs[-1] == ("b.txt", b"plain text\n")
    assert len(docs) == 31
    prose = list(iter_documents(BUILTIN + "python-docs", 300_000))
    assert len(prose) > 20 and all(b"def " not in d[:4] for _, d in prose)
    with pytest.raises(DataError, match="no such built-in corpus"):
        list(iter_documents(BUILTIN + "nope"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": 3}\n', 'line 2 .* has no "text" field'),
        ('{"text": "ok"}\nnot json\n', "line 2 .* is not JSON"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        prepare_data(str(path), tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_large_text_file_is_read_in_pieces_at_line_breaks(tmp_path):
    text = "".join(f"line {i} \u00e9\u00e8\n" for i in range(20_000))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_documents(str(path)))
    assert len(pieces) > 50 and all(d.endswith(b"\n") for _, d in pieces)
    assert b"".join(d for _, d in pieces) == text.encode()


# --- shards --------------------------------------------------------------------------------------------
def test_shards_hold_exactly_the_encoded_documents(tmp_path):
    folder = write_docs(tmp_path / "docs", {f"doc{i}.txt": f"text of document {i}\n" * (i + 1) for i in range(40)})
    tok = _small_bpe()
    out = prepare_data(str(folder), tmp_path / "shards", tok, val_fraction=0.2, shard_tokens=50, log=quiet)
    corpus = open_shards(out, tok)
    expected = {"train": [], "val": []}
    for key, data in iter_documents(str(folder)):
        expected["val" if is_val(key, 0.2) else "train"] += tok.encode(data.decode()) + [tok.eos_id]
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        assert split.read(0, len(split)).tolist() == expected[name]
    index = read_index(out)
    assert len(index["splits"]["train"]["shards"]) > 1 and index["dtype"] == "<u2"
    assert index["splits"]["val"]["documents"] + index["splits"]["train"]["documents"] == 40
    assert corpus.tokens_per_byte == pytest.approx(
        index["splits"]["val"]["tokens"] / index["splits"]["val"]["text_bytes"]
    )


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), data=st.data())
def test_shard_split_reads_across_shard_ends(tmp_path_factory, counts, data):
    folder = tmp_path_factory.mktemp("split")
    whole = np.arange(sum(counts), dtype=np.uint32) * 7 % 65_521
    paths, start = [], 0
    for i, n in enumerate(counts):
        paths.append(folder / f"s{i}.bin")
        paths[-1].write_bytes(whole[start : start + n].astype("<u2").tobytes())
        start += n
    split = ShardSplit(paths, counts, np.dtype("<u2"))
    first = data.draw(st.integers(0, len(whole) - 1))
    count = data.draw(st.integers(1, len(whole) - first))
    assert split.read(first, count).tolist() == whole[first : first + count].tolist()
    with pytest.raises(IndexError):
        split.read(len(whole) - count + 1, count)


def test_uint32_for_large_vocabularies(tmp_path):
    class Wide(ByteTokenizer):
        vocab_size = 70_000
        spec = "wide"

        def fingerprint(self):
            return "wide"

    out = prepare_data(None, tmp_path / "w", Wide(), max_bytes=20_000, log=quiet)
    assert read_index(out)["dtype"] == "<u4"
    split = open_shards(out).train
    assert split.dtype.itemsize == 4 and len(split) > 0


def test_streaming_batches_are_deterministic_and_resumable(bpe_shards):
    corpus = open_shards(bpe_shards)
    a = RandomBatches(corpus.train, 3, 16, seed=5)
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    rest = [next(a) for _ in range(2)]
    b = RandomBatches(corpus.train, 3, 16, seed=5)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, [next(b) for _ in range(3)]))
    c = RandomBatches(open_shards(bpe_shards).train, 3, 16, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(rest, [next(c) for _ in range(2)]))
    inputs, targets = first[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    val = eval_batches(corpus.val, 4, 16, 2)
    assert val[0][0].shape == (4, 16) and all(torch.equal(x, y) for (x, _), (y, _) in zip(val, eval_batches(corpus.val, 4, 16, 2)))


# --- bad input: one clear error each, nothing half-written ----------------------------------------------
def test_empty_and_binary_corpora_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 100)
    binary_folder = write_docs(tmp_path / "binfolder", {})
    (binary_folder / "x.dat").write_bytes(b"\x00\x01\x02")
    cases = [
        (tmp_path / "empty.txt", "holds no text"),
        (tmp_path / "blob.bin", "binary"),
        (binary_folder, "no text files .1 binary"),
        (tmp_path / "missing", "does not exist"),
    ]
    for src, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_data(str(src), tmp_path / "out", log=quiet)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_single_document_cannot_be_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one short line\n", encoding="utf-8")
    with pytest.raises(DataError, match="one document"):
        prepare_data(str(path), tmp_path / "out", log=quiet)
    two = write_docs(tmp_path / "two", {"a.txt": "first\n", "b.txt": "second\n"})
    out = prepare_data(str(two), tmp_path / "out2", log=quiet)  # neither hashes to validation: the last is held out
    index = read_index(out)
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 1


def test_existing_output_is_kept(tmp_path, bpe_shards):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="already exists"):
        prepare_data(None, out, max_bytes=10_000, log=quiet)
    assert (out / "keep.txt").read_text() == "mine"


def test_truncated_or_missing_shards_and_other_tokenizers_are_refused(tmp_path, bpe_shards):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bpe_shards, copy)
    open_shards(copy, shard_tokenizer(copy))  # intact
    with pytest.raises(DataError, match="made with tokenizer bpe:512"):
        open_shards(copy, ByteTokenizer())
    with pytest.raises(DataError, match="made with tokenizer bpe:512"):
        open_shards(copy, _small_bpe())
    shard = copy / read_index(copy)["splits"]["train"]["shards"][-1]["file"]
    os.truncate(shard, shard.stat().st_size - 2)
    with pytest.raises(DataError, match="truncated"):
        open_shards(copy)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        open_shards(copy)
    with pytest.raises(DataError, match="not a token-shard folder"):
        open_shards(tmp_path)
    (copy / "index.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a sparsemoe token-shard index"):
        open_shards(copy)


def test_prepare_data_command(tmp_path, capsys):
    out = tmp_path / "cmd"
    assert main(["prepare-data", "builtin:python-docs", str(out), "--max-bytes", "50000", "--tokenizer", "bpe:300"]) == 0
    assert is_shard_folder(str(out)) and read_index(out)["tokenizer"]["spec"] == "bpe:300"
    assert "sparsemoe train --data" in capsys.readouterr().out
    assert main(["prepare-data", "builtin:python-docs", str(out), "--max-bytes", "5000"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "nope"), str(tmp_path / "o2"), "--tokenizer", "bpe:3"]) == 2
    assert "bpe:N" in capsys.readouterr().err


# --- training on shards, bits per byte, resume ----------------------------------------------------------
def _tiny_model() -> ModelConfig:
    return preset("tiny")


def test_training_with_bpe_records_its_tokenizer_and_bits_per_byte(tmp_path):
    run = tmp_path / "run"
    summary = run_training(_tiny_model(), tiny_train_config(), run, tokenizer="bpe:300", max_bytes=TEXT_BYTES,
                           progress=False, log=quiet)  # fmt: skip
    model = summary["model"]
    assert model.config.vocab_size == 300
    assert (run / "tokenizer" / "tokenizer.json").is_file() and is_shard_folder(str(run / "data"))
    corpus = open_shards(run / "data")
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] * corpus.tokens_per_byte / math.log(2))
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_bpb" in r for r in evals if r.get("event") == "eval")
    assert "bits per byte" in (run / "report.md").read_text()
    meta = json.loads((run / "config.json").read_text())
    assert meta["tokenizer"]["spec"] == "bpe:300" and meta["model_config"]["vocab_size"] == 300


def test_training_with_a_given_tokenizer_file(tmp_path):
    tok = _small_bpe()
    tok.save(tmp_path / "tok")
    summary = run_training(_tiny_model(), tiny_train_config(max_steps=2), tmp_path / "run",
                           tokenizer=str(tmp_path / "tok" / "tokenizer.json"), max_bytes=TEXT_BYTES, progress=False,
                           log=quiet)  # fmt: skip
    assert summary["model"].config.vocab_size == tok.vocab_size
    assert load_tokenizer(str(tmp_path / "run" / "tokenizer")).fingerprint() == tok.fingerprint()
    first = next(data for key, data in iter_documents(None) if not is_val(key, 0.05))
    assert open_shards(tmp_path / "run" / "data", tok).train.read(0, 5).tolist() == tok.encode(first.decode())[:5]


def test_byte_runs_report_bits_per_byte_as_loss_over_ln2(tmp_path):
    summary = run_training(_tiny_model(), tiny_train_config(max_steps=3), tmp_path / "b", max_bytes=TEXT_BYTES,
                           progress=False, log=quiet)  # fmt: skip
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))


def test_resume_on_shards_equals_an_uninterrupted_run(tmp_path, bpe_shards):
    whole = run_training(_tiny_model(), tiny_train_config(), tmp_path / "whole", data=str(bpe_shards),
                         progress=False, log=quiet)  # fmt: skip
    run_training(_tiny_model(), tiny_train_config(max_steps=3, schedule_steps=6), tmp_path / "part",
                 data=str(bpe_shards), progress=False, log=quiet)  # fmt: skip
    resumed = run_training(_tiny_model(), tiny_train_config(), tmp_path / "part", data=str(bpe_shards), resume=True,
                           progress=False, log=quiet)  # fmt: skip
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed["val_loss"] == whole["val_loss"]


def test_resume_with_another_tokenizer_is_refused(tmp_path, bpe_shards):
    run_training(_tiny_model(), tiny_train_config(max_steps=3), tmp_path / "r", data=str(bpe_shards),
                 progress=False, log=quiet)  # fmt: skip
    with pytest.raises(DataError, match="made with tokenizer"):
        run_training(_tiny_model(), tiny_train_config(), tmp_path / "r", data=str(bpe_shards), tokenizer="bytes",
                     resume=True, progress=False, log=quiet)  # fmt: skip
    with pytest.raises(ValueError, match="vocabulary"):  # text with bytes, into a BPE checkpoint
        run_training(replace(preset("tiny"), vocab_size=512), tiny_train_config(), tmp_path / "r",
                     max_bytes=TEXT_BYTES, tokenizer="bytes", resume=True, progress=False, log=quiet)  # fmt: skip


def test_a_run_reuses_its_prepared_data(tmp_path, monkeypatch):
    import sparsemoe.train.training_data as data_module

    run = tmp_path / "run"
    run_training(_tiny_model(), tiny_train_config(max_steps=3), run, tokenizer="bpe:300", max_bytes=TEXT_BYTES,
                 progress=False, log=quiet)  # fmt: skip
    calls = []
    monkeypatch.setattr(data_module, "prepare_data", lambda *a, **k: calls.append(a))
    run_training(_tiny_model(), tiny_train_config(max_steps=6), run, max_bytes=TEXT_BYTES, resume=True,
                 progress=False, log=quiet)  # fmt: skip
    assert calls == []


def test_generate_inspect_and_export_use_the_runs_tokenizer(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run), "--max-bytes", str(TEXT_BYTES), "--tokenizer",
                 "bpe:320", "--max-steps", "4", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", "--checkpoint", str(run), "--tokenizer", "bytes", "--max-new-tokens", "2"]) == 2
    assert "trained with bpe:320" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(run), "--windows", "4", "--out", str(tmp_path / "insp")]) == 0
    report = capsys.readouterr().out
    assert "tokens:" in report and "words:" not in report
    spec = json.loads((tmp_path / "insp" / "inspect.json").read_text())
    assert spec["unit"] == "tokens"
    transformers = pytest.importorskip("transformers")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.encode("import os\n") == shard_tokenizer(run / "data").encode("import os\n")


def test_train_on_a_shard_folder_from_the_command_line(tmp_path, bpe_shards, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--run-dir", str(run), "--data", str(bpe_shards), "--max-steps", "2",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "shards" in capsys.readouterr().out
    assert main(args[:-3] + ["--max-steps", "2", "--tokenizer", "bpe:1000", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "made with bpe:512" in capsys.readouterr().err
    assert main(args + ["--max-bytes", "1000", "--run-dir", str(tmp_path / "r3")]) == 2
    assert "--max-bytes applies to text" in capsys.readouterr().err


# --- memory: independent of the corpus's size ------------------------------------------------------------
_MEASURE = r"""
import json, resource, sys
from sparsemoe.cli import main
rc = main(["train", "--preset", "tiny", "--run-dir", sys.argv[2], "--data", sys.argv[1], "--max-steps", "4",
           "--no-progress", "--threads", "1"])
print(json.dumps({"rc": rc, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _grow_train_split(folder: Path, tokens: int) -> None:
    """Make the train split `tokens` long: its last shard extended as a sparse file (zeros, no disk used)."""
    index = read_index(folder)
    shard = index["splits"]["train"]["shards"][-1]
    shard["tokens"] += tokens - index["splits"]["train"]["tokens"]
    index["splits"]["train"]["tokens"] = tokens
    os.truncate(folder / shard["file"], shard["tokens"] * 2)
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and sparse files as on Linux")
def test_training_memory_does_not_grow_with_the_corpus(tmp_path):
    """A train split of 3 GiB (sparse) under a 2 GiB address-space limit: it trains, in the memory of a small one."""
    limit = 2 * 2**30
    results = {}
    for name, tokens in (("small", None), ("large", 3 * 2**30 // 2)):
        folder = prepare_data(None, tmp_path / name, "bytes", max_bytes=100_000, log=quiet)
        if tokens:
            _grow_train_split(folder, tokens)
            assert (folder / "train-00000.bin").stat().st_size > limit
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(folder), str(tmp_path / f"run-{name}")],
            capture_output=True, text=True, timeout=300,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert results[name]["rc"] == 0
    assert results["large"]["maxrss_mib"] < results["small"]["maxrss_mib"] + 64, results
