"""Instant import and extra-naming errors, each in a fresh interpreter (``sys.modules`` of
this test process already holds torch).

A missing extra is simulated by a meta-path finder installed before anything else runs
(``-c`` code prepended to the command), which makes the extra's top-level package
unimportable exactly as an uninstalled one is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

BLOCK = """
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


def run(code: str, *, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    prelude = BLOCK.format(blocked=set(blocked)) if blocked else ""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


HEAVY = "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'ray') if m in sys.modules))"


def test_import_crossrank_loads_neither_torch_nor_transformers() -> None:
    done = run(f"import sys, crossrank; {HEAVY}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importtime_report_shows_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import crossrank"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "crossrank" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}


def test_public_names_resolve_on_first_use() -> None:
    done = run(
        "import sys, crossrank\n"
        "assert isinstance(crossrank.__version__, str) and crossrank.__version__\n"
        "assert issubclass(crossrank.OptionError, crossrank.CrossrankError)\n"
        "assert crossrank.EngineOptions().max_length == 512\n"
        "assert 'torch' not in sys.modules\n"
        "from crossrank import Reranker\n"
        "assert Reranker.__module__ == 'crossrank.engine' and 'torch' in sys.modules\n"
        "assert 'Reranker' in dir(crossrank)\n"
        "try:\n    crossrank.nothing_here\nexcept AttributeError as err:\n    print(err)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'nothing_here'" in done.stdout


@pytest.mark.parametrize("command", [[], ["serve"], ["rerank"], ["score-file"], ["eval"]])
def test_help_does_not_import_the_engine(command: list[str]) -> None:
    done = run(
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from crossrank.cli import app\n"
        f"result = CliRunner().invoke(app, {[*command, '--help']!r})\n"
        "assert result.exit_code == 0, result.output\n"
        f"{HEAVY}"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_ray_package_imports_without_ray_and_names_the_extra() -> None:
    done = run(
        "import crossrank.ray\n"
        "try:\n    crossrank.ray.score_dataset\nexcept ImportError as err:\n    print(err)\n",
        blocked=("ray",),
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "crossrank[ray]"' in done.stdout


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("crossrank.langchain", "langchain_core", "langchain"),
        ("crossrank.llama_index", "llama_index", "llama-index"),
    ],
)
def test_an_adapter_without_its_extra_names_it(module: str, blocked: str, extra: str) -> None:
    done = run(
        "import crossrank.errors\n"
        f"try:\n    import {module}\n"
        "except ImportError as err:\n"
        "    assert isinstance(err, crossrank.errors.MissingExtraError)\n"
        "    print(err)\n",
        blocked=(blocked,),
    )
    assert done.returncode == 0, done.stderr
    assert f'pip install "crossrank[{extra}]"' in done.stdout


@pytest.mark.parametrize(
    ("command", "blocked"), [("demo", "faiss"), ("eval", "sentence_transformers")]
)
def test_demo_and_eval_without_the_rag_extra_say_so_in_one_line(command: str, blocked: str) -> None:
    done = run(
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from crossrank.cli import app\n"
        f"result = CliRunner().invoke(app, [{command!r}])\n"
        "print(result.exit_code)\n"
        "print(result.stderr, end='')\n",
        blocked=(blocked,),
    )
    assert done.returncode == 0, done.stderr
    code, *lines = done.stdout.splitlines()
    assert int(code) != 0
    assert len(lines) == 1 and "Traceback" not in done.stdout
    assert "crossrank[rag]" in lines[0] and f"crossrank {command}" in lines[0]
