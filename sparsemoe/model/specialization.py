"""Expert specialisation: which tokens each expert of each MoE layer takes, and what they have in common.

Legend: T tokens, E experts, K experts per token, L MoE layers.

The model runs in eval mode over windows of text; a forward pre-hook on each MoE layer keeps its input
and the layer's own router (`router.logits` + `router.route`) assigns the T tokens to experts, the same
assignment the layer makes. A token is the byte at a position (its representation there, having read
the bytes before it). For each expert: its share of the T*K assignments, and the bytes and words it
prefers: ranked by the fraction of that byte's (or word's bytes') occurrences the expert processes,
relative to the expert's overall rate (lift; ties go to the more frequent item). The fraction is what
is shown: "self 100%" = every byte of every "self" went to this expert (one of its K choices).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from sparsemoe.layer import MoE
from sparsemoe.model.transformer import MoETransformer

# Byte classes for the preference plot.
CATEGORIES = ("lower", "upper", "digit", "space", "newline", "punct", "non-ascii")
_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def byte_category(b: int) -> int:
    c = chr(b)
    if b >= 128:
        return 6
    if c.islower():
        return 0
    if c.isupper():
        return 1
    if c.isdigit():
        return 2
    if c == "\n":
        return 4
    if c.isspace():
        return 3
    return 5


def show_byte(b: int) -> str:
    names = {32: "␣", 10: "\\n", 9: "\\t", 13: "\\r"}
    if b in names:
        return names[b]
    return chr(b) if 33 <= b < 127 else f"\\x{b:02x}"


@dataclass
class ExpertProfile:
    layer: int
    expert: int
    share: float  # this expert's fraction of the layer's assignments (uniform = 1/E)
    top_bytes: list[tuple[str, float, int]] = field(default_factory=list)  # (byte or token, fraction routed here, count)
    top_words: list[tuple[str, float, int]] = field(default_factory=list)  # (word, fraction of its bytes, bytes)
    categories: list[float] = field(default_factory=list)  # lift per CATEGORIES entry


@dataclass
class Specialization:
    layer_ids: list[int]  # model layer index of each MoE layer
    share: Tensor  # [L, E] float: token share per expert
    profiles: list[ExpertProfile]
    num_tokens: int
    unit: str = "bytes"  # what the tokens are: bytes, or (subword) tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_ids": self.layer_ids,
            "share": self.share.tolist(),
            "num_tokens": self.num_tokens,
            "unit": self.unit,
            # JSON has no NaN: a byte class absent from the text has no lift (null).
            "experts": [
                {**p.__dict__, "categories": [None if math.isnan(c) else c for c in p.categories]}
                for p in self.profiles
            ],
        }


@torch.no_grad()
def route_tokens(model: MoETransformer, input_ids: Tensor) -> dict[int, Tensor]:
    """layer index -> expert ids [T, K] (before capacity) for tokens input_ids [B, S] flattened."""
    captured: dict[int, Tensor] = {}
    handles = []
    for i, block in enumerate(model.layers):
        if isinstance(block.ffn, MoE):

            def keep(module, args, i=i):
                captured[i] = args[0].reshape(-1, args[0].shape[-1])

            handles.append(block.ffn.register_forward_pre_hook(keep))
    was_training = model.training
    model.eval()
    try:
        model(input_ids)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = {}
    for i, x_TD in captured.items():
        layer: MoE = model.layers[i].ffn
        logits = layer.router.logits(x_TD)
        routing = layer.router.route(logits, layer.config.capacity(x_TD.shape[0], training=False))
        out[i] = routing.expert_ids.view(x_TD.shape[0], -1)
    return out


def _word_ids(windows: list[bytes]) -> tuple[list[int], list[str]]:
    """Per byte the index of the identifier-like word it belongs to (-1: none), and the words.

    Each window is scanned on its own, so no word is glued across two windows.
    """
    ids: list[int] = []
    words: list[str] = []
    index: dict[str, int] = {}
    for data in windows:
        window_ids = [-1] * len(data)
        for m in _WORD.finditer(data):
            w = m.group().decode("ascii")
            j = index.setdefault(w, len(index))
            if j == len(words):
                words.append(w)
            window_ids[m.start() : m.end()] = [j] * (m.end() - m.start())
        ids.extend(window_ids)
    return ids, words


def _top_items(counts_E: Tensor, tokens_per_item: Tensor, min_tokens: int, top: int) -> list[tuple[int, float, int]]:
    """(item, fraction of its tokens routed to this expert, its tokens) for the `top` items by fraction.

    For one expert the fraction is proportional to the lift, so ranking by either is the same.
    """
    frac = counts_E / tokens_per_item.clamp_min(1)
    frac = torch.where(tokens_per_item >= min_tokens, frac, torch.zeros_like(frac))
    order = (frac + 1e-9 * tokens_per_item).argsort(descending=True)[:top]
    return [(int(i), float(frac[i]), int(tokens_per_item[i])) for i in order if frac[i] > 0]


def _token_views(vocab_size: int, token_text: Optional[Callable[[int], str]]) -> tuple[list[str], Tensor]:
    """How each token id is shown, and its byte class: bytes themselves, or a subword token's text (its
    class: that of its first character)."""
    if token_text is None:
        return [show_byte(b) for b in range(256)], torch.tensor([byte_category(b) for b in range(256)])
    texts = [token_text(t) for t in range(vocab_size)]
    shown = [repr(t)[1:-1].replace(" ", "␣") or "''" for t in texts]
    return shown, torch.tensor([byte_category(t.encode("utf-8")[0]) if t else 5 for t in texts])


@torch.no_grad()
def expert_specialization(
    model: MoETransformer,
    data: Tensor,
    seq_len: int,
    num_windows: int = 32,
    batch_size: int = 8,
    top: int = 5,
    token_text: Optional[Callable[[int], str]] = None,
) -> Optional[Specialization]:
    """Profile every MoE layer's experts on `num_windows` evenly spaced windows of `data` ([N] token ids).

    token_text: how a subword token reads (its decoded text); None: the tokens are bytes, and words are
    profiled too (for subword tokens the tokens are the unit, and "words" stay empty).
    Returns None for a model without MoE layers.
    """
    layer_ids = model.config.moe_layer_ids
    if not layer_ids:
        return None
    seq_len = min(seq_len, model.config.max_seq_len, data.numel())
    starts = torch.linspace(0, data.numel() - seq_len, num_windows).long().unique()
    device = model.embed.weight.device
    per_layer: dict[int, list[Tensor]] = {i: [] for i in layer_ids}
    tokens: list[Tensor] = []
    for chunk in starts.split(batch_size):
        ids = data[chunk[:, None] + torch.arange(seq_len)].long()
        routed = route_tokens(model, ids.to(device))
        for i in layer_ids:
            per_layer[i].append(routed[i].cpu())
        tokens.append(ids.reshape(-1))
    tok_T = torch.cat(tokens)
    V = 256 if token_text is None else model.config.vocab_size
    if token_text is None:
        word_T, words = _word_ids([bytes(w.tolist()) for w in tok_T.split(seq_len)])
        word_T = torch.tensor(word_T)
    else:
        word_T, words = torch.full_like(tok_T, -1), []
    E = model.config.num_experts
    shown, category_V = _token_views(V, token_text)
    cat_T = category_V[tok_T]

    share = torch.zeros(len(layer_ids), E)
    profiles = []
    for li, i in enumerate(layer_ids):
        ids_TK = torch.cat(per_layer[i])
        K = ids_TK.shape[1]
        tok_N, expert_N = tok_T.repeat_interleave(K), ids_TK.reshape(-1)
        word_N, cat_N = word_T.repeat_interleave(K), cat_T.repeat_interleave(K)
        byte_counts = torch.zeros(E, V).index_put_((expert_N, tok_N), torch.ones(len(tok_N)), accumulate=True)
        has_word = word_N >= 0
        word_counts = torch.zeros(E, max(len(words), 1)).index_put_(
            (expert_N[has_word], word_N[has_word]), torch.ones(int(has_word.sum())), accumulate=True
        )
        cat_counts = torch.zeros(E, len(CATEGORIES)).index_put_(
            (expert_N, cat_N), torch.ones(len(cat_N)), accumulate=True
        )
        share[li] = byte_counts.sum(1) / byte_counts.sum()
        T = tok_T.numel()
        byte_tokens, word_tokens = byte_counts.sum(0) / K, word_counts.sum(0) / K
        min_bytes = max(3, int(0.001 * T))
        min_words = max(6, int(0.0005 * T))  # bytes of the word: a few occurrences
        cat_all = cat_counts.sum(0)
        for e in range(E):
            cat_lift = (cat_counts[e] / cat_counts[e].sum().clamp_min(1)) / (cat_all / cat_all.sum()).clamp_min(1e-12)
            cat_lift = torch.where(cat_all > 0, cat_lift, torch.full_like(cat_lift, float("nan")))  # class absent
            profiles.append(
                ExpertProfile(
                    layer=i,
                    expert=e,
                    share=float(share[li, e]),
                    top_bytes=[
                        (shown[b], f, n) for b, f, n in _top_items(byte_counts[e], byte_tokens, min_bytes, top)
                    ],
                    top_words=[(words[w], f, n) for w, f, n in _top_items(word_counts[e], word_tokens, min_words, top)]
                    if words
                    else [],
                    categories=[float(v) for v in cat_lift],
                )
            )
    return Specialization(layer_ids, share, profiles, int(tok_T.numel()), "bytes" if token_text is None else "tokens")


def format_text(spec: Specialization) -> str:
    E = spec.share.shape[1]
    lines = [
        f"expert specialisation over {spec.num_tokens:,} tokens (uniform share = {100 / E:.1f}%); "
        + ("bytes/words" if spec.unit == "bytes" else "tokens")
        + ": the share of their occurrences this expert processes"
    ]
    for i in spec.layer_ids:
        lines.append(f"\nlayer {i}")
        for p in (p for p in spec.profiles if p.layer == i):
            byte_text = "  ".join(f"{b} {100 * f:.0f}%" for b, f, _ in p.top_bytes) or "-"
            word_text = "  ".join(f"{w} {100 * f:.0f}%" for w, f, _ in p.top_words) or "-"
            lines.append(f"  expert {p.expert:>2}  {100 * p.share:5.1f}%  {spec.unit}: {byte_text}")
            if spec.unit == "bytes":  # subword tokens are profiled as themselves, without words
                lines.append(f"  {'':>9}  {'':>6}  words: {word_text}")
    return "\n".join(lines)


def plot_specialization(spec: Specialization, path) -> None:
    """Token share [layers x experts] and, per layer, the byte-class lift of each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L, E = spec.share.shape
    fig, axes = plt.subplots(1, L + 1, figsize=(3.2 * (L + 1) + 1, 0.35 * E + 2.2), squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(spec.share.numpy().T, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(L), [str(i) for i in spec.layer_ids])
    ax.set_yticks(range(E))
    ax.set_xlabel("layer")
    ax.set_ylabel("expert")
    ax.set_title("token share")
    fig.colorbar(im, ax=ax, fraction=0.05)
    lifts = {i: np.array([p.categories for p in spec.profiles if p.layer == i], dtype=float) for i in spec.layer_ids}
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = {i: np.log2(lift) for i, lift in lifts.items()}  # lift 0 -> -inf (never routed), absent -> NaN
    finite = np.concatenate([v[np.isfinite(v)] for v in logs.values()] or [np.zeros(1)])
    span = float(np.clip(np.abs(finite).max(initial=1.0), 1.0, 6.0))  # the data's own range, at most 64x
    cmap = matplotlib.colormaps["coolwarm"].copy()
    cmap.set_bad("white")  # a byte class the text does not hold: no lift (labelled "absent")
    absent = set()
    for li, i in enumerate(spec.layer_ids):
        ax = axes[0][li + 1]
        shown = np.ma.masked_invalid(np.where(np.isneginf(logs[i]), -span, logs[i]))
        im = ax.imshow(shown, cmap=cmap, vmin=-span, vmax=span, aspect="auto")
        ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=60, fontsize=7)
        ax.set_yticks(range(E))
        ax.set_ylabel("expert")
        ax.set_title(f"layer {i}: byte-class lift (log2)")
        for c in range(len(CATEGORIES)):
            if np.isnan(logs[i][:, c]).all():
                absent.add(CATEGORIES[c])
                ax.text(c, (E - 1) / 2, "absent", rotation=90, ha="center", va="center", fontsize=7, color="dimgrey")
    bar = fig.colorbar(im, ax=axes[0][-1], fraction=0.05)
    bar.set_label("log2 lift")
    note = (f"lift: an expert's share of a byte class over its share of all tokens; 0 = its average, "
            f"{-span:.2g} = never routed there")  # fmt: skip
    if absent:
        note += f"; absent: {', '.join(sorted(absent))} does not occur in the text (no lift)"
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
