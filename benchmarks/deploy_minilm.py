"""The pretrained all-MiniLM-L6-v2 as ONNX in onnxruntime: dynamic int8, int4 weight-only.

The real model and sentences of ``benchmarks/minilm.py`` (offline ``AutoModel``, 70 sentences
in one padded batch), captured by the torch.export front end, compressed, written with
``fxcompress.export_onnx`` and run by onnxruntime's CPU provider at 1 thread:

* **ORT vs ours**: cosine of the mean-pooled, normalised sentence embeddings of onnxruntime's
  output against the same model run by fxcompress (mean / min over the sentences);
* **floor**: the same cosine between fxcompress's own x86 model and its ``backend="reference"``
  twin: how far two correct implementations of the same dynamic int8 arithmetic drift apart
  on this model (the float round-off of each implementation moves a code now and then, and
  the encoder amplifies it), hence the closest an ONNX form can be expected to come;
* **vs float**: cosine of onnxruntime's int8 embeddings against the float model's;
* latency: one call on the whole batch, best of interleaved medians, side by side in one run
  with onnxruntime fp32 (``export_onnx`` of the float model) and with onnxruntime's own
  ``quantize_dynamic`` of that fp32 file (the peer).

Run: ``python benchmarks/deploy_minilm.py [--rounds 3]`` (needs ``make install-bench``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxcompress  # noqa: E402
from _common import markdown_table, weights_for_this_cpu, write_section  # noqa: E402
from deploy import best_median, ort_session  # noqa: E402
from minilm import embed, load_minilm, sentences  # noqa: E402

TABLES = ("quantize_weights", {"bits": 8, "group_size": None, "embeddings": True})


def variants(bits: int) -> dict[str, list]:
    """name -> pipeline (the embedding tables weight-only int8 in the dynamic ones, as in minilm.py)."""
    return {
        "dynamic int8 per token + int8 tables": [("quantize_dynamic", {"granularity": "per_token", "bits": bits}),
                                                 TABLES],
        "dynamic int8 per tensor + int8 tables": [("quantize_dynamic", {"granularity": "per_tensor", "bits": bits}),
                                                  TABLES],
        "int4 weight-only (g32) + int4 tables (g64)": [
            ("quantize_weights", {"bits": 4, "group_size": 32}),
            ("quantize_weights", {"bits": 4, "group_size": 64, "embeddings": True, "scope": ["embeddings.*"]})],
    }


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def ort_embed(session, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    hidden = session.run(None, feed)[names.index("last_hidden_state") if "last_hidden_state" in names else 0]
    return pooled(torch.from_numpy(hidden), batch["attention_mask"])


def cosines(a: torch.Tensor, b: torch.Tensor) -> str:
    c = F.cosine_similarity(a, b)
    return f"{c.mean().item():.5f} / {c.min().item():.5f}"


def ort_peer(fp32: Path, out: Path) -> Path:
    """onnxruntime's own dynamic int8 of the fp32 file (MatMul -> DynamicQuantizeMatMul / MatMulInteger,
    int8 weights per tensor, its defaults)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return out


def ops_of(path: Path) -> str:
    """The int8 / int4 operators onnxruntime runs (after its graph optimizations)."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    keep = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "MatMulNBits",
            "MatMul", "FusedMatMul", "Attention", "SkipLayerNormalization", "Gelu", "BiasGelu")
    return ", ".join(f"{k} {ops[k]}" for k in keep if ops[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, tokenizer = load_minilm()
    texts, _ = sentences()
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    example = {k: v[:4] for k, v in batch.items()}  # exported on 4 sentences; runs on all 70 (dynamic sizes)
    label, _ = weights_for_this_cpu()
    bits = 7 if label.startswith("7-bit") else 8
    reference = embed(model, batch)
    rows, calls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captured = fxcompress.run(model, [], example, progress=False).model  # the same capture, float
        fp32 = fxcompress.export_onnx(captured, tmp / "fp32.onnx", example_inputs=example)
        sessions = {"ORT fp32": ort_session(fp32, tmp / "fp32_opt.onnx")}
        sessions["ORT quantize_dynamic (peer)"] = ort_session(ort_peer(fp32, tmp / "peer.onnx"), tmp / "peer_opt.onnx")
        ours, floors = {}, {}
        for i, (name, pipeline) in enumerate(variants(bits).items()):
            result = fxcompress.run(model, pipeline, example, progress=False)
            ours[name] = embed(result.model, batch)
            if name.startswith("dynamic"):
                ref_pipe = [(p, {**kw, "backend": "reference"}) if p == "quantize_dynamic" else (p, kw)
                            for p, kw in pipeline]
                floors[name] = cosines(ours[name], embed(fxcompress.run(model, ref_pipe, example,
                                                                        progress=False).model, batch))
            path = fxcompress.export_onnx(result, tmp / f"v{i}.onnx", example_inputs=example)
            sessions[name] = ort_session(path, tmp / f"v{i}_opt.onnx")
        embeddings = {k: ort_embed(s, batch) for k, s in sessions.items()}
        for k, s in sessions.items():
            calls[k] = (lambda s=s: s.run(None, {i.name: batch[i.name].numpy() for i in s.get_inputs()}))
        times = best_median(calls, rounds=args.rounds)
        optimized = {"ORT fp32": "fp32_opt", "ORT quantize_dynamic (peer)": "peer_opt",
                     **{name: f"v{i}_opt" for i, name in enumerate(variants(bits))}}
        for k in sessions:
            rows.append([k, cosines(embeddings[k], ours[k]) if k in ours else "-", floors.get(k, "-"),
                         cosines(embeddings[k], reference), f"{times[k] * 1e3:.1f}",
                         f"{times[k] / times['ORT fp32']:.2f}", ops_of(tmp / f"{optimized[k]}.onnx")])
            print(rows[-1], flush=True)
    body = (f"all-MiniLM-L6-v2 (pretrained), {len(texts)} sentences in one padded batch "
            f"{tuple(batch['input_ids'].shape)}, exported on 4 (batch and sequence dims symbolic); "
            f"onnxruntime CPU provider, 1 thread, all graph optimizations; int8 weights {bits}-bit. "
            "Cosines are mean / min over the sentences' mean-pooled, normalised embeddings.\n\n"
            + markdown_table(rows, ["variant", "ORT vs ours", "floor: ours x86 vs ours reference", "ORT vs float",
                                    "ORT latency (ms)", "/ ORT fp32", "operators ORT runs"])
            + "\n\nTarget (issue 15): ORT vs ours cosine >= 0.999. *floor*: two correct implementations of the "
              "same dynamic int8 arithmetic (fxcompress's x86 kernels and its reference) on this model, one "
              "sample of how far float round-off alone lets them drift: per layer onnxruntime's MatMulInteger is "
              "exact, and what remains is one-ULP differences (the quantizer's float32 scale, LayerNorm, "
              "Softmax, GELU) that move an activation code now and then, which the encoder amplifies. A "
              "per-tensor code is coarse (one scale for the whole activation, stretched by MiniLM's outlier "
              "channels), so a moved code weighs more than a per-token one. *peer*: onnxruntime's own "
              "`quantize_dynamic` of the fp32 file (int8 weights per tensor), compared with the float model. "
              "int4: `MatMulNBits` at its default accuracy level dequantizes the blocks to float32 and "
              "multiplies in float (no int8 speed-up, results equal ours to float round-off).")
    print(body)
    write_section("deploy_minilm", "Deployment: all-MiniLM-L6-v2 in onnxruntime", body)


if __name__ == "__main__":
    main()
