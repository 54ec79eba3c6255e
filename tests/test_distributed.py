"""How llm/distributed.py decides to join a multi-process run (jax.distributed itself is
exercised end to end by the 2-process test in test_scale_out.py)."""

import pytest

from llm.parallel import distributed
from llm.config import base_config


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of connecting anywhere."""
  seen = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *args, **kwargs: seen.append((args, kwargs)))
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  for var in (*distributed.ENV, "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "LLM_MULTIHOST"):
    monkeypatch.delenv(var, raising=False)
  return seen


def test_single_process_by_default(calls):
  assert distributed.initialize(base_config().distributed) == "single-process"
  assert calls == []


def test_config_then_env(calls, monkeypatch):
  d = base_config().distributed
  d.update(coordinator="10.0.0.1:1234", num_processes=4, process_id=2)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "ignored:1")
  assert distributed.initialize(d) == "config"
  assert calls[-1][0] == ("10.0.0.1:1234", 4, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.initialize(base_config().distributed) == "env"
  assert calls[-1][0] == ("ignored:1", 2, 1)


def test_detected_clusters(calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.initialize(base_config().distributed) == "single-process"
  monkeypatch.setenv("SLURM_NTASKS", "8")
  assert distributed.initialize(base_config().distributed) == "slurm"
  assert calls[-1] == ((), {})  # JAX's own SLURM detection fills in the rest
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert distributed.initialize(base_config().distributed) == "cloud-tpu"
  d = base_config().distributed
  d.initialize = "never"
  assert distributed.initialize(d) == "single-process"


@pytest.mark.parametrize("updates,env,message", [
    (dict(coordinator="h:1", num_processes=0, process_id=0), {}, "needs distributed.num_processes"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), {}, "process_id=2 must be <"),
    (dict(initialize="sometimes"), {}, "distributed.initialize='sometimes'; allowed"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "are set but .*JAX_NUM_PROCESSES"),
])
def test_bad_settings_are_named(calls, monkeypatch, updates, env, message):
  d = base_config().distributed
  d.update(updates)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(d)
  assert calls == []
