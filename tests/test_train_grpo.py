"""GRPO on one machine (replan.train.grpo, TRL): tiny Qwen2.5-VL on CPU, stage 1 with a crash and resume, stage 2
against local stand-in edit and judge servers, and the one-line configuration errors."""

import json
import socket
import zlib
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from replan.testing.standins import GOOD_PLAN, JUDGE_MODEL, StandIns  # noqa: E402
from replan.train import grpo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = ROOT / "configs/train/stage1.yaml", ROOT / "configs/train/stage2.yaml"
# a CPU-sized run of the official configs: 2 prompts x 4 generations per step, 24 new tokens
SMALL = ["data.dataset=tiny", "data.split=test", "grpo.max_steps=2", "prompts_per_step=2", "grpo.num_generations=4",
         "grpo.per_device_train_batch_size=8", "grpo.max_completion_length=24", "report_to=none",
         "grpo.save_steps=1", "grpo.learning_rate=1e-3", "grpo.gradient_checkpointing=false"]


def params(model) -> dict:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def shaping(prompts, completions, **kwargs):
    """Test-only dense reward: random weights get the same stage-1 score (-6) on every completion, so without this
    every group has zero advantage and nothing trains (grpo-feasibility.md §2.4-4)."""
    texts = [grpo._text(c) for c in completions]
    return [sum(ch.isalnum() for ch in t) / max(1, len(t)) for t in texts]


class Record(TrainerCallback):
    """Snapshots the weights the (resumed) run starts from, and counts its steps."""

    def __init__(self):
        self.start, self.steps = None, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = params(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class CrashAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise RuntimeError("simulated crash after checkpoint-1")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 on the tiny planner: crashes after checkpoint-1, then ``resume: auto`` finishes it."""
    out = tmp_path_factory.mktemp("stage1")
    overrides = ["model.path=tiny", f"output_dir={out}", *SMALL]
    cfg = grpo.load_config(STAGE1, overrides)
    base = grpo.resolve_model_path("tiny")
    with pytest.raises(RuntimeError, match="simulated crash"):
        grpo.train(cfg, callbacks=[CrashAfterFirstSave()], extra_rewards=[shaping])
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "checkpoint-2").exists()
    record = Record()
    trainer = grpo.train(grpo.load_config(STAGE1, overrides), callbacks=[record], extra_rewards=[shaping])  # resume
    return {"out": out, "base": base, "trainer": trainer, "record": record}


def test_stage1_trains_logs_and_resumes(stage1):
    from transformers import AutoModelForImageTextToText

    trainer, out, record = stage1["trainer"], stage1["out"], stage1["record"]
    assert trainer.state.global_step == 2 and record.steps == 1  # the resumed run did step 2 only
    resumed_from = params(AutoModelForImageTextToText.from_pretrained(out / "checkpoint-1"))
    assert all(torch.equal(record.start[k], resumed_from[k]) for k in resumed_from)  # weights of checkpoint-1
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]  # step 1's log comes back with the checkpoint's trainer state
    logged = steps[1]
    for key in ("reward", "rewards/replan_format/mean", "rewards/shaping/mean", "stage1/format", "stage1/quality",
                "stage1/region", "kl"):
        assert key in logged, key
    assert logged["kl"] > 0  # stage 1 keeps a reference model (beta 0.01); step 2 runs on updated weights
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    before = params(AutoModelForImageTextToText.from_pretrained(stage1["base"]))
    after = params(AutoModelForImageTextToText.from_pretrained(out))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    assert (out / grpo.CONFIG_FILE).is_file()


def test_stage1_checkpoints_are_planner_models(stage1):
    """Every checkpoint and the final directory load as a planner (HF format) and plan an edit."""
    from replan.planner import load_planner
    from replan.testing.ivedit import tiny_ivedit_rows

    image = tiny_ivedit_rows(1, 0)[0]["image"]
    for path in (stage1["out"], stage1["out"] / "checkpoint-1"):
        planner = load_planner("local", str(path), max_new_tokens=8)
        plan = planner.plan(image, "make the red square blue")
        assert plan is not None and planner.last_reply is not None


def test_stage2_against_stand_in_servers(stage1, tmp_path):
    """Stage 2 from the stage-1 model: waits through 503s, retries an injected 500 and a timeout, logs rewards."""
    out = tmp_path / "stage2"
    with StandIns(health_503=3, edit_faults={1: "500", 2: "hang"}, hang_seconds=2.0) as servers:
        overrides = [f"model.path={stage1['out']}", f"output_dir={out}", *SMALL, "grpo.save_steps=2",
                     f"reward.edit_url={servers.edit_url}", f"reward.judge_url={servers.judge_url}",
                     f"reward.judge_model={JUDGE_MODEL}", "reward.edit_timeout=1", "reward.backoff=0",
                     "reward.ready_interval=0.05", "reward.ready_timeout=30"]
        cfg = grpo.load_config(STAGE2, overrides)
        assert cfg.grpo["beta"] == 0.0 and cfg.grpo["epsilon_high"] == 0.28

        # random weights never write a plan that passes the execution gate: half of the decoded completions are
        # replaced by a valid plan, so the edit server and the judge are really called (the reward path is real)
        real_text = grpo._text
        grpo._text = lambda c: GOOD_PLAN if zlib.crc32(real_text(c).encode()) % 2 == 0 else real_text(c)
        try:
            trainer = grpo.train(cfg)
        finally:
            grpo._text = real_text
        assert servers.edit.calls["health"] == 4  # 3 x 503 loading, then ready
        executions = servers.edit.calls.get("execute", 0)
        judged = servers.judge.calls.get("chat", 0)
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    executed = sum(h["stage2/executed"] for h in steps) * 8  # mean over the 8 completions of each step
    assert executed >= 1
    assert executions == round(executed) + 2  # the injected 500 and the timeout were both retried
    assert judged == 3 * round(executed)
    assert all(h["stage2/edit_failed"] == 0 and h["stage2/judge_failed"] == 0 for h in steps)
    assert all("rewards/replan_planning/mean" in h for h in steps)
    assert any(h["stage2/planning"] > 0 and h["stage2/target_score"] > 0 for h in steps)  # judged 5/5/5
    assert (out / "checkpoint-2" / "config.json").is_file() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- errors
def run_main(capsys, *argv) -> str:
    assert grpo.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_missing_column_is_one_line_error(capsys, tmp_path):
    err = run_main(capsys, "--config", str(STAGE1), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                   "data.image_column=picture", f"output_dir={tmp_path}")
    assert "image_column='picture'" in err


def test_unknown_keys(capsys, tmp_path):
    assert "unknown key(s) stepz" in run_main(capsys, "--config", str(STAGE1), "stepz=3")
    assert "unknown trl.GRPOConfig field(s) num_gen" in run_main(capsys, "--config", str(STAGE1), "grpo.num_gen=3")
    assert "set from the top-level config" in run_main(capsys, "--config", str(STAGE1), "grpo.output_dir=x")
    assert "report_to" in run_main(capsys, "--config", str(STAGE1), "report_to=mlflow")


@pytest.mark.parametrize("layout, message", [
    ({}, "not a Hugging Face model directory"),
    ({"fsdp_config.json": "{}", "model_world_size_2_rank_0.pt": ""}, "sharded verl checkpoint"),
    ({"adapter_config.json": "{}"}, "LoRA adapter"),
])
def test_checkpoint_dir_that_is_not_a_model(capsys, tmp_path, layout, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, text in layout.items():
        (ckpt / name).write_text(text)
    err = run_main(capsys, "--config", str(STAGE2), f"model.path={ckpt}", f"output_dir={tmp_path / 'out'}")
    assert message in err and not (tmp_path / "out").exists()


def test_resume_from_a_dir_that_is_not_a_checkpoint(capsys, tmp_path):
    err = run_main(capsys, "--config", str(STAGE1), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                   "report_to=none", f"resume={tmp_path}", f"output_dir={tmp_path / 'out'}")
    assert "not a trainer checkpoint" in err


def test_batch_arithmetic_is_checked(capsys, tmp_path):
    err = run_main(capsys, "--config", str(STAGE1), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                   "prompts_per_step=3", "grpo.num_generations=4", "grpo.per_device_train_batch_size=8",
                   f"output_dir={tmp_path}")
    assert "must be divisible" in err


def test_stage2_unreachable_servers_fail_before_training(capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    err = run_main(capsys, "--config", str(STAGE2), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                   f"reward.edit_url=http://127.0.0.1:{port}", f"reward.judge_url=http://127.0.0.1:{port}/v1",
                   "reward.ready_timeout=0.5", "reward.ready_interval=0.1", "report_to=none", f"output_dir={out}")
    assert "not ready" in err and str(port) in err and not out.exists()


def test_stage2_judge_serving_another_model(capsys, tmp_path):
    with StandIns() as servers:
        err = run_main(capsys, "--config", str(STAGE2), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                       f"reward.edit_url={servers.edit_url}", f"reward.judge_url={servers.judge_url}",
                       "reward.judge_model=some/other-model", "reward.ready_timeout=5", "report_to=none",
                       f"output_dir={tmp_path}")
    assert "not 'some/other-model'" in err


def test_missing_logger_package(capsys, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    err = run_main(capsys, "--config", str(STAGE1), "model.path=tiny", "data.dataset=tiny", "data.split=test",
                   "report_to=wandb", f"output_dir={tmp_path}")
    assert "pip install wandb" in err


def test_official_defaults():
    s1, s2 = grpo.load_config(STAGE1), grpo.load_config(STAGE2)
    for cfg in (s1, s2):
        g = cfg.grpo
        assert (g["num_generations"], cfg.prompts_per_step, g["learning_rate"], g["epsilon"], g["delta"]) == \
            (8, 16, 1e-6, 0.2, 3.0)
        assert (g["max_completion_length"], cfg.max_prompt_length, g["temperature"], g["top_p"]) == \
            (2048, 2048, 1.0, 0.99)
        assert (g["lr_scheduler_type"], g["weight_decay"], g["max_grad_norm"]) == ("constant", 0.01, 1.0)
    key = lambda c: (c.grpo["beta"], c.grpo["epsilon_high"], c.grpo["max_steps"], c.grpo["save_steps"])  # noqa: E731
    assert key(s1) == (0.01, 0.3, 30, 20) and key(s2) == (0.0, 0.28, 40, 5)
    assert s1.model.path == "Qwen/Qwen2.5-VL-7B-Instruct" and s1.resume == "auto"
    args = grpo.grpo_args(grpo.load_config(STAGE1, ["report_to=none"]))
    # one optimiser step sees 16 prompts x 8 completions, as official
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 128
    assert args.generation_batch_size == 128 and args.num_generations == 8
