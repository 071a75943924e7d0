"""The tiny-model registry behind the family contract: one :class:`Family` per model family a host library
ships, with how to build a tiny random-initialised instance and what fnabench promises for it.

Each host's families are data in ``families/<host>.py`` (``FAMILIES``, one entry per line); adding a family is
one line there. ``tests/test_family_contract.py`` builds every family and holds it to its declaration: a
family that passes runs exact, FNA and undo as promised (a decoder also never leaks the future and generates
exact's tokens with either cache); a refused family is refused in one line containing its ``refused`` text.
``fnabench list hosts`` and ``docs/support.md`` print the table these declarations make.
"""

from __future__ import annotations

from fnabench.patching.families import open_clip, timm, transformers
from fnabench.patching.families.family import ROLES, ROUTES, Family

__all__ = ["ROLES", "ROUTES", "Family", "all_families", "support_table"]


def all_families() -> list[Family]:
    """Every declared family of every host, in host order (declarations only: nothing is built)."""
    return [*transformers.FAMILIES, *timm.FAMILIES, *open_clip.FAMILIES]


def support_table(families: list[Family] | None = None) -> str:
    """The support table (markdown): family → role, route, what the contract checks or why it is refused."""
    families = all_families() if families is None else families
    checks = {"decoder": "no leak, m ≥ N exact, undo, generate (full and landmark cache)",
              "encoder": "m ≥ N exact, live, undo",
              "causal encoder": "no leak, m ≥ N exact, undo"}
    rows = ["| host | family | role | route | checked / refused because | note |",
            "|:--|:--|:--|:--|:--|:--|"]
    for f in families:
        what = f"refused: {f.refused}" if f.refused else checks[f.role]
        rows.append(f"| {f.host} | {f.name} | {f.role} | {f.route} | {what} | {f.note} |")
    passed = sum(f.refused is None for f in families)
    summary = (f"{len(families)} families: {passed} pass the contract, {len(families) - passed} are refused by "
               "name (`tests/test_family_contract.py` holds every row).")
    return summary + "\n\n" + "\n".join(rows) + "\n"
