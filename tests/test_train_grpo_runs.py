"""GRPO run folders and LoRA saving: the offline tiny config runs as written, a folder records its settings and
refuses another run (a smoke run never resumes a real one), and a LoRA run saves a merged copy while the trainer
keeps its adapter."""

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from replan.train import grpo  # noqa: E402
from tests.test_train_grpo import shaping  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY, STAGE1 = ROOT / "configs/train/tiny.yaml", ROOT / "configs/train/stage1.yaml"


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert grpo.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_tiny_config_runs_as_written_and_its_folder_is_guarded(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert grpo.main(["--config", str(TINY), f"output_dir={out}"]) == 0
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()
    record = json.loads((out / "run_config.json").read_text())
    assert record["settings"]["model"]["path"] == "tiny" and "max_steps" not in record["settings"]["grpo"]
    # the real stage-1 recipe pointed at the smoke folder: refused before any model loads
    err = one_line_error(capsys, "--config", str(STAGE1), f"output_dir={out}")
    assert "other settings" in err and "model.path: 'tiny' → 'Qwen/Qwen2.5-VL-7B-Instruct'" in err
    err = one_line_error(capsys, "--config", str(TINY), f"output_dir={out}", "resume=never")
    assert "resume=never would overwrite them" in err
    # max_steps says when to stop, not what the run is: the same run may go on
    assert grpo.load_config(TINY, ["grpo.max_steps=3"]).grpo["max_steps"] == 3
    assert grpo.run_settings(grpo.load_config(TINY, ["grpo.max_steps=3"])) == grpo.run_settings(
        grpo.load_config(TINY))


def test_lora_final_save_merges_a_copy_and_keeps_the_adapter(tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "lora"
    cfg = grpo.load_config(TINY, [f"output_dir={out}", "grpo.max_steps=1", "grpo.learning_rate=1e-2",
                                  "lora.enabled=true", "lora.r=2", "lora.alpha=4", "lora.dropout=0.0",
                                  "lora.target_modules=[q_proj,v_proj]", "grpo.save_strategy='no'"])
    trainer = grpo.train(cfg, extra_rewards=[shaping])
    lora = {n: m for n, m in trainer.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert lora, "the trainer's model lost its adapter"
    assert (out / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    merged = dict(AutoModelForImageTextToText.from_pretrained(out / "merged").named_parameters())
    moved = 0
    for name, m in lora.items():   # W + (alpha / r) · B A, by hand, for every adapted layer
        delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        want = (m.base_layer.weight + delta).detach()
        got = merged[name.removeprefix("base_model.model.") + ".weight"]
        assert torch.allclose(got, want, atol=1e-6), name
        moved += int(delta.abs().max() > 0)
    assert moved, "the adapter never trained: the test would not see a merge that dropped it"
    trainer.save_model(str(tmp_path / "again"))   # the trainer still saves an adapter, not a merged model
    assert (tmp_path / "again" / "adapter_config.json").is_file()
