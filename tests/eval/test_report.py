"""The auditor's report: one self-contained page from real runs of all three modalities."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.report import build_report
from eval.report_parts import word_diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three short real attacks: DAGER on a tiny GPT-2 (B=2), TabLeak on Adult (B=4, 30 steps, a
    weak attack so that cells are wrong), the keyword L-BFGS inversion (40 iterations)."""
    root = tmp_path_factory.mktemp("runs")
    spec = {"text": ["--attack", "dager", "--case", "text/tiny-gpt2/dager", "--batch-size", "2"],
            "tabular": ["--attack", "tableak", "--case", "tabular/adult-fc/fedsgd-labels", "--batch-size", "4",
                        "--set", "iterations=30", "--set", "ensemble=2"],
            "speech": ["--attack", "speech-lbfgs", "--case", "speech/kws-mel/fedsgd", "--batch-size", "1",
                       "--set", "iterations=40"]}
    out = {}
    for mod, args in spec.items():
        out[mod] = root / mod
        assert main(["run", *args, "--out", str(out[mod]), "--quiet"]) == 0
    return out


def test_word_diff_marks_only_the_differing_words():
    left, right = word_diff("the cat sat on the mat", "the dog sat on a mat")
    assert left == "the <del>cat</del> sat on <del>the</del> mat"
    assert right == "the <mark>dog</mark> sat on <mark>a</mark> mat"
    assert word_diff("a <b>", "a <b>") == ("a &lt;b&gt;", "a &lt;b&gt;")


def test_report_shows_every_modality_with_its_reconstructions(runs, tmp_path):
    page = build_report(list(runs.values()))
    # self-contained: nothing fetched from the network
    assert not re.search(r"""(src|href)=['"]https?:""", page)
    # summary in plain words, one per modality
    summary = page[page.index("id='summary'"):page.index("</section>")]
    assert "dager recovered 2 of 2 sentences exactly at B=2" in summary
    assert re.search(r"tableak recovered \d+ % of cells and \d+ of 4 rows entirely at B=4", summary)
    assert "speech-lbfgs: reconstructed clips reach PESQ-wb" in summary and "_n " not in summary
    # text: originals beside reconstructions, exact rows marked
    sents = json.loads(next((runs["text"] / "artifacts").rglob("sentences.json")).read_text())
    for s in sents:
        assert s["reference"].split()[0] in page
    assert page.count("<tr class='exact'>") >= 2
    # tabular: every wrong cell of the batch is marked, with the true value in its title
    cells = json.loads(next((runs["tabular"] / "artifacts").rglob("cells.json")).read_text())
    n_wrong = sum(map(sum, cells["wrong"]))
    assert 0 < n_wrong < 4 * len(cells["columns"])
    assert page.count("<td class='bad'") == n_wrong
    # speech: both clips playable inline, spectrograms inline
    assert page.count("<audio controls src='data:audio/wav;base64,") == 2
    assert "alt='spectrograms, clip 0'" in page
    assert page.count("<section class='setting'") == 3


def test_report_cli_refuses_missing_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")]) == 2


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.browser
def test_report_in_a_real_browser(runs, tmp_path):
    """Headless Chromium loads the report: every section, table, image and audio element is in the
    DOM it built, no console errors, and a screenshot is saved beside the report."""
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; scripts/test.sh installs it)")
    report = tmp_path / "report.html"
    assert main(["report", *map(str, runs.values()), "-o", str(report)]) == 0
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<section class=\"setting\"") == 3 and "id=\"summary\"" in html
    assert html.count("<table") == 5  # a leaderboard table per setting, example tables for text and tabular
    assert html.count("<audio") == 2 and html.count("<img") >= 1
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    r = subprocess.run([*common, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000
