"""A 50-step training slice of each of the main job's two runs, whose SHA-256 says whether two
machines (or two instruction-set settings of one) compute the same bits: tests/test_numerics.py
compares them, scripts/bench_numerics.py times them pinned and unpinned.

    python scripts/numerics_slice.py [--steps 50] [--time]    # prints the hash [CPU seconds]

Both towers' MoSLoRA adapters and the projector of a tiny LLaVA, then LoRA's, are trained with
AdamW at a rate high enough that last bits grow, then each trained model's bfloat16 logits are
added to the hash:
every kernel family the main job runs (the ViT's patch convolution, attention, layer and RMS
norms, GELU/SiLU, cross entropy, AdamW; bfloat16 inference, which takes AVX512-BF16 or AMX kernels
where a CPU has them).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from llava_moslora.builders.tiny import CLIP_TARGETS, LLAMA_TARGETS, tiny_clip_vision, tiny_llama
from llava_moslora.moslora import moslora_config

BATCH, TOKENS = 8, 12  # per step: 8 pictures of (28 // 14) ** 2 = 4 patches, 12 text tokens


def train_slice(steps: int, digest: hashlib._Hash, adapter: Callable[..., LoraConfig]) -> None:
    """Train one slice with `adapter` configs on both towers; add its tensors to `digest`."""
    llm = get_peft_model(
        tiny_llama(0, hidden_size=64),
        adapter(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS)),
    )
    vit = get_peft_model(
        tiny_clip_vision(0), adapter(r=8, lora_alpha=2, target_modules=list(CLIP_TARGETS))
    )
    projector = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)
    )
    params = [p for m in (llm, vit, projector) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pixels = torch.randn(BATCH, 3, 28, 28, generator=generator)
        ids = torch.randint(0, 128, (BATCH, TOKENS), generator=generator)
        image = projector(vit(pixel_values=pixels).last_hidden_state[:, 1:])  # (8, 4, 64)
        embeds = torch.cat([image, llm.get_input_embeddings()(ids)], dim=1)  # (8, 16, 64)
        labels = torch.cat([torch.full((BATCH, 4), -100), ids], dim=1)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for tensor in params:
        digest.update(tensor.detach().numpy().tobytes())
    with torch.no_grad():
        vit, projector, llm = vit.bfloat16(), projector.bfloat16(), llm.bfloat16()
        image = projector(vit(pixel_values=pixels.bfloat16()).last_hidden_state[:, 1:])
        embeds = torch.cat([image, llm.get_input_embeddings()(ids)], dim=1)
        digest.update(llm(inputs_embeds=embeds).logits.float().numpy().tobytes())


def slice_digest(steps: int) -> str:
    """SHA-256 over both runs of the main job: MoSLoRA, then the LoRA baseline."""
    digest = hashlib.sha256()
    for adapter in (moslora_config, LoraConfig):
        train_slice(steps, digest, adapter)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="AdamW steps of each run (50)")
    parser.add_argument(
        "--time", action="store_true", help="also print the slice's CPU seconds (imports excluded)"
    )
    args = parser.parse_args()
    start = time.process_time()
    digest = slice_digest(args.steps)
    print(f"{digest} {time.process_time() - start:.3f}" if args.time else digest)


if __name__ == "__main__":
    main()
