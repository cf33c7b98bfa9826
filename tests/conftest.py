"""What the tests share: tiny models built from config objects (nothing is downloaded), the tiny
LLaVA on disk (`make-tiny`, once per setting per session), the models and inputs the export tests
start from, one way to launch a training run, and one interpreter that has never imported
llava_moslora for the checks that stock libraries read our files right.

Session-scoped folders are shared by every test that asks for them: read them, never write into
them (copy first, as test_launch.py does).

Nothing here imports XTuner, VLMEvalKit or bitsandbytes at module level: scripts/compat.sh runs the
adapter tests in environments without XTuner.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_moslora.builders.tiny import CLIP_TARGETS, tiny_clip_vision, tiny_llama
from llava_moslora.builders.tiny import LLAMA_TARGETS as _LLAMA

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_MOSLORA = str(CONFIGS / "tiny_moslora.py")
TINY_LORA = str(CONFIGS / "tiny_lora.py")

LLAMA_TARGETS = list(_LLAMA)
# CLIP's adapted linears inside one encoder layer, as PEFT names them, in the order CLIPAttention
# and CLIPMLP define them (and named_parameters lists them).
CLIP_LAYER_LINEARS = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.q_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)

# --- tiny models in memory ---------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


# A stand-in for the `llava-moslora` command, for the scripts' control flow: it records each call
# in $CALLS; `train` writes the checkpoint pointer a script reads and fails for the configs named
# in $FAIL_TRAIN; `make-tiny` fails if $FAIL_MAKE_TINY is set; `ablate` fails for the work dirs
# named in $FAIL_ABLATE; `report` prints a table line; every other subcommand succeeds.
RECORDER = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1" = make-tiny ] && [ -n "${FAIL_MAKE_TINY:-}" ]; then echo "Traceback: boom in make-tiny"; exit 1; fi
if [ "$1" = train ]; then
    for name in $FAIL_TRAIN; do
        case "$2" in *"$name"*) echo "Traceback: boom in $2"; exit 1;; esac
    done
    shift 2
    while [ $# -gt 0 ]; do
        if [ "$1" = --work-dir ]; then mkdir -p "$2"; echo "$2/iter_1200.pth" > "$2/last_checkpoint"; fi
        shift
    done
fi
if [ "$1" = ablate ]; then
    for name in $FAIL_ABLATE; do
        case "$*" in *"--work-dir "*"/$name"*) echo "Traceback: boom in $name"; exit 1;; esac
    done
fi
[ "$1" = report ] && echo "| the table |"
exit 0
"""


def run_script(script: Path, tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """`bash script out` from the repository root, with RECORDER as `llava-moslora`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "llava-moslora"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, CALLS=str(tmp_path / "calls"), **env)
    return subprocess.run(
        ["bash", str(script), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    """The recorder's calls under `run_script`, each split into words."""
    path = tmp_path / "calls"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def make_mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_size: int = 32):
    return tiny_llama(seed, dtype=dtype, hidden_size=hidden_size)


# Layer widths 64 and 128: bitsandbytes' AVX512 CPU kernel mis-dequantizes rows that are a multiple
# of 16 but not of its 64-wide blocks (llava_moslora.moslora.layers_bnb), so 4-bit tests use these.
HIDDEN_4BIT = 64


def make_tiny_clip_vision(seed: int = 0):
    return tiny_clip_vision(seed)


def build_llava(seed: int = 0):
    """XTuner's LLaVAModel on the in-memory tiny towers (2-layer LLaMA, 2-layer CLIP), MoSLoRA on
    both: r=8 on every LLM linear, r=4 on the ViT's."""
    from xtuner.model import LLaVAModel

    from llava_moslora.moslora import moslora_config

    torch.manual_seed(seed)
    return LLaVAModel(
        llm=make_tiny_llama(seed),
        visual_encoder=make_tiny_clip_vision(seed),
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            type=moslora_config,
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        visual_encoder_lora=dict(
            type=moslora_config, r=4, lora_alpha=2, target_modules=list(CLIP_TARGETS), bias="none"
        ),
    )


def nf4_config(compute_dtype: torch.dtype = torch.float32, **extra):
    """4-bit NF4 with double quantization, the QLoRA recipe (configs/internlm2_qmoslora.py)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **extra,
    )


def load_4bit(path: Path, **extra):
    """The LLaMA saved at `path`, its linears quantized to NF4 on load (float32 compute).

    4-bit loading on CPU wants float32 around the quantized layers (bitsandbytes' CPU kernels).
    """
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        path, quantization_config=nf4_config(**extra), torch_dtype=torch.float32
    )


def qmoslora(path: Path, **kwargs):
    """QMoSLoRA (r=8 on every linear) on the 4-bit LLaMA saved at `path`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from llava_moslora.moslora import moslora_config

    model = prepare_model_for_kbit_training(load_4bit(path), use_gradient_checkpointing=False)
    config = moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, **kwargs)
    return get_peft_model(model, config)


@pytest.fixture(scope="session")
def llama_4bit_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA at the 4-bit tests' width (HIDDEN_4BIT), saved once; load it with
    `load_4bit` or `qmoslora`."""
    path = tmp_path_factory.mktemp("tiny_llama_4bit")
    make_tiny_llama(0, hidden_size=HIDDEN_4BIT).save_pretrained(path)
    return path


def trained_moslora(seed: int = 0):
    """(base, MoSLoRA on a copy): the tiny LLaMA with r=8 MoSLoRA on every linear, B random and
    the mixer orthogonal, so the adapter changes the output as a trained one would."""
    import copy

    from peft import get_peft_model

    from llava_moslora.moslora import moslora_config

    base = make_tiny_llama(seed)
    config = moslora_config(
        r=8,
        lora_alpha=16,
        target_modules=LLAMA_TARGETS,
        init_lora_weights=False,
        mixer_init="orthogonal",
    )
    return base, get_peft_model(copy.deepcopy(base), config)


def copy_lora_weights(src, dst, adapter: str = "default") -> None:
    """Copy lora_A / lora_B of every adapted layer from `src` to the same layers of `dst`."""
    src_layers = dict(src.named_modules())
    with torch.no_grad():
        for name, module in dst.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                other = src_layers[name]
                module.lora_A[adapter].weight.copy_(other.lora_A[adapter].weight)
                module.lora_B[adapter].weight.copy_(other.lora_B[adapter].weight)


def moslora_layers(model, adapter: str = "default"):
    return [m for m in model.modules() if hasattr(m, "lora_mixer") and adapter in m.lora_mixer]


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """`import vlmeval.vlm` switches autograd off process-wide (see llava_moslora.eval's
    import_vlmeval); tests that import VLMEvalKit directly must not leak that into later tests."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def vlmevalkit_mcq_prompts(tsv, tmp_path, monkeypatch) -> list[str]:
    """Build `tsv` with VLMEvalKit itself (its name unknown, so read as a custom MCQ set, from a
    copy in a fresh $LMUData) and return the text of every row's prompt."""
    from llava_moslora.eval import import_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    shutil.copy(tsv, root / "my_mcq_set.tsv")
    monkeypatch.setenv("LMUData", str(root))
    dataset = import_vlmeval("vlmeval.dataset").build_dataset("my_mcq_set")
    assert type(dataset).__name__ == "CustomMCQDataset"
    prompts = []
    for _, row in dataset.data.iterrows():
        message = dataset.build_prompt(row)
        assert [part["type"] for part in message] == ["image", "text"]
        prompts.append(message[1]["value"])
    return prompts


# --- the tiny LLaVA on disk (`llava-moslora make-tiny`) ---------------------------------------


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_llava(samples=160, **make_tiny_options)`: the folder `make-tiny` writes, built once
    per setting in a session. The models are the same whatever the samples (seeded); the first
    N samples are the same for any count above N."""
    from llava_moslora.builders.make_tiny import make_tiny

    built: dict[tuple, Path] = {}

    def folder(samples: int = 160, **options) -> Path:
        key = (samples, *sorted(options.items()))
        if key not in built:
            built[key] = tmp_path_factory.mktemp(f"tiny{samples}")
            make_tiny(built[key], samples=samples, **options)
        return built[key]

    return folder


@pytest.fixture(scope="session")
def tiny_dir(tiny_llava) -> Path:
    """The tiny LLaVA most tests read: 160 samples, 40 iterations an epoch at the tiny configs'
    batch 4. Fewer would round their warm-up (3 % of 2 epochs) to zero iterations, which
    mmengine refuses ("end should be larger than begin")."""
    return tiny_llava(samples=160)


@contextmanager
def tiny_dir_in_env(tiny_dir: Path) -> Iterator[Path]:
    """configs/tiny_*.py read $LLAVA_MOSLORA_TINY_DIR when they are parsed."""
    old = os.environ.get("LLAVA_MOSLORA_TINY_DIR")
    os.environ["LLAVA_MOSLORA_TINY_DIR"] = str(tiny_dir)
    try:
        yield tiny_dir
    finally:
        if old is None:
            os.environ.pop("LLAVA_MOSLORA_TINY_DIR", None)
        else:
            os.environ["LLAVA_MOSLORA_TINY_DIR"] = old


@pytest.fixture(scope="module")
def tiny_env(tiny_dir) -> Iterator[Path]:
    """`tiny_dir`, set as $LLAVA_MOSLORA_TINY_DIR for the rest of the module."""
    with tiny_dir_in_env(tiny_dir):
        yield tiny_dir


def read_config(name: str, options: dict | None = None):
    """configs/NAME.py as mmengine parses it, `options` (`--cfg-options`) merged in. The tiny
    configs read $LLAVA_MOSLORA_TINY_DIR (`tiny_env`) as they are parsed."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    cfg.merge_from_dict(options or {})
    return cfg


def build_from_config(name: str, options: dict | None = None, seed: int = 0):
    """(cfg, model): `read_config(name, options)` and its LLaVAModel, built from `cfg.model` as
    `xtuner train` builds it after `torch.manual_seed(seed)`, in train mode."""
    from xtuner.registry import BUILDER

    cfg = read_config(name, options)
    torch.manual_seed(seed)
    return cfg, BUILDER.build(cfg.model).train()


@pytest.fixture(scope="session")
def tiny_samples(tiny_dir) -> list[dict]:
    """The first two training samples of configs/tiny_moslora.py's dataset on `tiny_dir` (the
    tiny configs share it), as its dataloader yields them; built once, since building the dataset
    starts worker processes (seconds)."""
    from xtuner.registry import BUILDER

    with tiny_dir_in_env(tiny_dir):
        dataset = BUILDER.build(read_config("tiny_moslora").train_dataloader.dataset)
        return [dataset[0], dataset[1]]


# --- the trained tiny LLaVA the export tests start from --------------------------------------

IMAGE_TOKEN_INDEX = -200  # xtuner.utils.IMAGE_TOKEN_INDEX: where LLaVAModel splices the image
QUESTION = "How many shapes are there?"
# float32 throughout, same base weights: the reloaded adapters compute the same products, so
# only summation order can differ (fused vs chained B·M, merged W0 + ΔW vs W0 x + ΔW x).
FP32_ATOL = 1e-4


def randomise_trained_tensors(model, seed: int = 1) -> None:
    """What training would have moved: B (zero at init), the mixers, the projector."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_mixer" in name or name.startswith("projector."):
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.add_(noise.to(param.dtype))


def save_mmengine_checkpoint(model, path: Path, seed: int | None = 7) -> Path:
    torch.save({"state_dict": model.state_dict(), "meta": {"seed": seed}}, path)
    return path


def llava_model_logits(model, inputs) -> torch.Tensor:
    """The training model's own forward (LLaVAModel, mode="tensor"); it mutates `data`."""
    data = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"].clone()}
    with torch.no_grad():
        return model(data, mode="tensor").logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max abs diff {diff:.3g}")  # shown with `pytest -s`: the measured values quoted here
    return diff


@pytest.fixture(scope="session")
def inputs(tiny_dir):
    """One image question as XTuner lays it out: ids with one IMAGE_TOKEN_INDEX, pixel values."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor
    from xtuner.utils import PROMPT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    prompt = PROMPT_TEMPLATE.llama3_chat.INSTRUCTION.format(input="<image>\n" + QUESTION, round=1)
    before, after = prompt.split("<image>")
    # xtuner chat / EvaluateChatHook: BOS + first chunk, the image index, the rest without BOS.
    ids = tokenizer.encode(before) + [IMAGE_TOKEN_INDEX]
    ids += tokenizer.encode(after, add_special_tokens=False)
    image = Image.open(tiny_dir / "data" / "images" / "000000.png").convert("RGB")
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixel_values,
        "prompt": prompt,
        "image": image,
    }


@pytest.fixture(scope="session")
def _trained(tiny_dir, tmp_path_factory, inputs):
    with tiny_dir_in_env(tiny_dir):
        _, model = build_from_config("tiny_moslora")
    model.eval()  # no LoRA dropout
    before = llava_model_logits(model, inputs)
    randomise_trained_tensors(model)
    logits = llava_model_logits(model, inputs)
    with model.llm.disable_adapter(), model.visual_encoder.disable_adapter():
        no_adapters = llava_model_logits(model, inputs)
    # The adapters and the projector change the output: equalities below mean something.
    assert (logits - before).abs().max() > 0.5
    assert (logits - no_adapters).abs().max() > 0.5
    path = save_mmengine_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "iter_1.pth")
    return model, path, logits


@pytest.fixture(scope="module")
def trained(_trained, tiny_env):
    """(model, iter_1.pth, logits): the tiny MoSLoRA LLaVA of configs/tiny_moslora.py, its
    adapters and projector perturbed, saved as mmengine saves a checkpoint; built once a session,
    read-only. Sets $LLAVA_MOSLORA_TINY_DIR for the module, so the config parses to this model."""
    return _trained


# --- one interpreter that never imports llava_moslora ------------------------------------------

# Imports torch and PEFT (and with it transformers) first, while the tests before the first job
# run; then reads one job a line ({"script", "argv"}), runs the script as `python -c SCRIPT
# ARGV...` would, and answers one line: the traceback, or null. The replies keep the original
# stdout to themselves; whatever a job prints goes to stderr. Checked after every job: nothing
# imported llava_moslora.
_STOCK_SERVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    import torch
    from peft import PeftModel
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        job = json.loads(line)
        sys.argv = ["-c", *job["argv"]]
        error = None
        try:
            exec(compile(job["script"], "<stock job>", "exec"), {"__name__": "__main__"})
            ours = [name for name in sys.modules if name.startswith("llava_moslora")]
            assert not ours, f"the job imported our package: {ours}"
        except BaseException:
            error = traceback.format_exc()
        sys.stdout.flush()
        replies.write(json.dumps(error) + "\\n")
        replies.flush()
    """
)


class _StockInterpreter:
    """The interpreter behind `stock_python`: offline, its own $HF_HOME (where remote code is
    cached), an empty working directory, one thread (tiny models). `executable`: this
    environment's python by default, or the hf5 environment's (`stock_python_hf5`)."""

    def __init__(self, executable: str = sys.executable) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="stock_python_"))
        self.log = self.work / "stderr.log"
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HOME=str(self.work / "hf_home"),
            PYTHONPATH="",
            OMP_NUM_THREADS="1",  # tiny models: see pytest_collection_finish
        )
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen(
                [executable, "-c", _STOCK_SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=self.work,
                env=env,
                text=True,
            )

    def run(self, script: str, *args: str, timeout: float = 600) -> None:
        process = self.process
        assert process.poll() is None, self.log.read_text()[-4000:]
        process.stdin.write(json.dumps({"script": script, "argv": list(args)}) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        reply = process.stdout.readline() if ready else ""
        assert reply, f"no answer within {timeout} s: {self.log.read_text()[-4000:]}"
        error = json.loads(reply)
        assert error is None, error[-4000:]

    def close(self) -> None:
        self.process.kill()  # nothing to flush: every job wrote its results before it answered
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        shutil.rmtree(self.work, ignore_errors=True)


_stock_interpreters: list[_StockInterpreter] = []
_hf5_interpreters: list[_StockInterpreter] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once the tests that will run are known: without a slow test among them (the fast lane),
    torch runs on one thread in this process. Their models are tiny, so a thread pool buys
    nothing, and on a shared machine (CI, a 2-core box with other jobs) each op waits for pool
    threads the scheduler has parked: test_demo.py took 22 s instead of 3 s under load. (The
    stand-ins of the slow tests are 4096 wide: they keep the default.) And if a test uses
    `stock_python`, its interpreter starts now: its imports (seconds to a minute) run beside the
    tests before that one."""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("slow") for item in session.items):
        torch.set_num_threads(1)
    if any("stock_python" in getattr(item, "fixturenames", ()) for item in session.items):
        _stock_interpreters.append(_StockInterpreter())


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _stock_interpreters:
        _stock_interpreters.pop().close()
    while _hf5_interpreters:
        _hf5_interpreters.pop().close()


@pytest.fixture(scope="session")
def stock_python() -> Callable[..., None]:
    """`stock_python(script, *args)`: run `script` as `python -c script args` would, in one
    interpreter for the session that never imports llava_moslora: what a user's stock
    transformers and PEFT see. One interpreter, started as collection ends, because each start
    imports torch, transformers and PEFT again (seconds to a minute on a busy machine)."""
    if not _stock_interpreters:
        _stock_interpreters.append(_StockInterpreter())
    return _stock_interpreters[0].run


# --- an export read the way stock libraries read it ------------------------------------------

# Runs in `stock_python`, which never imports llava_moslora: stock transformers + PEFT, the folder
# layout probed the way VLMEvalKit's LLaVA_XTuner and `xtuner chat --llava` probe it (llm/ and
# visual_encoder/ if present, else the manifest's base models plus llm_adapter/ and
# visual_encoder_adapter/), the projector through AutoModel with trust_remote_code (its code is
# saved next to it; on transformers 5, where that code no longer loads, from its safetensors into
# the same Linear-GELU-Linear), and the image features spliced where the image index sits.
STOCK_READER = r"""
import json, os, sys
import torch
import transformers
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel

inputs = torch.load(sys.argv[1])
results = {}
for export_dir in sys.argv[3:]:
    manifest = json.load(open(os.path.join(export_dir, "llava_moslora_export.json")))
    entries = os.listdir(export_dir)
    llm_path = os.path.join(export_dir, "llm") if "llm" in entries else manifest["llm"]
    vit_path = (
        os.path.join(export_dir, "visual_encoder")
        if "visual_encoder" in entries else manifest["visual_encoder"]
    )
    llm = AutoModelForCausalLM.from_pretrained(llm_path, torch_dtype=torch.float32)
    vit = CLIPVisionModel.from_pretrained(vit_path, torch_dtype=torch.float32)
    if "llm_adapter" in entries:
        llm = PeftModel.from_pretrained(llm, os.path.join(export_dir, "llm_adapter"))
    if "visual_encoder_adapter" in entries:
        # transformers 5's CLIPVisionModel has no `vision_model.` level; the adapter (saved from
        # 4.57's) names its layers under it: PEFT's key_mapping renames them, or they'd be dropped.
        flat = not hasattr(vit, "vision_model")
        vit = PeftModel.from_pretrained(
            vit,
            os.path.join(export_dir, "visual_encoder_adapter"),
            key_mapping={r"^vision_model\.": ""} if flat else None,
        )
    projector_dir = os.path.join(export_dir, "projector")
    if int(transformers.__version__.split(".")[0]) < 5:
        projector = AutoModel.from_pretrained(
            projector_dir, trust_remote_code=True, torch_dtype=torch.float32
        )
    else:  # XTuner's ProjectorModel code fails on 5.x (no `all_tied_weights_keys`)
        from safetensors.torch import load_file

        weights = load_file(os.path.join(projector_dir, "model.safetensors"))
        projector = torch.nn.Sequential(
            torch.nn.Linear(*weights["model.0.weight"].shape[::-1]),
            torch.nn.GELU(),
            torch.nn.Linear(*weights["model.2.weight"].shape[::-1]),
        )
        projector.load_state_dict({k[len("model."):]: v for k, v in weights.items()})
    for m in (llm, vit, projector):
        m.eval()
    ids = inputs["input_ids"]
    with torch.no_grad():
        hidden = vit(inputs["pixel_values"], output_hidden_states=True).hidden_states
        features = projector(hidden[manifest["visual_select_layer"]][:, 1:])  # (1, 16, hidden)
        at = int((ids[0] == -200).nonzero()[0])
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(ids[:, :at]), features, embed(ids[:, at + 1:])], dim=1)
        results[export_dir] = llm(inputs_embeds=embeds).logits
assert not any(name.startswith("llava_moslora") for name in sys.modules), "imported our package"
torch.save(results, sys.argv[2])
"""


# --- the hf5 environment: transformers 5, no XTuner ------------------------------------------

HF5_ENV = REPO / ".venv-hf5"


@pytest.fixture(scope="session")
def hf5_python() -> Path:
    """The python of the hf5 environment (pyproject's `hf5` group: transformers 5.x, accelerate,
    no XTuner), built from uv.lock into .venv-hf5 beside .venv by `uv sync`, once a session (a
    few seconds when it is up to date; about a minute from uv's cache)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("the hf5 tests build .venv-hf5 with `uv`: install it (pip install uv)")
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(HF5_ENV))
    env.pop("VIRTUAL_ENV", None)  # `uv run` sets it to .venv
    command = [uv, "sync", "--frozen", "--no-group", "xtuner", "--group", "hf5", "--quiet"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return HF5_ENV / "bin" / "python"


@pytest.fixture(scope="session")
def stock_python_hf5(hf5_python) -> Callable[..., None]:
    """`stock_python` on the hf5 environment's python: stock transformers 5 and PEFT."""
    if not _hf5_interpreters:
        _hf5_interpreters.append(_StockInterpreter(str(hf5_python)))
    return _hf5_interpreters[0].run


# --- launching a training run ------------------------------------------------------------------


def train_command(
    config: str, work_dir: Path, *args: str, launcher: str = "xtuner", seed: int = 0
) -> list[str]:
    """`LAUNCHER train configs/CONFIG.py --work-dir WORK_DIR --seed SEED ARGS`.

    `launcher`: "xtuner" (XTuner's own command, which exits 0 even when training fails),
    "llava-moslora" (ours, with the run's exit code), or "tools" (XTuner's tools/train.py run
    by this interpreter: what `xtuner train` starts, without paying a second Python start-up).
    """
    if launcher == "tools":
        from importlib.util import find_spec

        command = [sys.executable, find_spec("xtuner.tools.train").origin]
    else:
        found = shutil.which(launcher, path=str(Path(sys.executable).parent))
        found = found or shutil.which(launcher)
        assert found, f"the `{launcher}` command is not installed"
        command = [found, "train"]
    config_path = str(CONFIGS / f"{config}.py")
    return [*command, config_path, "--work-dir", str(work_dir), "--seed", str(seed), *args]


def train_env(tiny_dir: Path, **extra: str) -> dict[str, str]:
    """This environment, offline, reading the tiny LLaVA at `tiny_dir`, plus `extra`."""
    bin_dir = Path(sys.executable).parent
    return dict(
        os.environ,
        LLAVA_MOSLORA_TINY_DIR=str(tiny_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # `xtuner train` re-launches `python` (or torchrun) from PATH: make it this environment's.
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )


def run_train(
    config: str,
    tiny_dir: Path,
    work_dir: Path,
    *args: str,
    launcher: str = "xtuner",
    check: bool = True,
    **env: str,
) -> subprocess.CompletedProcess:
    """Train configs/CONFIG.py on the tiny LLaVA at `tiny_dir` into `work_dir` in a subprocess
    (`train_command`; `train_env` plus `env`); return it, its output captured as text.

    `check`: assert it trained, the only way that works for `xtuner train` (which exits 0 when
    training failed): a checkpoint was written and nothing raised.
    """
    run = subprocess.run(
        train_command(config, work_dir, *args, launcher=launcher),
        cwd=REPO,
        env=train_env(tiny_dir, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        output = run.stdout + run.stderr
        assert (work_dir / "last_checkpoint").exists() and "Traceback" not in output, output[-4000:]
    return run


# What the tiny configs adapt: 2 LLM layers x q, k, v, o, gate, up, down, and layers 0-1 of the
# 3-layer CLIP x q, k, v, out_proj, fc1, fc2 (the last layer runs after the hidden state LLaVA
# reads, visual_select_layer=-2, so they leave it out).
LLM_MIXERS = 2 * 7
VIT_MIXERS = 2 * 6


def assert_both_towers_have_mixers(state: dict[str, torch.Tensor]) -> None:
    """A trained tiny checkpoint's state: a mixer in every adapted linear of both towers, and the
    projector."""
    mixers = [key for key in state if "lora_mixer" in key]
    assert len([k for k in mixers if k.startswith("llm.")]) == LLM_MIXERS, mixers
    assert len([k for k in mixers if k.startswith("visual_encoder.")]) == VIT_MIXERS, mixers
    assert any(key.startswith("projector.") for key in state)


# --- the offline evaluation: exports in every layout, the tiny suite run through VLMEvalKit -----


def _export_manifest(fmt: str, tiny_dir: Path, merged: bool):
    from llava_moslora.export.manifest import ExportManifest

    return ExportManifest(
        format=fmt,
        llm=None if merged else str(tiny_dir / "llm"),
        visual_encoder=None if merged else str(tiny_dir / "clip"),
        prompt_template="llama3_chat",
        system="",
        visual_select_layer=-2,
        pad_image_to_square=True,
        adapter_kind="moslora",
        mixer={"llm": {"init": "kaiming"}, "visual_encoder": {"init": "kaiming"}},
        quantized_base=False,
        dtype="float32",
        config="configs/tiny_moslora.py",
        checkpoint="tests/conftest.py fixture",
        seed=0,
        trust_remote_code=False,
    )


@pytest.fixture(scope="session")
def tiny_exports(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA with random MoSLoRA adapters on both towers, in all four export layouts
    (written here with PEFT/transformers/xtuner + our io helpers), plus the adapter-free base
    ("base") and a scene image ("image")."""
    import copy

    from peft import get_peft_model
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM
    from xtuner.model.modules import ProjectorConfig, ProjectorModel
    from xtuner.utils import PROMPT_TEMPLATE

    from llava_moslora.export.hf_llava import build_hf_llava
    from llava_moslora.export.manifest import write_manifest
    from llava_moslora.moslora import moslora_config, save_adapter, save_folded

    root = tmp_path_factory.mktemp("exports")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    projector = ProjectorModel(ProjectorConfig(visual_hidden_size=64, llm_hidden_size=64, depth=2))
    state = torch.load(tiny_dir / "projector" / "iter_0.pth", weights_only=True)["state_dict"]
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()})

    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapters change the outputs (equalities mean something)
    llm = get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_dir / "llm"),
        moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False),
    )
    vit = get_peft_model(
        CLIPVisionModel.from_pretrained(tiny_dir / "clip"),
        moslora_config(
            r=8, lora_alpha=16, target_modules=list(CLIP_TARGETS), init_lora_weights=False
        ),
    )
    out = {}
    for fmt, save in (("xtuner", save_adapter), ("peft-folded", save_folded)):
        out[fmt] = root / fmt
        save(llm, out[fmt] / "llm_adapter")
        save(vit, out[fmt] / "visual_encoder_adapter")
        projector.save_pretrained(out[fmt] / "projector")
        write_manifest(out[fmt], _export_manifest(fmt, tiny_dir, merged=False))

    merged_llm = copy.deepcopy(llm).merge_and_unload()
    merged_vit = copy.deepcopy(vit).merge_and_unload()
    base_llm = LlamaForCausalLM.from_pretrained(tiny_dir / "llm")
    base_vit = CLIPVisionModel.from_pretrained(tiny_dir / "clip")
    for name, (lm, vt) in {
        "merged-xtuner": (merged_llm, merged_vit),
        "base": (base_llm, base_vit),
    }.items():
        out[name] = root / name
        lm.save_pretrained(out[name] / "llm")
        tokenizer.save_pretrained(out[name] / "llm")
        vt.save_pretrained(out[name] / "visual_encoder")
        processor.save_pretrained(out[name] / "visual_encoder")
        projector.save_pretrained(out[name] / "projector")
        write_manifest(out[name], _export_manifest("merged-xtuner", tiny_dir, merged=True))

    hf_model, hf_processor = build_hf_llava(
        copy.deepcopy(merged_llm),
        copy.deepcopy(merged_vit),
        projector,
        AutoTokenizer.from_pretrained(tiny_dir / "llm"),
        processor,
        visual_select_layer=-2,
        prompt_template=PROMPT_TEMPLATE.llama3_chat,
        pad_image_to_square=True,
    )
    out["hf-llava"] = root / "hf-llava"
    hf_model.save_pretrained(out["hf-llava"])
    hf_processor.save_pretrained(out["hf-llava"])
    write_manifest(out["hf-llava"], _export_manifest("hf-llava", tiny_dir, merged=True))
    out["image"] = root / "scene.png"
    _scene_image().save(out["image"])
    return out


def _scene_image():
    import random

    from llava_moslora.data import synthetic
    from llava_moslora.data.drawing import draw

    rng = random.Random(3)
    return draw(synthetic.random_scene(rng).objects, rng)


def scene_answers(records: dict, lmu_data: Path) -> dict[tuple[str, str], str]:
    """{(image key, question): answer} of the tiny benchmark `records` written in `lmu_data`."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from llava_moslora.eval.tiny_bench import image_key

    answers = {}
    for name, recs in records.items():
        frame = pd.read_csv(lmu_data / f"{name}.tsv", sep="\t")
        images = {str(i): img for i, img in zip(frame["index"], frame["image"], strict=True)}
        for rec in recs:
            b64 = images[str(rec.index)]
            b64 = images[b64] if len(b64) <= 64 else b64
            key = image_key(Image.open(io.BytesIO(base64.b64decode(b64))))
            answers[(key, rec.question)] = rec.answer_text
    return answers


def make_oracle(records, lmu_data):
    """A VLMEvalKit model (test double) that answers every question right, from the scene drawn
    in the image."""
    import re
    import string

    from PIL import Image

    from llava_moslora.eval import import_vlmeval
    from llava_moslora.eval.benchmarks import TINY_TYPE
    from llava_moslora.eval.tiny_bench import image_key

    class Oracle(import_vlmeval("vlmeval.vlm.base").BaseModel):
        def __init__(self):
            super().__init__()
            self.table = scene_answers(records, lmu_data)

        def generate_inner(self, message, dataset=None):
            prompt, image = self.message_to_promptimg(message, dataset)
            key = image_key(Image.open(image))
            answer = next(a for (k, q), a in self.table.items() if k == key and q in prompt)
            if TINY_TYPE[dataset] == "MCQ":  # the letter whose option text is the answer
                return next(
                    letter
                    for letter in string.ascii_uppercase[:4]
                    if re.search(rf"^{letter}\. {re.escape(answer)}$", prompt, re.M)
                )
            return answer

    return Oracle()


def make_constant():
    """A VLMEvalKit model (test double) that always answers "A" / "Yes" / "red": chance-level by
    construction."""
    from llava_moslora.eval import import_vlmeval
    from llava_moslora.eval.benchmarks import TINY_TYPE

    class Constant(import_vlmeval("vlmeval.vlm.base").BaseModel):
        def generate_inner(self, message, dataset=None):
            return {"MCQ": "A", "Y/N": "Yes", "VQA": "red"}[TINY_TYPE[dataset]]

    return Constant()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_exports) -> dict:
    """The offline suite in a temporary $LMUData, run for an oracle, a constant answerer and the
    tiny LLaVA (xtuner export), offline: any download or TCP connection raises.
    {"work": runs' folder, "lmu": $LMUData, "records": the questions, "summaries": {run: ...}}."""
    from llava_moslora.eval.benchmarks import TINY
    from llava_moslora.eval.manifest import read_export_manifest
    from llava_moslora.eval.model import GenerationSettings, LLaVAMoSLoRA
    from llava_moslora.eval.runner import run_benchmarks
    from llava_moslora.eval.tiny_bench import write_tiny_bench

    lmu = tmp_path_factory.mktemp("LMUData")
    records = write_tiny_bench(lmu, per_category=1)  # 6 questions per MMBench language
    work = tmp_path_factory.mktemp("runs")
    settings = GenerationSettings(max_new_tokens=8, short_max_new_tokens=8)
    manifest = read_export_manifest(tiny_exports["xtuner"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMUData", str(lmu))
        mp.delenv("OPENAI_API_KEY", raising=False)
        models = {
            "oracle": make_oracle(records, lmu),
            "constant": make_constant(),
            "tiny_llava": LLaVAMoSLoRA(tiny_exports["xtuner"], generation=settings),
        }
        summaries = {
            name: run_benchmarks(
                list(TINY),
                work_dir=work,
                run_name=name,
                model=model,
                manifest=manifest,
                generation=settings.as_dict(),
                offline=True,
                log=lambda _: None,
            )
            for name, model in models.items()
        }
    return {"work": work, "lmu": lmu, "records": records, "summaries": summaries}
