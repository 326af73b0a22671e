import json
import math

import pytest
import torch

from dnascale.config import apply_overrides, from_dict
from dnascale.errors import ConfigError
from dnascale.train.config import OptimConfig, TrainConfig
from dnascale.train.engine import GuardedAdamW, parameter_groups, resolve_ds_config, warmup_cosine


def write(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_shipped_ds_configs_resolve(repo_root):
    for name in ("zero3.json", "zero2.json", "zero3_offload.json", "stage0.json"):
        config, plan = resolve_ds_config(str(repo_root / "ds_configs" / name), micro_batch_size=None,
                                         grad_accum=None, dp_size=2)
        assert plan.global_batch_size == config["train_batch_size"] == 8 * 1 * 2
        assert config["bf16"]["enabled"] in (True, False)  # "auto" resolved
        if not torch.cuda.is_available():
            assert config["bf16"]["enabled"] is False, "CPU trains in fp32"


def test_cli_contradicting_ds_config_is_refused(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 8 but the command line asks for 4"):
        resolve_ds_config(path, micro_batch_size=4, grad_accum=None, dp_size=1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 2"):
        resolve_ds_config(path, micro_batch_size=None, grad_accum=3, dp_size=1)
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 64})
    with pytest.raises(ConfigError, match=r"train_batch_size 64 != micro 8 x accumulation 1 x data-parallel 2 = 16"):
        resolve_ds_config(path, micro_batch_size=None, grad_accum=None, dp_size=2)


def test_missing_invalid_or_foreign_ds_config(tmp_path):
    with pytest.raises(ConfigError, match="no such ds_config"):
        resolve_ds_config(str(tmp_path / "nope.json"), micro_batch_size=1, grad_accum=1, dp_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        resolve_ds_config(str(bad), micro_batch_size=1, grad_accum=1, dp_size=1)
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"}})
    with pytest.raises(ConfigError, match="'optimizer' is set by dnascale"):
        resolve_ds_config(path, micro_batch_size=None, grad_accum=None, dp_size=1)


def test_warmup_cosine_schedule_shape():
    factor = warmup_cosine(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_guarded_adamw_skips_the_whole_update():
    model = torch.nn.Linear(4, 4)
    optimizer = GuardedAdamW(parameter_groups(model, 0.1), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    optimizer.skipping = True
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state, "no moments were created by a skipped step"
    optimizer.skipping = False
    optimizer.step()
    assert not torch.equal(before[0], model.weight)
    groups = parameter_groups(model, 0.1)
    assert groups[0]["params"] == [model.weight] and groups[1]["params"] == [model.bias]


def test_config_from_dict_and_overrides_name_the_field():
    cfg = from_dict(TrainConfig, {"steps": 5, "optim": {"lr": 1}}, "test")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="unknown field 'stepz'"):
        from_dict(TrainConfig, {"stepz": 5}, "test")
    with pytest.raises(ConfigError, match="steps: expected int"):
        from_dict(TrainConfig, {"steps": "many"}, "test")
    with pytest.raises(ConfigError, match="steps: expected a positive integer"):
        from_dict(TrainConfig, {"steps": 0}, "test")
    assert apply_overrides(cfg, ["optim.lr=0.5", "seed=3"]).optim.lr == 0.5
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        apply_overrides(cfg, ["optim.lrr=0.5"])
    with pytest.raises(ConfigError, match="expected field=value"):
        apply_overrides(cfg, ["seed"])
    with pytest.raises(ConfigError, match="wandb_mode: expected one of"):
        apply_overrides(cfg, ["wandb_mode=loud"])
