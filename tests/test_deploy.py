"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas offline
(kubernetes-validate, strict: no unknown fields), probe the server's /health, carry the
Prometheus scrape annotations and drain within the pod's grace period; the Dockerfile
runs `python -m llm.serve` as the container's main process."""

import re
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _manifests():
  out = {}
  for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
      out[doc["kind"]] = doc
  return out


def test_manifests_validate_against_kubernetes_schemas():
  manifests = _manifests()
  assert set(manifests) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
  for kind, doc in manifests.items():
    kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises on any violation
  bad = dict(manifests["Service"], spec={"selector": {"app": "x"}, "portz": []})
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(bad, "1.37.0", strict=True)


def test_deployment_probes_health_scrapes_metrics_and_drains():
  dep = _manifests()["Deployment"]
  pod = dep["spec"]["template"]
  container = pod["spec"]["containers"][0]
  for probe in ("startupProbe", "readinessProbe"):
    assert container[probe]["httpGet"]["path"] == "/health"
  assert "livenessProbe" in container
  annotations = pod["metadata"]["annotations"]
  assert annotations["prometheus.io/scrape"] == "true"
  assert annotations["prometheus.io/path"] == "/metrics"
  assert container["ports"][0]["containerPort"] == int(annotations["prometheus.io/port"])
  args = next(e["value"] for e in container["env"] if e["name"] == "LLM_SERVE_ARGS")
  grace = float(re.search(r"--grace_seconds=(\d+)", args).group(1))
  assert grace < pod["spec"]["terminationGracePeriodSeconds"]
  svc = _manifests()["Service"]
  assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
  hpa = _manifests()["HorizontalPodAutoscaler"]
  assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


def test_dockerfile_runs_the_server_as_its_main_process():
  text = (DEPLOY / "Dockerfile").read_text()
  cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
  assert "exec python -m llm.serve" in cmd and "--host=0.0.0.0" in cmd
  assert 'pip install ".[serve]"' in text
  assert re.search(r"^EXPOSE 8000$", text, re.M)
