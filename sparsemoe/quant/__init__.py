"""Weight-only quantized experts for inference: int8 per output channel and int4 group-wise.

    sparsemoe.quant.quantize(model_or_layer, "int8" | "int4", group_size=64)

stores every MoE layer's expert weights quantized (`QuantizedExperts`), read directly by the native CPU
decode kernel and dequantized for the float backends when a batch is large. Schemes and stored layouts:
`sparsemoe.quant.schemes`.
"""

from sparsemoe.quant.apply import quantization_of, quantize, quantized_layout, register_quantizer
from sparsemoe.quant.experts import QuantizedExperts, QuantizedSharedExperts, QuantizedWeight
from sparsemoe.quant.schemes import SCHEMES, QuantizationError, QuantScheme, dequantize_weight, quantize_weight

__all__ = [
    "SCHEMES",
    "QuantScheme",
    "QuantizationError",
    "QuantizedExperts",
    "QuantizedSharedExperts",
    "QuantizedWeight",
    "dequantize_weight",
    "quantization_of",
    "quantize",
    "quantized_layout",
    "quantize_weight",
    "register_quantizer",
]
