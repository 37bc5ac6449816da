"""transformers' Gemma 4 or Gemma 3n (tiny random configs, default sliding/full layer types) exported with
``kvpass.hf.export_step`` and run in ONNX Runtime against eager.

Run it::

    python examples/hf_export.py                   # Gemma 4: export, torch.onnx.export, prefill + 8 decode steps
    python examples/hf_export.py --model gemma3n   # Gemma 3n

What it does: builds the model from a tiny random config with the model's default layer types (sliding-window
layers and full-attention layers, K/V shared by the last layers; no hub access, every parameter redrawn so that
every layer matters) and a sliding window of 4 tokens, shorter than the prompt, so the decode runs past the
window. It exports one step with ``kvpass.hf.export_step`` (one program for the prefill and every decode step),
converts it with ``torch.onnx.export``, then prefills a random prompt and decodes greedily in ONNX Runtime,
carrying the position and the cache only through the program's outputs, and compares each step's logits with
the eager model run over the whole sequence without a cache. Ends with ``PASS`` or ``FAIL: ...``.

Importing this file has no side effects; :func:`main` does the work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["tiny_gemma4_sliding", "tiny_gemma3n", "MODELS", "onnx_session", "decode_in_onnxruntime", "main"]

#: The sliding window of the tiny configs: shorter than a prompt, so a decode runs past it.
WINDOW = 4
MAX_CACHE_LEN = 32
TOL = 1e-5


def _redrawn(model, seed: int):
    torch.manual_seed(seed)
    for p in model.parameters():  # not the init's near-identity norms: every layer matters
        p.data.normal_(0.0, 0.3)
    return model.eval()


def tiny_gemma4_sliding(seed: int = 24):
    """``Gemma4ForCausalLM`` with Gemma 4's default layer types (five sliding layers, then a full one; the last
    layer full), 8 layers of which the last 2 reuse the K/V of the last sliding and the last full layer,
    ``attention_k_eq_v``, head dims 8 (sliding) and 16 (full), a 4-token window."""
    import transformers

    config = transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_kv_shared_layers=2, attention_k_eq_v=True,
        sliding_window=WINDOW, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
        max_position_embeddings=64, use_cache=True)
    torch.manual_seed(seed)
    return _redrawn(transformers.Gemma4ForCausalLM(config), seed)


def tiny_gemma3n(seed: int = 25):
    """``Gemma3nForCausalLM`` with Gemma 3n's default layer types (four sliding layers, then a full one), 7 layers
    of which the last 2 reuse K/V, AltUp and LAuReL at their defaults, a 4-token window."""
    import transformers

    config = transformers.Gemma3nTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return _redrawn(transformers.Gemma3nForCausalLM(config), seed)


MODELS = {"gemma4": tiny_gemma4_sliding, "gemma3n": tiny_gemma3n}


def onnx_session(ep, path, optimize: bool = True):
    """``torch.onnx.export`` of the program as it is, loaded in ONNX Runtime (CPU)."""
    import onnxruntime

    torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False, optimize=optimize)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def decode_in_onnxruntime(sess, model, prompt: torch.Tensor, steps: int) -> tuple[list[float], int]:
    """Prefill ``prompt`` and decode ``steps`` greedy tokens through the session from an empty cache (zeros,
    position 0), feeding each step's outputs back; returns max |onnxruntime - eager| of each step's logits
    (eager: the model over the whole sequence, no cache) and the final position."""
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    cache = [np.zeros(i.shape, dtypes[i.type]) for i in inputs[2:]]  # an empty cache: each input its own type
    position, ids, seq = np.zeros(1, np.int64), prompt, prompt
    errors = []
    for _ in range(1 + steps):
        logits, position, *cache = sess.run(None, dict(zip(names, [ids.numpy(), position, *cache])))
        with torch.no_grad():
            want = model(input_ids=seq, use_cache=False).logits[:, -ids.shape[1]:]
        errors.append(float((torch.from_numpy(logits) - want).abs().max()))
        ids = torch.from_numpy(logits[:, -1:].argmax(-1))
        seq = torch.cat([seq, ids], 1)
    return errors, int(position.reshape(()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gemma4")
    parser.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    parser.add_argument("--seed", type=int, default=3, help="prompt seed")
    args = parser.parse_args(argv)

    import kvpass
    import kvpass.hf

    model = MODELS[args.model]()
    c = model.config
    print(f"{type(model).__name__} (tiny random config): layer types {c.layer_types}, window {c.sliding_window}, "
          f"{c.num_kv_shared_layers} layers sharing K/V")
    t0 = time.perf_counter()
    ep = kvpass.hf.export_step(model, max_cache_len=MAX_CACHE_LEN)
    findings = kvpass.check(ep)
    print(f"kvpass.hf.export_step: {time.perf_counter() - t0:.0f}s, inputs {ep.graph_signature.user_inputs[:2]} + "
          f"{len(ep.graph_signature.user_inputs) - 2} cache tensors; kvpass.check: {len(findings)} finding(s)")
    prompt = torch.randint(0, c.vocab_size, (1, 6), generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        sess = onnx_session(ep, Path(tmp) / "decoder.onnx")
        errors, position = decode_in_onnxruntime(sess, model, prompt, args.steps)
    print(f"ONNX Runtime, prefill {prompt.shape[1]} + {args.steps} decode steps, max |onnxruntime - eager| per step: "
          f"[{', '.join(f'{e:.1e}' for e in errors)}], final position {position}")
    failures = ([] if not findings else [f"kvpass.check found {len(findings)} finding(s)"]) + \
        ([] if max(errors) < TOL else [f"logits differ from eager by {max(errors):.1e} (> {TOL})"]) + \
        ([] if position == prompt.shape[1] + args.steps else [f"final position {position}"])
    print("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
