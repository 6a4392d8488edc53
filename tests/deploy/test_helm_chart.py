"""The Helm chart (deploy/helm/balansis), rendered offline with each ci/*-values.yaml: `helm lint` finds no
error, every object is valid (Kubernetes' own schemas in strict mode; ours, tests/deploy/crd_schemas, for the
custom resources), and the pods keep what a model server needs (probes, drain, GPUs, security). The checks
are plain functions returning problems, so a deliberately broken copy of the chart shows they catch things."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.helm import CHART, NAMESPACE, RELEASE, VALUES_FILES, load_values, render, rendered_objects

# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion).
KUBERNETES_VERSION = "1.28.0"
CRD_SCHEMAS = {(schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"]): schema
               for schema in (json.loads(path.read_text())
                              for path in sorted((Path(__file__).parent / "crd_schemas").glob("*.json")))}
# Variables read from the Secret, and the secret.keys value naming each one's key.
SECRET_VARIABLES = {"BALANSIS_API_KEY": "apiKey", "BALANSIS_JWT_SECRET": "jwtSecret",
                    "BALANSIS_DATABASE_URL": "databaseUrl", "BALANSIS_REDIS_URL": "redisUrl"}
GPU = "nvidia.com/gpu"
SHUTDOWN_MARGIN = 15  # seconds the process gets after its drain, in the pod's grace period
WAITING_METRIC = "balansis:num_requests_waiting"
CHART_APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def merged_values(values: dict[str, Any], chart: Path = CHART) -> dict[str, Any]:
    """The values a release would use: the chart's defaults under these."""
    with helm_python.Chart.load(chart) as loaded:
        return loaded.merge_values(values)


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# -- validity ------------------------------------------------------------------------------------------

def schema_problems(objects: list[dict]) -> list[str]:
    """Objects that are not what their API accepts: Kubernetes' schemas (strict: no unknown field) for
    built-in kinds, ours for the custom resources, and the pod templates inside a LeaderWorkerSet too."""
    problems = []
    for obj in objects:
        crd_schema = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd_schema is not None:
            problems += [f"{name_of(obj)}: {'.'.join(map(str, error.path))}: {error.message}"
                         for error in jsonschema.Draft7Validator(crd_schema).iter_errors(obj)]
            templates = obj.get("spec", {}).get("leaderWorkerTemplate", {})
            for role in ("leaderTemplate", "workerTemplate"):
                if role in templates:
                    problems += [f"{name_of(obj)}: {role}: {problem}" for problem in kubernetes_problems(
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"},
                         "template": templates[role]})]
        else:
            problems += [f"{name_of(obj)}: {problem}" for problem in kubernetes_problems(obj)]
    return problems


def kubernetes_problems(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


# -- what a model server's pods need --------------------------------------------------------------------

def pod_templates(objects: list[dict]) -> list[tuple[str, str, dict]]:
    """(where, role, pod template) of every workload: role "server" serves HTTP, "worker" only follows."""
    found = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            found.append((name_of(obj), "server", obj["spec"]["template"]))
        elif obj["kind"] == "LeaderWorkerSet":
            templates = obj["spec"]["leaderWorkerTemplate"]
            found.append((f"{name_of(obj)} leader", "server", templates["leaderTemplate"]))
            found.append((f"{name_of(obj)} worker", "worker", templates["workerTemplate"]))
    return found


def gpus_per_pod(values: dict) -> int:
    return values["multiHost"]["gpusPerHost"] if values["mode"] == "multiHost" else values["gpus"]


def tensor_parallel_size(values: dict) -> int:
    """Every GPU of one pod: tensor-parallel groups stay inside a host."""
    return {"single": 1, "multiGpu": values["gpus"], "multiHost": values["multiHost"]["gpusPerHost"]}[values["mode"]]


def data_parallel_size(values: dict) -> int:
    """multiHost: each host a data-parallel replica of the model."""
    return values["multiHost"]["hosts"] if values["mode"] == "multiHost" else 1


def pod_problems(role: str, template: dict, values: dict) -> list[str]:
    """What one pod template gets wrong, for these (merged) values."""
    problems = []
    spec = template["spec"]
    container, = spec["containers"]
    env = {variable["name"]: variable for variable in container.get("env", [])}
    shutdown = values["shutdown"]

    def probe_problem(kind: str, path: str) -> str | None:
        probe = container.get(kind) or {}
        if probe.get("httpGet") != {"path": path, "port": "http"}:
            return f"{kind} is not httpGet {path} on port http: {probe}"
        return None

    if role == "server":
        startup = container.get("startupProbe") or {}
        problems += filter(None, (probe_problem("startupProbe", "/health"), probe_problem("readinessProbe", "/ready"),
                                  probe_problem("livenessProbe", "/health")))
        allowed = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
        if allowed < values["probes"]["startup"]["maxSeconds"]:
            problems.append(f"the startup probe gives up after {allowed} s, before probes.startup.maxSeconds")
        if {"name": "http", "containerPort": 8000, "protocol": "TCP"} not in container.get("ports", []):
            problems.append("no container port 8000 named http")
        pre_stop_wanted = shutdown["preStopSeconds"]
    else:  # a worker serves no HTTP: any HTTP probe would fail it forever
        problems += [f"a worker has a {kind}" for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                     if kind in container]
        # ... and must keep following while the leader drains.
        pre_stop_wanted = shutdown["preStopSeconds"] + math.ceil(shutdown["drainTimeout"]) + 5

    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if pre_stop != ["sleep", str(pre_stop_wanted)]:
        problems.append(f"preStop is {pre_stop}, not sleep {pre_stop_wanted}")
    least_grace = max(shutdown["preStopSeconds"] + shutdown["drainTimeout"] + SHUTDOWN_MARGIN, pre_stop_wanted)
    if spec.get("terminationGracePeriodSeconds", 30) < least_grace:
        problems.append(f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds')} < {least_grace}")
    drain = env.get("BALANSIS_DRAIN_TIMEOUT", {}).get("value")
    if drain is None or float(drain) != shutdown["drainTimeout"]:
        problems.append(f"BALANSIS_DRAIN_TIMEOUT is {drain}, not shutdown.drainTimeout")

    tp = tensor_parallel_size(values)
    tp_given = env.get("BALANSIS_TENSOR_PARALLEL_SIZE", {}).get("value", "1")
    if tp_given != str(tp):
        problems.append(f"BALANSIS_TENSOR_PARALLEL_SIZE is {tp_given}, not {tp}")
    dp, dp_given = data_parallel_size(values), env.get("BALANSIS_DATA_PARALLEL_SIZE", {}).get("value", "1")
    if dp_given != str(dp):
        problems.append(f"BALANSIS_DATA_PARALLEL_SIZE is {dp_given}, not {dp}")

    gpus = gpus_per_pod(values)
    resources = container.get("resources", {})
    requested, limited = (resources.get(kind, {}).get(GPU) for kind in ("requests", "limits"))
    gpu_toleration = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec.get("tolerations", [])
    if gpus:
        if not requested == limited == gpus:
            problems.append(f"{GPU}: requests {requested}, limits {limited}, not both {gpus}")
        if not gpu_toleration:
            problems.append(f"no toleration of {GPU} NoSchedule taints")
    else:
        if requested is not None or limited is not None or gpu_toleration:
            problems.append(f"a CPU pod asks for or tolerates {GPU}")
        if env.get("NVIDIA_VISIBLE_DEVICES", {}).get("value") != "void":
            problems.append("a CPU pod would see every GPU of its node (the image's NVIDIA_VISIBLE_DEVICES=all)")

    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    shm = [mount["name"] for mount in container.get("volumeMounts", []) if mount["mountPath"] == "/dev/shm"]
    if not shm or volumes.get(shm[0], {}).get("emptyDir") != {"medium": "Memory",
                                                              "sizeLimit": values["shm"]["sizeLimit"]}:
        problems.append("/dev/shm is not an in-memory emptyDir of shm.sizeLimit")
    problems += volume_problems(container, volumes, values)

    pod_security = spec.get("securityContext", {})
    wanted_pod_security = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 0, "fsGroup": 0,
                           "seccompProfile": {"type": "RuntimeDefault"}}
    problems += [f"securityContext.{key} is {pod_security.get(key)}, not {wanted}"
                 for key, wanted in wanted_pod_security.items() if pod_security.get(key) != wanted]
    security = container.get("securityContext", {})
    if security.get("allowPrivilegeEscalation") is not False or security.get("capabilities") != {"drop": ["ALL"]}:
        problems.append(f"the container may gain privileges: {security}")
    if spec.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false: every Service's variables would land in the env")

    image = container["image"]
    tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else None
    if tag != (values["image"]["tag"] or CHART_APP_VERSION) or tag == "latest":
        problems.append(f"image {image}: not tagged image.tag or the chart's appVersion")

    for variable, key in SECRET_VARIABLES.items():
        wanted = {"secretKeyRef": {"name": values["secret"]["name"], "key": values["secret"]["keys"][key]}}
        if values["secret"]["keys"][key] and env.get(variable) != {"name": variable, "valueFrom": wanted}:
            problems.append(f"{variable} is {env.get(variable)}, not read from the Secret: {wanted}")
        if not values["secret"]["keys"][key] and variable in env:
            problems.append(f"{variable} is set with no secret.keys.{key}")
    problems += [f"extraEnv {variable['name']} is missing" for variable in values["extraEnv"]
                 if variable not in container.get("env", [])]
    if container.get("args", []) != values["extraArgs"]:
        problems.append(f"args {container.get('args')} are not extraArgs {values['extraArgs']}")
    return problems


def volume_problems(container: dict, volumes: dict, values: dict) -> list[str]:
    """The models and cache volumes: the chart's PVC, an existing claim, or (cache) an emptyDir."""
    problems = []
    mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
    for key, path in (("models", "/models"), ("cache", "/cache")):
        persistence = values["persistence"][key]
        volume = volumes.get(mounts.get(path, {}).get("name"), {})
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if persistence["enabled"]:
            wanted = persistence["existingClaim"] or f"{fullname(values)}-{key}"
            if claim != wanted:
                problems.append(f"{path} is not the claim {wanted}: {volume}")
        elif key == "cache" and volume.get("emptyDir") is None:
            problems.append("/cache is not an emptyDir with persistence.cache disabled")
        elif key == "models" and path in mounts:
            problems.append("/models is mounted with persistence.models disabled")
    if mounts.get("/models", {}).get("readOnly") is False:
        problems.append("/models is writable")
    return problems


def fullname(values: dict) -> str:
    return values["fullnameOverride"] or f"{RELEASE}-balansis"


def chart_problems(objects: list[dict], values: dict) -> list[str]:
    """What the rendered chart gets wrong as a whole, for these (merged) values."""
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    templates = pod_templates(objects)
    for where, role, template in templates:
        problems += [f"{where}: {problem}" for problem in pod_problems(role, template, values)]

    multi_host = values["mode"] == "multiHost"
    workloads = [obj["kind"] for obj in objects if obj["kind"] in ("Deployment", "LeaderWorkerSet")]
    if workloads != ["LeaderWorkerSet" if multi_host else "Deployment"]:
        problems.append(f"workloads {workloads} for mode {values['mode']}")
    service, = by_kind.get("Service", [{}])
    if service.get("spec", {}).get("ports") != [{"name": "http", "port": 8000, "targetPort": "http",
                                                 "protocol": "TCP"}]:
        problems.append(f"the Service's ports are not port 8000 named http: {service.get('spec')}")
    selector = service.get("spec", {}).get("selector", {})
    for where, role, template in templates:
        labels = dict(template["metadata"]["labels"])
        if multi_host:  # the LWS controller labels each pod with its index in the group, 0 the leader's
            labels["leaderworkerset.sigs.k8s.io/worker-index"] = "0" if where.endswith("leader") else "1"
        selected = selector.items() <= labels.items()
        if selected != (role == "server"):
            problems.append(f"the Service {'selects' if selected else 'misses'} {where}")
    for lws in by_kind.get("LeaderWorkerSet", []):
        group = lws["spec"]["leaderWorkerTemplate"]
        if group["size"] != values["multiHost"]["hosts"] or lws["spec"].get("replicas") != values["replicaCount"]:
            problems.append(f"{name_of(lws)}: {lws['spec'].get('replicas')} groups of {group['size']} pods")
        # The LWS controller names its headless Service (the leader's address) after the LWS.
        if lws["metadata"]["name"] == service.get("metadata", {}).get("name"):
            problems.append(f"{name_of(lws)} has the HTTP Service's name")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not all(pdb["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
                   for _, _, t in templates):
            problems.append(f"{name_of(pdb)} misses some pods")
    if values["podDisruptionBudget"]["enabled"] != bool(by_kind.get("PodDisruptionBudget")):
        problems.append("podDisruptionBudget.enabled is not followed")

    claims = {obj["metadata"]["name"] for obj in by_kind.get("PersistentVolumeClaim", [])}
    wanted_claims = {f"{fullname(values)}-{key}" for key, persistence in values["persistence"].items()
                     if persistence["enabled"] and not persistence["existingClaim"]}
    if claims != wanted_claims:
        problems.append(f"PVCs {sorted(claims)}, not {sorted(wanted_claims)}")

    problems += autoscaling_problems(by_kind, values)
    problems += monitoring_problems(by_kind, values, service)
    return problems


def autoscaling_problems(by_kind: dict[str, list[dict]], values: dict) -> list[str]:
    problems = []
    autoscaling = values["autoscaling"]
    kind = autoscaling["kind"] if autoscaling["enabled"] else None
    hpas, scaled_objects = by_kind.get("HorizontalPodAutoscaler", []), by_kind.get("ScaledObject", [])
    if (len(hpas), len(scaled_objects)) != (int(kind == "hpa"), int(kind == "keda")):
        problems.append(f"{len(hpas)} HPAs and {len(scaled_objects)} ScaledObjects for autoscaling {kind}")
    for deployment in by_kind.get("Deployment", []):
        if ("replicas" in deployment["spec"]) == bool(kind):
            problems.append("the Deployment's replicas must be left to the autoscaler, and only to it")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": fullname(values)}
    for hpa in hpas:
        if hpa["spec"]["scaleTargetRef"] != target:
            problems.append(f"the HPA scales {hpa['spec']['scaleTargetRef']}")
        if hpa["spec"]["metrics"] != [{"type": "Pods", "pods": {
                "metric": {"name": WAITING_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(autoscaling["targetRequestsWaiting"])}}}]:
            problems.append(f"the HPA's metrics are not {WAITING_METRIC} per pod: {hpa['spec']['metrics']}")
    for scaled in scaled_objects:
        if scaled["spec"]["scaleTargetRef"]["name"] != fullname(values):
            problems.append(f"the ScaledObject scales {scaled['spec']['scaleTargetRef']}")
        trigger, = scaled["spec"]["triggers"]
        wanted = {"serverAddress": autoscaling["keda"]["serverAddress"],
                  "threshold": str(autoscaling["targetRequestsWaiting"]),
                  "query": f'sum({WAITING_METRIC}{{namespace="{NAMESPACE}",service="{fullname(values)}"}})'}
        if trigger["type"] != "prometheus" or trigger["metadata"] != wanted:
            problems.append(f"the KEDA trigger is not {wanted}: {trigger}")
    return problems


def monitoring_problems(by_kind: dict[str, list[dict]], values: dict, service: dict) -> list[str]:
    problems = []
    monitoring = values["monitoring"]
    for kind, key in (("ServiceMonitor", "serviceMonitor"), ("PrometheusRule", "prometheusRule")):
        if monitoring[key]["enabled"] != bool(by_kind.get(kind)):
            problems.append(f"monitoring.{key}.enabled is not followed")
    for monitor in by_kind.get("ServiceMonitor", []):
        if not monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items():
            problems.append("the ServiceMonitor does not select the Service")
        if [(e.get("port"), e.get("path")) for e in monitor["spec"]["endpoints"]] != [("http", "/metrics")]:
            problems.append(f"the ServiceMonitor does not scrape /metrics on port http: {monitor['spec']}")
    for rule in by_kind.get("PrometheusRule", []):
        if rule["spec"]["groups"] != source_rule_groups():
            problems.append("the PrometheusRule's groups are not those of deploy/prometheus/rules")
    dashboards = [obj for obj in by_kind.get("ConfigMap", []) if obj["metadata"]["labels"].get("grafana_dashboard")]
    if monitoring["dashboard"]["enabled"] != bool(dashboards):
        problems.append("monitoring.dashboard.enabled is not followed")
    for dashboard in dashboards:
        if dashboard["metadata"]["labels"]["grafana_dashboard"] != "1":
            problems.append("the dashboard ConfigMap is not labelled grafana_dashboard: \"1\"")
        if {name: json.loads(text) for name, text in dashboard["data"].items()} != source_dashboards():
            problems.append("the dashboard ConfigMap does not hold deploy/grafana/dashboards")
    return problems


def source_rule_groups() -> list[dict]:
    return [group for path in sorted((CHART.parent.parent / "prometheus" / "rules").glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"]]


def source_dashboards() -> dict[str, Any]:
    return {path.name: json.loads(path.read_text())
            for path in sorted((CHART.parent.parent / "grafana" / "dashboards").glob("*.json"))}


# -- tests ---------------------------------------------------------------------------------------------

def test_every_mode_has_a_values_file():
    modes = {merged_values(load_values(path))["mode"] for path in VALUES_FILES}
    assert modes == {"single", "multiGpu", "multiHost"}
    assert {path.name for path in VALUES_FILES} >= {
        "default-values.yaml", "multigpu-values.yaml", "multihost-values.yaml", "autoscaling-values.yaml",
        "keda-values.yaml", "monitoring-values.yaml"}


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda path: path.name if path else "no values")
def test_helm_lint_finds_no_error(values_file):
    report = helm_python.lint(CHART, load_values(values_file) if values_file else None, strict=True,
                              namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended").
    assert [message for message in report["messages"] if message["severity"] > 1] == []


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda path: path.name)
def test_rendered_objects_are_valid(values_file):
    objects = rendered_objects(values_file)
    assert objects
    assert schema_problems(objects) == []


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda path: path.name)
def test_rendered_chart_keeps_its_invariants(values_file):
    values = merged_values(load_values(values_file))
    assert chart_problems(rendered_objects(values_file), values) == []


def test_values_schema_declares_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def undeclared(values: dict, schema: dict, prefix: str) -> list[str]:
        found = []
        for key, value in values.items():
            declared = schema.get("properties", {}).get(key)
            if declared is None:
                found.append(prefix + key)
            elif isinstance(value, dict) and "properties" in declared:
                found += undeclared(value, declared, f"{prefix}{key}.")
        return found

    assert schema["additionalProperties"] is False
    assert undeclared(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "") == []


@pytest.mark.parametrize("bad", [
    {"mode": "bogus"},
    {"gpus": -1},
    {"bogus": 1},
    {"mode": "single", "gpus": 2},
    {"mode": "multiGpu", "gpus": 1},
    {"image": {"tag": "latest"}},
    {"mode": "multiHost", "autoscaling": {"enabled": True}},
    {"autoscaling": {"kind": "vpa"}},
    {"shutdown": {"drainTimeout": "30s"}},
    {"model": {"paths": ["/models/a model.gguf"]}},
], ids=json.dumps)
def test_values_schema_refuses_bad_values(bad):
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm_python.HelmValuesError):
        render(bad)


def test_secret_keys_need_the_secret_name():
    with pytest.raises(helm_python.HelmRenderError, match="secret.name"):
        render({"secret": {"keys": {"apiKey": "api-key"}}})


def test_files_link_to_the_shared_rules_and_dashboards():
    """One copy of the rules and dashboards: the chart's files/ are relative links into deploy/, which Helm
    follows (a packaged chart holds the files themselves)."""
    assert os.readlink(CHART / "files" / "prometheus") == "../../../prometheus/rules"
    assert os.readlink(CHART / "files" / "dashboards") == "../../../grafana/dashboards"
    with helm_python.Chart.load(CHART) as chart:
        names = {file["name"] for file in chart.files}
    assert {f"files/prometheus/{path.name}" for path in (CHART / "files" / "prometheus").glob("*.yml")} <= names
    assert {f"files/dashboards/{name}" for name in source_dashboards()} <= names
    assert source_rule_groups() and source_dashboards()


@pytest.mark.parametrize(("path", "old", "new", "expected"), [
    # Kubernetes' schema: a string where an integer goes, and an unknown field.
    ("templates/deployment.yaml", "replicas: {{ .Values.replicaCount }}", 'replicas: "two"',
     "Deployment/demo-balansis: spec.replicas: 'two' is not of type 'integer'"),
    ("templates/_helpers.tpl", "imagePullPolicy: {{ $values.image.pullPolicy }}",
     "imagePullPolicy: {{ $values.image.pullPolicy }}\n      restartPolicyy: Always",
     "Additional properties are not allowed ('restartPolicyy' was unexpected)"),
    # Ours, for a custom resource.
    ("templates/servicemonitor.yaml", "- port: http", "- portName: http", "ServiceMonitor/demo-balansis"),
    # The invariants.
    ("templates/_helpers.tpl", "path: /ready", "path: /health", "readinessProbe is not httpGet /ready"),
    ("templates/_helpers.tpl", "effect: NoSchedule", "effect: NoExecute", "no toleration of nvidia.com/gpu"),
    ("templates/_helpers.tpl", "(ceil .Values.shutdown.drainTimeout) 15", "(ceil .Values.shutdown.drainTimeout) 5",
     "terminationGracePeriodSeconds 45 < 55"),
    ("templates/_helpers.tpl", "key: {{ $key }}", "key: {{ $variable }}",
     "not read from the Secret: {'secretKeyRef': {'name': 'balansis-credentials', 'key': 'api-key'}}"),
    ("templates/service.yaml", 'leaderworkerset.sigs.k8s.io/worker-index: "0"', "",
     "the Service selects LeaderWorkerSet/demo-balansis-lws worker"),
])
def test_a_broken_copy_is_caught(tmp_path, path, old, new, expected):
    broken = tmp_path / "balansis"
    shutil.copytree(CHART, broken)  # the links' targets are copied as files
    source = (broken / path).read_text()
    assert old in source
    (broken / path).write_text(source.replace(old, new))
    problems = []
    for values in map(load_values, (CHART / "ci" / f"{name}-values.yaml" for name in ("monitoring", "multigpu",
                                                                                       "multihost"))):
        objects = render(values, chart=broken)
        problems += schema_problems(objects) + chart_problems(objects, merged_values(values, chart=broken))
    assert any(expected in problem for problem in problems), problems
