"""The image builds' pure parts: the Debian mirror read from apt's sources, the cache key."""

from __future__ import annotations

from pathlib import Path

from tests.harness import images

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: trixie trixie-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/debian
Suites: trixie
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: trixie-security
Components: main
"""


def test_mirrors_keep_the_hosts_archive_renamed_to_the_base_suite(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    legacy = tmp_path / "extra.list"
    legacy.write_text("# old style\ndeb http://other.example/debian trixie main\n")
    disabled = tmp_path / "nodesource.sources.disabled"
    disabled.write_text("Types: deb\nURIs: http://nodesource.example\nSuites: nodistro\n")
    got = images.debian_mirrors([sources, legacy, disabled, tmp_path / "missing.list"])
    suite = images.BASE_SUITE
    assert got == [
        f"deb http://mirror.example/debian {suite} main contrib",
        f"deb http://mirror.example/debian {suite}-updates main contrib",
        f"deb http://mirror.example/debian-security {suite}-security main",
        f"deb http://other.example/debian {suite} main",
    ]


def test_cache_key_follows_content_not_bytecode(tmp_path: Path) -> None:
    src = tmp_path / "pkg"
    (src / "__pycache__").mkdir(parents=True)
    (src / "mod.py").write_text("x = 1\n")
    key = images._hash("recipe", src)
    (src / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert images._hash("recipe", src) == key
    (src / "mod.py").write_text("x = 2\n")
    assert images._hash("recipe", src) != key
    assert images._hash("other", src) != images._hash("recipe", src)
