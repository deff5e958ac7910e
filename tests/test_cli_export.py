"""``squant-rs export MODULE:FACTORY OUT.onnx``: torch models to QDQ ONNX."""

from __future__ import annotations

import collections
import os
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import squant_rs
from export_models import small
from squant_rs.cli import main

CPU = ["CPUExecutionProvider"]


def run(path, x: np.ndarray, **opts) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in opts.items():
        setattr(so, k, v)
    sess = ort.InferenceSession(str(path), so, providers=CPU)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def optimized_ops(path, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=CPU)
    return collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    )


@pytest.fixture
def weights(tmp_path):
    """A state dict that differs from the factory's own weights."""
    net = small()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_export_equals_api(tmp_path, weights, capsys):
    net, w = weights
    out = tmp_path / "m.onnx"
    args = ["export", "export_models:small", str(out), "--weights", str(w)]
    opts = ["--input-shape", "2,3,16,16", "--wbits", "8", "--abits", "8"]
    opts += ["--quantizer", "symmetric", "--recipe", "paper"]
    assert main([*args, *opts]) == 0
    assert "4 layers" in capsys.readouterr().out
    api = tmp_path / "api.onnx"
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    squant_rs.export_onnx(net, api, x, 8, 8, quantizer="symmetric", recipe="paper")
    y = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(run(out, y), run(api, y))  # the --weights were used
    assert out.read_bytes() == api.read_bytes()


def test_export_integer_kernels(tmp_path, weights, capsys):
    net, w = weights
    out = tmp_path / "m.onnx"
    args = ["export", "export_models:small", str(out), "--weights", str(w), "-q"]
    args += ["--input-shape", "1,3,16,16", "--wbits", "8", "--abits", "8"]
    args += ["--quantizer", "symmetric", "--recipe", "squant+", "--integer-kernels"]
    assert main([*args, "--quantize-input", "0,1"]) == 0
    assert capsys.readouterr().out == ""
    counts = optimized_ops(out, tmp_path)
    # every layer (the first too: --quantize-input) and the residual Add fused
    assert counts["QLinearConv"] + counts["QGemm"] == 4, counts
    assert counts["QLinearAdd"] == 1 and counts["Conv"] + counts["Add"] == 0, counts
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    ref = run(out, x, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(run(out, x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.abs(run(out, x) - want).max() < 0.1 * np.abs(want).max()


def test_export_without_weights_uses_factory(tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", "export_models:small", str(out), "--input-shape", "1,3,8,8", "-q"]) == 0
    x = np.random.default_rng(3).random((1, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        want = small()(torch.from_numpy(x)).numpy()
    # W4 weights: close to the float model, not equal
    got = run(out, x)
    assert np.abs(got - want).max() < 0.5 * np.abs(want).max()


def test_export_takes_an_upper_case_onnx_extension(tmp_path):
    """``export ... m.ONNX`` writes an ONNX model (the .onnx extension in any
    case, as for the outputs of quantize; it said 'export writes an .onnx
    model')."""
    out = tmp_path / "m.ONNX"
    assert main(["export", "export_models:small", str(out), "--input-shape", "1,3,8,8", "-q"]) == 0
    onnx.checker.check_model(str(out))


def _bad_cases(tmp_path, w):
    mismatched = tmp_path / "mismatch.pth"
    sd = small().state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, mismatched)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    shape = ["--input-shape", "1,3,8,8"]
    return {
        "no colon": (["export_models", "o.onnx"], "expected MODULE:FACTORY"),
        "no module": (["no_such_module_xyz:f", "o.onnx"], "cannot import 'no_such_module_xyz'"),
        "no attribute": (["export_models:nope", "o.onnx"], "has no attribute 'nope'"),
        "not callable": (["export_models:NOT_CALLABLE", "o.onnx"], "not a callable"),
        "not a module": (["export_models:not_a_module", "o.onnx"], "not a torch.nn.Module"),
        "factory raises": (["export_models:broken", "o.onnx"], "no weights for this one"),
        "missing weights": (
            ["export_models:small", "o.onnx", "--weights", str(tmp_path / "nope.pth")],
            "file not found",
        ),
        # it said "cannot load torch checkpoint (it holds Python objects ...)",
        # for a text file "(174812789)", a bare KeyError
        "junk weights": (
            ["export_models:small", "o.onnx", "--weights", str(tmp_path / "junk.pth")],
            "junk.pth: not a torch checkpoint (--weights takes a state dict saved with torch.save)",
        ),
        # it was loaded (empty: "cannot load torch checkpoint"; /dev/zero: read to
        # the end of memory or "holds Python objects")
        "device weights": (
            ["export_models:small", "o.onnx", "--weights", os.devnull],
            f"input {os.devnull} is a character device, not a regular file",
        ),
        "mismatched weights": (
            ["export_models:small", "o.onnx", "--weights", str(mismatched)],
            "1 missing (e.g. fc.bias), 1 unexpected (e.g. extra.weight) keys",
        ),
        "output is input": (
            ["export_models:small", str(w), "--weights", str(w)],
            "export writes an .onnx model",
        ),
        "bad shape text": (["export_models:small", "o.onnx", "--input-shape", "1,x"], "1,x"),
        "zero dim": (["export_models:small", "o.onnx", "--input-shape", "1,3,0,8"], "positive"),
        "wrong shape": (
            ["export_models:small", "o.onnx", "--input-shape", "1,4,8,8"],
            "failed (RuntimeError",
        ),
        "model fails": (
            ["export_models:indexing", "o.onnx", *shape],
            "failed (IndexError: index 99 is out of bounds",
        ),
        "not onnx": (["export_models:small", "o.safetensors", *shape], ".onnx extension"),
        "input range": (
            ["export_models:small", "o.onnx", "--abits", "8", "--quantize-input", "1,2"],
            "LO <= 0 <= HI",
        ),
        "ik needs abits": (
            ["export_models:small", "o.onnx", "--integer-kernels"],
            "--integer-kernels needs --abits",
        ),
        "float16": (["export_models:half", "o.onnx", *shape], "needs a float32 model"),
        "batch dim beyond the shape": (
            ["export_models:small", "o.onnx", *shape, "--batch-dim", "4"],
            "--batch-dim 4: --input-shape 1,3,8,8 has 4 dimensions (0..3); pass one of them, "
            "or --batch-dim none for static shapes",
        ),
        "batch dim text": (
            ["export_models:small", "o.onnx", *shape, "--batch-dim", "first"],
            "expected a dimension of the input (an integer, e.g. 0 or 1) or none, got 'first'",
        ),
        # calibration errors name --input-shape, not the API's input_shape=
        "calibration shape": (
            ["export_models:small", "o.onnx", "--input-shape", "1,4,8,8", "--abits", "8"]
            + ["--recipe", "paper"],
            "; pass --input-shape matching the model's input",
        ),
        "integer ids": (
            ["export_models:token_lm", "o.onnx", "--input-shape", "2,9", "--abits", "8"],
            "nn.Embedding '0' takes integer ids, and U[0,1) noise is float, which no "
            "--input-shape changes (the example input export makes is such noise too): export "
            "integer-input models with squant_rs.export_onnx, an integer example_input and "
            "abits=None",
        ),
    }


def test_bad_input_exit_2_one_line_no_output(tmp_path, weights, capsys, monkeypatch):
    _, w = weights
    monkeypatch.chdir(tmp_path)
    for name, (argv, msg) in _bad_cases(tmp_path, w).items():
        assert main(["export", *argv]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (name, err)
        assert err.startswith("squant-rs: error: "), (name, err)
        assert "input_shape" not in err and "example_input shape" not in err, (name, err)
        left = sorted(f for f in os.listdir(tmp_path) if f.startswith("o.") or f.startswith("."))
        assert left == [], (name, left)
    # the weights file named as output: refused, untouched
    before = w.read_bytes()
    onnx_w = tmp_path / "w.onnx"
    onnx_w.write_bytes(before)
    assert main(["export", "export_models:small", str(onnx_w), "--weights", str(onnx_w)]) == 2
    assert "equals the input" in capsys.readouterr().err
    assert onnx_w.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_weights_are_refused_not_waited_on(tmp_path):
    """``--weights`` that is a FIFO: one error line at once (torch.load
    blocked on it forever). In a subprocess, as a hang would block the run."""
    import subprocess

    os.mkfifo(tmp_path / "w.pth")
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    argv = ["export", "export_models:small", "o.onnx", "--weights", "w.pth"]
    r = subprocess.run(
        [sys.executable, "-m", "squant_rs", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr == (
        "squant-rs: error: input w.pth is a FIFO, not a regular file: squant-rs reads regular "
        "files only\n"
    )
    assert os.listdir(tmp_path) == ["w.pth"]


@pytest.mark.filterwarnings("ignore:the model .* has no Conv1d")
def test_export_of_a_model_without_layers_fails(tmp_path, capsys, monkeypatch):
    """Nothing to quantize: status 2 and why, as quantize does, not an
    unquantized file and a size ratio of 'nanx'."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "export_models:no_layer", "o.onnx", "--input-shape", "2,4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no layer to quantize" in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_user_module_from_current_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_net_mod.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "lin.onnx"
    assert main(["export", "my_net_mod:build", str(out), "--input-shape", "2,3,4"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    x = np.random.default_rng(4).random((2, 3, 4), dtype=np.float32)
    assert run(out, x).shape == (2, 3)


def _cli_stderr(tmp_path, *argv: str) -> tuple[int, str]:
    """``python -m squant_rs ARGV`` in a subprocess (the real stderr: raw
    Python warnings show there, not under pytest's warning capture)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    r = subprocess.run(
        [sys.executable, "-m", "squant_rs", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": path},
        timeout=600,
    )
    return r.returncode, r.stderr


def _float_onnx(path, prefix: str = "") -> None:
    """A float ONNX model of two Gemms (layers 'g0' and 'g1', after ``prefix``)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], name=f"{prefix}g0", transB=1),
        helper.make_node("Gemm", ["h", "w1"], ["y"], name=f"{prefix}g1", transB=1),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 8)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 6)).astype(np.float32), "w1"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_export_and_onnx_quantize_warnings_are_one_line_each(tmp_path):
    """Warnings of export and ONNX quantize are `squant-rs: warning: ...`
    lines (they were raw UserWarnings with their source line, and ONNX
    quantize said nothing of a skip pattern that matches nothing); an error
    is its one error line alone (export of a model without layers printed
    the raw warning, its source line and the error)."""
    shape = ["--input-shape", "1,3,8,8"]
    rc, err = _cli_stderr(
        tmp_path, "export", "export_models:no_layer", "o.onnx", "--input-shape", "2,4"
    )
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("squant-rs: error: ") and "has no layer to quantize" in err, err
    rc, err = _cli_stderr(
        tmp_path, "export", "export_models:small", "m.onnx", *shape, "--skip", "nomatch*", "-q"
    )
    assert rc == 0, err
    assert err == "squant-rs: warning: skip pattern 'nomatch*' matches no Conv/Linear layer\n"
    _float_onnx(tmp_path / "f.onnx")
    rc, err = _cli_stderr(tmp_path, "quantize", "f.onnx", "q.onnx", "--skip", "nomatch*", "-q")
    assert rc == 0, err
    assert err == (
        "squant-rs: warning: skip pattern 'nomatch*' matches no quantizable "
        "Conv/Gemm/MatMul layer\n"
    )
    # A pattern that skips every layer: no warning, one error line.
    rc, err = _cli_stderr(tmp_path, "quantize", "f.onnx", "q2.onnx", "--skip", "g*", "nomatch*")
    assert rc == 2 and err.count("\n") == 1, err
    assert "the --skip pattern 'g*' excludes every quantizable layer" in err, err
    assert sorted(os.listdir(tmp_path)) == ["f.onnx", "m.onnx", "q.onnx"]


def test_quantize_onnx_warns_for_an_unmatched_skip_pattern(tmp_path):
    _float_onnx(tmp_path / "f.onnx")
    with pytest.warns(UserWarning, match="skip pattern 'nope' matches no quantizable") as rec:
        report = squant_rs.quantize_onnx(
            tmp_path / "f.onnx", tmp_path / "q.onnx", skip=("nope", "g1")
        )
    assert len(rec) == 1 and report.skipped == ["g1"]


def test_readme_install_hints_name_existing_extras() -> None:
    """The ONNX section's pip commands name extras that exist, and the one
    for a torch model brings torch (it said 'squant-rs[onnx]', which has none)."""
    import re
    import sys
    from pathlib import Path

    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Deploy with ONNX", 1)[1].split("\n#", 1)[0]
    intro = section.split("```", 1)[0]
    hints = re.findall(r"pip install 'squant-rs\[([a-z,]+)\]'", intro)
    assert hints, intro
    for hint in hints:
        assert all(name in extras for name in hint.split(",")), hint
    after = intro.split("torch model", 1)[-1]
    torch_hint = re.search(r"pip install 'squant-rs\[([a-z,]+)\]'", after)
    assert torch_hint is not None, intro
    deps = [d for name in torch_hint.group(1).split(",") for d in extras[name]]
    assert any(d.startswith("torch") for d in deps) and any(d.startswith("onnx") for d in deps)


@pytest.mark.parametrize(
    "missing,opts",
    [
        ("onnx", []),
        ("ml_dtypes", ["--wbits", "4"]),
        ("onnxruntime", ["--wbits", "8", "--abits", "8", "--integer-kernels"]),
    ],
)
def test_export_names_a_missing_package(tmp_path, capsys, monkeypatch, missing, opts):
    """A missing onnx, ml_dtypes (int4 codes) or onnxruntime (integer
    kernels' calibration): one error line naming it and how to install it,
    exit 2, no output, before the model is quantized (the API raises
    ImportError)."""
    import squant_rs.model.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("quantized before the packages were checked")

    monkeypatch.setattr(pipeline, "quantize_model", no_work)
    monkeypatch.setitem(sys.modules, missing, None)
    out = tmp_path / "m.onnx"
    hint = f"needs {missing}: pip install 'squant-rs[onnx]'"
    args = ["export", "export_models:small", str(out), "--input-shape", "1,3,16,16"]
    assert main([*args, *opts]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("squant-rs: error: ") and hint in err, err
    assert not out.exists()
    with pytest.raises(ImportError, match=re.escape(hint)):
        squant_rs.export_onnx(
            small(), out, torch.rand(1, 3, 16, 16), 8 if "8" in opts else 4, 8, integer_kernels=True
        )
    assert os.listdir(tmp_path) == []


# nn.MultiheadAttention's shape checks convert traced tensors to bools
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_batch_dim(tmp_path, capsys):
    """--batch-dim: the input dimension the ONNX model takes at any size
    (default 0; 1 for a sequence-first (L, N, E) transformer, whose
    sequence was exported as the batch), none for static shapes; the same
    model as export_onnx(batch_dim=...)."""
    from export_models import seq_first

    out, api = tmp_path / "m.onnx", tmp_path / "api.onnx"
    args = ["export", "export_models:seq_first", str(out), "--input-shape", "7,2,16", "-q"]
    x = torch.rand(7, 2, 16, generator=torch.Generator().manual_seed(0))
    for given, batch_dim, shape in [
        ([], 0, ["batch", 2, 16]),
        (["--batch-dim", "1"], 1, [7, "batch", 16]),
        (["--batch-dim", "-2"], -2, [7, "batch", 16]),
        (["--batch-dim", "none"], None, [7, 2, 16]),
    ]:
        assert main([*args, *given]) == 0, capsys.readouterr().err
        sess = ort.InferenceSession(str(out), providers=CPU)
        assert [i.shape for i in sess.get_inputs()] == [shape]
        squant_rs.export_onnx(seq_first(), api, x, 4, batch_dim=batch_dim)
        assert out.read_bytes() == api.read_bytes(), given
    assert main([*args, "--batch-dim", "1"]) == 0
    y = np.random.default_rng(5).random((7, 3, 16), dtype=np.float32)
    assert run(out, y).shape == (7, 3, 16)


def test_onnx_quantize_and_export_print_names_and_paths_escaped(tmp_path, capsys):
    """ONNX quantize and export print layer names and the output path with
    control characters escaped, as the safetensors path does: they printed
    them raw (an ESC in a node name or OUT reached the terminal, a newline in
    OUT split the summary line)."""
    _float_onnx(tmp_path / "f.onnx", prefix="\x1b[32m")
    assert main(["quantize", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[32mg0" in out and "\\x1b[32mg1" in out, out
    odd = tmp_path / "o\x1b[31m\n.onnx"
    assert main(["quantize", str(tmp_path / "f.onnx"), str(odd)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}/o\\x1b[31m\\n.onnx: 2 layers") and out.count("\n") == 1
    odd = tmp_path / "e\x1b[31m\n.onnx"
    shape = ["--input-shape", "1,3,8,8"]
    assert main(["export", "export_models:small", str(odd), *shape]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}/e\\x1b[31m\\n.onnx: ") and out.count("\n") == 1, out


def test_activation_options_without_abits_are_named_in_cli_words(tmp_path, capsys):
    """ONNX quantize with --integer-kernels or --quantize-input but no
    --abits names the options given, as export does: it said
    'integer_kernels=True needs abits' (the Python API's words)."""
    _float_onnx(tmp_path / "f.onnx")
    said = {
        ("--integer-kernels",): "--integer-kernels needs --abits",
        ("--quantize-input",): "--quantize-input needs --abits",
        ("--integer-kernels", "--quantize-input"): (
            "--integer-kernels and --quantize-input need --abits"
        ),
    }
    for opts, msg in said.items():
        for argv in (
            ["quantize", str(tmp_path / "f.onnx"), str(tmp_path / "o.onnx")],
            ["export", "export_models:small", str(tmp_path / "o.onnx")],
        ):
            assert main([*argv, *opts]) == 2
            err = capsys.readouterr().err
            assert err == f"squant-rs: error: {msg} (quantized activations)\n", (argv, err)
    assert os.listdir(tmp_path) == ["f.onnx"]


def test_an_onnx_output_needs_an_onnx_input(tmp_path, capsys, monkeypatch):
    """A safetensors file or a sharded directory quantized to an .onnx
    output is refused saying the output needs an ONNX input, as the Rust
    CLI names the output: it said 'ONNX input needs an .onnx output (and the
    other way round)' of an input that is not ONNX."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(b"")
    for src in ("m.safetensors", "."):
        assert main(["quantize", src, "o.onnx"]) == 2
        assert capsys.readouterr().err == (
            "squant-rs: error: output o.onnx: an ONNX model: quantize writes one from an ONNX "
            f"input only ({src} is not one; squant-rs export makes one from a torch model)\n"
        )
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_export_help_says_the_default_of_batch_dim_once(capsys):
    """``export --help`` said '(default: 0) (default: 0)' of --batch-dim."""
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "none: static shapes (default: 0) --" in text, text
    assert text.count("(default: 0)") == 1, text
