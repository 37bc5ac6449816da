"""transformers' Gemma4 (tiny random config, ``StaticCache``) compiled with ``kvpass.backend``.

Run it::

    python examples/hf_gemma4.py           # kvpass, then Inductor
    python examples/hf_gemma4.py --fast    # kvpass, then eager (no Inductor code generation)

What it does: builds ``Gemma4ForCausalLM`` from a tiny random config (shared KV layers, ``attention_k_eq_v``,
``global_head_dim != head_dim``; no hub access, every parameter redrawn so that every layer matters), decodes
16 greedy tokens with a ``StaticCache`` eagerly and with
``torch.compile(model.forward, backend=kvpass.backend(on_report=...))``, and prints whether the tokens are
identical, how many rewrites kvpass reported (expected 0: Hugging Face's static cache keeps K/V on the device,
with no host round trip to remove) and how many graphs Dynamo compiled.

Importing this file has no side effects; :func:`main` does the work and returns 0 when the tokens match and
nothing was rewritten.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import kvpass

__all__ = ["tiny_gemma4", "greedy", "main"]

STEPS = 16


def tiny_gemma4(seed: int = 18):
    """The tiny random Gemma4 kvpass's tests and ``kvpass demo --model hf-gemma4`` use: shared KV layers,
    ``attention_k_eq_v``, head dims 8 and 16; parameters redrawn from N(0, 0.3) so no norm is an identity."""
    import transformers

    config = transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_kv_shared_layers=2, attention_k_eq_v=True,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8, max_position_embeddings=64, use_cache=True,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(config).eval()
    for p in model.parameters():  # not the init's near-identity norms: every layer matters
        p.data.normal_(0.0, 0.3)
    return model


def greedy(model, step, prompt: torch.Tensor, steps: int, times: list | None = None) -> list[int]:
    """Prefill ``prompt`` then decode ``steps`` greedy tokens through ``step`` (``model.forward`` or compiled).

    ``times``, when given, receives the wall time of each decode step in seconds."""
    import time

    from transformers import StaticCache

    t = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=max(32, t + steps))
    with torch.no_grad():
        logits = step(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(t), use_cache=True).logits
        out = []
        for i in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            out.append(int(nxt))
            t0 = time.perf_counter()
            logits = step(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([t + i]),
                          use_cache=True).logits
            if times is not None:
                times.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help='compile with inner="eager" instead of Inductor')
    parser.add_argument("--seed", type=int, default=3, help="prompt seed")
    args = parser.parse_args(argv)

    model = tiny_gemma4()
    c = model.config
    head_dims = sorted({layer.self_attn.head_dim for layer in model.model.layers})
    print(f"Gemma4ForCausalLM (tiny random config): {c.num_hidden_layers} layers, "
          f"{c.num_kv_shared_layers} sharing K/V, attention_k_eq_v={c.attention_k_eq_v}, "
          f"per-layer head_dims {head_dims}, StaticCache")
    prompt = torch.randint(0, c.vocab_size, (1, 6), generator=torch.Generator().manual_seed(args.seed))

    t0 = time.perf_counter()
    want = greedy(model, model.forward, prompt, STEPS)
    print(f"eager:    {STEPS} greedy tokens in {time.perf_counter() - t0:.1f}s: {want}")

    inner = "eager" if args.fast else "inductor"
    reports: list = []
    kv = kvpass.backend(inner=inner, on_report=reports.append)
    graphs = []

    def counting(gm, example_inputs):  # Dynamo calls the backend once per compiled graph
        graphs.append(gm)
        return kv(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend=counting)
    print(f"compiling with kvpass.backend(inner={inner!r}) ...", flush=True)
    t0 = time.perf_counter()
    got = greedy(model, compiled, prompt, STEPS)
    print(f"compiled: {STEPS} greedy tokens in {time.perf_counter() - t0:.1f}s (compiles included): {got}")

    same = got == want
    rewrites = sum(len(r.matches) for r in reports)
    skips = sum(len(r.skips) for r in reports)
    print(f"tokens identical: {'yes' if same else 'NO'}")
    print(f"kvpass rewrites reported: {rewrites} (expected 0: no round trips in HF's cache), "
          f"skipped candidates: {skips}, reports: {len(reports)} (one per compiled graph)")
    for r in reports:
        for m in list(r.matches) + list(r.skips):
            print(f"  {m}")
    print(f"compiled graphs: {len(graphs)}")
    failures = ([] if same else ["compiled tokens differ from eager"]) + \
        ([] if rewrites == 0 and skips == 0 else [f"{rewrites} rewrite(s), {skips} skip(s) where none was expected"]) + \
        ([] if graphs else ["nothing was compiled"]) + \
        ([] if len(reports) == len(graphs) else [f"{len(reports)} reports for {len(graphs)} compiled graphs"])
    print("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
