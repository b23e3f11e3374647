"""The cluster path (verl 0.9.1): the configs' official hyper-parameters, the reward adapters of
replan.train.verl_reward, and, when verl is importable, Hydra composition + validation of the configs, verl's reward
manager calling our functions, and RLHFDataset reading our parquet. verl is not installed by the project's test
environment (its transformers pin is older): those tests skip there."""

import asyncio
import importlib.util
import io
from pathlib import Path

import pytest
import yaml
from PIL import Image

from replan.testing.standins import GOOD_PLAN, JUDGE_MODEL, StandIns, sample_image
from replan.train import verl_reward
from replan.train.rewards import EDITING_KEYS, PLANNING_KEYS, stage1_rewards

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs/train"
HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed: it lives in its own cluster env (its "
                                                      "transformers pin conflicts with replan's; docs/training.md)")


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


# ---------------------------------------------------------------------------------------------------- configs
def test_verl_configs_carry_the_official_hyper_parameters():
    s1, s2 = load("verl_stage1"), load("verl_stage2")
    for cfg in (s1, s2):
        assert cfg["defaults"] == ["ppo_trainer", "_self_"]
        assert cfg["algorithm"]["adv_estimator"] == "grpo" and cfg["algorithm"]["use_kl_in_reward"] is False
        data, actor, rollout = cfg["data"], cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
        assert (data["train_batch_size"], data["max_prompt_length"], data["max_response_length"]) == (16, 2048, 2048)
        assert data["image_key"] == "images" and data["prompt_key"] == "prompt" and data["filter_overlong_prompts"]
        assert (rollout["name"], rollout["n"], rollout["temperature"], rollout["top_p"]) == ("vllm", 8, 1.0, 0.99)
        assert (rollout["val_kwargs"]["n"], rollout["val_kwargs"]["temperature"]) == (1, 0.5)
        assert (rollout["tensor_model_parallel_size"], rollout["gpu_memory_utilization"]) == (2, 0.6)
        assert (actor["optim"]["lr"], actor["optim"]["weight_decay"], actor["optim"]["lr_scheduler_type"]) == \
            (1e-6, 0.01, "constant")
        assert (actor["ppo_mini_batch_size"], actor["ppo_epochs"], actor["loss_agg_mode"]) == (16, 1, "token-mean")
        assert (actor["clip_ratio_low"], actor["clip_ratio_c"], actor["grad_clip"]) == (0.2, 3.0, 1.0)
        assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://replan.train.verl_reward"
    a1, a2 = s1["actor_rollout_ref"]["actor"], s2["actor_rollout_ref"]["actor"]
    assert (a1["use_kl_loss"], a1["kl_loss_coef"], a1["kl_loss_type"], a1["clip_ratio_high"]) == \
        (True, 0.01, "low_var_kl", 0.3)
    assert (a2["use_kl_loss"], a2["clip_ratio_high"]) == (False, 0.28)
    t1, t2 = s1["trainer"], s2["trainer"]
    assert (t1["total_training_steps"], t1["save_freq"], t1["test_freq"]) == (30, 20, 5)
    assert (t2["total_training_steps"], t2["save_freq"], t2["test_freq"]) == (40, 5, 20)
    assert s1["reward"]["custom_reward_function"]["name"] == "compute_score"
    assert s2["reward"]["custom_reward_function"]["name"] == "compute_score_stage2"
    kwargs = s2["reward"]["custom_reward_function"]["reward_kwargs"]
    verl_reward.reward_config(kwargs)  # every key is a RewardConfig field
    for cfg in (s1, s2):
        assert callable(getattr(verl_reward, cfg["reward"]["custom_reward_function"]["name"]))


def test_trl_and_verl_configs_agree():
    """The single-machine (TRL) and cluster (verl) configs encode the same recipe."""
    for stage in (1, 2):
        trl, verl = load(f"stage{stage}"), load(f"verl_stage{stage}")
        g, actor = trl["grpo"], verl["actor_rollout_ref"]["actor"]
        rollout = verl["actor_rollout_ref"]["rollout"]
        assert g["num_generations"] == rollout["n"] and trl["prompts_per_step"] == verl["data"]["train_batch_size"]
        assert g["learning_rate"] == actor["optim"]["lr"] and g["weight_decay"] == actor["optim"]["weight_decay"]
        assert (g["epsilon"], g["epsilon_high"], g["delta"]) == \
            (actor["clip_ratio_low"], actor["clip_ratio_high"], actor["clip_ratio_c"])
        assert g["beta"] == (actor["kl_loss_coef"] if actor["use_kl_loss"] else 0.0)
        assert (g["temperature"], g["top_p"]) == (rollout["temperature"], rollout["top_p"])
        assert g["max_completion_length"] == verl["data"]["max_response_length"]
        assert trl["max_prompt_length"] == verl["data"]["max_prompt_length"]
        assert g["max_steps"] == verl["trainer"]["total_training_steps"]
        assert g["save_steps"] == verl["trainer"]["save_freq"]


def test_scripts_use_verls_entry_point_and_merger():
    for stage in (1, 2):
        text = (ROOT / f"scripts/train/verl_stage{stage}.sh").read_text()
        assert "python3 -m verl.trainer.main_ppo" in text and f"--config-name verl_stage{stage}" in text
    merge = (ROOT / "scripts/train/merge.sh").read_text()
    assert "python3 -m verl.model_merger merge --backend fsdp" in merge


# ---------------------------------------------------------------------------------------------------- adapters
def test_stage1_adapter_fixed_keys():
    results = [verl_reward.compute_score("replan_edit", text, "", {"width": 96, "height": 80})
               for text in (GOOD_PLAN, "garbage", "", None)]
    keys = {"score", *EDITING_KEYS}
    for r in results:
        assert set(r) == keys and all(isinstance(v, float) for v in r.values())
    assert results[0]["score"] == pytest.approx(stage1_rewards([GOOD_PLAN])[0]["overall"])
    assert results[0]["format"] == 1.0 and results[1]["format"] == 0.0
    assert results[3]["score"] == 0.0  # not a string: scored 0, never raised


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_stage2_adapter_against_stand_ins(tmp_path):
    image = sample_image()
    path = tmp_path / "1000.png"
    image.save(path)
    base = {"instruction": "make the red square blue", "referring_expression": "the red square", "width": 96,
            "height": 80}
    raw_prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "..."}]}]
    with StandIns(health_503=2, edit_faults={2: "500"}) as servers:
        kwargs = {"edit_url": servers.edit_url, "judge_url": servers.judge_url, "judge_model": JUDGE_MODEL,
                  "backoff": 0.0, "ready_interval": 0.05, "ready_timeout": 20}

        async def batch():
            return await asyncio.gather(
                verl_reward.compute_score_stage2("replan_edit", GOOD_PLAN, "", {**base, "raw_prompt": raw_prompt},
                                                 **kwargs),
                verl_reward.compute_score_stage2("replan_edit", GOOD_PLAN, "", {**base, "image_path": str(path)},
                                                 **kwargs),
                verl_reward.compute_score_stage2("replan_edit", "no plan", "", {**base, "image_path": str(path)},
                                                 **kwargs),
                verl_reward.compute_score_stage2("replan_edit", GOOD_PLAN, "", {**base, "image_path": ""}, **kwargs))

        results = asyncio.run(batch())
        assert servers.edit.calls["health"] == 3 and servers.edit.calls["execute"] == 3  # 2 plans + 1 retry
        assert servers.judge.calls["chat"] == 6
    keys = {"score", *PLANNING_KEYS}
    assert all(set(r) == keys and all(isinstance(v, float) for v in r.values()) for r in results)
    for r in results[:2]:  # both ways to the raw image: executed and judged 5/5/5
        assert r["executed"] == 1.0 and r["planning"] == 1.0 and r["score"] > 1.0
    assert results[2]["executed"] == 0.0 and results[2]["planning"] == 0.0  # not executable: format part only
    assert results[3]["missing_input"] == 1.0 and results[3]["executed"] == 0.0  # no image anywhere
    for reward in verl_reward._rewards.values():
        reward.close()
    verl_reward._rewards.clear()


def test_router_address_fills_the_judge_url():
    cfg = verl_reward.reward_config({"judge_model": "m", "reward_router_address": "10.0.0.1:9000",
                                     "reward_model_tokenizer": object()})
    assert cfg.judge_url == "http://10.0.0.1:9000/v1"
    assert verl_reward.reward_config({"judge_model": "m", "judge_url": "http://x/v1",
                                      "reward_router_address": "10.0.0.1:9000"}).judge_url == "http://x/v1"


# ---------------------------------------------------------------------------------------------------- verl itself
def compose(name: str, overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=name, overrides=list(overrides))


@needs_verl
@pytest.mark.parametrize("name", ["verl_stage1", "verl_stage2"])
def test_verl_composes_and_validates(name):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = compose(name)
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.actor_rollout_ref.rollout.n == 8
    assert need_reference_policy(cfg) is (name == "verl_stage1")  # stage 2: no reference model
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def _data_proto(tokenizer, text: str, extra_info: dict, style: str):
    import numpy as np
    import torch
    from verl import DataProto

    prompt = torch.tensor([tokenizer("plan it")["input_ids"]])
    response = torch.tensor([tokenizer(text)["input_ids"]])
    mask = torch.ones(1, prompt.shape[1] + response.shape[1], dtype=torch.long)
    return DataProto.from_dict(
        tensors={"prompts": prompt, "responses": response, "attention_mask": mask},
        non_tensors={"data_source": np.array(["replan_edit"], dtype=object),
                     "reward_model": np.array([{"style": style, "ground_truth": ""}], dtype=object),
                     "extra_info": np.array([extra_info], dtype=object)})


@needs_verl
def test_verl_reward_manager_calls_our_functions(tmp_path):
    from verl.trainer.ppo.reward import load_reward_manager

    from replan.testing.tokenizers import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer()
    info = {"instruction": "make the red square blue", "referring_expression": "the red square", "width": 96,
            "height": 80}
    manager = load_reward_manager(compose("verl_stage1"), tokenizer)
    out = manager.loop.run_until_complete(manager.run_single(_data_proto(tokenizer, GOOD_PLAN, dict(info), "rule")))
    assert out["reward_score"] == pytest.approx(stage1_rewards([GOOD_PLAN])[0]["overall"])
    assert set(out["reward_extra_info"]) == {"score", *EDITING_KEYS}

    path = tmp_path / "img.png"
    sample_image().save(path)
    with StandIns() as servers:
        cfg = compose("verl_stage2", [f"reward.custom_reward_function.reward_kwargs.edit_url={servers.edit_url}",
                                      f"reward.custom_reward_function.reward_kwargs.judge_url={servers.judge_url}",
                                      f"reward.custom_reward_function.reward_kwargs.judge_model={JUDGE_MODEL}"])
        manager = load_reward_manager(cfg, tokenizer)
        data = _data_proto(tokenizer, GOOD_PLAN, {**info, "image_path": str(path)}, "model")
        out = manager.loop.run_until_complete(manager.run_single(data))
        assert servers.edit.calls["execute"] == 1 and servers.judge.calls["chat"] == 3
    assert out["reward_score"] > 1.0 and out["reward_extra_info"]["executed"] == 1.0
    for reward in verl_reward._rewards.values():
        reward.close()
    verl_reward._rewards.clear()


@needs_verl
def test_verl_dataset_reads_our_parquet(tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from replan.planner.base import build_prompt, load_template
    from replan.testing.qwenvl import tiny_qwen25vl
    from replan.train import data as tdata

    out = tmp_path / "train.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out)]) == 0
    _, processor = tiny_qwen25vl()
    cfg = compose("verl_stage1", ["data.filter_overlong_prompts=false"])  # the filter needs qwen_vl_utils (GPU env)
    ds = RLHFDataset(str(out), processor.tokenizer, config=cfg.data, processor=processor)
    assert len(ds) == 5
    item = ds[0]
    (message,) = item["raw_prompt"]
    image, text = message["content"]
    assert image["type"] == "image" and isinstance(image["image"], Image.Image)
    assert text == {"type": "text", "text": build_prompt(load_template(), text["text"].split("\n")[-1])}
    assert item["extra_info"]["instruction"] and item["reward_model"]["style"] == "rule"


FSDP_CHECKPOINT = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from replan.testing.qwenvl import tiny_qwen25vl
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
model, processor = tiny_qwen25vl()
model.config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
fully_shard(model, mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",)))
out = sys.argv[1]
os.makedirs(out + "/huggingface")
torch.save(model.state_dict(), out + "/model_world_size_1_rank_0.pt")  # DTensor shards, as verl's manager saves
json.dump({"FSDP_version": 2, "world_size": 1}, open(out + "/fsdp_config.json", "w"))
model.config.save_pretrained(out + "/huggingface")
processor.save_pretrained(out + "/huggingface")
dist.destroy_process_group()
"""


@needs_verl
def test_merge_script_makes_a_planner_model(tmp_path):
    """scripts/train/merge.sh (verl's merger) turns an FSDP2 actor checkpoint into a model replan loads."""
    import os
    import socket
    import subprocess
    import sys

    import torch

    from replan.testing.qwenvl import tiny_qwen25vl
    from replan.train import grpo

    actor, merged = tmp_path / "global_step_1" / "actor", tmp_path / "stage1_hf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-c", FSDP_CHECKPOINT, str(actor), str(port)], check=True, env=env, timeout=120)
    with pytest.raises(ValueError, match="sharded verl checkpoint"):
        grpo.resolve_model_path(str(actor))
    subprocess.run(["bash", str(ROOT / "scripts/train/merge.sh"), str(actor), str(merged)], check=True, env=env,
                   timeout=120)
    from transformers import AutoModelForImageTextToText

    assert grpo.resolve_model_path(str(merged)) == str(merged)
    assert (merged / "processor_config.json").is_file() or (merged / "preprocessor_config.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(merged)
    reference = tiny_qwen25vl()[0].state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(reference[k].to(torch.bfloat16).float(), loaded[k].float()) for k in reference)
