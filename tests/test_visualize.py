"""``minicnn visualize``: the pictures, the HTML page, any Sequential model, and one-line
errors for bad input. (The gradients it draws are checked in test_study.py.)"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicnn import backend, cli
from conftest import read_npz

from minicnn.checkpoint import write_npz_atomic
from minicnn.images import load_image
from minicnn.study.inputs import read_history

pytest.importorskip("matplotlib", reason="minicnn visualize draws with matplotlib "
                                         "(pip install 'minicnn[plot]')")
from minicnn.study import report  # noqa: E402  (needs matplotlib)

from test_study import CAT, WEIGHTS, nested_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --- minicnn visualize ------------------------------------------------------------------------

PANELS = ["input", "features_0", "features_3", "saliency", "filters", "curves"]


def visualize(*args) -> int:
    return cli.main(["visualize", *map(str, args), "--samples", "4", "--no-progress"])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One run of visualize with PNG files and the HTML page (drawing takes seconds, so
    the tests below share it): (folder of the PNGs, the page, what it printed)."""
    folder = tmp_path_factory.mktemp("visualize")
    capture = io.StringIO()
    backend.use("numpy")
    with redirect_stdout(capture):
        assert visualize(CAT, "--label", "dog", "--out", folder / "pictures",
                         "--html", folder / "report.html") == 0
    return folder / "pictures", folder / "report.html", capture.getvalue()


def test_visualize_writes_titled_pictures(made):
    pictures, page, out = made
    assert "label: dog (from --label)" in out
    for name in PANELS:
        path = pictures / f"{name}.png"
        assert f"wrote {path}" in out
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape[0] > 200 and picture.shape[1] > 600
        colours = picture.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])
        assert len(np.unique(colours)) > 50                            # not a blank page
    assert sorted(p.name for p in pictures.iterdir()) == sorted(f"{n}.png" for n in PANELS)
    assert f"wrote {page}" in out


def test_the_html_page_is_self_contained(made):
    _, page, _ = made
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert "<script" not in text and "<link" not in text
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', text)
    assert len(images) == len(PANELS) == text.count("<img")
    for (data_uri, alt), name in zip(images, PANELS, strict=True):
        inlined = base64.b64decode(data_uri, validate=True)
        assert inlined == (page.parent / "pictures" / f"{name}.png").read_bytes()
        assert f"<h2>{alt}</h2>" in text
    assert text.count("<b>What it shows.</b>") == len(PANELS)
    assert text.count("<b>What to notice.</b>") == len(PANELS)


def captions(page: Path) -> dict:
    """{section id: (title, what it shows, what to notice)} of the HTML page."""
    found = re.findall(r'<section id="([^"]+)">\s*<h2>([^<]+)</h2>.*?What it shows.</b> '
                       r'([^<]+)</p>\s*<p><b>What to notice.</b> ([^<]+)</p>',
                       page.read_text(), flags=re.S)
    return {name: (html.unescape(title), html.unescape(shows), html.unescape(notice))
            for name, title, shows, notice in found}


def test_each_panel_says_what_it_shows_and_what_to_notice(made):
    by_name = captions(made[1])
    assert list(by_name) == PANELS
    for title, shows, notice in by_name.values():
        assert title and len(shows) > 60 and len(notice) > 60
    assert '"dog"' in by_name["saliency"][0]                          # the label asked for
    assert "5x5 patch" in by_name["features_0"][2]
    assert "14x14 patch" in by_name["features_3"][2]
    assert "end of the epoch" in by_name["curves"][1]
    assert "peak learning rate" in by_name["curves"][2]
    assert "The model answers cat (" in by_name["input"][2]


def test_visualize_draws_any_sequential_of_minicnn_layers(tmp_path):
    model = nested_model()
    metadata = {"class_names": [f"class {i}" for i in range(10)],
                "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    panels, label = report.study(model, metadata, load_image(CAT), image_name="cat.png",
                                 weights_name="nested", samples=3)
    assert [p.name for p in panels] == ["input", "features_0", "features_2.body.0",
                                        "features_4.0", "saliency", "filters"]
    assert f'"class {label}"' in panels[4].title
    written = report.write_pngs(panels, tmp_path)
    assert all(Image.open(path).size[0] > 300 for path in written)


def test_curves_without_learning_rates_say_so(tmp_path):
    history = json.loads(WEIGHTS.with_suffix(".history.json").read_text())
    for entry in history["history"]:
        del entry["lr"]
    (tmp_path / "h.json").write_text(json.dumps(history))
    read = read_history(tmp_path / "h.json")
    assert all("lr" not in e for e in read["history"])
    figure = report.figures.curves(read["history"], "t")
    assert [t.get_text() for t in figure.axes[2].texts] == ["no learning rate\nin this history"]
    sizes = [Image.open(io.BytesIO(report.figures.png_bytes(figure, dpi))).size
             for dpi in (100, 50)]
    assert sizes == [(1260, 390), (630, 195)]


# --- bad input: one line, exit 1, nothing written ----------------------------------------

def weights_with(tmp_path, **metadata) -> Path:
    """A copy of the shipped weights with some metadata replaced (None: removed), written
    as it stands: save_model would refuse some of it."""
    arrays, saved = read_npz(WEIGHTS)
    changed = {k: v for k, v in {**saved, **metadata}.items() if v is not None}
    return write_npz_atomic(tmp_path / "odd.npz", arrays, changed)


def history_file(tmp_path, content) -> Path:
    path = tmp_path / "history.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


BAD_INPUTS = {
    "missing weights": (lambda t: ["--weights", t / "missing.npz"], "no such file"),
    "weights that are text": (lambda t: ["--weights", history_file(t, "hello")],
                              "not a minicnn weights file"),
    "weights given as the image": (lambda t: [WEIGHTS], "weights file, not an image"),
    "history that is a list": (lambda t: ["--history", history_file(t, [{"epoch": 1}])],
                               "(the list)[0].train_loss must be a finite number"),
    "history that is not JSON": (lambda t: ["--history", history_file(t, "{oops")],
                                 "not a JSON file"),
    "history without losses": (lambda t: ["--history", history_file(
        t, {"history": [{"epoch": 1, "train_accuracy": 0.1, "test_accuracy": 0.1}]})],
        "history[0].train_loss must be a finite number"),
    "history with a text lr": (lambda t: ["--history", history_file(
        t, {"history": [{"epoch": 1, "train_loss": 1, "train_accuracy": 0.1,
                         "test_accuracy": 0.1, "lr": "fast"}]})], "lr"),
    "missing history": (lambda t: ["--history", t / "nope.json"], "no such file"),
    "class names not a list": (lambda t: ["--weights", weights_with(t, class_names="cat")],
                               "class"),
    "too few class names": (lambda t: ["--weights", weights_with(t, class_names=["a", "b"])],
                            "class_names has 2 names, but the model has 10 outputs"),
    "zero std": (lambda t: ["--weights", weights_with(
        t, normalization={"mean": [0, 0, 0], "std": [1, 0, 1]})], "normalization.std must be"),
    "unknown label": (lambda t: ["--label", "unicorn"], "--label must be a class name"),
    "html is a folder": (lambda t: ["--html", t], "is a folder"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_1_and_nothing_written(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert visualize(*args, "--out", tmp_path / "pictures") == 1
    err = capsys.readouterr().err
    assert err.startswith("minicnn visualize: error:") and err.count("\n") == 1, err
    assert message in err
    assert sorted(tmp_path.rglob("*")) == before


def test_without_a_history_there_are_no_curves(tmp_path, capsys, monkeypatch):
    # which panels there are, not how they look (that is above): skip the slow rendering
    monkeypatch.setattr(report.figures, "png_bytes", lambda figure, dpi: b"\x89PNG not drawn")
    weights = tmp_path / "copy.npz"                     # no .history.json beside it
    weights.write_bytes(WEIGHTS.read_bytes())
    assert visualize("--weights", weights, "--html", tmp_path / "r.html") == 0
    out = capsys.readouterr().out
    assert "label: cat (the predicted class; --label to choose)" in out
    assert f"no training history in {weights} or {tmp_path / 'copy.history.json'}" in out
    text = (tmp_path / "r.html").read_text()
    assert text.count("<img") == len(PANELS) - 1 and 'id="curves"' not in text


def test_without_matplotlib_visualize_says_what_to_install(tmp_path):
    blocked = ("import sys; sys.modules['matplotlib'] = None; from minicnn.cli import main; "
               f"sys.exit(main(['visualize', '--html', {str(tmp_path / 'r.html')!r}]))")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stderr == ("minicnn visualize: error: drawing the figures needs matplotlib: "
                           "pip install 'minicnn[plot]'\n")
    assert list(tmp_path.iterdir()) == []


def test_the_example_script_is_the_subcommand():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples" / "visualize.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                           env=env)
    assert shown.returncode == 0 and "usage: minicnn visualize" in shown.stdout
    failed = subprocess.run([sys.executable, script, str(WEIGHTS)], capture_output=True,
                            text=True, env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.count("\n") == 1 and "--weights" in failed.stderr


# --- in a real browser --------------------------------------------------------------------

def find_chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for name in names if (path := shutil.which(name))), None)


def run_chromium(tmp_path: Path, page: Path, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``, offline: no network, no GPU, a fresh profile."""
    command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
               *options, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(find_chromium() is None,
                    reason="no Chromium to render the HTML page in (Debian: apt-get install "
                           "chromium)")
def test_a_real_browser_decodes_every_image_and_draws_the_page(made, tmp_path):
    pictures, page, _ = made
    # 1. Every image decoded, at the size of its PNG: a copy of the page reports the
    #    browser's natural sizes of its images into the DOM once they have loaded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
window.addEventListener("load", () => document.body.setAttribute("data-decoded",
  JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]))));
</script></body>"""))
    dom = run_chromium(tmp_path, probe, "--virtual-time-budget=10000", "--dump-dom").stdout
    decoded = json.loads(html.unescape(re.search(r'data-decoded="([^"]*)"', dom).group(1)))
    expected = [[True, *Image.open(pictures / f"{name}.png").size] for name in PANELS]
    assert decoded == expected
    assert dom.count("<h2>") == len(PANELS) and "What to notice." in dom
    # 2. The page itself, as a screenshot: text, and the pictures in their colours.
    shot = tmp_path / "page.png"
    run_chromium(tmp_path, page, "--window-size=1280,2400", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape == (2400, 1280, 3)
    colours = np.unique(pixels @ np.array([1 << 16, 1 << 8, 1]))
    assert len(colours) > 2000                              # photos and colour maps, not text
    assert (pixels.min(axis=2) < 200).mean() > 0.05         # well filled, not a blank page
    bar_red = np.abs(pixels - [214, 39, 40]).max(axis=2) < 12    # the top prediction's bar
    assert bar_red.sum() > 2000
