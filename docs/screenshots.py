"""`make screenshots`: the pictures the docs show, taken from what `make demo` left — never drawn by hand.

Serves the MLflow store the stages log to (`med-idefics tracking-uri`; a tracking server's URL is used as it is, a
sqlite store gets an `mlflow server` of its own on a free port on 127.0.0.1, stopped at the end), then drives Debian's
headless Chromium with Playwright (its own browser downloads are never used) through what the docs tell a user to do:

- ``mlflow-runs-table.png``: the runs table, one row per variant (the search ``metrics.`vqa-rad/closed` >= 0``), with
  the vqa-rad headline metrics and the variant and seed columns;
- ``mlflow-chart-view.png``: the chart view, the vqa-rad section (a bar chart per headline metric, a bar per variant);
- ``mlflow-registry-version.png``: the registered model's champion version page;
- ``mlflow-registry-metrics.png``: the logged model that version was registered from (its *Source Model*), where
  MLflow 3 shows a version's metrics: the headline numbers of every suite;

and copies the report's Figure 2 and Figure 3 (``reports/figure2.png``, ``figure3.png``) beside them. Names (the
experiment, the registered model and its alias) come from params.yaml. Every step waits for what it needs on the page
and, when the MLflow UI has changed under it, stops naming the step, leaving the images it had not yet replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Without the background-networking flags Chromium keeps trying to reach Google's services and, offline, hangs.
CHROMIUM_ARGS = [
    "--no-sandbox",  # running as root (CI, containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1600
TIMEOUT_MS = 60_000


class ScreenshotError(RuntimeError):
    pass


def tracking_uri() -> str:
    result = subprocess.run(["med-idefics", "tracking-uri"], cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ScreenshotError(f"`med-idefics tracking-uri` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(uri: str) -> Iterator[str]:
    """The UI's base URL for store ``uri``: a tracking server as it is, else an `mlflow server` started here."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    port = free_port()
    log = ROOT / "outputs" / "logs" / "screenshots-mlflow-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise ScreenshotError(f"mlflow server exited with status {server.returncode}; its log: {log}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{base}/health", timeout=2).read().strip() == b"OK":
                    break
            if time.monotonic() > deadline:
                raise ScreenshotError(f"mlflow server did not answer on {base}/health within 120 s; its log: {log}")
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def store_facts(base: str) -> tuple[str, str, str]:
    """The experiment's id, the champion's version number and its logged model's id, read through the served store."""
    import mlflow
    from mlflow import MlflowClient

    from med_idefics.config import load_params

    params = load_params(ROOT / "params.yaml")
    mlflow.set_tracking_uri(base)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        raise ScreenshotError(f"no experiment {params.mlflow.experiment!r} in the store: run `make demo` first")
    try:
        version = MlflowClient().get_model_version_by_alias(params.registry.model_name, params.registry.alias)
    except mlflow.exceptions.MlflowException as err:
        raise ScreenshotError(
            f"no version of {params.registry.model_name!r} has the alias {params.registry.alias!r}: run `make demo` "
            f"first ({err})"
        ) from err
    from med_idefics.tracking.registry import logged_model_id

    return experiment.experiment_id, version.version, logged_model_id(version)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Name the step that failed: the MLflow UI is another project's, and it changes between versions."""
    try:
        yield
    except Exception as err:
        import mlflow

        raise ScreenshotError(f"{name}: {err.__class__.__name__}: {err}\n(MLflow {mlflow.__version__}'s UI)") from err


def close_assistant(page) -> None:
    """MLflow 3's UI opens an assistant panel beside a page (a moment after the page), its one Close button at the top:
    close it where there is one."""
    close = page.get_by_role("button", name="Close", exact=True)
    with contextlib.suppress(Exception):  # none within a few seconds: this page has no assistant open
        close.first.wait_for(timeout=5_000)
    if close.count():
        close.first.click()
        close.first.wait_for(state="detached")


def shoot(page, path: Path, bottom: float | None = None) -> None:
    """The viewport, cut below ``bottom`` (page pixels) when given; the pointer moved off every hover state."""
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring on the last control
    page.wait_for_timeout(800)  # charts animate in; tooltips fade
    height = page.viewport_size["height"]
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": min(height, bottom + 24)} if bottom else None
    page.screenshot(path=str(path), clip=clip)
    print(f"wrote {path}")


def take(base: str, experiment_id: str, version: str, model_id: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    from med_idefics.config import load_params
    from med_idefics.data.suites import VQA_RAD
    from med_idefics.reporting.results import HEADLINE, headline_metrics

    params = load_params(ROOT / "params.yaml")
    metrics = [f"{VQA_RAD}/{short}" for short in headline_metrics(VQA_RAD)]  # closed, em, open, consistent
    search = f"metrics.`{metrics[0]}` >= 0"  # training runs and the base's: the runs that carry headline metrics
    runs_url = (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&searchFilter={urllib.parse.quote(search)}"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)

            with step("the runs table: open it filtered to one row per variant"):
                page.goto(runs_url, wait_until="load")
                page.get_by_text(f"two-stage (seed {params.seed})", exact=True).first.wait_for()
                close_assistant(page)
            with step("the runs table: choose its columns (Columns: less Dataset, Source, Models; the headlines)"):
                page.get_by_role("button", name="Columns", exact=True).click()
                chooser = page.get_by_role("dialog").filter(has=page.get_by_placeholder("Search columns"))
                for name in ("Dataset", "Source", "Models"):  # untick: they push the metrics off screen
                    chooser.get_by_text(name, exact=True).click()
                search_box = chooser.get_by_placeholder("Search columns")
                tree = chooser.get_by_test_id("column-selector-tree")
                for name in [*metrics, "seed", "variant"]:
                    search_box.fill(name)
                    # the item named exactly so (not data.demo.seed, whose match is highlighted as "seed"), the
                    # first: Metrics, then Parameters, then Tags
                    tree.locator("span").filter(has_text=re.compile(f"^{re.escape(name)}$")).first.click()
                page.keyboard.press("Escape")
                page.get_by_test_id(f"sort-header-{metrics[-1]}").wait_for()
                rows = page.get_by_role("row")
                last = rows.nth(rows.count() - 1).bounding_box()
            shoot(page, out / "mlflow-runs-table.png", last["y"] + last["height"] if last else None)

            with step("the chart view: switch to it, show the vqa-rad charts"):
                page.locator("label:has(input[value=CHART])").click()
                page.get_by_placeholder("Search metric charts").fill(f"{VQA_RAD}/")
                card = "[data-testid=experiment-view-compare-runs-card]"
                page.wait_for_function(f"document.querySelectorAll('{card}').length === {len(metrics)}")
                box = page.locator(card).last.bounding_box()
            shoot(page, out / "mlflow-chart-view.png", box["y"] + box["height"] if box else None)

            with step(f"the registered model's champion version page (version {version})"):
                model = urllib.parse.quote(params.registry.model_name)
                page.goto(f"{base}/#/models/{model}/versions/{version}?workflowType=machine_learning")
                page.get_by_text(f"Version {version}", exact=True).first.wait_for()
                page.get_by_text(params.registry.alias).first.wait_for()
                close_assistant(page)
            shoot(page, out / "mlflow-registry-version.png")

            with step(f"the champion's source model: its metrics (logged model {model_id})"):
                page.goto(f"{base}/#/experiments/{experiment_id}/models/{model_id}?workflowType=machine_learning")
                page.get_by_text(f"{VQA_RAD}/{next(iter(HEADLINE))}", exact=True).first.wait_for()
                close_assistant(page)
            shoot(page, out / "mlflow-registry-metrics.png")
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument(
        "--chromium",
        default=os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser"),
        help="the Chromium executable (default: $CHROMIUM, else chromium on PATH)",
    )
    args = parser.parse_args()
    if not args.chromium:
        print("no chromium on PATH: install Debian's (`apt-get install chromium`) or pass --chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        figures = [ROOT / "reports" / name for name in ("figure2.png", "figure3.png")]
        missing = [str(f.relative_to(ROOT)) for f in figures if not f.is_file()]
        if missing:
            raise ScreenshotError(f"{', '.join(missing)} missing: run `make demo` first")
        with served(tracking_uri()) as base:
            experiment_id, version, model_id = store_facts(base)
            take(base, experiment_id, version, model_id, args.out, args.chromium)
        for figure in figures:
            shutil.copyfile(figure, args.out / figure.name)
            print(f"wrote {args.out / figure.name}")
    except ScreenshotError as err:
        print(f"make screenshots: {err}", file=sys.stderr)
        return 1
    print(f"screenshots taken in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
