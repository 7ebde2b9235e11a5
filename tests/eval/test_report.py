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


FRONTIER_SUITE = """
[[run]]
case = "text/tiny-gpt2/dager"
attacks = ["dager"]
batch_sizes = [2]
defenses = [[{ name = "gaussian", sigma = 1e-2 }]]

[[run]]
case = "tabular/adult-fc/fedsgd-labels"
attacks = ["tableak"]
batch_sizes = [4]
set = { iterations = 30, ensemble = 2 }
defenses = [[{ name = "gaussian", sigma = 0.1 }]]

[[run]]
case = "speech/kws-mel/fedsgd"
attacks = ["speech-lbfgs"]
batch_sizes = [1]
set = { iterations = 40 }
defenses = [[{ name = "gaussian", sigma = 0.01 }]]
"""


@pytest.fixture(scope="module")
def frontier(tmp_path_factory) -> Path:
    """The main job's frontier step in small: each modality's attack under one Gaussian noise (the
    undefended points are the ``runs``) and ``eval utility --defended-only`` on a few rounds."""
    root = tmp_path_factory.mktemp("frontier")
    suite = root / "suite.toml"
    suite.write_text(FRONTIER_SUITE)
    assert main(["bench", str(suite), "--out", str(root), "--quiet"]) == 0
    assert main(["utility", str(suite), "--out", str(root), "--defended-only", "--rounds", "3", "--clients", "2"]) == 0
    return root


def _frontier_figures(page: str, quote: str = "'") -> dict[str, int]:
    q = quote
    return {m: len(re.findall(f"<figure class={q}frontier{q} data-modality={q}{m}{q}><img [^>]*src={q}data:image/png",
                              page)) for m in ("text", "tabular", "speech")}


def test_report_draws_a_privacy_utility_frontier_per_modality(runs, frontier):
    util = [json.loads(ln) for ln in (frontier / "utility.jsonl").read_text().splitlines()]
    assert len(util) == 6 and {u["case"]["modality"] for u in util} == {"text", "tabular", "speech"}
    page = build_report([*runs.values(), frontier])
    assert _frontier_figures(page) == {"text": 1, "tabular": 1, "speech": 1}
    assert "held-out next-token accuracy" in page  # the tiny GPT-2 is a causal LM
    assert page.count("<section class='setting'") == 6


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
def test_report_in_a_real_browser(runs, frontier, tmp_path):
    """Headless Chromium loads the main-job-like report (the three modalities undefended and under
    noise, with utility): every section, table, image and audio element, a frontier image per
    modality, is in the DOM it built, no console errors, and a screenshot is saved beside it."""
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; scripts/test.sh installs it)")
    report = tmp_path / "report.html"
    assert main(["report", *map(str, runs.values()), str(frontier), "-o", str(report)]) == 0
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<section class=\"setting\"") == 6 and "id=\"summary\"" in html and "id=\"frontier\"" in html
    # a leaderboard table per setting (6), example tables for text and tabular, undefended and under noise (4)
    assert html.count("<table") == 10
    assert html.count("<audio") == 4 and html.count("<img") >= 6
    assert _frontier_figures(html, quote='"') == {"text": 1, "tabular": 1, "speech": 1}
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    r = subprocess.run([*common, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000
