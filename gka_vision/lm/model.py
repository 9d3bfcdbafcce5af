"""GKAForCausalLM: token embedding, pre-norm blocks (causal GKA mixer + SwiGLU MLP), final RMSNorm, tied LM head."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import GKACache, GKALayerCache
from .config import CONFIG_NAME, GKAConfig
from .generation import generate as _generate
from .mixer import GKACausalMixer

__all__ = ['GKAForCausalLM', 'CausalLMOutput', 'SwiGLU', 'LMBlock', 'WEIGHTS_NAME', 'IGNORE_INDEX']

WEIGHTS_NAME = 'model.safetensors'
IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """Result of ``GKAForCausalLM.forward``.

    Attributes:
        logits: [B, T, vocab_size] next-token logits at every position.
        loss: Mean shifted cross-entropy (position t predicts labels[t + 1]) when labels were given, else None.
        cache: The cache after the last input token (None with ``use_cache=False``).
    """
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    cache: Optional[GKACache] = None


class SwiGLU(nn.Module):
    """SiLU-gated MLP: down(SiLU(gate(x)) ⊙ up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LMBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + mlp(norm2(x)).

    The mixer is any module with ``forward(x, cache, use_cache) -> (y, new_cache)`` (the benchmarks reuse this
    block with a softmax-attention mixer).
    """

    def __init__(self, config: GKAConfig, mixer: Optional[nn.Module] = None):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = mixer if mixer is not None else GKACausalMixer(config)
        self.norm2 = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cache=None, use_cache: bool = False):
        y, new_cache = self.mixer(self.norm1(x), cache, use_cache)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, new_cache


class GKAForCausalLM(nn.Module):
    """Causal language model built from the GKA mixer of gka_spec.md §2 and the shared ``gka_kernels``.

    Args:
        config: The model's :class:`GKAConfig`.
        mixer_factory: Builds the mixer of one block from the config (default: :class:`GKACausalMixer`). Used by
            the benchmarks to build a same-skeleton softmax-attention baseline.
    """

    def __init__(self, config: GKAConfig, mixer_factory: Optional[Callable[[GKAConfig], nn.Module]] = None):
        super().__init__()
        if not isinstance(config, GKAConfig):
            raise TypeError(f'config must be a GKAConfig, got {type(config).__name__}')
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        factory = mixer_factory or GKACausalMixer
        self.layers = nn.ModuleList([LMBlock(config, factory(config)) for _ in range(config.num_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, initializer_range) for the embedding and every Linear weight (the fused ``in_proj`` included),
        zero biases (the mixers' β / α ``gate_bias`` too), unit norms; the forget gate and the short convs keep their
        own init (gka_spec.md §2 steps 2 and 7); then tie the head."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, GKACausalMixer):
                nn.init.zeros_(m.gate_bias)  # the biases of the former β / α Linears, zeroed like every Linear bias
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Full names of the parameters to exclude from weight decay (the forget gate's A_log and dt_bias, the β / α
        gate_bias)."""
        names = set()
        for prefix, m in self.named_modules():
            if hasattr(m, 'no_weight_decay') and m is not self:
                names |= {f'{prefix}.{n}' for n in m.no_weight_decay()}
        return names

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f'input_ids must be a torch.Tensor of token ids [B, T], got {type(input_ids).__name__}')
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f'input_ids must have shape [B, T] with B, T >= 1, got {list(input_ids.shape)}')
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f'input_ids must be an integer tensor, got {input_ids.dtype}')
        if torch.compiler.is_compiling():
            return   # the value checks read the tensor (a host sync, data-dependent control flow in a graph)
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f'input_ids contains token id {bad}, outside the vocabulary [0, '
                             f'{self.config.vocab_size - 1}] (vocab_size={self.config.vocab_size})')

    def _check_labels(self, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f'labels must be a tensor shaped like input_ids {list(input_ids.shape)}, got {got}')
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f'labels must be an integer tensor, got {labels.dtype}')
        if labels.shape[1] < 2:
            raise ValueError('labels need at least 2 tokens: position t is scored against labels[:, t + 1]')
        if torch.compiler.is_compiling():
            return   # as in _check_ids; the embedding and cross entropy still reject ids out of range
        valid = ((labels >= 0) & (labels < self.config.vocab_size)) | (labels == IGNORE_INDEX)
        if not bool(valid.all()):
            bad = int(labels[~valid][0])
            raise ValueError(f'labels contains {bad}: expected token ids in [0, {self.config.vocab_size - 1}] or '
                             f'{IGNORE_INDEX} (ignored)')

    def check_length(self, total: int, what: str = 'the sequence') -> None:
        """Raise ValueError when ``total`` positions exceed ``config.max_length`` (if one is set)."""
        limit = self.config.max_length
        if limit is not None and total > limit:
            raise ValueError(f'{what} would reach {total} tokens, more than config.max_length={limit}')

    def forward_hidden(
            self,
            input_ids: torch.Tensor,
            cache: Optional[GKACache] = None,
            use_cache: bool = True,
            check_ids: bool = True,
    ):
        """Final-norm hidden states [B, T, d] and the new cache (the body of ``forward`` without the head).

        ``check_ids=False`` skips the vocabulary range check, which reads the ids back (a device sync); only for
        ids known to be valid, e.g. tokens the model itself sampled."""
        if check_ids:
            self._check_ids(input_ids)
        elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError('input_ids must be a [B, T] tensor of token ids')
        B, T = input_ids.shape
        if cache is not None:
            if not isinstance(cache, GKACache):
                raise ValueError(f'cache must be a GKACache returned by forward, got {type(cache).__name__}')
            cache.check(self.config, B, input_ids.device)
        start = cache.seen_tokens if cache is not None else 0
        self.check_length(start + T, 'input_ids (after the cached tokens)')
        x = self.embed_tokens(input_ids)
        new_layers: List[GKALayerCache] = []
        for i, block in enumerate(self.layers):
            x, layer_cache = block(x, cache.layers[i] if cache is not None else None, use_cache)
            new_layers.append(layer_cache)
        x = self.norm(x)
        new_cache = GKACache(new_layers, start + T, self.config.cache_signature()) if use_cache else None
        return x, new_cache

    def forward(
            self,
            input_ids: torch.Tensor,
            labels: Optional[torch.Tensor] = None,
            cache: Optional[GKACache] = None,
            use_cache: bool = True,
    ) -> CausalLMOutput:
        """Run the model on ``input_ids`` [B, T] (integer token ids).

        Args:
            input_ids: Token ids in ``[0, vocab_size)``.
            labels: Optional targets shaped like ``input_ids``; the loss is the cross-entropy of logits[:, t]
                against labels[:, t + 1], ignoring positions labelled -100.
            cache: A cache from a previous call of this model: the sequence continues from it (prefill through
                ``gka_chunk`` from its state, or one O(1) ``gka_step`` per layer for a single token). Not modified.
            use_cache: Build and return the cache after the last token (set False for plain training).

        Returns:
            :class:`CausalLMOutput` with logits, loss (or None) and cache (or None).
        """
        if labels is not None:
            self._check_labels(labels, input_ids)
        h, new_cache = self.forward_hidden(input_ids, cache, use_cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits=logits, loss=loss, cache=new_cache)

    @torch.no_grad()
    def generate(
            self,
            input_ids: torch.Tensor,
            max_new_tokens: int = 32,
            temperature: float = 0.0,
            top_k: Optional[int] = None,
            top_p: Optional[float] = None,
            eos_token_id: Optional[int] = None,
            generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Continue a batch of equal-length prompts with the recurrent cache (O(1) work per new token).

        Args:
            input_ids: Prompts [B, T].
            max_new_tokens: Tokens to add (fewer if every row has emitted ``eos_token_id``).
            temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
            top_k: When sampling, keep only the ``top_k`` most likely tokens.
            top_p: When sampling, keep the smallest set of most likely tokens whose probability reaches ``top_p``.
            eos_token_id: A row that emits it is finished; later positions of that row are filled with it.
            generator: ``torch.Generator`` for reproducible sampling.

        Returns:
            [B, T + n] token ids: the prompts followed by the n <= max_new_tokens generated tokens.
        """
        return _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` (a tied head is stored once) into ``save_directory``."""
        from safetensors.torch import save_file
        os.makedirs(save_directory, exist_ok=True)
        self.config.save(os.path.join(save_directory, CONFIG_NAME))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop('lm_head.weight')
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={'format': 'pt'})

    @classmethod
    def from_pretrained(
            cls,
            save_directory: Union[str, os.PathLike],
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> 'GKAForCausalLM':
        """Load a model written by :meth:`save_pretrained` (safetensors only; every tensor must match)."""
        from safetensors.torch import load_file
        cfg_path = os.path.join(save_directory, CONFIG_NAME)
        w_path = os.path.join(save_directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f'{p} not found: save_directory must hold {CONFIG_NAME} and {WEIGHTS_NAME} '
                                        f'written by GKAForCausalLM.save_pretrained')
        model = cls(GKAConfig.load(cfg_path))
        state = load_file(w_path)
        if model.config.tie_embeddings:
            state['lm_head.weight'] = state.get('embed_tokens.weight')
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f'{w_path} does not match the config: missing {missing}, unexpected {unexpected}')
        for k, v in expected.items():
            if state[k] is None or state[k].shape != v.shape:
                got = None if state[k] is None else list(state[k].shape)
                raise ValueError(f'{w_path}: tensor {k} has shape {got}, the config needs {list(v.shape)}')
        model.load_state_dict(state)
        model.tie_weights()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model
