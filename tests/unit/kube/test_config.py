"""kubeconfig loading as kubectl does it: merging, contexts, data vs files, in-cluster."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlasd.kube.config import load_config, load_in_cluster, load_kubeconfig
from atlasd.kube.errors import ConfigError


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _write(path: Path, doc: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _cfg(
    *,
    clusters: dict[str, dict[str, Any]] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
    contexts: dict[str, dict[str, Any]] | None = None,
    current: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": c} for n, c in (clusters or {}).items()],
        "users": [{"name": n, "user": u} for n, u in (users or {}).items()],
        "contexts": [{"name": n, "context": c} for n, c in (contexts or {}).items()],
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def test_first_file_to_set_a_name_wins_and_current_context_from_first_setter(
    tmp_path: Path,
) -> None:
    a = _write(
        tmp_path / "a" / "config",
        _cfg(
            clusters={"c": {"server": "https://a.example:6443/"}},
            users={"u": {"token": "token-a"}},
            contexts={"ctx-a": {"cluster": "c", "user": "u"}},
        ),
    )
    b = _write(
        tmp_path / "b" / "config",
        _cfg(
            clusters={"c": {"server": "https://b.example:6443"}, "d": {"server": "https://d:1"}},
            users={"u": {"token": "token-b"}},
            contexts={
                "ctx-a": {"cluster": "d", "user": "u"},
                "ctx-b": {"cluster": "d", "user": "u", "namespace": "monitoring"},
            },
            current="ctx-a",
        ),
    )
    cfg = load_kubeconfig([a, b])
    assert cfg.context == "ctx-a"
    assert cfg.server == "https://a.example:6443"  # cluster c from a; trailing / dropped
    assert cfg.token == "token-a"
    assert cfg.namespace == "default"
    other = load_kubeconfig([a, b], context="ctx-b")
    assert other.server == "https://d:1" and other.namespace == "monitoring"


def test_relative_paths_resolve_against_the_file_that_holds_them(tmp_path: Path) -> None:
    (tmp_path / "one" / "certs").mkdir(parents=True)
    (tmp_path / "one" / "certs" / "ca.pem").write_text("CA-FROM-FILE")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "tok").write_text("tok-from-file\n")
    (tmp_path / "two" / "client.crt").write_text("CERT")
    (tmp_path / "two" / "client.key").write_text("KEY")
    one = _write(
        tmp_path / "one" / "config",
        _cfg(
            clusters={"c": {"server": "https://x", "certificate-authority": "certs/ca.pem"}},
            contexts={"x": {"cluster": "c", "user": "u"}},
            current="x",
        ),
    )
    two = _write(
        tmp_path / "two" / "config",
        _cfg(
            users={
                "u": {
                    "tokenFile": "tok",
                    "client-certificate": "client.crt",
                    "client-key": "client.key",
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": "./bin/plugin",
                    },
                }
            }
        ),
    )
    cfg = load_kubeconfig([one, two])
    assert cfg.ca_data == b"CA-FROM-FILE"
    assert cfg.token_file == str(tmp_path / "two" / "tok")
    assert cfg.client_cert_data == b"CERT" and cfg.client_key_data == b"KEY"
    assert cfg.exec is not None and cfg.exec.command == str(tmp_path / "two" / "bin" / "plugin")


def test_exec_command_without_separator_is_looked_up_in_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "config",
        _cfg(
            clusters={"c": {"server": "https://x"}},
            users={
                "u": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1beta1",
                        "command": "aws",
                        "args": ["eks", "get-token"],
                        "env": [{"name": "AWS_PROFILE", "value": "p"}],
                        "provideClusterInfo": True,
                    }
                }
            },
            contexts={"x": {"cluster": "c", "user": "u"}},
            current="x",
        ),
    )
    cfg = load_kubeconfig([path])
    assert cfg.exec is not None
    assert cfg.exec.command == "aws"
    assert cfg.exec.args == ("eks", "get-token")
    assert cfg.exec.env == (("AWS_PROFILE", "p"),)
    assert cfg.exec.api_version == "client.authentication.k8s.io/v1beta1"
    assert cfg.exec.provide_cluster_info


def test_data_beats_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("FILE")
    path = _write(
        tmp_path / "config",
        _cfg(
            clusters={
                "c": {
                    "server": "https://x",
                    "certificate-authority": "ca.pem",
                    "certificate-authority-data": _b64("DATA"),
                    "insecure-skip-tls-verify": True,
                    "tls-server-name": "kubernetes",
                }
            },
            users={"u": {"client-certificate-data": _b64("C"), "client-key-data": _b64("K")}},
            contexts={"x": {"cluster": "c", "user": "u"}},
            current="x",
        ),
    )
    cfg = load_kubeconfig([path])
    assert cfg.ca_data == b"DATA"
    assert cfg.client_cert_data == b"C" and cfg.client_key_data == b"K"
    assert cfg.insecure_skip_tls_verify and cfg.tls_server_name == "kubernetes"


def test_repr_hides_token_and_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "config",
        _cfg(
            clusters={"c": {"server": "https://x"}},
            users={"u": {"token": "sekrit-token", "client-key-data": _b64("PRIVATE-KEY")}},
            contexts={"x": {"cluster": "c", "user": "u"}},
            current="x",
        ),
    )
    text = repr(load_kubeconfig([path]))
    assert "sekrit-token" not in text and "PRIVATE-KEY" not in text


@pytest.mark.parametrize(
    ("doc", "context", "fragment"),
    [
        (_cfg(clusters={"c": {"server": "https://x"}}), None, "no current-context"),
        (_cfg(clusters={"c": {"server": "https://x"}}, current="nope"), None, "'nope' not found"),
        (_cfg(contexts={"x": {"cluster": "c"}}, current="x"), None, "cluster 'c' not found"),
        (
            _cfg(
                clusters={"c": {"server": "https://x"}},
                contexts={"x": {"cluster": "c", "user": "ghost"}},
                current="x",
            ),
            None,
            "user 'ghost' not found",
        ),
        (
            _cfg(clusters={"c": {}}, contexts={"x": {"cluster": "c"}}, current="x"),
            None,
            "no server",
        ),
        (
            _cfg(
                clusters={"c": {"server": "https://x"}},
                users={
                    "u": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1alpha1",
                            "command": "x",
                        }
                    }
                },
                contexts={"x": {"cluster": "c", "user": "u"}},
                current="x",
            ),
            None,
            "not supported",
        ),
        (
            _cfg(
                clusters={"c": {"server": "https://x", "certificate-authority": "/no/such/ca"}},
                contexts={"x": {"cluster": "c"}},
                current="x",
            ),
            None,
            "cannot read certificate-authority",
        ),
    ],
)
def test_configuration_errors_say_what_is_wrong(
    tmp_path: Path, doc: dict[str, Any], context: str | None, fragment: str
) -> None:
    path = _write(tmp_path / "config", doc)
    with pytest.raises(ConfigError, match=fragment):
        load_kubeconfig([path], context=context)


def test_a_kubeconfig_that_is_not_yaml_says_where_and_never_echoes_it(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("users:\n- name: u\n  user: {token: s3cret-token\n")
    with pytest.raises(ConfigError) as err:
        load_kubeconfig([str(path)], context=None)
    assert str(err.value) == f"kubeconfig {path} is not valid YAML (line 4, column 1)"
    with pytest.raises(ConfigError) as err:
        load_kubeconfig([str(tmp_path)], context=None)
    assert str(err.value) == f"cannot read kubeconfig {tmp_path}: Is a directory"


def test_kubeconfig_env_merges_and_ignores_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _write(tmp_path / "a", _cfg(clusters={"c": {"server": "https://a"}}))
    b = _write(
        tmp_path / "b",
        _cfg(
            clusters={"c": {"server": "https://b"}},
            contexts={"x": {"cluster": "c"}},
            current="x",
        ),
    )
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{a}:{b}")
    assert load_config().server == "https://a"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="none of the KUBECONFIG files exist"):
        load_config()
    # An explicit --kubeconfig beats $KUBECONFIG and must exist.
    monkeypatch.setenv("KUBECONFIG", a)
    assert load_config(b).server == "https://b"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing"))


def test_in_cluster(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("CA")
    (tmp_path / "namespace").write_text("monitoring\n")
    cfg = load_in_cluster(
        sa_dir=tmp_path,
        environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
    )
    assert cfg.server == "https://[fd00::1]:443"
    assert cfg.namespace == "monitoring"
    assert cfg.ca_data == b"CA"
    assert cfg.token_file == str(tmp_path / "token") and cfg.token is None
    assert cfg.source == "in-cluster"
    v4 = load_in_cluster(sa_dir=tmp_path, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert v4.server == "https://10.0.0.1:443"
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        load_in_cluster(sa_dir=tmp_path, environ={})


def test_exec_interactive_mode_and_proxy_url(tmp_path: Path) -> None:
    def doc(mode: str) -> dict[str, Any]:
        return _cfg(
            clusters={"c": {"server": "https://x", "proxy-url": "http://127.0.0.1:3128"}},
            users={
                "u": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": "p",
                        "interactiveMode": mode,
                    }
                }
            },
            contexts={"x": {"cluster": "c", "user": "u"}},
            current="x",
        )

    cfg = load_kubeconfig([_write(tmp_path / "ok", doc("Never"))])
    assert cfg.proxy_url == "http://127.0.0.1:3128"
    assert cfg.exec is not None and cfg.exec.interactive_mode == "Never"
    with pytest.raises(ConfigError, match="interactiveMode 'Sometimes'"):
        load_kubeconfig([_write(tmp_path / "bad", doc("Sometimes"))])
