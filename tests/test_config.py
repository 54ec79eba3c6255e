import subprocess
import sys

import pytest

from llm import config as config_lib
from llm.params import count_params
from tests.helpers import load_recipe, tiny_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,expected", [
    ("llama2_7b", 6_738_415_616),
    ("llama3_8b", 8_030_261_248),
    ("mistral_7b", 7_241_732_096),
    ("llama2_13b", 13_015_864_320),
    ("llama2_70b", 68_976_648_192),
])
def test_published_parameter_counts(name, expected):
  cfg = load_recipe(name)
  config_lib.validate(cfg)
  assert count_params(cfg.model) == expected


@pytest.mark.parametrize("name", ["tiny", "llama3_70b", "llama_125m", "sft_tiny", "dpo_tiny",
                                  "reward_tiny", "grpo_tiny"])
def test_every_config_validates(name):
  config_lib.validate(load_recipe(name))


@pytest.mark.parametrize("override,message", [
    (dict(model=dict(n_heads=3)), "model.n_heads=3 does not divide model.d_model=64"),
    (dict(model=dict(n_kv_heads=3)), "model.n_kv_heads=3 does not divide model.n_heads=4"),
    (dict(model=dict(attention="magic")), "model.attention='magic' is not allowed"),
    (dict(model=dict(remat="some")), "model.remat='some' is not allowed"),
    (dict(optim=dict(schedule="linear")), "optim.schedule='linear' is not allowed"),
    (dict(train=dict(batch_size=6, grad_accum=4)), "train.batch_size=6 is not divisible"),
    (dict(mesh=dict(data=-1, fsdp=-1)), "at most one mesh axis may be -1"),
    (dict(data=dict(source="csv")), "data.source='csv' is not allowed"),
    # settings of a part that is off
    (dict(model=dict(moe=dict(top_k=1))), "model.moe.top_k=1 set but model.mlp='dense'"),
    (dict(model=dict(lora=dict(targets="q,k,v"))),
     "model.lora.targets='q,k,v' set but model.lora.rank=0"),
    (dict(data=dict(paths="p.jsonl"), train=dict(objective="dpo", dpo=dict(
        loss_type="ipo", label_smoothing=0.1))), "label_smoothing=0.1 applies to the sigmoid"),
    (dict(data=dict(curate=dict(languages="en,deu"))), "'deu' is not an ISO 639-1 code"),
    *[(dict(data=dict(paths="p.jsonl"), train=dict(objective="grpo", grpo=dict(
        max_new_tokens=8, rewards="exact_match,one_line", reward_weights=w))),
       f"train.grpo.reward_weights='{w}' must be finite numbers, not all 0")
      for w in ("0,0", "nan,1", "1,inf")],
])
def test_bad_values_are_named(override, message):
  cfg = tiny_config()
  for section, values in override.items():
    cfg[section].update(values)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(cfg)


def test_json_round_trip():
  cfg = tiny_config()
  assert config_lib.from_json(config_lib.to_json(cfg)).to_dict() == cfg.to_dict()


def test_unknown_command_line_key_is_rejected(tmp_path):
  cmd = [sys.executable, "-m", "llm.params", f"--config={ROOT}/configs/tiny.py",
         "--config.model.n_layerz=4"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode != 0
  assert "n_layerz" in result.stderr


def test_params_command_prints_total():
  cmd = [sys.executable, "-m", "llm.params", f"--config={ROOT}/configs/mistral_7b.py"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert "7,241,732,096" in result.stdout.splitlines()[-1]


def test_load_config_from_python_with_overrides(tmp_path):
  cfg = config_lib.load_config("sft_tiny", {"train.steps": 70, "model.lora.rank": 4})
  assert cfg.train.steps == 70 and cfg.model.lora.rank == 4 and cfg.train.objective == "sft"
  assert config_lib.load_config(str(ROOT / "configs" / "tiny.py")).train.steps == 1200
  with pytest.raises(ValueError, match="no field 'train.stepz'"):
    config_lib.load_config("tiny", {"train.stepz": 1})
  with pytest.raises(ValueError, match="no field 'nope.steps'"):
    config_lib.load_config("tiny", {"nope.steps": 1})
  with pytest.raises(ValueError, match="cannot set train.steps='many'"):
    config_lib.load_config("tiny", {"train.steps": "many"})
  with pytest.raises(ValueError, match="model.n_heads=3 does not divide"):
    config_lib.load_config("tiny", {"model.n_heads": 3})
  with pytest.raises(FileNotFoundError, match="no config file"):
    config_lib.load_config("no_such_recipe")
