"""Sampling from the model: greedy, temperature, top-k, top-p, with or without a KV cache, streamed.

Legend: B batch, S positions, V vocabulary.

Context window: the model sees at most `max_seq_len` positions. When the cache is full, generation
restarts the cache from the last `max_seq_len // 2` tokens (one re-prefill per half window rather than
one per token). The uncached path uses exactly the same window, so both give the same tokens.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from sparsemoe.model.transformer import MoETransformer
from sparsemoe.ops import small_kernels


def sample_next(
    logits_BV: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick the next token per row [B] from logits [B, V]. temperature 0 = greedy (argmax)."""
    if temperature == 0:
        picked = small_kernels.argmax_rows(logits_BV)  # one native pass on the CPU, the same index
        return picked if picked is not None else logits_BV.float().argmax(dim=-1)
    logits = logits_BV.float()
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float], max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} is invalid: expected a number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid: expected an integer >= 0 (0 or None = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: expected a number in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected an integer >= 0")


@torch.no_grad()
def stream(
    model: MoETransformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """Yield the next token of each row, [B] long, on the model's device, `max_new_tokens` times.
    prompt_ids: [S] or [B, S], on any device.

    The model is put in eval mode for the duration (dropout off, routing noise off) and restored after.
    The KV cache lives on the model's device, in its dtype. With a `generator`, each step's last logits
    [B, V] are sampled on the generator's device (a host generator: the same seed gives the same tokens
    from the same logits on every device).
    """
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens = prompt_ids.view(1, -1) if prompt_ids.dim() == 1 else prompt_ids
    if tokens.shape[1] == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    max_len = model.config.max_seq_len
    keep = max(1, max_len // 2)
    tokens = tokens[:, -max_len:].to(model.embed.weight.device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(tokens.shape[0]) if use_cache else None
        window_start = 0  # first position of `tokens` inside the model's context
        fed = 0  # tokens already in the cache
        for _ in range(max_new_tokens):
            if tokens.shape[1] - window_start > max_len:
                window_start = tokens.shape[1] - keep
                fed = 0
                if cache is not None:
                    cache.reset()
            if cache is not None:
                new = tokens[:, window_start + fed :]
                logits = model(new, cache=cache, last_only=True, with_aux_loss=False).logits
                fed = tokens.shape[1] - window_start
            else:
                logits = model(tokens[:, window_start:], last_only=True, with_aux_loss=False).logits
            last = logits[:, -1] if generator is None else logits[:, -1].to(generator.device)
            nxt = sample_next(last, temperature, top_k, top_p, generator).to(tokens.device)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            yield nxt
    finally:
        model.train(was_training)


def generate(
    model: MoETransformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    on_token: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """The generated tokens [B, max_new_tokens] (prompt not included); `on_token` sees each step's [B]."""
    out = []
    for nxt in stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
        if on_token is not None:
            on_token(nxt)
        out.append(nxt)
    rows = 1 if prompt_ids.dim() == 1 else prompt_ids.shape[0]
    if not out:
        return torch.zeros(rows, 0, dtype=torch.long)
    return torch.stack(out, dim=1)
