"""QMoSLoRA on the tiny LLaVA: `tiny_moslora.py` with the LLM in 4-bit NF4, as `internlm2_qmoslora.py`.

    llava-moslora make-tiny ./tiny
    xtuner train configs/tiny_qmoslora.py                               # one CPU process
    xtuner train configs/tiny_qmoslora.py --deepspeed deepspeed_zero3   # XTuner's QLoRA + ZeRO-3 path

The quantization settings are the paper config's (NF4, double quantization); only the compute
dtype is float32, because bitsandbytes' CPU kernels and the CPU runs here are float32. Under
ZeRO-3, XTuner's LLaVAModel rewrites `torch_dtype`, `bnb_4bit_compute_dtype` and
`bnb_4bit_quant_storage` to one half dtype so that DeepSpeed can partition the packed 4-bit
weights like any other parameter (`LLaVAModel._prepare_for_qlora_zero3`); this config leaves that
to XTuner, which is what `tests/test_scale.py` checks.

`down_proj` stays unquantized (still adapted, by plain MoSLoRA): the tiny LLM's MLP is 224 wide,
and bitsandbytes' AVX512 CPU kernel dequantizes rows that are a multiple of 16 but not of its
64-wide blocks wrongly (llava_moslora.moslora.layers_bnb refuses such a layer). Every other
adapted layer reads the 64-wide hidden state and is 4-bit. Real models need no such exception.
"""

import torch
from mmengine.config import read_base

with read_base():
    from ._base_.nf4_quantization import *
    from .tiny_moslora import *

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
quantization_config.bnb_4bit_compute_dtype = torch.float32  # the paper config's float16, on a CPU
quantization_config.llm_int8_skip_modules = ["lm_head", "down_proj"]  # see the docstring
model.llm.update(torch_dtype=torch.float32, quantization_config=quantization_config)
