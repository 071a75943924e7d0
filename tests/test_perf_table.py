"""The README's performance table is the rendering of the committed benchmark CSVs, never hand-typed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _perf_table():
    spec = importlib.util.spec_from_file_location("perf_table", ROOT / "benchmarks" / "perf_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_performance_table_is_generated_from_the_committed_csvs():
    perf = _perf_table()
    readme = (ROOT / "README.md").read_text()
    table = perf.render()
    assert perf.replace_block(readme, table) == readme, "run: python benchmarks/perf_table.py --write README.md"
    assert "| idle | 4096 | `fna:m=64` |" in table and "Amdahl bound" in table
    assert perf.replace_block(f"a\n{perf.BEGIN}\nold\n{perf.END}\nb", "new") == f"a\n{perf.BEGIN}\nnew\n{perf.END}\nb"
