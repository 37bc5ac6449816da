"""Export a transformers decoder as it is: one program for the prefill and every decode step.

:func:`export_step` is the adapter a user would otherwise write around ``kvpass.export``: it gives the model a
static cache that lives on the step (transformers' ``StaticCache``), tracks the position, and exports
``(input_ids, position, cache) -> (logits, new_position, new_cache)`` with ``kvpass.export(cache="outputs")``:
the form ONNX Runtime, ExecuTorch and IREE take as it is (README "Deploy").

Sliding-window layers: transformers' ``StaticSlidingWindowLayer`` keeps only the last ``sliding_window`` tokens,
and its ``update`` branches on the position (not yet full / becoming full / full) with a K/V length that differs
per branch. No one program can take all three branches, so a trace of it holds only for the positions of the
example's branch. :func:`export_step` stores every sliding layer at full length instead (transformers' plain
``StaticLayer``, as its full-attention layers are stored), and the window is applied where it is defined, by
transformers' sliding-window mask (``create_sliding_window_causal_mask``, which reads ``config.sliding_window``):

    for every query at position ``q``, both caches attend to exactly the keys at positions ``q - W < j <= q``,
    with the same K/V values (written by the same projections at the same positions); every other key is
    masked out, with weight 0 in the softmax.

So the attention's result is the same sum of the same non-zero terms; a full-length row only adds terms of
weight exactly 0, whose place in the reduction can change the float rounding of the sum (not its value in exact
arithmetic): the program matches eager within float rounding, as transformers' own static and dynamic caches
match each other. The cost is memory: a sliding layer holds ``max_cache_len`` positions instead of
``sliding_window``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .faithful_export import ExportInputError

__all__ = ["export_step", "static_cache", "StepModule"]


def static_cache(model, max_cache_len: int):
    """transformers' ``StaticCache`` for ``model`` with every sliding-window layer stored at full length (see the
    module docstring), allocated and empty: a one-token step is run on it once to size each layer (heads, head
    dim, dtype and device per layer, as transformers' lazy initialization finds them) and then reset."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            if type(layer).__name__ != "StaticSlidingWindowLayer":
                raise ExportInputError(
                    f"kvpass.hf.export_step(model): cache layer {i} is a {type(layer).__name__}; kvpass knows how to "
                    f"store transformers' StaticSlidingWindowLayer at full length, not this one")
            cache.layers[i] = StaticLayer(max_cache_len=max_cache_len)
    device = next(model.parameters()).device
    with torch.no_grad():
        model(**_call_kwargs(model, torch.zeros(1, 1, dtype=torch.long, device=device), cache, 0))
    cache.reset()
    return cache


def _call_kwargs(model, input_ids, cache, pos) -> dict:
    """The keyword arguments of one step: the cache under the name this transformers takes (``cache`` or the
    older ``past_key_values``) and the tokens' absolute positions."""
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    t = input_ids.shape[1]
    position_ids = torch.arange(pos, pos + t, device=input_ids.device).unsqueeze(0)
    return {"input_ids": input_ids, cache_name: cache, "position_ids": position_ids, "use_cache": True}


class StepModule(torch.nn.Module):
    """One step of a transformers causal LM on a static cache it owns: ``forward(input_ids) -> logits``, advancing
    ``pos`` by the number of tokens. The model's submodules are registered under their own names, so the
    exported program's parameters have the keys of ``model.state_dict()``."""

    def __init__(self, model, max_cache_len: int):
        from .faithful_export import share_module_state

        super().__init__()
        share_module_state(self, model)
        object.__setattr__(self, "hf_model", model)  # called, not registered twice
        self.cache = static_cache(model, max_cache_len)
        self.pos = 0

    def forward(self, input_ids):
        out = self.hf_model(**_call_kwargs(self.hf_model, input_ids, self.cache, self.pos))
        self.pos += input_ids.shape[1]
        return out.logits


def export_step(model, *, max_cache_len: int, example_tokens: int = 4, dynamic: bool = True,
                position_shape: tuple = (1,)) -> torch.export.ExportedProgram:
    """Export one step of the transformers causal LM ``model`` (``Gemma4ForCausalLM``, ``Gemma3nForCausalLM``,
    ... in eval mode, batch 1) as ``(input_ids, position, cache) -> (logits, new_position, new_cache)``.

    Args:
        model: a transformers ``*ForCausalLM`` (its ``forward`` takes ``input_ids``, ``position_ids``, a cache
            and ``use_cache``, and returns ``.logits``). It is not changed.
        max_cache_len: how many tokens the cache holds (every layer, sliding ones included: see the module
            docstring). The program asserts ``position + input_ids.shape[1] <= max_cache_len``.
        example_tokens: the example prefill length the export traces with (at least 2).
        dynamic: ``True`` (default): one program for any token count from 1 to ``max_cache_len - 1`` (the prefill,
            chunked prefill and every decode step); ``False``: a program for ``example_tokens`` tokens only.
        position_shape: ``(1,)`` (default) or ``()``: the shape of the ``position`` input and output.

    Returns:
        The ``kvpass.export(..., cache="outputs")`` program: inputs ``input_ids`` (int64 ``[1, T]``), ``position``
        (int64, the tokens already in the cache; 0 for an empty one) and ``cache`` (a dict of tensors keyed by
        attribute path, ``"cache.layers.0.keys"``, ``"cache.layers.0.cumulative_length"``...; zeros are an empty
        cache); outputs the logits ``[1, T, vocab]``, ``position + T`` and the cache after the step, to feed back.
        :func:`kvpass.check` finds it faithful.

    Raises:
        kvpass.faithful_export.ExportInputError: an unusable argument (the message names it).
        kvpass.faithful_export.ExportCaptureError: the model's step cannot be captured as one graph.
    """
    from torch.export import Dim

    from .faithful_export import export

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ExportInputError(f"kvpass.hf.export_step(model): expected a transformers model, got "
                               f"{type(model).__name__}")
    if not isinstance(max_cache_len, int) or max_cache_len < 3:
        raise ExportInputError(f"kvpass.hf.export_step(max_cache_len={max_cache_len!r}): expected an int >= 3")
    if not isinstance(example_tokens, int) or not 2 <= example_tokens < max_cache_len:
        raise ExportInputError(f"kvpass.hf.export_step(example_tokens={example_tokens!r}): expected an int in "
                               f"[2, max_cache_len)")
    step = StepModule(model, max_cache_len)
    device = next(model.parameters()).device
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", 2)
    ids = torch.randint(0, vocab, (1, example_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    shapes: Any = {"input_ids": {1: Dim("T", min=1, max=max_cache_len - 1)}} if dynamic else None
    return export(step, (ids,), cache="outputs", positions="pos", dynamic_shapes=shapes,
                  position_shape=position_shape)
