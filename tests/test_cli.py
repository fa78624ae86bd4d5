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
    assert "fuse_conv_bn" in out and "after/before" in out
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
