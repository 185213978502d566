"""The CLI's fixed costs: importing ``ttp_ray.cli`` and ``ttp-ray --help`` import neither torch nor Ray (nor
pandas); ``sweep --dry-run`` imports no Ray; the commands built on first use list the same help as once built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "pandas", "torchvision", "sklearn", "pyarrow")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter on this checkout; it prints one JSON object as its last line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_cli_loads_no_heavy_module():
    got = _python("import json, sys; import ttp_ray.cli; "
                  f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert got == []


def test_help_lists_every_command_without_heavy_imports():
    got = _python(
        "import contextlib, io, json, sys\n"
        "from ttp_ray.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    main(['--help'])\n"
        f"print(json.dumps({{'out': buf.getvalue(), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    assert got["heavy"] == []
    for name in ("datasets", "models", "pretrain", "finetune", "predict", "sweep", "rank", "validate", "plot"):
        assert f"\n  {name} " in got["out"], got["out"]


def test_dry_run_imports_no_ray():
    spec = ROOT / "sweeps" / "quickstart.yaml"
    got = _python(
        "import contextlib, io, json, sys\n"
        "from ttp_ray.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    main(['sweep', {str(spec)!r}, '--dry-run'])\n"
        "print(json.dumps({'out': buf.getvalue(), 'heavy': [m for m in ('ray', 'torchvision', 'sklearn', 'pandas') "
        "if m in sys.modules]}))")
    assert got["heavy"] == []
    assert "distinct simulations" in got["out"]


@pytest.mark.parametrize("limit", [20, 45, 80, 200, 2000])
def test_lazy_commands_list_their_own_help(limit):
    from ttp_ray.cli import cli

    assert set(cli.lazy) == {"predict", "rank", "validate", "plot"}
    for name, (build, summary) in cli.lazy.items():
        cmd = build()
        assert isinstance(cmd, click.Command) and cmd.name == name
        assert click.Command(name, help=summary).get_short_help_str(limit) == cmd.get_short_help_str(limit), name


def test_lazy_command_help_and_options(capsys):
    from conftest import run_cli

    code, out, err = run_cli(["predict", "--help"], capsys)
    assert code == 0, err
    assert "--method [auto|ode|discrete|sde|minibatch]" in out and "--predictor" in out
    code, out, err = run_cli(["rank", "--help"], capsys)
    assert code == 0 and "--by" in out, err
