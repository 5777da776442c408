"""deploy/kubernetes/: every manifest valid, and consistent with the zpar a user runs in it.

Offline, with no cluster: the built-in kinds against Kubernetes' own OpenAPI schemas, which
kubernetes-validate ships (strict: an unknown or misspelt field fails); KEDA's kinds, which it has no
schema for, against a subset of KEDA's CRD schemas written here. Then what a user relies on: the
flags, variables and ports the pods use are ones zpar accepts, the Secret's key is the one the pods
read, the metrics the autoscalers name are ones a real broker serves, and the probes, run as
Kubernetes runs them against a broker and an agent started with the manifests' own command lines,
pass and fail when they should.
"""

from __future__ import annotations

import contextlib
import fractions
import importlib.resources
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families

from zpar import config as cfg
from zpar.agent.lifecycle import SHUTDOWN_GRACE
from zpar.cli import app
from zpar.security import generate_secret
from zpar.testing import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
BIN = os.path.dirname(sys.executable)
#: The oldest Kubernetes the manifests promise to fit, and the newest kubernetes-validate knows.
VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
KUSTOMIZE = {"Kustomization", "Component"}
PODS = ("broker", "agent", "producer")


def load(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def manifests() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.yaml") if load(p)[0].get("kind") not in KUSTOMIZE)


def objects() -> list[dict[str, Any]]:
    return [doc for path in manifests() for doc in load(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


#: Manifests applied on their own, outside the kustomization.
STANDALONE = {"producer-job.yaml"}


def container(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of the Deployment (or Job: the producer) ``zpar-NAME``'s container ``NAME``."""
    pod = find("Job" if name == "producer" else "Deployment", f"zpar-{name}")["spec"]["template"]["spec"]
    (box,) = [c for c in pod["containers"] if c["name"] == name]
    return pod, box


# ---------------------------------------------------------------------- KEDA's kinds

_K8S = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s."


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object schema that rejects fields it does not name (a CRD's pruning does the same, silently)."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_META = {"$ref": _K8S + "apimachinery.pkg.apis.meta.v1.ObjectMeta"}

# The fields of KEDA 2.15's CRDs (keda.sh_scaledobjects.yaml, keda.sh_triggerauthentications.yaml) that
# these manifests may use, with their types and required fields; KEDA's behavior field is Kubernetes'
# own HorizontalPodAutoscalerBehavior, so it is checked against that schema.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _closed({
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _META,
        "spec": _closed({
            "scaleTargetRef": _closed({"apiVersion": _STR, "kind": _STR, "name": _STR,
                                       "envSourceContainerName": _STR}, ("name",)),
            "minReplicaCount": _INT, "maxReplicaCount": _INT, "idleReplicaCount": _INT,
            "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
            "fallback": _closed({"failureThreshold": _INT, "replicas": _INT}, ("failureThreshold", "replicas")),
            "advanced": _closed({
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": _closed({
                    "name": _STR, "behavior": {"$ref": _K8S + "api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}}),
            }),
            "triggers": {"type": "array", "minItems": 1, "items": _closed({
                "type": _STR, "name": _STR, "useCachedMetrics": {"type": "boolean"},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "metadata": {"type": "object", "additionalProperties": _STR},  # every value a string
                "authenticationRef": _closed({"name": _STR, "kind": {"enum": ["TriggerAuthentication",
                                                                              "ClusterTriggerAuthentication"]}},
                                             ("name",)),
            }, ("type", "metadata"))},
        }, ("scaleTargetRef", "triggers")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "TriggerAuthentication": _closed({
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"}, "metadata": _META,
        "spec": _closed({"secretTargetRef": {"type": "array", "minItems": 1, "items": _closed(
            {"parameter": _STR, "name": _STR, "key": _STR}, ("parameter", "name", "key"))}}),
    }, ("apiVersion", "kind", "metadata", "spec")),
}

# The metrics-api scaler's metadata (KEDA 2.15's metrics_api_scaler.go): what it requires and accepts.
METRICS_API_REQUIRED = {"url", "valueLocation", "targetValue"}
METRICS_API_KNOWN = METRICS_API_REQUIRED | {"format", "activationTargetValue", "authMode", "unsafeSsl",
                                            "method", "keyParamName"}


def _k8s_definitions() -> referencing.Registry:
    path = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{VERSIONS[-1]}-local-strict" / "_definitions.json")
    defs = json.loads(path.read_text())
    return referencing.Registry().with_resource(defs["$id"], referencing.Resource.from_contents(defs))


def validate(doc: dict[str, Any]) -> None:
    """Validate one object: against Kubernetes' schemas if it is a built-in kind, else against KEDA's."""
    if doc["apiVersion"].startswith("keda.sh/"):
        # kubernetes-validate knows no CRD: it says so (its command line only warns, and passes).
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
        schema = KEDA_SCHEMAS[doc["kind"]]
        jsonschema.Draft202012Validator(schema, registry=_k8s_definitions()).validate(doc)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


# ---------------------------------------------------------------------- the schemas


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_is_valid(path):
    docs = load(path)
    assert docs
    for doc in docs:
        validate(doc)


def misspelt(doc: dict[str, Any], where: tuple[str | int, ...]) -> dict[str, Any]:
    bad = json.loads(json.dumps(doc))
    node = bad
    for key in where:
        node = node[key]
    node["imagePullPolicey" if "image" in node else "nmae"] = "x"
    return bad


def test_strict_validation_catches_a_misspelt_field_in_each_kind():
    deep = {"Deployment": ("spec", "template", "spec", "containers", 0), "ScaledObject": ("spec", "triggers", 0),
            "TriggerAuthentication": ("spec", "secretTargetRef", 0), "Service": ("spec", "ports", 0),
            "HorizontalPodAutoscaler": ("spec", "metrics", 0, "external", "target")}
    for doc in objects():
        for where in (("metadata",), deep.get(doc["kind"], ("metadata",))):
            with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
                validate(misspelt(doc, where))


def test_the_kustomizations_name_only_files_that_exist_and_keep_generated_secrets_out_of_git():
    ignored = [line for line in (ROOT / ".gitignore").read_text().splitlines() if not line.startswith("#")]
    declared = set()
    for path in ROOT.rglob("kustomization.yaml"):
        (k,) = load(path)
        assert k["kind"] in KUSTOMIZE and k["apiVersion"].startswith("kustomize.config.k8s.io/")
        for resource in k.get("resources", []):
            declared.add((path.parent / resource).resolve())
            assert (path.parent / resource).is_file(), resource
        for component in k.get("components", []):
            assert (path.parent / component / "kustomization.yaml").is_file()
        for generator in k.get("secretGenerator", []):
            for entry in generator["files"]:
                _, _, source = entry.rpartition("=")
                assert source in ignored, f"{source} (a real secret) must be in deploy/kubernetes/.gitignore"
        for patch in k.get("patches", []):
            find(patch["target"]["kind"], patch["target"]["name"])
    assert declared == {p.resolve() for p in manifests() if p.name not in STANDALONE}, \
        "every manifest is part of the kustomization or a component, or applied on its own"
    (base,) = load(ROOT / "kustomization.yaml")
    assert {o["metadata"].get("namespace") for o in objects() if o["kind"] != "Namespace"} == {base["namespace"]}
    assert find("Namespace", base["namespace"])
    for name in PODS:
        assert container(name)[1]["image"].partition(":")[0] in {i["name"] for i in base["images"]}
    # The autoscaler owns the agents' count: each component drops it from the Deployment.
    for component in ("keda", "hpa"):
        (k,) = load(ROOT / component / "kustomization.yaml")
        assert any("/spec/replicas" in p["patch"] and p["target"]["name"] == "zpar-agent" for p in k["patches"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
@pytest.mark.parametrize("component", [None, "keda", "hpa"])
def test_kustomize_builds_the_cluster_and_every_object_it_builds_is_valid(component, tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("secret", "token"))  # never copy a real one
    (tree / "secret").write_text(generate_secret() + "\n")
    (tree / "keda" / "token").write_text("0" * 32)
    if component:
        with open(tree / "kustomization.yaml", "a") as f:
            f.write(f"components:\n  - {component}\n")
    built = subprocess.run(["kubectl", "kustomize", str(tree)], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    for doc in docs:
        validate(doc)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Secret", "zpar-secret"), ("Deployment", "zpar-broker"), ("Deployment", "zpar-agent")} <= kinds
    agents = next(d for d in docs if d["metadata"]["name"] == "zpar-agent" and d["kind"] == "Deployment")
    assert ("replicas" in agents["spec"]) == (component is None)
    if component == "keda":
        assert {("ScaledObject", "zpar-agent"), ("Secret", "zpar-dashboard-token")} <= kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
def test_a_missing_secret_file_stops_kustomize_rather_than_deploying_without_one(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("secret", "token"))
    built = subprocess.run(["kubectl", "kustomize", str(tree)], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert built.returncode != 0 and "secret" in built.stderr


# ---------------------------------------------------------------------- consistency with zpar


def command(argv: list[str]) -> Any:
    """Parse ``zpar SUBCOMMAND ...`` with zpar's own typer app, as the container's entrypoint would: its
    context (``.params``), or the parser's error for an option zpar does not have."""
    sub = typer.main.get_command(app).commands[argv[0]]  # type: ignore[attr-defined]
    return sub.make_context(argv[0], list(argv[1:]))


def probe_commands(probe: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The ``zpar ...`` arguments a probe runs: its exec command, or the zpar part of its ``sh -c`` script."""
    argv = probe["exec"]["command"]
    if argv[0] == "zpar":
        return argv[1:]
    assert argv[:2] == ["sh", "-c"], argv
    words = shlex.split(argv[2])
    start = end = words.index("zpar") + 1
    while end < len(words) and not words[end].startswith(">") and not words[end].endswith(";"):
        end += 1
    return [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], w) for w in words[start:end]]


def cpu(quantity: str) -> fractions.Fraction:
    return fractions.Fraction(int(quantity[:-1]), 1000) if quantity.endswith("m") else fractions.Fraction(quantity)


def pod_env(name: str, secret: str, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it (the Secret holding ``secret``)."""
    _, box = container(name)
    env: dict[str, str] = {}
    for var in box["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            assert source["secretKeyRef"] == {"name": "zpar-secret", "key": "secret"}
            env[var["name"]] = secret
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = pod_name
        else:  # resourceFieldRef: the kubelet rounds the quantity up to whole divisors
            ref = source["resourceFieldRef"]
            assert ref["containerName"] == name
            kind, resource = ref["resource"].split(".")
            env[var["name"]] = str(math.ceil(cpu(box["resources"][kind][resource]) / cpu(ref["divisor"])))
    return env


def settings(cls: type[cfg.C], ctx: Any, env: dict[str, str]) -> cfg.C:
    fields = set(cls.__dataclass_fields__)
    return cfg.load(cls, {k: v for k, v in ctx.params.items() if k in fields}, env)


def port_of(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition("://")[2].rpartition(":")
    return host, int(port)


def test_the_secret_the_pods_read_is_the_one_the_kustomization_makes():
    (base,) = load(ROOT / "kustomization.yaml")
    (generator,) = base["secretGenerator"]
    (entry,) = generator["files"]
    key = entry.partition("=")[0]
    refs = [var["valueFrom"]["secretKeyRef"] for name in PODS for var in container(name)[1]["env"]
            if "secretKeyRef" in var.get("valueFrom", {})]
    assert refs and all(ref == {"name": generator["name"], "key": key} for ref in refs)
    assert generator["options"]["disableNameSuffixHash"]  # the documented `kubectl create secret` gives this name


def test_the_pods_command_lines_and_variables_are_ones_zpar_accepts():
    secret = generate_secret()
    for name, cls in (("broker", cfg.BrokerConfig), ("agent", cfg.AgentConfig)):
        _, box = container(name)
        assert box["args"][0] == name
        env = pod_env(name, secret, f"zpar-{name}-7d9f-x2v")
        fields = {f.upper() for f in cls.__dataclass_fields__}
        assert {v.removeprefix("ZPAR_") for v in env if v.startswith("ZPAR_")} <= fields
        settings(cls, command(box["args"]), env)  # ConfigError on a bad value
        for probe in ("readinessProbe", "livenessProbe"):
            ctx = command(probe_commands(box[probe], env))
            assert ctx.info_name == "status"
            assert box[probe]["timeoutSeconds"] > ctx.params["timeout"], "the kubelet must not cut the probe short"


def test_the_namespace_enforces_restricted_and_every_pod_meets_it():
    assert find("Namespace", "zpar")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in PODS:
        pod, box = container(name)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert box["securityContext"]["allowPrivilegeEscalation"] is False
        assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert all(set(v) <= {"name", "emptyDir"} for v in pod["volumes"])
        assert pod["enableServiceLinks"] is False  # ZPAR_* are zpar's settings: no ZPAR_BROKER_PORT=tcp://...
        assert pod["automountServiceAccountToken"] is False  # tasks run here: no Kubernetes credentials


def test_the_service_exposes_each_port_the_broker_binds_under_the_same_number():
    _, box = container("broker")
    conf = settings(cfg.BrokerConfig, command(box["args"]), {})
    bound = {"frontend": port_of(conf.frontend), "backend": port_of(conf.backend),
             "collector": port_of(conf.collector), "dashboard": cfg.dashboard_address(conf.dashboard)}
    assert all(host == "0.0.0.0" for host, _ in bound.values())  # noqa: S104 - reachable from other pods
    declared = {p["name"]: p["containerPort"] for p in box["ports"]}
    service = find("Service", "zpar-broker")
    assert service["spec"]["selector"] == find("Deployment", "zpar-broker")["spec"]["selector"]["matchLabels"]
    exposed = {p["name"]: (p["port"], declared[p["targetPort"]]) for p in service["spec"]["ports"]}
    # The broker tells agents the collector's port number, and they dial it on the Service's address.
    assert exposed == {name: (port, port) for name, (_, port) in bound.items()}


def test_the_agents_reach_the_broker_through_its_service_and_work_one_worker_per_cpu_requested():
    _, box = container("agent")
    env = pod_env("agent", generate_secret(), "zpar-agent-7d9f-x2v")
    conf = settings(cfg.AgentConfig, command(box["args"]), env)
    ports = {p["name"]: p["port"] for p in find("Service", "zpar-broker")["spec"]["ports"]}
    assert port_of(conf.broker) == ("zpar-broker", ports["backend"])
    assert conf.worker_count() == cpu(box["resources"]["requests"]["cpu"]) == 2
    assert conf.name == "zpar-agent-7d9f-x2v"
    for probe in ("readinessProbe", "livenessProbe"):
        ctx = command(probe_commands(box[probe], env))
        assert port_of(ctx.params["broker"]) == ("zpar-broker", ports["frontend"])
        assert ctx.params["node"] == conf.name


def test_the_producer_job_reaches_the_frontend_through_the_service():
    _, box = container("producer")
    (address,) = box["args"]
    ports = {p["name"]: p["port"] for p in find("Service", "zpar-broker")["spec"]["ports"]}
    assert port_of(address) == ("zpar-broker", ports["frontend"])
    script = box["command"][-1].replace("/opt/zpar/examples/", "")
    assert (ROOT.parent.parent / "examples" / script).is_file()
    assert "COPY examples /opt/zpar/examples" in (ROOT.parent / "container" / "Containerfile").read_text()


def test_kubernetes_waits_for_the_agents_drain_before_killing_it():
    pod, box = container("agent")
    conf = settings(cfg.AgentConfig, command(box["args"]), pod_env("agent", generate_secret(), "a"))
    assert conf.grace >= 60  # a real drain, not the bare default
    # SIGTERM; the drain; then the agent gives its workers SHUTDOWN_GRACE; then the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= conf.grace + SHUTDOWN_GRACE + 5
    strategy = find("Deployment", "zpar-broker")["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}  # never two brokers behind the Service


def test_the_autoscalers_read_the_brokers_service_with_its_token():
    scaled = find("ScaledObject", "zpar-agent")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "zpar-agent"
    auth = find("TriggerAuthentication", "zpar-dashboard-token")
    (k,) = load(ROOT / "keda" / "kustomization.yaml")
    (generator,) = k["secretGenerator"]
    key = generator["files"][0].partition("=")[0]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "token", "name": generator["name"], "key": key}]
    service = find("Service", "zpar-broker")
    dashboard = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "dashboard")
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "metrics-api" and METRICS_API_REQUIRED <= set(meta) <= METRICS_API_KNOWN
        assert meta["format"] == "prometheus" and meta["authMode"] == "bearer"  # the token as a Bearer header
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert float(meta["targetValue"]) > 0
        # KEDA runs in its own namespace: it needs the Service's NAME.NAMESPACE.svc name.
        meta_service = service["metadata"]
        assert meta["url"] == f"http://{meta_service['name']}.{meta_service['namespace']}.svc:{dashboard}/metrics"


@contextlib.contextmanager
def daemon(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``zpar ARGV`` as the container's entrypoint runs it, its log in ``log``; killed if the test left it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([os.path.join(BIN, "zpar"), *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def on_loopback(text: str, ports: dict[int, int]) -> str:
    """An address of the manifests moved to loopback and to this test's free ports."""
    return re.sub(r"(?:0\.0\.0\.0|127\.0\.0\.1|zpar-broker):(\d+)", lambda m: f"127.0.0.1:{ports[int(m[1])]}", text)


def probe(spec: dict[str, Any], env: dict[str, str], ports: dict[int, int], wait: float | None = None) -> int:
    """Run a probe's command as the kubelet does (in the container's environment); its exit code.

    ``wait``: its ``--timeout`` instead of the manifest's, where no broker answers (the same outcome, sooner).
    """
    argv = [on_loopback(word, ports) for word in spec["exec"]["command"]]
    if wait is not None:
        argv = [re.sub(r"--timeout=[\d.]+", f"--timeout={wait}", word) for word in argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=spec["timeoutSeconds"])
    return done.returncode


@pytest.fixture
def cluster(tmp_path):
    """A broker and an agent run with the manifests' command lines and environment, moved to loopback."""
    secret = generate_secret()
    ports = {port: free_port() for port in (5555, 5556, 5557, 8790)}
    base = {"PATH": f"{BIN}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    envs = {name: {**base, **pod_env(name, secret, f"zpar-{name}-7d9f-x2v")} for name in ("broker", "agent")}
    envs["agent"]["ZPAR_WORKERS"] = "1"  # the manifest's 2 (tested above); 1 is enough here
    args = {name: [on_loopback(a, ports) for a in container(name)[1]["args"]] for name in envs}
    with (daemon(args["broker"], envs["broker"], tmp_path / "broker.log") as broker,
          daemon(args["agent"], envs["agent"], tmp_path / "agent.log") as agent):
        yield {"broker": broker, "agent": agent, "env": envs, "ports": ports}


@pytest.mark.timeout(90)
def test_the_probes_pass_on_a_running_cluster_and_fail_when_they_should(cluster):
    ports, env = cluster["ports"], cluster["env"]
    _, broker = container("broker")
    _, agent = container("agent")
    wait_for(lambda: probe(broker["readinessProbe"], env["broker"], ports) == 0, 30, 0.2, "the broker ready")
    assert probe(broker["livenessProbe"], env["broker"], ports) == 0
    wait_for(lambda: probe(agent["readinessProbe"], env["agent"], ports) == 0, 30, 0.2, "the agent registered")
    assert probe(agent["livenessProbe"], env["agent"], ports) == 0

    # Another pod's name: the broker answers and does not list it (a stuck agent looks the same).
    stranger = {**env["agent"], "ZPAR_NAME": "zpar-agent-gone"}
    assert probe(agent["readinessProbe"], stranger, ports) == 3  # `zpar status --node`: answered, not listed
    assert probe(agent["livenessProbe"], stranger, ports) != 0
    # A wrong secret is refused: not ready, not alive.
    wrong = {**env["broker"], "ZPAR_SECRET": generate_secret()}
    assert probe(broker["readinessProbe"], wrong, ports) == 1

    # The broker goes: agents are not ready, and still alive (restarting them would not help).
    cluster["broker"].send_signal(signal.SIGTERM)
    cluster["broker"].wait(timeout=30)
    assert probe(broker["livenessProbe"], env["broker"], ports, wait=0.5) != 0
    assert probe(agent["readinessProbe"], env["agent"], ports, wait=0.5) == 1  # no broker answered
    assert probe(agent["livenessProbe"], env["agent"], ports, wait=0.5) == 0

    # Scaling down: SIGTERM, and the idle agent drains and leaves well within the pod's grace period.
    cluster["agent"].send_signal(signal.SIGTERM)
    pod, _ = container("agent")
    assert cluster["agent"].wait(timeout=pod["terminationGracePeriodSeconds"]) == 0


@pytest.mark.timeout(60)
def test_the_metrics_the_autoscalers_name_are_gauges_the_broker_serves(cluster):
    ports, env = cluster["ports"], cluster["env"]
    wait_for(lambda: probe(container("broker")[1]["readinessProbe"], env["broker"], ports) == 0, 30, 0.2)
    status = subprocess.run(["zpar", "status", "--json", f"--broker=tcp://127.0.0.1:{ports[5555]}"],
                            env=env["broker"], capture_output=True, text=True, timeout=30, check=True)
    # The token, by the command deploy/README.md and keda/kustomization.yaml give for keda/token.
    (documented,) = set(re.findall(r"python3 -c '([^']+)'", (ROOT / "keda" / "kustomization.yaml").read_text()))
    assert f"python3 -c '{documented}'" in (ROOT.parent / "README.md").read_text()
    token = subprocess.run([sys.executable, "-c", documented], input=status.stdout, capture_output=True, text=True,
                           timeout=30, check=True).stdout
    assert re.fullmatch(r"[0-9a-f]{32}", token)  # one line, no newline: what the Secret holds
    url = on_loopback(find("ScaledObject", "zpar-agent")["spec"]["triggers"][0]["metadata"]["url"]
                      .replace("zpar-broker.zpar.svc", "zpar-broker"), ports)
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310 - http, checked
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own loopback broker
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # KEDA's valueLocation is a selector, NAME{LABEL="VALUE",...}; the HPA's a name and matchLabels.
    wanted = [selector(t["metadata"]["valueLocation"]) for t in find("ScaledObject", "zpar-agent")["spec"]["triggers"]]
    wanted += [(m["external"]["metric"]["name"], m["external"]["metric"].get("selector", {}).get("matchLabels", {}))
               for m in find("HorizontalPodAutoscaler", "zpar-agent")["spec"]["metrics"]]
    assert {name for name, _ in wanted} == {"zpar_tasks_queued", "zpar_workers"}
    for name, labels in wanted:
        # A level (a gauge), not a count; and exactly one sample of it matches, as KEDA takes one.
        assert families[name].type == "gauge"
        assert len([s for s in families[name].samples if s.name == name and s.labels == labels]) == 1


def selector(text: str) -> tuple[str, dict[str, str]]:
    """``(name, labels)`` of a Prometheus selector such as ``zpar_workers{state="busy"}``."""
    name, _, rest = text.partition("{")
    return name, dict(re.findall(r'(\w+)="([^"]*)"', rest))
