"""Writing files: every file the project writes (weights, `mha demo -o` in each format, `mha prune -o`) gets
the permissions `open()` would give under the umask, keeps those of a file it replaces, writes through a
symlink to its target atomically, leaves devices and pipes in place, and refuses a missing folder with one
line before any work."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mha
from mha_cli.main import cli

from tests.helpers import random_weights

TEXT = "The cat sat on the mat."


def _cli(*args):
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output
    return res


def _weights(path):
    random_weights(6, 3, seed=1).save(path)


def _demo(fmt):
    def write(path):
        if fmt == "png":
            pytest.importorskip("matplotlib")
        _cli("demo", "--model", "builtin", "--head", "0", "--format", fmt, "-o", str(path), TEXT)
    return write


def _prune(path):
    pytest.importorskip("matplotlib")
    _cli("prune", "--model", "builtin", "--random", "0", "--fractions", "0.5", "-o", str(path))


# file name -> a function writing it the way a user would
WRITERS = {"w.safetensors": _weights, "w.npz": _weights, "heads.json": _demo("json"), "heads.html": _demo("html"),
           "heads.txt": _demo("term"), "heads.png": _demo("png"), "curve.png": _prune}


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, name", [(u, n) for u in (0o022, 0o077) for n in WRITERS
                                         if (u, n) != (0o077, "curve.png")],  # prune's curve: 2 s, once is enough
                         indirect=["umask"], ids=lambda v: f"umask{v:03o}" if isinstance(v, int) else v)
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, umask, name):
    WRITERS[name](tmp_path / name)
    assert mode(tmp_path / name) == 0o666 & ~umask  # 0o644 under umask 022, 0o600 under 077
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", [n for n in WRITERS if n != "curve.png"])  # prune's PNG: same code as heads.png
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, name):
    path = tmp_path / name
    path.write_bytes(b"old")
    path.chmod(0o640)
    ino = path.stat().st_ino
    WRITERS[name](path)
    assert mode(path) == 0o640 and path.read_bytes() != b"old"
    assert path.stat().st_ino != ino  # replaced by a rename, not rewritten in place
    assert os.listdir(tmp_path) == [name]


def test_saving_through_a_symlink_updates_its_target(tmp_path):
    target = tmp_path / "real.safetensors"
    random_weights(6, 3, seed=0).save(target)
    target.chmod(0o640)
    ino = target.stat().st_ino
    link = tmp_path / "w.safetensors"
    link.symlink_to("real.safetensors")
    new = random_weights(6, 3, seed=2)
    new.save(link)
    assert link.is_symlink() and os.readlink(link) == "real.safetensors"
    assert mha.AttentionWeights.load(target) == new
    assert target.stat().st_ino != ino and mode(target) == 0o640  # atomically replaced, mode kept
    assert sorted(os.listdir(tmp_path)) == ["real.safetensors", "w.safetensors"]


def test_saving_through_a_dangling_symlink_creates_its_target(tmp_path, umask):
    link = tmp_path / "w.safetensors"
    link.symlink_to("later.safetensors")
    w = random_weights(6, 3, seed=3)
    w.save(link)
    assert link.is_symlink() and mha.AttentionWeights.load(tmp_path / "later.safetensors") == w
    assert mode(tmp_path / "later.safetensors") == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["later.safetensors", "w.safetensors"]


@pytest.mark.parametrize("name", ["w.safetensors", "heads.json", "heads.png"])
def test_saving_through_a_link_into_another_folder(tmp_path, name):
    (tmp_path / "shared").mkdir()
    (tmp_path / "work").mkdir()
    target = tmp_path / "shared" / name
    target.write_bytes(b"old")
    hop = tmp_path / "work" / "hop"  # a chain: work/name -> hop -> ../shared/name
    hop.symlink_to(os.path.join("..", "shared", name))
    link = tmp_path / "work" / name
    link.symlink_to("hop")
    WRITERS[name](link)
    assert link.is_symlink() and hop.is_symlink() and target.read_bytes() != b"old"
    assert os.listdir(tmp_path / "shared") == [name]  # no temporary file left in either folder
    assert sorted(os.listdir(tmp_path / "work")) == sorted(["hop", name])


def test_a_pipe_is_written_in_place_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is waiting, as `cat pipe` would be
    try:
        random_weights(6, 3, seed=4).save(fifo)
        got = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got[8:40].startswith(b'{"__metadata__"')


def test_a_missing_folder_or_a_folder_is_a_named_error(tmp_path):
    w = random_weights(6, 3)
    with pytest.raises(ValueError, match=r"cannot write '.*nope/w\.safetensors': the folder '.*nope' does not exist"):
        w.save(tmp_path / "nope" / "w.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"the folder '.*file' is not a folder"):
        w.save(tmp_path / "file" / "w.npz")
    with pytest.raises(ValueError, match=r"cannot write '.*': it is a folder; give a file name"):
        w.save(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "w.safetensors")
    with pytest.raises(ValueError, match=r"the folder '.*gone' does not exist"):
        w.save(tmp_path / "dangling")
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


@pytest.mark.parametrize("args", [
    ["demo", "--model", "builtin", TEXT], ["demo", "--model", "builtin", "--format", "json", TEXT],
    ["demo", "--model", "builtin", "--format", "html", TEXT], ["demo", "--model", "builtin", "--format", "png", TEXT],
    ["prune", "--model", "builtin"],
], ids=["term", "json", "html", "png", "prune"])
def test_output_into_a_missing_folder_is_one_line(tmp_path, args):
    out = tmp_path / "nope" / "out"
    res = subprocess.run([sys.executable, "-m", "mha_cli", *args, "-o", str(out)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert errors == [f"Error: Invalid value for '-o' / '--output': cannot write '{out}': the folder "
                      f"'{out.parent}' does not exist"]
    assert os.listdir(tmp_path) == [] and res.stdout == ""


def test_terminal_format_writes_plain_text_to_o(tmp_path):
    """The terminal heat maps go to the file, uncoloured even when stdout is a terminal."""
    import pty

    out = tmp_path / "heads.txt"
    primary, secondary = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "mha_cli", "demo", "--model", "builtin", "--head", "0", "-o",
                              str(out), TEXT], stdout=secondary, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(primary)
        os.close(secondary)
    assert res.returncode == 0 and f"wrote {out}" in res.stderr
    text = out.read_text()
    assert "L0 H0 previous token" in text and "[CLS]" in text and text.endswith("\n")
    assert "\x1b" not in text
    coloured = _cli("demo", "--model", "builtin", "--head", "0", "--color", "-o", str(out), TEXT)
    assert "\x1b[48;5;" in out.read_text() and coloured.stdout == ""  # --color asked for explicitly
