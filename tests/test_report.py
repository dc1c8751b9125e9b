"""report.html: its contents for a comparison and a run, the `report` command, and a real headless-browser check
(Debian chromium) that every picture decodes and is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from transferkit.evaluation.compare import CompareConfig, run_compare
from transferkit.evaluation.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _tiny_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(base + rng.normal(0, 30, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(root / "cache"))
        data = _tiny_image_folder(root / "data")
        run_compare(CompareConfig(str(data), ["small_cnn"], ["linear-probe", "finetune"], seeds=2,
                                  out=str(root / "cmp"), isolate=False,
                                  fit_options={"epochs": 2, "image_size": 8, "batch_size": 8}))
    return root / "cmp"


def _images(text: str) -> list[str]:
    return re.findall(r'<img src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)


def test_compare_report_contents(compare_dir):
    text = (compare_dir / "report.html").read_text()
    for heading in ("Recommendation:", "Leaderboard", "paired t-test", "Confusion matrix", "Per-class accuracy",
                    "Calibration", "Most confidently wrong examples", "Feature t-SNE", "First-layer filters"):
        assert heading in text, heading
    assert "linear-probe" in text and "finetune" in text
    assert len(_images(text)) >= 6  # chart, confusion, per-class, reliability, examples, t-SNE, filters (curves if any)
    assert 'alt="leaderboard chart"' in text
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(?!data:)', text)


def test_run_report_has_learning_curves_and_cli_writes_it(compare_dir, tmp_path):
    from transferkit.cli.main import main

    run = compare_dir / "runs" / "small_cnn__finetune__seed0"
    assert main(["report", str(run), "--output", str(tmp_path / "run.html")]) == 0
    text = (tmp_path / "run.html").read_text()
    assert 'alt="learning curves"' in text and 'alt="first-layer filters"' in text
    assert main(["report", str(tmp_path)]) == 2  # neither a run nor a compare folder: one-line error
    # a closed-form linear probe has one history row without losses: no curves, and the report says why
    path = write_report(compare_dir / "runs" / "small_cnn__linear-probe__seed1")
    probe_report = path.read_text()
    assert "No per-epoch history" in probe_report and 'alt="learning curves"' not in probe_report
    marker = json.loads((path.parent / "transferkit-output.json").read_text())
    assert "report.html" in marker["files"]  # ours: `fit --overwrite` of that run replaces it, no refusal


def test_report_on_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    from transferkit.cli.main import main

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


_CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const rows = [];
  for (const img of document.images) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    let distinct = 0;
    if (c.width > 0) {
      const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      const seen = new Set();
      for (let i = 0; i < d.length && seen.size < 50; i += 4 * 7) seen.add(d[i] * 65536 + d[i+1] * 256 + d[i+2]);
      distinct = seen.size;
    }
    rows.push(img.alt + ':' + img.naturalWidth + 'x' + img.naturalHeight + ':' + distinct);
  }
  const out = document.createElement('pre'); out.id = 'imgcheck'; out.textContent = rows.join('\\n');
  document.body.appendChild(out);
});
</script>
"""


def test_report_renders_in_headless_chromium(compare_dir, tmp_path):
    assert CHROMIUM, ("Debian chromium is required for the browser check (`apt-get install -y chromium`; "
                      "scripts/setup.sh installs it)")
    page = tmp_path / "checked.html"
    page.write_text((compare_dir / "report.html").read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    match = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom, re.S)
    assert match, "the check script did not run in chromium"
    rows = [line.rsplit(":", 2) for line in match.group(1).strip().splitlines()]
    assert len(rows) == len(_images(page.read_text())) >= 6
    for alt, size, distinct in rows:
        width, height = map(int, size.split("x"))
        assert width > 0 and height > 0, f"image '{alt}' did not decode"
        assert int(distinct) >= 3, f"image '{alt}' rendered blank"
    # and a screenshot of the page is not blank either
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,2000", f"--screenshot={shot}", (compare_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20


def test_report_replaces_report_html_atomically(compare_dir, tmp_path, monkeypatch, capsys):
    """`transferkit report RUN` writes into a published run folder: a failed write (full disk) is one line, exit 2,
    and leaves the previous report.html whole, with no temporary file behind."""
    import os

    from transferkit.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(compare_dir / "runs" / "small_cnn__linear-probe__seed0", run)
    (run / "report.html").write_text("previous report")
    before = sorted(os.listdir(run))

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err  # (may also hold the module fixture's log lines)
    assert err.strip().splitlines()[-1].startswith("error: the disk is full") and "Traceback" not in err
    assert (run / "report.html").read_text() == "previous report" and sorted(os.listdir(run)) == before
