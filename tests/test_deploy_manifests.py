"""deploy/: the kustomization renders offline, every manifest validates against the Kubernetes
schemas (kubernetes-validate, strict) of the last three Kubernetes versions it ships, the DaemonSet
asks for no more than the capabilities and host mounts docs/deploy.md names, and the ConfigMap's
bundles are what the runtime's folder mode reads. No cluster, no network, no root.

Rendering: a small renderer of the kustomize features deploy/ uses (resources, namespace, labels,
configMapGenerator, images); where `kubectl kustomize` is installed, its output must be the same."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DEPLOY = ROOT / "deploy"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
CAPABILITIES = ["BPF", "PERFMON"]
HOST_MOUNTS = {"/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"}


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize FOLDER` prints, as documents, for the features deploy/ uses."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}
    assert set(k) <= known, f"the renderer does not know {set(k) - known}: teach it, or compare with kubectl"
    docs = [d for r in k["resources"] for d in yaml.safe_load_all((folder / r).read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        assert gen.get("options", {}).get("disableNameSuffixHash"), "hashed names are not rendered here"
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}}
        for entry in gen.get("files", []):
            key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
            raw = (folder / path).read_bytes()
            try:
                cm.setdefault("data", {})[key] = raw.decode("utf-8")
            except UnicodeDecodeError:
                cm.setdefault("binaryData", {})[key] = base64.b64encode(raw).decode()
        docs.append(cm)
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = k["namespace"]
        for subject in doc.get("subjects", []):
            if subject.get("kind") == "ServiceAccount" and "namespace" in k:
                subject["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            assert not group.get("includeSelectors") and not group.get("includeTemplates")
            meta["labels"] = {**meta.get("labels", {}), **group["pairs"]}
        for container in _containers(doc):
            for image in k.get("images", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _containers(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    return by_name(render(DEPLOY))


def test_renderer_agrees_with_kubectl_kustomize(rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:        # the renderer above is then what renders it; it is tested below
        return
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = by_name([d for d in yaml.safe_load_all(out.stdout) if d])
    assert theirs.keys() == rendered.keys()
    for key, doc in rendered.items():
        ours = doc
        if key[0] == "ConfigMap":      # kubectl folds base64 into lines
            ours = json.loads(json.dumps(doc))
            theirs[key]["binaryData"] = {k: v.replace("\n", "") for k, v in theirs[key].get("binaryData", {}).items()}
        assert theirs[key] == ours, key


def last_three_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions, major_minor
    versions = sorted({major_minor(v) for v in all_versions()}, key=lambda v: tuple(int(x) for x in v.split(".")))
    return versions[-3:]


@pytest.mark.parametrize("version", last_three_versions())
def test_every_manifest_validates_strictly(rendered, version):
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate
    not_validated = []
    for (kind, name), doc in rendered.items():
        try:
            validate(doc, version, strict=True)
        except SchemaNotFoundError:
            not_validated.append(kind)
        except ValidationError as exc:
            pytest.fail(f"{kind}/{name} against Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
    # the Prometheus Operator's CRD has no schema in kubernetes-validate: checked by hand below
    assert not_validated == ["ServiceMonitor"]


def test_service_monitor_finds_the_service(rendered):
    monitor = rendered["ServiceMonitor", "probec"]
    service = rendered["Service", "probec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    pod_labels = rendered["DaemonSet", "probec"]["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_daemonset_asks_only_for_what_probec_needs(rendered):
    ds = rendered["DaemonSet", "probec"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert pod["serviceAccountName"] == "probec"
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert set(host.values()) == HOST_MOUNTS
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name, path in host.items():
        assert mounts[name]["readOnly"] is True and mounts[name]["mountPath"] == path
    limits = container["resources"]["limits"]
    assert set(limits) == {"cpu", "memory"} and set(container["resources"]["requests"]) == {"cpu", "memory"}
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/metrics" and probe["port"] in ("metrics", port)
    assert f"{port}" in container["args"] and "0.0.0.0" in container["args"]


def test_rbac_reads_pods_from_the_kubelet_only(rendered):
    role = rendered["ClusterRole", "probec-kubelet-pods"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    binding = rendered["ClusterRoleBinding", "probec-kubelet-pods"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "probec", "namespace": "probec"}]


def test_configmap_bundles_are_what_the_runtime_runs(rendered, tmp_path):
    """The ConfigMap's files, laid out as the kubelet mounts them, are a folder `probec run` reads:
    every manifest loads and names an object that is there."""
    from probec.runtime.collector import discover
    from probec.runtime.manifest import load_bundle
    cm = rendered["ConfigMap", "probec-bundles"]
    for key, text in cm.get("data", {}).items():
        (tmp_path / key).write_text(text)
    for key, data in cm.get("binaryData", {}).items():
        (tmp_path / key).write_bytes(base64.b64decode(data))
    sources = discover([str(tmp_path)])
    assert [s.name for s in sources] == ["node_tcp.manifest.json"]
    bundle = load_bundle(sources[0])
    assert bundle.backend == "core" and (tmp_path / bundle.manifest.files["object"]).read_bytes()[:4] == b"\x7fELF"
    args = rendered["DaemonSet", "probec"]["spec"]["template"]["spec"]["containers"][0]["args"]
    mount = {m["name"]: m["mountPath"] for m in rendered["DaemonSet", "probec"]["spec"]["template"]["spec"]
             ["containers"][0]["volumeMounts"]}["bundles"]
    assert args[:2] == ["run", mount]


def test_deploy_bundles_are_built_from_deploy_specs(tmp_path):
    """deploy/bundles/ is deploy/specs/ built (deploy/build-bundles.sh): the manifests agree."""
    for spec in sorted((DEPLOY / "specs").glob("*.yaml")):
        out = subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", "core", "-o",
                              str(tmp_path / spec.stem), "--no-compile"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        built = json.loads((tmp_path / spec.stem / "manifest.json").read_text())
        shipped = json.loads((DEPLOY / "bundles" / f"{built['name']}.manifest.json").read_text())
        for manifest in (built, shipped):     # --no-compile leaves the object out
            manifest.get("files", {}).pop("object", None)
            manifest.get("core", {}).pop("object", None)
        assert built == shipped, f"deploy/bundles/ is stale: run deploy/build-bundles.sh ({spec})"


def test_image_build_script_stages_the_runtime_only():
    """The fast path of deploy/image/build.sh: what goes into the image imports without the compiler.
    (The image itself: `make image`, minutes and the Debian mirror; docs/deploy.md.)"""
    out = subprocess.run(["bash", str(DEPLOY / "image" / "build.sh"), "--check"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "runtime only" in out.stdout
