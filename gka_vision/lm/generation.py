"""Token generation with the recurrent cache: one prefill, then one O(1) step per new token."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ['generate', 'filter_logits', 'select_next_token']


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus of mass ``top_p``.

    logits: [B, V] (fp32). The most likely token always survives, so a row never becomes all -inf.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (so the first one is always kept).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    return logits


def select_next_token(
        logits: torch.Tensor,
        temperature: float,
        top_k: Optional[int],
        top_p: Optional[float],
        generator: Optional[torch.Generator],
) -> torch.Tensor:
    """[B, V] logits → [B] token ids: argmax when ``temperature == 0``, else a filtered softmax sample."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_args(model, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator) -> None:
    vocab = model.config.vocab_size
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f'max_new_tokens must be an int >= 0, got {max_new_tokens!r}')
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f'temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}')
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f'top_k must be None or an int >= 1, got {top_k!r}')
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f'top_p must be None or a number in (0, 1], got {top_p!r}')
    if eos_token_id is not None and (not _is_int(eos_token_id) or not 0 <= eos_token_id < vocab):
        raise ValueError(f'eos_token_id must be None or a token id in [0, {vocab - 1}], got {eos_token_id!r}')
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f'generator must be None or a torch.Generator, got {type(generator).__name__}')


@torch.no_grad()
def generate(
        model,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """See ``GKAForCausalLM.generate``."""
    _check_args(model, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    model._check_ids(input_ids)
    B, T = input_ids.shape
    model.check_length(T + max_new_tokens, 'the prompt plus max_new_tokens')
    if max_new_tokens == 0:
        return input_ids.clone()
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(f'generator is on {generator.device} but input_ids is on {input_ids.device}')

    h, cache = model.forward_hidden(input_ids, use_cache=True)
    logits = model.lm_head(h[:, -1])
    tokens = [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        nxt = select_next_token(logits, temperature, top_k, top_p, generator).to(input_ids.dtype)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        tokens.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        h, cache = model.forward_hidden(nxt[:, None], cache, use_cache=True, check_ids=False)
        logits = model.lm_head(h[:, -1])
    return torch.cat(tokens, dim=1)
