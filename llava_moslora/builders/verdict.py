"""`make-tiny DIR --verdict-steps N`: the tiny base's stand-in for what a real LLaVA-1.5 starts
from, in two phases after make-tiny has written its random models.

1. **The projector, aligned on captions** (LLaVA's stage 1, whose result is the "pretrained
   projector" the paper starts from): CAPTION_STEPS steps on one round per picture,

       "Describe the picture." -> "I see two red circles. The circles are in the top left and
                                   bottom right."

   the loss on the whole caption, the projector and the LLM trained (the random LLM learns the
   captions' language too), the vision tower frozen. Without it the adapters had to learn to read
   shapes at 56 x 56 through the random ViT and projector within their own run (the main job's
   schedule, configs/tiny_quickstart_moslora.py), and one of
   them, which one depending on the base, did not (docs/evaluation.md).
2. **The verdict** (what a real LLM brings from language pretraining): N steps on yes/no rounds
   answered "<the picture's words> <verdict>",

       "Are the shapes red in the image? ..." -> "blue No"     (synthetic's `yes_no_read` answer)
       "Is there a shape in the top left cell ...?" -> "top right and bottom left No"

   the words given, not predicted (no loss on them): only the verdict token is learned, the
   comparison of the question's value with the words before it. Only the LLM trains (the vision
   tower and the now aligned projector frozen), with the picture in context, as it will be when
   the adapters run. The random tiny LLM does not learn that comparison inside an adapter run,
   even with every weight trained on yes/no rounds alone: its verdict stays at MME's floor
   (docs/evaluation.md has the measurements).

What the adapters must still learn is every benchmark's answer format: the multiple-choice option,
the single word, and the picture's words before a verdict, none of which the base was taught.

    DIR/data/captions.json, captions_images/  phase 1's conversations   (each its own picture
    DIR/data/verdict.json, verdict_images/    phase 2's conversations    stream, not the benchmark's)
    DIR/llm/, DIR/projector/iter_0.pth        replaced by the trained ones (the vision tower stays)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import synthetic

ROUNDS = 3  # yes/no rounds per picture
SAMPLES = 1000  # pictures of each phase; the main job's 1,000 verdict steps of 16 show each picture 16 times
BATCH_SIZE = 16
LR = 1e-3  # both phases; the projector's too (LLaVA's stage 1 trains it at 1e-3)
CAPTION_PROMPT = "Describe the picture."
CAPTION_STEPS = 300  # the main job's build: caption loss 2.2 at step 50, 0.06 at 300


def conversation(scene: synthetic.Scene, rng: random.Random) -> list[dict[str, str]]:
    """Phase 2: ROUNDS yes/no rounds about `scene`, each answered "<the picture's words>
    <verdict>"."""
    return synthetic.as_turns([synthetic.yes_no_turn(scene, rng, read=True) for _ in range(ROUNDS)])


def caption_conversation(scene: synthetic.Scene, rng: random.Random) -> list[dict[str, str]]:
    """Phase 1's one round: the picture described, its colour, shape, count and filled cells."""
    caption = synthetic.answer(scene, "shape") + " " + synthetic.answer(scene, "where")
    return synthetic.as_turns([(CAPTION_PROMPT, caption)])


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
    caption_steps: int = CAPTION_STEPS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Align the projector of make-tiny's `paths` on captions, then train its LLM on the verdict
    for `steps` steps; save both in place (the module docstring has the two phases).

    Returns {"caption_steps", "caption_loss_first", "caption_loss_last", "steps", "loss_first",
    "loss_last"}: the captions' and the verdict's cross-entropy (for the verdict ln 2 = 0.69 is a
    guess), the last over the final 20 steps.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
    )
    from xtuner.model import LLaVAModel

    from .make_tiny import projector_keys, save_projector
    from .pretrain import Conversations, train_steps

    check_steps(steps)
    if isinstance(caption_steps, bool) or not isinstance(caption_steps, int) or caption_steps < 1:
        raise ValueError(f"`caption_steps` should be a positive integer, got {caption_steps!r}")
    data = paths["data"].parent

    def write(name: str, stream: str, talk) -> Path:
        """DIR/data/NAME.json + NAME_images/, drawn from a random stream of their own."""
        rng = random.Random(f"{seed}-{stream}")
        return synthetic.write_conversations(
            data / f"{name}.json", data / f"{name}_images", samples, rng, talk
        )

    verdicts = write("verdict", "verdict", conversation)
    captions = write("captions", "caption", caption_conversation)
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

    def train(dataset: Conversations, n: int, name: str) -> list[float]:
        return train_steps(
            model,
            dataset,
            steps=n,
            batch_size=BATCH_SIZE,
            lr=LR,
            vision_lr_mult=1.0,  # the projector at the LLM's rate, as in LLaVA's stage 1
            seed=seed,
            log=log,
            name=name,
        )

    caption_losses = train(Conversations(captions, tokenizer, processor), caption_steps, "caption")
    save_projector(projector_keys(model.projector), paths["projector"], seed)
    model.projector.requires_grad_(False)
    learn = verdict_token_ids(tokenizer)
    losses = train(Conversations(verdicts, tokenizer, processor, learn=learn), steps, "verdict")
    llm.save_pretrained(paths["llm"])
    return {
        "caption_steps": caption_steps,
        "caption_loss_first": caption_losses[0],
        "caption_loss_last": _tail_mean(caption_losses),
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": _tail_mean(losses),
    }


def _tail_mean(losses: list[float]) -> float:
    return sum(losses[-20:]) / len(losses[-20:])
