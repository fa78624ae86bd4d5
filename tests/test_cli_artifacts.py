"""`fxcompress inspect`, `compare` and `export-onnx` on real artifacts (the digits CNN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress.cli import main
from fxcompress.examples import digits
from fxcompress.quant.spec import portable_weight_spec


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Float original; a model compressed in two steps (fuse, save, load, quantize, save); keys."""
    root = tmp_path_factory.mktemp("cli")
    data = digits.load_digits_data()
    x, batches = data.test_x[:4], [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 64, 32)]
    fxcompress.save(fxcompress.run(digits.pretrained_digits_cnn(), [], x, progress=False), root / "orig.fxc")
    fxcompress.save(fxcompress.run(digits.pretrained_digits_cnn(), ["fuse_conv_bn"], x, progress=False),
                    root / "step1.fxc")
    int8 = fxcompress.recipes.int8_static(weights=portable_weight_spec(), only_if_faster=False)[1:]
    second = fxcompress.run(fxcompress.load(root / "step1.fxc"), int8, x, calibration_data=batches, progress=False)
    fxcompress.save(second, root / "step2.fxc")
    assert main(["keygen", "--private", str(root / "k.pem"), "--public", str(root / "k.pub")]) == 0
    fxcompress.save(second, root / "signed.fxc", key=root / "k.pem")
    return {"root": root, "orig": root / "orig.fxc", "step1": root / "step1.fxc", "step2": root / "step2.fxc",
            "signed": root / "signed.fxc", "public": root / "k.pub"}


def test_inspect_shows_both_steps_of_the_history(artifacts, capsys) -> None:
    assert main(["inspect", str(artifacts["step2"])]) == 0
    out = capsys.readouterr().out
    first_id = fxcompress.verify_artifact(artifacts["step1"])
    assert "history: 1 earlier step:" in out
    assert "1. " + fxcompress.load(artifacts["step1"]).meta["fxcompress_artifact"]["manifest_sha256"][:16] in out
    assert "fuse_conv_bn" in out.split("1. ")[1].split("\n")[0]
    assert "2. this artifact: insert_observers, calibrate, fold_fake_quant, lower" in out
    assert "signature: none (unsigned)" in out and "input x: float32 (4, 1, 8, 8)" in out
    assert first_id["format_version"] == 2
    assert main(["inspect", str(artifacts["step2"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["pipeline"][0]["name"] for s in doc["history"]] == ["fuse_conv_bn"]
    assert doc["manifest"]["parent"] == doc["history"][0]["id"]


def test_inspect_checks_a_signature_when_given_a_key(artifacts, capsys) -> None:
    assert main(["inspect", str(artifacts["signed"]), "--public-key", str(artifacts["public"])]) == 0
    assert ", verified" in capsys.readouterr().out
    assert main(["inspect", str(artifacts["step2"]), "--public-key", str(artifacts["public"])]) == 2
    assert "error:" in capsys.readouterr().err


def test_compare_prints_the_table_and_json(artifacts, capsys) -> None:
    with pytest.warns(UserWarning):  # the int8 digits CNN is slower than float on this tiny input, and says so
        assert main(["compare", str(artifacts["orig"]), str(artifacts["step2"]), "--data", "digits", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["agreement"]["top1_agreement"] >= 0.97 and doc["agreement"]["rows"] > 300
    assert set(doc["original"]["latency"]) == {"1"}
    path = artifacts["root"] / "inputs.pt"
    torch.save(digits.load_digits_data().test_x[:40], path)
    with pytest.warns(UserWarning):
        assert main(["compare", str(artifacts["orig"]), str(artifacts["step2"]), "--data", str(path)]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["compare", str(artifacts["orig"]), str(artifacts["step2"]), "--data", "nothing.csv"]) == 2
    assert "--data 'nothing.csv' is neither a file nor 'digits'" in capsys.readouterr().err


def test_export_onnx_command(artifacts, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = artifacts["root"] / "m.onnx"
    assert main(["export-onnx", str(artifacts["step2"]), str(out)]) == 0
    assert out.is_file() and "dynamic batch" in capsys.readouterr().out
    assert main(["export-onnx", str(artifacts["step2"]), str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    refused = artifacts["root"] / "refused.onnx"
    assert main(["export-onnx", str(artifacts["step2"]), str(refused), "--public-key", str(artifacts["public"])]) == 2
    assert "is unsigned, but --public-key was given" in capsys.readouterr().err and not refused.exists()
    signed = artifacts["root"] / "signed.onnx"
    assert main(["export-onnx", str(artifacts["signed"]), str(signed), "--public-key", str(artifacts["public"])]) == 0
    assert signed.is_file()
    assert main(["export-onnx", str(artifacts["step2"]), str(artifacts["root"] / "o.onnx"), "--opset", "11"]) == 2
    assert "opset 11 is too old" in capsys.readouterr().err
    exact = artifacts["root"] / "integer.onnx"
    assert main(["export-onnx", str(artifacts["step2"]), str(exact), "--form", "integer"]) == 0
    assert exact.is_file() and "integer form" in capsys.readouterr().out
