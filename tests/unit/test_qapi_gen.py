"""The committed generated module is what tools/qapi_gen.py makes of the
QAPI declarations kept in tools/qapi-7.2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "tools" / "qapi-7.2"


def test_generated_module_is_current(tmp_path):
    out = tmp_path / "qapi_types.py"
    subprocess.run([sys.executable, str(ROOT / "tools" / "qapi_gen.py"), str(REF), str(out)],
                   check=True, timeout=60)
    committed = (ROOT / "qsd_trio" / "qapi" / "qapi_types.py").read_text()
    assert out.read_text() == committed, "run: python tools/qapi_gen.py"
