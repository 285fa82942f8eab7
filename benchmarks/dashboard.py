"""The Dask dashboard of a running fit, seen in a real browser: a screenshot of ``/status`` in headless Chromium.

Starts the default LocalCluster (``cluster.dashboard_address`` as configured,
bokeh from the plain install), simulates a small catalog and fits it while
Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
``selenium``) opens the dashboard's status page. The screenshot is taken once
the page has drawn the task stream with the pass's tasks in it (``chromium
--screenshot`` alone captures the page before bokeh draws), and the script
prints the task names the scheduler has seen, so the figure's claim is checked:
``features``, ``acc-fold``, ``solve expert ...``.

    pip install selenium   # once; apt-get install chromium chromium-driver
    python benchmarks/dashboard.py --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from dask.utils import key_split

from snrmoe_dask.cluster import dask_session
from snrmoe_dask.config import load_config
from snrmoe_dask.fit import fit_model
from snrmoe_dask.pipeline import run_simulate


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def _task_names(dask_scheduler=None) -> dict:
    return dict(Counter(key_split(k) for k in dask_scheduler.tasks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    ap.add_argument("--n", type=int, default=20_000, help="spectra to simulate and fit")
    ap.add_argument("--wait", type=float, default=25.0, help="seconds into the pass to take the screenshot")
    args = ap.parse_args()
    cfg = load_config(overrides={"simulate": {"n": args.n}})
    work = Path(tempfile.mkdtemp(prefix="snrmoe-dashboard-"))
    try:
        with dask_session(cfg.cluster) as client:
            url = client.dashboard_link
            print(f"dashboard {url}", flush=True)
            run_simulate(cfg.simulate, work / "cat.zarr", cfg.storage, client=client, progress=False)
            done = threading.Event()
            errors: list[BaseException] = []

            def fit() -> None:
                try:
                    fit_model(work / "cat.zarr", work / "model", cfg, client=client, progress=False)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                finally:
                    done.set()

            threading.Thread(target=fit, daemon=True).start()
            browser = _browser()
            try:
                browser.get(url)
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.wait and not done.is_set():
                    time.sleep(0.5)
                # bokeh draws into canvases: wait until the page has them, then a moment for the stream
                for _ in range(40):
                    if browser.execute_script("return document.querySelectorAll('canvas').length") > 0:
                        break
                    time.sleep(0.5)
                time.sleep(2.0)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(args.out))
                title = browser.title
            finally:
                browser.quit()
            names = client.run_on_scheduler(_task_names)
            done.wait()
        if errors:
            raise errors[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"page title: {title}")
    print("tasks on the scheduler at the screenshot: " + ", ".join(f"{k} ({v})" for k, v in sorted(names.items())))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    if not any(k.startswith(("acc-fold", "features", "solve expert")) for k in names):
        sys.exit("the pass's named tasks were not on the scheduler when the screenshot was taken")


if __name__ == "__main__":
    main()
