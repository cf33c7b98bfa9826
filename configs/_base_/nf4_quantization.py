"""QLoRA's 4-bit base for `model.llm.quantization_config`: NF4 with double quantization.

`internlm2_qmoslora.py` (the paper's QMoSLoRA setting) and `tiny_qmoslora.py` use this dict;
the tiny one only switches the compute dtype to float32 for bitsandbytes' CPU kernels.
"""

import torch
from transformers import BitsAndBytesConfig

quantization_config = dict(
    type=BitsAndBytesConfig,
    load_in_4bit=True,
    load_in_8bit=False,
    llm_int8_threshold=6.0,
    llm_int8_has_fp16_weight=False,
    bnb_4bit_compute_dtype=torch.float16,
    bnb_4bit_use_double_quant=True,
    bnb_4bit_quant_type="nf4",
)
