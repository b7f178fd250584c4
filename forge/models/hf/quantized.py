"""`forge convert --to hf` of a model trained with quantisation-aware training (model.quant).

Hugging Face's dense families hold floating-point weights and no fake-quantisation step, so:
  * without --quantized the full-precision weights W are written, model.quant is dropped from the
    exported config, and a note says so;
  * with --quantized each fake-quantised weight is written as q(W) (forge.parallel.quant at mix = 1,
    the scale taken over the whole tensor as training's tp-reduced scale was): the quantised
    values dequantised, which a float checkpoint holds exactly in fp32 (bf16 / fp16 round them).
    Activation quantisation (model.quant.act_points) has no place in those formats and is dropped,
    with a note; with tied embeddings and model.quant.embed_method the HF head reads q(E) where
    Forge's head read E, also noted.
A model without model.quant refuses --quantized (there is nothing quantised to write).
Where a family's format holds model.quant itself (BitNet: model.quant.linear='bitlinear_1p58' is its
quantization_config with AutoBitLinear in online mode), the export without --quantized keeps it: the
full-precision weights, which transformers quantises in each forward as Forge does. HF's packed "offline" BitNet checkpoints (2-bit codes + weight_scale, e.g. the published
microsoft/bitnet-b1.58-2B-4T) are read (`bitnet_offline_to_master`), and `--quantized` writes one
(`pack_bitnet_stream`: AutoBitLinear offline, codes + weight_scale, the int8 inputs kept).
"""
from __future__ import annotations

import dataclasses
import re

import torch

from forge.config import ModelConfig, QuantConfig


def quantized_weight_names(cfg: ModelConfig) -> dict:
    """Forge weight name -> (method, bits, granularity) of every fake-quantised weight, read off
    the model as built (on the meta device), so it lists exactly the tensors training quantised."""
    from forge.models import build_model
    from forge.parallel.quant import FakeQuant
    model = build_model(cfg, device="meta")
    out = {}
    for name, module in model.named_modules():
        fq = getattr(module, "weight_quant", None)
        if isinstance(fq, FakeQuant) and getattr(module, "weight", None) is not None:
            out[f"{name}.weight"] = (fq.method, fq.bits, fq.granularity)
    return out


class QuantizedWeights:
    """Forge weights (FolderWeights / StateDictWeights) with q(W) in place of each fake-quantised W."""

    def __init__(self, weights, cfg: ModelConfig):
        self.weights, self.quantized = weights, quantized_weight_names(cfg)

    def names(self):
        return self.weights.names()

    def shape(self, name):
        return self.weights.shape(name)

    def dtype(self, name):
        return self.weights.dtype(name)

    def get(self, name) -> torch.Tensor:
        from forge.parallel.quant import quantize
        w = self.weights.get(name)
        spec = self.quantized.get(name)
        if spec is None or (spec[0] != "ternary" and spec[1] >= 16):    # bits >= 16: full precision
            return w
        method, bits, granularity = spec
        return quantize(w, method, bits, granularity)[0]


def family_holds_quant(cfg: ModelConfig) -> bool:
    """Whether some Hugging Face family represents `cfg` with its model.quant exactly (BitNet's online
    quantization_config holds model.quant.linear='bitlinear_1p58')."""
    from forge.models.hf.families import FAMILIES, representation_errors
    return any(not representation_errors(spec, cfg) for spec in FAMILIES.values())


def export_plan(cfg: ModelConfig, quantized: bool) -> tuple[ModelConfig, list[str], bool]:
    """(the config to export, the notes to print, whether to write packed BitNet codes);
    ValueError for --quantized without model.quant."""
    q = cfg.quant
    if not q.enabled:
        if quantized:
            raise ValueError("--quantized: the model has no quantisation-aware training (model.quant is off); "
                             "there are no quantised weights to write")
        return cfg, [], False
    plain = dataclasses.replace(cfg, quant=QuantConfig())
    if family_holds_quant(cfg):
        if not quantized:
            return cfg, ["model.quant is part of this family's format (BitNet: quantization_config with "
                         "AutoBitLinear in online mode): wrote the full-precision weights, which transformers "
                         "quantises in the forward"], False
        if cfg.qkv_bias or cfg.attn_out_bias:
            raise ValueError("--quantized: packed BitNet linears scale their bias by weight_scale (AutoBitLinear "
                             "offline), Forge's bitlinear_1p58 does not; convert without --quantized")
        return cfg, ["wrote the packed ternary codes (2 bits, 4 rows a byte) and weight_scale of every "
                     "projection, quantization_config AutoBitLinear offline (int8 inputs as in training)"], True
    if not quantized:
        return plain, ["model.quant is not part of the Hugging Face format: wrote the full-precision weights "
                       "(pass --quantized to write the fake-quantised q(W) instead)"], False
    notes = []
    if q.weight_method is None and q.embed_method is None and q.linear == "linear":
        raise ValueError("--quantized: model.quant quantises only activations, which no Hugging Face format "
                         "holds; convert without --quantized to write the full-precision weights")
    if q.act_points:
        notes.append(f"model.quant.act_points={q.act_points}: activation quantisation is not part of the Hugging "
                     f"Face format; the exported model runs the quantised weights on full-precision activations")
    if q.linear != "linear":
        notes.append(f"model.quant.linear={q.linear!r}: wrote the ternary weights q(W); the per-token int8 "
                     f"quantisation of the projections' inputs is not part of the exported format")
    if q.embed_method and cfg.tie_embeddings:
        notes.append("tied embeddings: the Hugging Face head reads the quantised table q(E) (Forge's head read E)")
    return plain, notes, False


# ---------------------------------------------------------------- reading packed BitNet checkpoints
VALUES_PER_BYTE = 4        # ternary codes + 1 in {0, 1, 2}, 2 bits each


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """(R, in) uint8 -> (4 R, in) codes in {-1, 0, 1} (float32), transformers' pack_weights layout:
    code row i R + r sits in bits 2i..2i+1 of byte row r."""
    rows = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    return torch.cat(rows, dim=0).float() - 1.0


def bitnet_offline_to_master(hf_cfg: dict, sd: dict) -> dict:
    """A packed ("offline") BitNet state dict -> one whose weights model.quant.linear='bitlinear_1p58'
    quantises back to what transformers computes; any other checkpoint: `sd` unchanged.
    Each packed linear holds codes c in {-1, 0, 1} (uint8, 4 rows a byte) and `weight_scale`;
    transformers computes y = q8(x) (c s)^T with s = weight_scale (AutoBitLinear, offline) or
    1 / weight_scale (BitLinear). Forge re-quantises its weight in every forward, q(W) = round(W / m) m
    with m = mean|W|; W = c s / f, f the fraction of nonzero codes, has m = s and W / m = c / f, which
    rounds (and clamps) to c because 1 / f >= 1: q(W) = c s, up to float rounding of m."""
    q = hf_cfg.get("quantization_config") or {}
    if q.get("quant_method") != "bitnet" or q.get("quantization_mode", "offline") != "offline":
        return sd
    reciprocal = q.get("linear_class", "bitlinear") == "bitlinear"
    out = {}
    for name, t in sd.items():
        if name.endswith(".weight_scale"):
            continue
        scale = sd.get(name[:-len("weight")] + "weight_scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = t
            continue
        if name[:-len("weight")] + "bias" in sd:
            raise ValueError(f"{name}: a packed BitNet linear with a bias is not supported")
        codes = unpack_ternary(t) if t.dtype == torch.uint8 else t.float()    # (out, in)
        s = 1.0 / scale.float() if reciprocal else scale.float()
        nonzero = codes.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
        out[name] = codes * (s.reshape(()) / nonzero)
    return out


# ---------------------------------------------------------------- writing packed BitNet checkpoints
BITNET_OFFLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
_PACKED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight")   # what transformers converts


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """(4 R, in) codes in {-1, 0, 1} -> (R, in) uint8, the inverse of unpack_ternary."""
    rows = codes.shape[0] // VALUES_PER_BYTE
    c = (codes + 1).to(torch.uint8)
    out = torch.zeros((rows, *codes.shape[1:]), dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        out |= c[i * rows:(i + 1) * rows] << (2 * i)
    return out


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, s): bitlinear_1p58's weight quantisation q(W) = codes s, s = max(mean|W|, 1e-5)."""
    w = w.float()
    s = (w.abs().sum() / w.numel()).clamp_min(1e-5)
    return torch.round(w / s).clamp(-1, 1), s


def pack_bitnet_stream(layout: list, tensors, scale_dtype: torch.dtype):
    """`forge_to_hf_stream`'s (layout, tensors) with every projection weight W (out, in) of a BitNet
    model replaced by its packed codes (out / 4, in) uint8 and `<name>_scale` = s (1,): transformers'
    AutoBitLinear offline then computes y = q8(x) (codes s)^T, Forge's bitlinear_1p58 forward."""
    new = []
    for name, shape, dtype in layout:
        if not _PACKED.fullmatch(name):
            new.append((name, shape, dtype))
            continue
        if shape[0] % VALUES_PER_BYTE:
            raise ValueError(f"{name}: {shape[0]} output rows do not pack 4 to a byte (transformers unpacks only "
                             f"multiples of 4)")
        new += [(name, (shape[0] // VALUES_PER_BYTE, *shape[1:]), torch.uint8), (name + "_scale", (1,), scale_dtype)]

    def packed():
        for name, t in tensors:
            if _PACKED.fullmatch(name):
                codes, s = ternary_codes(t)
                yield name, pack_ternary(codes)
                yield name + "_scale", s.reshape(1).to(scale_dtype)
            else:
                yield name, t
    return new, packed()
