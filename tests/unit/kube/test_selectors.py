"""atlasd.kube.selectors: the API server's selector grammar, atlasd's strict ``k=v`` one,
and that the two read a ``k=v`` selector alike (Hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasd.kube.selectors import (
    matches,
    object_matches,
    pairs_match,
    parse_selector,
    parse_terms,
)

LABELS = {"app": "envoy", "release": "atlas", "goatlas.io/cluster": "true"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (None, True),
        ("", True),
        (",", True),
        ("app=envoy", True),
        ("app==envoy", True),
        (" app = envoy ,\trelease=atlas", True),
        ("app=other", False),
        ("app!=other", True),
        ("app!=envoy", False),
        ("missing!=x", True),
        ("goatlas.io/cluster", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app=envoy,release=other", False),
    ],
)
def test_matches_as_the_api_server(selector: str | None, expected: bool) -> None:
    assert matches(LABELS, selector) is expected
    assert object_matches({"metadata": {"labels": LABELS}}, selector) is expected


def test_object_without_labels_matches_only_what_needs_none() -> None:
    for obj in ({}, {"metadata": None}, {"metadata": {"labels": None}}):
        assert object_matches(obj, "!app")
        assert not object_matches(obj, "app=envoy")


def test_parse_terms() -> None:
    assert parse_terms("a=1, b!=2,c,!d,e==5") == (
        ("=", "a", "1"),
        ("!=", "b", "2"),
        ("exists", "c", ""),
        ("!exists", "d", ""),
        ("=", "e", "5"),
    )


@pytest.mark.parametrize(
    "text",
    [
        "\tapp=envoy",  # a tab is whitespace around an entry, as the docstring says
        "app=envoy\t,release=atlas",
        "app=envoy,\n release=atlas\n",
    ],
)
def test_strict_selector_tolerates_any_whitespace_around_an_entry(text: str) -> None:
    expected = (("app", "envoy"), ("release", "atlas"))[: text.count("=")]
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must not be empty"),
        (" \t", "must not be empty"),
        ("app", "not of the form key=value"),
        ("app=envoy,", "not of the form key=value"),
        ("app = envoy", "not a valid label key"),
        ("app==envoy", "not a valid, non-empty label value"),
        ("app=", "not a valid, non-empty label value"),
        ("Bad_Prefix/app=x", "invalid prefix"),
        ("app=x,app=y", "appears twice"),
        ("a" * 64 + "=x", "not a valid label key"),
        ("app=" + "v" * 64, "not a valid, non-empty label value"),
    ],
)
def test_strict_selector_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_selector(text)


_name = st.from_regex(r"[a-z0-9]([-a-z0-9_.]{0,20}[a-z0-9])?", fullmatch=True)
_prefix = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,3}", fullmatch=True)
_key = st.one_of(_name, st.tuples(_prefix, _name).map("/".join))
_space = st.sampled_from(["", " ", "\t", "\n", " \t "])


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.dictionaries(_key, _name, min_size=1, max_size=4).map(lambda d: tuple(d.items())),
    pads=st.lists(st.tuples(_space, _space), min_size=4, max_size=4),
    lbls=st.dictionaries(_key, _name, max_size=4),
    keep=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_both_grammars_read_a_pair_selector_alike(
    pairs: tuple[tuple[str, str], ...],
    pads: list[tuple[str, str]],
    lbls: dict[str, Any],
    keep: list[bool],
) -> None:
    text = ",".join(f"{a}{k}={v}{b}" for (k, v), (a, b) in zip(pairs, pads, strict=False))
    assert parse_selector(text) == pairs
    # Labels that carry some of the pairs (and maybe other labels): the two agree.
    labels = {**lbls, **{k: v for (k, v), kept in zip(pairs, keep, strict=False) if kept}}
    assert matches(labels, text) is pairs_match(labels, pairs)
    if all(keep[: len(pairs)]):
        assert pairs_match(labels, pairs)
