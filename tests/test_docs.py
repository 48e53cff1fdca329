"""The documentation site builds with warnings as errors: a broken link, a page missing from the navigation,
a snippet naming a file that moved, or an API page naming a module that no longer imports fails here."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    for page in ("index.html", "synthesis/index.html", "api/mim/index.html"):
        assert (tmp_path / page).is_file(), page
    api = (tmp_path / "api" / "synth" / "index.html").read_text(encoding="utf-8")
    assert 'id="synth.data.conversation_io.read_conversations"' in api  # docstrings were rendered

def test_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_bytes()
    assert len(readme) < 15_000, f"README.md is {len(readme)} bytes; move detail to docs/"
