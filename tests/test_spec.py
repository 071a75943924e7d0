"""The variant spec grammar: canonical strings, defaults, and one-line errors."""

from __future__ import annotations

import sys

import pytest

import fnabench
from fnabench._extras import MissingExtraError, require
from fnabench.variants import SpecError


def test_canonical_fills_defaults_and_sorts_keys():
    a = fnabench.parse_variant("fna:layers=-11:,m=32")
    b = fnabench.parse_variant(" fna : m=32 , layers=-11: ")
    assert a.canonical == b.canonical
    assert a.canonical.startswith("fna:exclude=none,features=q,guarantee=prefix,iters=6,landmarks=fps,layers=-11:,m=32")
    keys = [kv.split("=")[0] for kv in a.core.canonical.split(":", 1)[1].split(",")]
    assert keys == sorted(keys)
    assert fnabench.parse_variant(a.canonical).canonical == a.canonical  # canonical is a fixed point


def test_core_first_and_mask_alone_means_exact_core():
    v = fnabench.parse_variant("mask:tokens=all+fna:m=16")
    assert v.canonical.startswith("fna:") and "+mask:" in v.canonical
    assert fnabench.parse_variant("mask").core.name == "exact"
    assert fnabench.parse_variant("exact").is_exact
    assert not fnabench.parse_variant("exact+mask").is_exact


def test_short_form_shows_only_non_defaults_and_m():
    assert fnabench.parse_variant("fna:m=64,layers=-6:").short == "fna:layers=-6:,m=64"
    assert fnabench.parse_variant("exact").short == "exact"
    assert fnabench.parse_variant("fna:m=16+mask").short == "fna:m=16+mask"


def test_values_are_normalised():
    v = fnabench.parse_variant("fna:resample=yes,rcond=0.01,layers=3,guarantee=0:5")
    assert "resample=true" in v.canonical and "rcond=0.01" in v.canonical
    assert "layers=3," in v.canonical and "guarantee=0:5" in v.canonical
    assert list(v.core["layers"].resolve(12)) == [3]
    assert list(fnabench.parse_variant("fna:layers=-11:").core["layers"].resolve(24)) == list(range(13, 24))
    assert list(fnabench.parse_variant("fna:layers=-1").core["layers"].resolve(12)) == [11]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("fnaa:m=3", "accepted: exact, fastv, fna, mask, null, nystrom, tome, visionzip"),
        ("fna:mm=3", "accepted: cache, exclude, fallback, features"),
        ("fna:m=0", "accepted: an integer >= 1"),
        ("fna:m", "needs a value"),
        ("fna:landmarks=kmeans", "accepted: fps | random | norm | stride"),
        ("fna:layers=a:b", "accepted: a slice"),
        ("fna:m=4,m=5", "given twice"),
        ("fna+nystrom", "at most one of"),
        ("mask+mask", "mask twice"),
        ("nystrom+mask", "action=values"),
        ("mask:artifact_ratio=30", "must exceed"),
        ("", "empty variant spec"),
    ],
)
def test_bad_specs_give_one_line_errors(spec, fragment):
    with pytest.raises(SpecError) as err:
        fnabench.parse_variant(spec)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError) as err:
        require("timm")
    assert "pip install 'fnabench[clip]'" in str(err.value)
    assert "\n" not in str(err.value)


def test_import_needs_only_torch():
    """`import fnabench` must work with no host library installed (they load lazily)."""
    import subprocess

    code = ("import sys\n"
            "for m in ('timm', 'open_clip', 'transformers', 'torchvision', 'matplotlib', 'skimage'):\n"
            "    sys.modules[m] = None\n"
            "import fnabench\n"
            "v = fnabench.parse_variant('fna:m=8')\n"
            "print(v.short)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fna:m=8"
