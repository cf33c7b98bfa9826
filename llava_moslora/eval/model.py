"""`LLaVAMoSLoRA`: a VLMEvalKit model (a `vlmeval.vlm.base.BaseModel`) for our export folders.

It reads `llava_moslora_export.json` and loads any of the four layouts `llava-moslora export`
writes, then answers exactly as XTuner's LLaVA does at inference:

    image ──pad to square (image-processor mean)──► CLIP ──hidden_states[visual_select_layer][:, 1:]
          ──► projector ──► (B, 576, d_llm) image embeddings, spliced by XTuner's
              prepare_inputs_labels_for_multimodal where the prompt has IMAGE_TOKEN_INDEX
    prompt = PROMPT_TEMPLATE[template].INSTRUCTION.format(input="<image>\\n" + question)
          ──► LLM.generate(inputs_embeds=...)  greedy by default

Layouts (see the exporter):
  xtuner / peft-folded   base LLM + CLIP from the manifest's paths, adapters from llm_adapter/ and
                         visual_encoder_adapter/ through `llava_moslora.moslora.load_adapter`
                         (registers MoSLoRA layers when a mixer is present and raises if any saved
                         adapter tensor is not consumed: VLMEvalKit's own LLaVA_XTuner uses plain
                         PeftModel.from_pretrained, which would drop the mixer without a word),
                         projector/ (XTuner ProjectorModel).
  merged-xtuner          llm/, visual_encoder/, projector/.
  hf-llava               a transformers LlavaForConditionalGeneration at the root; its vision
                         tower, projector and the model itself play the three roles above, so the
                         same XTuner inference path runs on it.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError

from ..data.prompts import language_of, mcq_prompt, short_answer_prompt
from ..moslora.safety import require_finite, unreadable_safetensors
from ..runs import image_features, square_pixels
from . import import_vlmeval
from .benchmarks import BENCHMARKS, benchmark_type
from .manifest import read_export_manifest, require_export_files
from .protocol import LLAVA_PROMPT_COLUMN

BaseModel = import_vlmeval("vlmeval.vlm.base").BaseModel

ADAPTER_FORMATS = ("xtuner", "peft-folded")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, recorded with the results (greedy: the paper's numbers are greedy)."""

    max_new_tokens: int = 512  # MM-Vet and MathVista answers are free-form
    short_max_new_tokens: int = 32  # a letter, yes/no, or a word or phrase
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None

    def __post_init__(self) -> None:
        for field in ("max_new_tokens", "short_max_new_tokens", "num_beams"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field}` should be a positive integer, got {value!r}.")
        if self.do_sample and self.temperature is None:
            raise ValueError("`temperature` is needed with `do_sample=True`; give e.g. 0.2.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_short_answer(dataset: str | None) -> bool:
    """Whether the benchmark's family is asked with LLaVA-1.5's own prompt and a short answer
    (a letter, yes/no, a word); judged free answers get VLMEvalKit's prompt and a long budget."""
    entry = BENCHMARKS.get(dataset) if dataset else None
    return entry is not None and entry.family.short_answer


class LLaVAMoSLoRA(BaseModel):
    """A LLaVA-1.5 trained with (Q)MoSLoRA/LoRA, loaded from an export folder, for VLMEvalKit."""

    INSTALL_REQ = False
    INTERLEAVE = False
    READS_LLAVA_PROMPT = True  # asks a row's `llava_prompt` verbatim when the runner gives one

    def __init__(
        self,
        model_dir: str | Path,
        *,
        generation: GenerationSettings | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.model_dir = Path(model_dir)
        self.manifest = read_export_manifest(self.model_dir)
        # Code shipped with the export or its base model (a config's auto_map) runs only when the
        # user says so: the manifest's flag records the training config, it grants nothing.
        self.trust_remote_code = trust_remote_code
        require_export_files(self.model_dir, self.manifest)
        self.generation = generation or GenerationSettings()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            # CPU matmuls in bf16/fp16 are slow or unsupported: CPU runs in float32.
            dtype = getattr(torch, self.manifest.get("dtype") or "bfloat16")
            dtype = dtype if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.visual_select_layer = int(self.manifest["visual_select_layer"])
        self.pad_image_to_square = bool(self.manifest["pad_image_to_square"])
        self.system = self.manifest.get("system") or ""
        self._load()
        self._build_template()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        fmt = self.manifest["format"]
        loader = {
            "xtuner": self._load_adapters,
            "peft-folded": self._load_adapters,
            "merged-xtuner": self._load_merged_xtuner,
            "hf-llava": self._load_hf_llava,
        }[fmt]
        try:
            loader()
        except SafetensorError as error:  # transformers passes it on without the file's name
            raise unreadable_safetensors(self.model_dir, error) from None
        for module in (self.llm, self.visual_encoder, self.projector):
            module.to(self.device).eval()
            # A diverged export is refused rather than scored (it would answer garbage, exit 0).
            require_finite(dict(module.named_parameters()), self.model_dir)

    def _llm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "torch_dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
        }
        if self.manifest.get("quantized_base") and self.manifest["format"] in ADAPTER_FORMATS:
            # The adapters were trained on a 4-bit NF4 base (QMoSLoRA): evaluate on the same base.
            # (Merged formats hold the dequantized merge, see the exporter: no quantization.)
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype,
            )
        return kwargs

    def _load_towers(self, llm_path: str | Path, vit_path: str | Path, local: bool = False) -> None:
        """The towers; `local`: they are in the export folder, so never look on the hub."""
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            CLIPImageProcessor,
            CLIPVisionModel,
        )

        trust = self.trust_remote_code
        llm_path, vit_path = str(llm_path), str(vit_path)
        self.llm = AutoModelForCausalLM.from_pretrained(
            llm_path, local_files_only=local, **self._llm_kwargs()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            llm_path, trust_remote_code=trust, local_files_only=local
        )
        self.visual_encoder = CLIPVisionModel.from_pretrained(
            vit_path, torch_dtype=self.dtype, local_files_only=local
        )
        self.image_processor = CLIPImageProcessor.from_pretrained(vit_path, local_files_only=local)

    def _load_projector(self) -> None:
        from xtuner.model.modules import ProjectorModel

        self.projector = ProjectorModel.from_pretrained(
            str(self.model_dir / "projector"), torch_dtype=self.dtype, local_files_only=True
        )

    def _load_adapters(self) -> None:
        from llava_moslora.moslora import io

        self._load_towers(self.manifest["llm"], self.manifest["visual_encoder"])
        llm_adapter = self.model_dir / "llm_adapter"
        vit_adapter = self.model_dir / "visual_encoder_adapter"
        if not llm_adapter.is_dir() and not vit_adapter.is_dir():
            raise FileNotFoundError(
                f"`MODEL_DIR` {str(self.model_dir)!r} is a {self.manifest['format']!r} export but "
                "holds neither llm_adapter/ nor visual_encoder_adapter/; re-export the checkpoint."
            )
        # load_adapter raises if any saved tensor (the mixer above all) finds no place in the model.
        if llm_adapter.is_dir():
            self.llm = io.load_adapter(self.llm, llm_adapter)
        if vit_adapter.is_dir():
            self.visual_encoder = io.load_adapter(self.visual_encoder, vit_adapter)
        self._load_projector()

    def _load_merged_xtuner(self) -> None:
        self._load_towers(self.model_dir / "llm", self.model_dir / "visual_encoder", local=True)
        self._load_projector()

    def _load_hf_llava(self) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

        root = str(self.model_dir)
        llava = LlavaForConditionalGeneration.from_pretrained(
            root, local_files_only=True, **self._llm_kwargs()
        )
        self.llm = llava  # generates from inputs_embeds like any causal LM
        self.visual_encoder = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        # The XTuner path pads to square itself (prepare_inputs), then only resizes/normalises.
        self.image_processor = CLIPImageProcessor.from_pretrained(root, local_files_only=True)

    def _build_template(self) -> None:
        from transformers import StoppingCriteriaList
        from xtuner.utils import PROMPT_TEMPLATE, StopWordStoppingCriteria

        name = self.manifest.get("prompt_template")
        if name is not None and name not in PROMPT_TEMPLATE:
            raise ValueError(
                f"`prompt_template` in the manifest should be one of XTuner's PROMPT_TEMPLATE "
                f"names {sorted(PROMPT_TEMPLATE)}, got {name!r}."
            )
        self.template = PROMPT_TEMPLATE[name] if name else None
        stop_words = list(self.template.get("STOP_WORDS", [])) if self.template else []
        self.stop_criteria = StoppingCriteriaList(
            [StopWordStoppingCriteria(self.tokenizer, word) for word in stop_words]
        )
        self.stop_words = stop_words

    # ------------------------------------------------------------------ prompts
    def use_custom_prompt(self, dataset: str) -> bool:
        """LLaVA-1.5's own prompts for multiple choice and short answers; VLMEvalKit's otherwise."""
        return _is_short_answer(dataset)

    def prompt_variant(self, dataset: str) -> str:
        """The prompt this model asks `dataset` with, as recorded in the results' protocol."""
        if not _is_short_answer(dataset):
            return "VLMEvalKit's"
        if benchmark_type(dataset) == "MCQ":
            return "LLaVA-1.5 multiple choice (options, then answer with the letter)"
        return "LLaVA-1.5 short answer (a single word or phrase)"

    def build_prompt(self, line: pd.Series, dataset: str | None = None) -> list[dict[str, str]]:
        images = self.dump_image(line, dataset)
        llava_prompt = line.get(LLAVA_PROMPT_COLUMN)
        if isinstance(llava_prompt, str):  # LLaVA-1.5's own prompt for this row (TextVQA + OCR)
            return [dict(type="image", value=p) for p in images] + [
                dict(type="text", value=llava_prompt)
            ]
        question = str(line["question"])
        hint = line["hint"] if "hint" in line and not pd.isna(line["hint"]) else None
        if benchmark_type(dataset) == "MCQ":
            if hint is not None:
                question = f"{hint}\n{question}"
            options = {
                letter: str(line[letter])
                for letter in string.ascii_uppercase
                if letter in line and not pd.isna(line[letter])
            }
            lang = language_of("".join([question, *options.values()]))
            prompt = mcq_prompt(question, options, lang)
        else:
            prompt = short_answer_prompt(question)
        return [dict(type="image", value=path) for path in images] + [
            dict(type="text", value=prompt)
        ]

    # ------------------------------------------------------------------ inference
    def prepare_inputs(self, prompt: str, image_path: str | None) -> dict[str, Any]:
        """Token ids + image embeddings → XTuner's multimodal LLM inputs (inputs_embeds, mask)."""
        from PIL import Image
        from xtuner.model.utils import prepare_inputs_labels_for_multimodal
        from xtuner.utils import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

        prompt = prompt.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        pixel_values = None
        if image_path is not None:
            image = Image.open(image_path).convert("RGB")
            if self.pad_image_to_square:
                pixels = square_pixels(image, self.image_processor)
            else:
                pixels = self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"]
            # (1, 3, H, W) -> (1, patches, d_llm); cast to each part's dtype inside
            pixel_values = image_features(self, pixels.to(self.device))
            prompt = f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"

        text = prompt
        if self.template is not None:
            text = self.template["INSTRUCTION"].format(input=prompt, round=1)
            if self.system:
                text = self.template["SYSTEM"].format(system=self.system) + text
        ids: list[int] = []
        for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            # Only the first chunk gets the tokenizer's BOS, as in XTuner's chat and training.
            ids.extend(self.tokenizer.encode(chunk, add_special_tokens=i == 0))
        input_ids = torch.tensor([ids], device=self.device)
        return prepare_inputs_labels_for_multimodal(
            llm=self.llm, input_ids=input_ids, pixel_values=pixel_values
        )

    @torch.no_grad()
    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        from transformers import GenerationConfig

        prompt, image_path = self.message_to_promptimg(message, dataset=dataset)
        inputs = self.prepare_inputs(prompt, image_path)
        settings = self.generation
        max_new = (
            settings.short_max_new_tokens if _is_short_answer(dataset) else settings.max_new_tokens
        )
        pad_id = self.tokenizer.pad_token_id
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=settings.do_sample,
            num_beams=settings.num_beams,
            temperature=settings.temperature if settings.do_sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        output = self.llm.generate(
            **inputs, generation_config=config, stopping_criteria=self.stop_criteria
        )
        answer = self.tokenizer.decode(output[0], skip_special_tokens=True)
        for word in self.stop_words:
            answer = answer.split(word)[0]
        return answer.strip()
