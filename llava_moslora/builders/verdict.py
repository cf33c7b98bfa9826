"""`make-tiny DIR --verdict-steps N`: the tiny LLM learns, before any adapter, to say whether the
word it has just said is the one the question asks about.

A real LLM brings that comparison from its language pretraining; the random tiny LLM does not, and
it does not learn it inside an adapter run either: its yes/no verdict stays at the prior (MME's
floor), even with every weight trained on yes/no rounds alone (docs/evaluation.md has the
measurements). Learned on its own, the picture in context and the loss on the verdict only, it
takes 500-1,000 steps of batch 16 (verdict loss 0.18 after 500); with fewer, the adapter runs
wear it away (at 450 steps MoSLoRA's verdict went back to "Yes" in the main job).
So this is the tiny model's stand-in for language pretraining:

    "Are the shapes red in the image? ..." -> "blue No"    (synthetic's `yes_no_read` answer)

The word before the verdict is the picture's true value (colour, count or shape), given, not
predicted (no loss on it); only the LLM's weights train (the vision tower and the projector are
make-tiny's, frozen), with the picture in context, as it will be when the adapters run. What the
adapters must still learn is the reading of the picture, the word the verdict compares; the
comparison itself is the base's. Position questions (no single word of the picture answers them)
are not part of it.

    DIR/data/verdict.json, verdict_images/   the pretraining conversations (training images'
                                             stream of their own; not the benchmark's)
    DIR/llm/                                 the LLM's weights, replaced by the trained ones
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import synthetic

KINDS = tuple(kind for kind in synthetic.YES_NO_QUESTIONS if kind != "position")
ROUNDS = 3  # yes/no rounds per picture
SAMPLES = 1000  # pictures; each is seen 16 times in 1,000 steps (what is learned is the verdict)
BATCH_SIZE = 16
LR = 1e-3


def conversation(scene: synthetic.Scene, rng: random.Random) -> list[dict[str, str]]:
    """ROUNDS yes/no rounds about `scene`, each answered "<the picture's word> <verdict>"."""
    return synthetic.as_turns(
        [synthetic.yes_no_turn(scene, rng, read=True, kinds=KINDS) for _ in range(ROUNDS)]
    )


def verdict_token_ids(tokenizer) -> frozenset[int]:
    """The ids the verdict ends with after a word ("blue No"): the tokens the loss is on."""
    ids = set()
    for verdict in synthetic.YES_NO_ANSWERS:
        last = tokenizer.encode(f"blue {verdict}", add_special_tokens=False)[-1]
        if tokenizer.decode([last]).strip() != verdict:
            raise ValueError(
                f"the tokenizer does not end {verdict!r} with one token of its own: rebuild the "
                "tiny model with make-tiny"
            )
        ids.add(last)
    return frozenset(ids)


def check_steps(steps: int) -> None:
    """Raise ValueError unless `steps` is a positive integer (checked before make-tiny writes)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"`--verdict-steps` should be a positive integer but the value passed is {steps!r}. "
            "Use e.g. --verdict-steps 1000, or leave it out for a random LLM."
        )


def teach_verdict(
    paths: dict[str, Path],
    *,
    steps: int,
    seed: int = 0,
    samples: int = SAMPLES,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the LLM of make-tiny's `paths` on the verdict for `steps` steps and save it in place.

    Returns {"steps", "loss_first", "loss_last"} (the verdict's cross-entropy; ln 2 = 0.69 is a
    guess).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
    )
    from xtuner.model import LLaVAModel

    from .pretrain import Conversations, train_steps

    check_steps(steps)
    data = paths["data"].parent
    json_path = synthetic.write_conversations(
        data / "verdict.json",
        data / "verdict_images",
        samples,
        random.Random(f"{seed}-verdict"),
        conversation,
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    llm = AutoModelForCausalLM.from_pretrained(paths["llm"])
    clip = CLIPVisionModel.from_pretrained(paths["clip"])
    processor = CLIPImageProcessor.from_pretrained(paths["clip"])
    torch.manual_seed(seed)
    model = LLaVAModel(
        llm,
        clip,
        freeze_visual_encoder=True,
        pretrained_pth=str(paths["projector"]),  # visual_select_layer: -2, the configs' too
        use_activation_checkpointing=False,
    )
    model.projector.requires_grad_(False)
    dataset = Conversations(json_path, tokenizer, processor, learn=verdict_token_ids(tokenizer))
    losses = train_steps(
        model,
        dataset,
        steps=steps,
        batch_size=BATCH_SIZE,
        lr=LR,
        vision_lr_mult=1.0,  # nothing outside the LLM trains
        seed=seed,
        log=log,
        name="verdict",
    )
    llm.save_pretrained(paths["llm"])
    return {
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": sum(losses[-20:]) / len(losses[-20:]),
    }
