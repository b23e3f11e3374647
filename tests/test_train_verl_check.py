"""The verl launch scripts' pre-flight (replan.train.verl_check): missing qwen_vl_utils/torchvision stop the launch
with one line naming the install, the dataset size after filter_overlong_prompts is judged, and the scripts' install
comments say exactly what docs/training.md says. The verl parts run only where verl is installed (its own env)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replan.train import verl_check

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ("pip install 'verl[vllm]==0.9.1'", "pip install --no-deps -e .")


def test_missing_packages_stop_with_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(verl_check.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("qwen_vl_utils", "torchvision") else real(name, *a)
                        if name != "verl" else object())
    assert verl_check.missing_packages() == ["qwen_vl_utils", "torchvision"]
    assert verl_check.main(["--config-name", "verl_stage1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "qwen_vl_utils, torchvision" in err and all(part in err for part in INSTALL)


def test_sizes_after_the_filter_are_judged(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, n in enumerate((3, 4)):
        pq.write_table(pa.table({"x": list(range(n))}), tmp_path / f"p{i}.parquet")
    files = [str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet")]
    assert verl_check.parquet_rows(files) == 7 and verl_check.parquet_rows(files[0]) == 3
    line = verl_check.verdict("train", 1043, 1040, 2048, 16)
    assert line == "train: 1040 of 1043 rows remain after filter_overlong_prompts (max_prompt_length=2048)"
    with pytest.raises(ValueError, match="train: 0 of 1043 rows remain.*needs at least 16"):
        verl_check.verdict("train", 1043, 0, 2048, 16)
    with pytest.raises(ValueError, match="needs at least 16"):
        verl_check.verdict("train", 20, 15, 2048, 16)


@pytest.mark.parametrize("script", ["verl_stage1.sh", "verl_stage2.sh"])
def test_launch_scripts_run_the_preflight_first(script, tmp_path):
    """Without verl (this environment), the script stops at the pre-flight with its one line, before Ray/main_ppo."""
    if importlib.util.find_spec("verl") is not None:
        pytest.skip("verl is installed here: the pre-flight would go on to build the datasets")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # this venv's python
    (bin_dir / "python3").chmod(0o755)
    for name in ("train", "dev"):
        (tmp_path / f"{name}.parquet").write_bytes(b"")
    stage1_hf = tmp_path / "stage1_hf"
    stage1_hf.mkdir()
    (stage1_hf / "config.json").write_text("{}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "TRAIN": str(tmp_path / "train.parquet"), "VAL": str(tmp_path / "dev.parquet"), "STAGE1_HF": str(stage1_hf)}
    proc = subprocess.run(["bash", str(ROOT / "scripts/train" / script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "lacks verl" in proc.stderr and "main_ppo" not in proc.stderr


def test_scripts_and_docs_give_the_same_install():
    docs = (ROOT / "docs/training.md").read_text()
    for script in ("verl_stage1.sh", "verl_stage2.sh"):
        text = (ROOT / "scripts/train" / script).read_text()
        assert "train-verl" not in text
        assert "verl_check" in text
    stage1 = (ROOT / "scripts/train/verl_stage1.sh").read_text()
    for part in INSTALL:
        assert part in stage1 and part in docs
    assert stage1.index(INSTALL[0]) < stage1.index(INSTALL[1]) and docs.index(INSTALL[0]) < docs.index(INSTALL[1])


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl lives in its own cluster env")
def test_preflight_builds_verls_dataset(tmp_path):   # pragma: no cover - runs in the verl env only
    from replan.testing.qwenvl import save_tiny_qwen25vl
    from replan.train import data as tdata

    model = save_tiny_qwen25vl(tmp_path / "model")
    out = tmp_path / "train.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out)]) == 0
    cfg = verl_check.compose("verl_stage1", [f"data.train_files={out}", f"data.val_files={out}",
                                             f"actor_rollout_ref.model.path={model}", "data.train_batch_size=2"])
    lines = verl_check.check_data(cfg)
    assert lines[0].startswith("train: 5 of 5 rows")
