"""contrib/deploy/kubernetes/: every manifest parses, holds what the README
and docs/deployment.md say (N gateway replicas with probes on /healthz and
/readyz, one Redis, the config as a ConfigMap, the keys file as a Secret
mounted where keys_file points), and the config it ships builds a gateway."""

import tomllib
from pathlib import Path, PurePosixPath

import pytest

from comox import build_gateway

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).parent.parent / "contrib" / "deploy" / "kubernetes"


def documents():
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: an empty or non-mapping document"
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind"
            docs.append((path.name, doc))
    return docs


def find(kind, name):
    matches = [doc for _, doc in documents() if doc["kind"] == kind and doc.get("metadata", {}).get("name") == name]
    assert len(matches) == 1, f"one {kind} {name}"
    return matches[0]


def container(deployment):
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_every_manifest_parses_with_the_kinds_expected():
    kinds = sorted((doc["kind"], doc.get("metadata", {}).get("name", "")) for _, doc in documents())
    assert kinds == [("ConfigMap", "comox-config"), ("Deployment", "comox"), ("Deployment", "comox-redis"),
                     ("Kustomization", ""), ("PodDisruptionBudget", "comox"), ("Secret", "comox-keys"),
                     ("Service", "comox"), ("Service", "comox-redis")]
    (kustomization,) = [doc for _, doc in documents() if doc["kind"] == "Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_gateway_replicas_probe_healthz_and_readyz():
    gateway = find("Deployment", "comox")
    assert gateway["spec"]["replicas"] >= 2
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateway["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find("Service", "comox")["spec"]["selector"].items() <= labels.items()
    main = container(gateway)
    port = {p["name"]: p["containerPort"] for p in main["ports"]}["http"]
    assert main["args"][main["args"].index("--port") + 1] == str(port)
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["resources"]["requests"]["cpu"] and main["resources"]["requests"]["memory"]
    assert main["resources"]["limits"]["memory"]
    redis = find("Deployment", "comox-redis")
    assert redis["spec"]["replicas"] == 1 and container(redis)["resources"]["limits"]["memory"]


def mounts(deployment):
    """mount path → (volume kind, the ConfigMap or Secret it shows)."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = {}
    for mount in container(deployment)["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert "subPath" not in mount, "a subPath mount never sees a ConfigMap or Secret update"
        if "configMap" in volume:
            found[mount["mountPath"]] = ("configMap", volume["configMap"]["name"])
        else:
            found[mount["mountPath"]] = ("secret", volume["secret"]["secretName"])
    return found


def shipped_config():
    return tomllib.loads(find("ConfigMap", "comox-config")["data"]["comox.toml"])


def test_config_is_a_configmap_and_keys_a_mounted_secret():
    gateway = find("Deployment", "comox")
    args = container(gateway)["args"]
    config_path = PurePosixPath(args[args.index("-c") + 1])
    volumes = mounts(gateway)
    assert volumes[str(config_path.parent)] == ("configMap", "comox-config")
    assert config_path.name in find("ConfigMap", "comox-config")["data"]

    config = shipped_config()
    keys_file = PurePosixPath(config["keys_file"])
    assert str(keys_file) == "/etc/comox/keys/keys.toml"
    assert volumes[str(keys_file.parent)] == ("secret", "comox-keys")
    secret = find("Secret", "comox-keys")
    assert keys_file.name in secret["stringData"]
    assert "keys" not in tomllib.loads(secret["stringData"][keys_file.name])  # a placeholder: no key ships


def test_config_shares_state_through_the_redis_service():
    redis_url = shipped_config()["state"]["redis_url"]
    service = find("Service", "comox-redis")
    (port,) = service["spec"]["ports"]
    assert redis_url == f"redis://{service['metadata']['name']}:{port['port']}/0"
    redis = find("Deployment", "comox-redis")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["containerPort"] for p in container(redis)["ports"]}[port["targetPort"]] == 6379


def test_the_shipped_config_builds_a_gateway(tmp_path):
    from comox_redis.state import RedisState

    keys = tmp_path / "keys.toml"
    keys.write_text(find("Secret", "comox-keys")["stringData"]["keys.toml"])
    config = tmp_path / "comox.toml"
    text = find("ConfigMap", "comox-config")["data"]["comox.toml"]
    config.write_text(text.replace("/etc/comox/keys/keys.toml", str(keys)))
    gateway = build_gateway(config)  # every key validated by the core and the plugins that own it
    assert isinstance(gateway.shared_state, RedisState)
    assert sorted(gateway.groups) == ["chat"]
