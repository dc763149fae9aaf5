"""The layer contract (README, Layout; .importlinter): every import in the package points down.

import-linter reads the package from the file system; the Triton kernels live outside
python/splice (installed as splice.kernels), so the check runs on a tree of links that puts them
where the installed package has them."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _installed_layout(tmp_path: Path) -> Path:
    package = tmp_path / "splice"
    package.mkdir()
    for child in (ROOT / "python/splice").iterdir():
        if child.name != "kernels":
            (package / child.name).symlink_to(child)
    (package / "kernels").symlink_to(ROOT / "kernels")
    return tmp_path


def test_imports_point_down_the_layers(tmp_path):
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is not installed (make test installs it)"
    done = subprocess.run([lint, "--no-cache", str(ROOT / ".importlinter")], cwd=_installed_layout(tmp_path),
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout
