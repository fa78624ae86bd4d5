"""The ``fxcompress`` command, run in-process through main(argv) (and once as a real process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fxcompress import available_passes
from fxcompress.cli import demo_pipeline, main


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    """A small recipe: the digits CNN, fused and cleaned up."""
    path = tmp_path / "digits.toml"
    path.write_text('[model]\nfactory = "fxcompress.examples.digits:DigitsCNN"\n'
                    '[[inputs]]\nshape = [2, 1, 8, 8]\n'
                    '[[passes]]\nrecipe = "fusion_only"\n')
    return str(path)


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_passes_lists_every_registered_pass_with_docs_and_options(capsys) -> None:
    code, out, _ = _run(capsys, "passes", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [p["name"] for p in listed] == available_passes()
    fuse = next(p for p in listed if p["name"] == "fuse_conv_bn")
    assert fuse["exact"] and fuse["eval_only"] and "BatchNorm" in fuse["doc"]
    code, text, _ = _run(capsys, "passes")
    assert code == 0
    for p in listed:
        assert p["name"] in text
        for option in p["options"]:
            assert f"{option['name']}: {option['type']} = {option['default']}" in text


def test_console_script_lists_passes() -> None:
    script = Path(sys.executable).parent / "fxcompress"
    proc = subprocess.run([str(script), "passes"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "fuse_conv_bn" in proc.stdout and "eliminate_dead_nodes" in proc.stdout


def test_run_recipe_prints_the_report(capsys, recipe: str) -> None:
    code, out, _ = _run(capsys, "run", "--recipe", recipe)
    assert code == 0
    assert "fuse_conv_bn" in out and any("before" in line and "change" in line for line in out.splitlines())
    code, out, _ = _run(capsys, "run", "--recipe", recipe, "--json")
    report = json.loads(out)
    assert [r["name"] for r in report["passes"]] == ["fuse_conv_bn", "eliminate_dead_nodes"]
    assert report["after"]["nodes"] < report["before"]["nodes"]


def test_user_errors_print_one_line_and_exit_2(capsys, tmp_path: Path, recipe: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nfactory = "torchvision.models:resnet18"\n[[inputs]]\nshape = [1, 3, 32, 32]\n'
                   '[[passes]]\nname = "fuse_conv_bm"\n')
    code, out, err = _run(capsys, "run", "--recipe", str(bad))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fxcompress run: error: ") and "did you mean 'fuse_conv_bn'" in err
    code, _, err = _run(capsys, "run", "--recipe", recipe, "--key", "k.pem")
    assert code == 2 and "give --out PATH as well" in err
    with pytest.raises(SystemExit) as info:  # usage errors: argparse's own message and status 2
        main(["run"])
    assert info.value.code == 2


def test_keygen_run_out_and_verify_round_trip(capsys, tmp_path: Path, recipe: str) -> None:
    private, public, artifact = tmp_path / "k.pem", tmp_path / "k.pub", tmp_path / "model.fxc"
    code, out, _ = _run(capsys, "keygen", "--private", str(private), "--public", str(public))
    assert code == 0 and "fingerprint" in out and private.exists() and public.exists()
    code, out, err = _run(capsys, "run", "--recipe", recipe, "--out", str(artifact), "--key", str(private),
                          "--json")
    assert code == 0 and json.loads(out)["passes"] and "signed" in err
    code, out, _ = _run(capsys, "verify", str(artifact), "--public-key", str(public))
    assert code == 0 and "integrity and signature verified" in out and "fuse_conv_bn" in out
    # An existing artifact is kept unless --overwrite is given.
    code, _, err = _run(capsys, "run", "--recipe", recipe, "--out", str(artifact))
    assert code == 2 and str(artifact) in err
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    code, out, err = _run(capsys, "verify", str(artifact), "--public-key", str(public))
    assert code == 2 and out == "" and err.startswith("fxcompress verify: error: ") and "Traceback" not in err


def test_demo_pipeline_grows_with_the_registry() -> None:
    available = available_passes()
    entries, ran, skipped = demo_pipeline(available)
    assert "fuse_conv_bn" in entries and entries[-1] == "eliminate_dead_nodes"
    assert len(ran) + len(skipped) == 5
    entries, ran, skipped = demo_pipeline(["eliminate_dead_nodes"])
    assert entries == ["eliminate_dead_nodes"]
    assert any("BatchNorm fusion (not registered: fuse_conv_bn)" in s for s in skipped)


def test_demo_reports_accuracy_before_and_after(capsys) -> None:
    code, out, _ = _run(capsys, "demo")
    assert code == 0
    assert "stages run:" in out and "BatchNorm fusion: fuse_conv_bn" in out
    assert "task metric" in out and "SQNR" in out


def test_out_and_key_problems_are_reported_before_the_pipeline_runs(capsys, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory leaves a marker each time the model is built: the pipeline never starts.
    (tmp_path / "fxc_cli_factory.py").write_text(
        "from pathlib import Path\nimport torch\n"
        "def build():\n"
        f"    Path({str(tmp_path / 'built')!r}).write_text('built')\n"
        "    return torch.nn.Linear(3, 2)\n")
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "local.toml"
    recipe.write_text('[model]\nfactory = "fxc_cli_factory:build"\n[[inputs]]\nshape = [1, 3]\n'
                      '[[passes]]\nrecipe = "fusion_only"\n')
    existing = tmp_path / "exists.fxc"
    existing.write_bytes(b"precious")
    (tmp_path / "bad.pem").write_text("not a key")
    for argv, message in ((["--out", str(existing)], "exists; pass overwrite=True"),
                          (["--out", str(tmp_path / "no" / "dir.fxc")], "does not exist"),
                          (["--out", str(tmp_path / "new.fxc"), "--key", str(tmp_path / "bad.pem")],
                           "is not a readable PEM private key"),
                          (["--out", str(tmp_path / "new.fxc"), "--key", str(tmp_path / "absent.pem")],
                           "cannot read the private key file")):
        code, out, err = _run(capsys, "run", "--recipe", str(recipe), *argv)
        assert code == 2 and out == "" and message in err, (argv, err)
    assert not (tmp_path / "built").exists() and existing.read_bytes() == b"precious"
    # A factory in the current directory imports, as with `python -m` (and sys.path is restored).
    path_before = list(sys.path)
    code, out, _ = _run(capsys, "run", "--recipe", str(recipe))
    assert code == 0 and (tmp_path / "built").exists() and sys.path == path_before
    sys.modules.pop("fxc_cli_factory", None)


def test_python_dash_m_fxcompress_and_a_closed_pipe(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fxcompress", "passes", "--json"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)
    # `fxcompress passes --json | head`, with a reader that has left before the first write (`true` exits
    # while the command is still importing torch): no BrokenPipeError traceback, SIGPIPE's status.
    script = Path(sys.executable).parent / "fxcompress"
    shell = subprocess.run(f"'{script}' passes --json | true; exit ${{PIPESTATUS[0]}}", shell=True,
                           executable="/bin/bash", capture_output=True, text=True, timeout=300, check=False)
    assert "Traceback" not in shell.stderr and "BrokenPipeError" not in shell.stderr, shell.stderr
    assert shell.returncode == 141


def test_run_help_says_a_recipe_is_trusted_code(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "trusted code" in out and "imports the modules it names" in " ".join(out.split())


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_a_recipe_path_that_is_a_directory_or_not_text_is_one_line_of_error(capsys, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "recipe.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00[model]")
    code, out, err = _run(capsys, "run", "--recipe", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
