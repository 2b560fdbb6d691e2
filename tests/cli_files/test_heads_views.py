"""The step view's head roles and sink mass (mha.viz.step_report(..., roles=), mha generate --format html)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mha.analysis as ma
import mha.models as mm
import mha.viz as mv
from cli.main import cli
from tests.analysis.planted import PLANTED, planted_decoder
from tests.helpers import browser_page

PROMPT = "1 2 3 4 5 6 1 2"


def _data(page: str) -> dict:
    return json.loads(page.split('id="data">')[1].split("</script>")[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return planted_decoder(tmp_path_factory.mktemp("views") / "planted")


def test_the_step_view_carries_the_role_table(folder):
    model = mm.load(folder, backend="numpy")
    table = ma.decoder_roles(model, sequences=8, length=7)
    gen = model.generate([int(t) for t in PROMPT.split()], 4, attentions=True)
    roles = _data(mv.step_report(gen, roles=table).html)["roles"]
    assert [(r["layer"], r["head"]) for r in roles["heads"]] == [(la, h) for la in range(2) for h in range(4)]
    named = {(r["layer"], r["head"]): r["role"] for r in roles["heads"] if r["role"] != "broad"}
    assert named == PLANTED and roles["sequences"] == 8
    r = next(r for r in roles["heads"] if r["role"] == "induction")
    assert r["ci"][0] <= r["score"] <= r["ci"][1] and r["chance"] < 0.2
    assert _data(mv.step_report(gen).html)["roles"] is None


def test_mha_generate_html_has_roles_unless_asked_not_to(folder, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["generate", PROMPT, "--model", str(folder), "-n", "3", *a])  # noqa: E731
    assert run("-o", str(tmp_path / "a.html")).exit_code == 0
    assert run("-o", str(tmp_path / "b.html"), "--no-roles").exit_code == 0
    assert len(_data((tmp_path / "a.html").read_text())["roles"]["heads"]) == 8
    assert _data((tmp_path / "b.html").read_text())["roles"] is None


def test_choosing_a_role_row_chooses_the_head(folder, tmp_path):
    out = tmp_path / "steps.html"
    assert CliRunner().invoke(cli, ["generate", PROMPT, "--model", str(folder), "-n", "3", "-o", str(out)]).exit_code == 0
    with browser_page(out.as_uri()) as page:
        assert page.locator("#roles-body tr").count() == 8 and page.locator("#sinks").is_hidden()
        page.click("#roles-body tr[data-layer='1'][data-head='2']")
        assert page.locator("#head").input_value() == "2" and page.locator("#layer").input_value() == "1"
        assert page.locator("#roles-body tr.chosen").get_attribute("data-head") == "2"
        assert "role induction" in page.locator("#info").text_content()
        shown = [float(page.locator(f'#tokens .t[data-i="{j}"]').get_attribute("data-weight")) for j in range(8)]
        assert int(np.argmax(shown)) == 2  # query 7 ("2") looks where "2" came after "1" before: position 2
        assert not page.errors
