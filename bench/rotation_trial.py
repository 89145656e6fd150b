"""Would rotating SmolLM2's hidden space help its 4-bit weights? A trial in PyTorch.

    HF_HUB_OFFLINE=1 python bench/rotation_trial.py [--windows 8] [--json OUT]

QuaRot / SpinQuant-style rotation: every RMSNorm's weight folded into the projections that read
it (the tied head untied for the trial and left float), then the residual stream rotated by an
orthogonal Q (the embedding table and every reader's input columns by Q, every writer's output
rows by Q^T) and each attention head's values / the output projection's inputs by a 64 x 64
Hadamard matrix. The float model is the same function (its perplexity is printed as a check);
its weights are not, so round-to-nearest 4-bit blocks of 64 along K (asymmetric) land
differently. Two rotations: a random orthogonal matrix, and block-diagonal 64 x 64 Hadamard
matrices with random signs (incoherent within each quantization block). Every linear layer of the
30 blocks is quantized; the embedding and the head stay float. Perplexity over ``--windows``
windows of 512 tokens of the Wikipedia eval split.

Caution (ASSETS.md): SmolLM2's weights came from a Q4_1 GGUF (every aligned block of 32 is on a
16-level grid), which unrotated block quantization partly keeps and any rotation spreads.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import cpu_name, print_json, quiet

HEAD_DIM = 64


def _hadamard(n: int):
    import torch

    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _rtn(w, block: int = 64, bits: int = 4):
    import torch

    o, k = w.shape
    wb = w.reshape(o, k // block, block)
    lo, hi = wb.amin(-1, keepdim=True).clamp(max=0), wb.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo).clamp(min=1e-12) / (2**bits - 1)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(wb / s) + z, 0, 2**bits - 1)
    return ((q - z) * s).reshape(o, k)


def _linears(layer):
    a, f = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)


def _fold_norms(m) -> None:
    import torch

    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone())
    for layer in m.model.layers:
        a, f = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                              (layer.post_attention_layernorm, (f.gate_proj, f.up_proj))):
            for p in readers:
                p.weight.data *= norm.weight.data[None]
            norm.weight.data[:] = 1
    m.lm_head.weight.data *= m.model.norm.weight.data[None]
    m.model.norm.weight.data[:] = 1


def _rotate(m, q) -> None:
    import torch

    h = _hadamard(HEAD_DIM)
    m.model.embed_tokens.weight.data = m.model.embed_tokens.weight.data @ q
    m.lm_head.weight.data = m.lm_head.weight.data @ q
    for layer in m.model.layers:
        a, f = layer.self_attn, layer.mlp
        for p in (a.q_proj, a.k_proj, a.v_proj, f.gate_proj, f.up_proj):
            p.weight.data = p.weight.data @ q
        for p in (a.o_proj, f.down_proj):
            p.weight.data = q.T @ p.weight.data
        wv, wo = a.v_proj.weight.data, a.o_proj.weight.data
        a.v_proj.weight.data = torch.cat([h.T @ wv[i:i + HEAD_DIM] for i in range(0, wv.shape[0], HEAD_DIM)])
        a.o_proj.weight.data = torch.cat([wo[:, i:i + HEAD_DIM] @ h for i in range(0, wo.shape[1], HEAD_DIM)], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    import torch

    from graphc.models import get_model_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = get_model_spec("smollm2")
    feeds = spec.perplexity_feeds(args.windows, seq=512)

    def load():
        with quiet():
            m = spec.load_torch().model
        return m.eval()

    def ppl(m) -> float:
        nll, n = 0.0, 0
        with torch.no_grad():
            for f in feeds:
                ids = torch.from_numpy(f["input_ids"])
                logits = m(input_ids=ids).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                n += ids.shape[1] - 1
        return math.exp(nll / n)

    d = load().config.hidden_size
    signs = torch.where(torch.randn(d) >= 0, 1.0, -1.0)
    rotations = {"random orthogonal": torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float(),
                 "block-diagonal Hadamard 64, random signs": torch.block_diag(*[_hadamard(64)] * (d // 64))
                 * signs[:, None]}
    res: dict = {"cpu": cpu_name(), "windows": args.windows, "rows": {}}
    m = load()
    res["rows"]["fp32"] = {"float": ppl(m)}
    m = load()
    _fold_norms(m)
    res["rows"]["norms folded, no rotation"] = {"float": ppl(m)}
    for layer in m.model.layers:
        for p in _linears(layer):
            p.weight.data = _rtn(p.weight.data)
    res["rows"]["norms folded, no rotation"]["rtn4 b64"] = ppl(m)
    for name, q in rotations.items():
        m = load()
        _fold_norms(m)
        _rotate(m, q)
        row = res["rows"][name] = {"float": ppl(m)}
        for layer in m.model.layers:
            for p in _linears(layer):
                p.weight.data = _rtn(p.weight.data)
        row["rtn4 b64"] = ppl(m)
    ref = res["rows"]["fp32"]["float"]
    for row in res["rows"].values():
        if "rtn4 b64" in row:
            row["rtn4 b64 rise"] = row["rtn4 b64"] / ref - 1
    print_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
