"""The source keeps to its width: no line of the project's Python files is longer than 120 columns."""
import glob
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 120


def python_files() -> list[str]:
    top = glob.glob(os.path.join(REPO_ROOT, "*.py"))
    inside = [path for folder in ("sit_fast", "kernels", "benchmarks", "tests")
              for path in glob.glob(os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True)]
    return sorted(top + inside)


def test_no_python_line_is_wider_than_120_columns():
    files = python_files()
    assert any(path.endswith(os.path.join("sit_fast", "models.py")) for path in files)
    wide = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(line.rstrip("\n")) > WIDTH:
                    wide.append(f"{os.path.relpath(path, REPO_ROOT)}:{number} ({len(line.rstrip())} columns)")
    assert not wide, "lines over 120 columns:\n" + "\n".join(wide)
