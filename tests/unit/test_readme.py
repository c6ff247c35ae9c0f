"""The README's feature table is what the code registers (regenerate with
``python tools/feature_table.py --write``)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_feature_table_is_current():
    spec = importlib.util.spec_from_file_location("feature_table", ROOT / "tools/feature_table.py")
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    readme = (ROOT / "README.md").read_text()
    assert ft.BEGIN in readme, "README lacks the generated feature table"
    assert ft.render(readme) == readme, "run: python tools/feature_table.py --write"
