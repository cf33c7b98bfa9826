"""scripts/ablation_pretrained.sh (the pretrained-base ablation in one command): its control flow,
with `llava-moslora` replaced by a recorder on PATH; the real run is docs/ablation.md's."""

from __future__ import annotations

from mmengine.config import Config

from llava_moslora.ablate.variants import VARIANTS
from tests.factories import CONFIGS, REPO
from tests.launchers import recorded_calls, run_script

SCRIPT = REPO / "scripts" / "ablation_pretrained.sh"


def _flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_a_folder_the_script_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_script(SCRIPT, tmp_path, out)
    assert result.returncode == 2
    assert f"{out} exists and was not written by this script" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert recorded_calls(tmp_path) == []


def test_the_base_then_both_ranks_with_the_issue_s_variants_seeds_and_grid_then_pooled(tmp_path):
    out = tmp_path / "out"
    result = run_script(SCRIPT, tmp_path, out)
    assert result.returncode == 0, result.stderr
    made = recorded_calls(tmp_path)
    assert made[0] == ["machine"]  # the CPU and the pins, beside the numbers (OUT/machine.md)
    assert (out / "machine.md").is_file()
    made = made[1:]
    assert made[0] == ["make-tiny", f"{out}/base", "--pretrain"]
    assert made[-1] == ["ablate-report", str(out)]  # both ranks pooled, after both finished
    ablations = {_flag(call, "--work-dir"): call for call in made[1:-1]}
    assert set(ablations) == {f"{out}/r8", f"{out}/r64"} and len(made) == 4
    # Pinned like the main job, so a rerun's numbers do not depend on the CPU (pin_numerics.sh).
    isa = (tmp_path / "calls.isa").read_text().splitlines()
    assert isa == ["avx2 AVX2 AVX2,STRICT"] * (len(made) + 1)
    config = Config.fromfile(str(CONFIGS / "tiny_ablation_pretrained.py"))
    for call in ablations.values():
        assert call[0] == "ablate" and _flag(call, "--config").endswith(
            "tiny_ablation_pretrained.py"
        )
        assert set(_flag(call, "--variants").split(",")) == set(VARIANTS) - {"dora"}
        seeds = int(_flag(call, "--seeds"))
        grid_seeds = [int(s) for s in _flag(call, "--grid-seeds").split(",")]
        assert seeds >= 5 and len(grid_seeds) == 2
        assert not set(grid_seeds) & set(range(seeds))  # the test seeds are 0..seeds-1
        assert int(_flag(call, "--grid-widen")) >= 1  # an edge choice widens the grid
        rates = [float(r) for r in _flag(call, "--lr-grid").split(",")]
        assert len(rates) >= 3 and config.lr in rates  # the shared rate is on the grid too
    # rank 64 chose the grid's lowest rate on 2e-3..8e-3, so its grid reaches below the shared one
    assert min(float(r) for r in _flag(ablations[f"{out}/r64"], "--lr-grid").split(",")) < config.lr
    assert "--cfg-options" not in ablations[f"{out}/r8"]  # the config's own rank 8
    assert config.llm_rank == 8
    options = ablations[f"{out}/r64"][ablations[f"{out}/r64"].index("--cfg-options") + 1 :]
    # rank 64 at the paper's scales (Table 8: LLM alpha 128, ViT alpha 16)
    assert sorted(options) == sorted(
        [
            "model.llm_lora.r=64",
            "model.llm_lora.lora_alpha=128",
            "model.visual_encoder_lora.r=64",
            "model.visual_encoder_lora.lora_alpha=16",
        ]
    )
    assert run_script(SCRIPT, tmp_path, out).returncode == 0  # its own folder: resumed


def test_a_failed_rank_fails_the_command_and_shows_its_log(tmp_path):
    out = tmp_path / "out"
    result = run_script(SCRIPT, tmp_path, out, FAIL_ABLATE="r64")
    assert result.returncode == 1
    assert "error: the rank-r64 ablation failed; the end of" in result.stderr
    assert "Traceback: boom in r64" in result.stderr
    made = [call[0] for call in recorded_calls(tmp_path)]
    assert made == ["machine", "make-tiny", "ablate", "ablate"]  # rank 8 ran on; nothing pooled
