"""The Dagster UI in a real browser: `dagster dev` on a free port, Debian's Chromium
driven headless by Playwright, an asset of a tiny-model partition materialized by
clicking, and the DuckDB rows that run wrote checked afterwards."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest

from lqlora_dagster.ui_session import stop_session

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# as root in a closed network: no sandbox, and no background connections to refuse
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PARTITION = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster dev exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster dev did not serve {url} in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def dagster_dev(tmp_path, tiny_llama_folder):
    """A registered tiny model in a fresh home, and `dagster dev` serving it."""
    home = tmp_path / "home"
    env = {**os.environ, "LQLORA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    env["LQLORA_EXECUTOR"] = "in_process"  # one run process on 2 cores
    registered = subprocess.run(
        [
            sys.executable,
            "-m",
            "lqlora_dagster.cli",
            "--home",
            str(home),
            "register",
            str(tiny_llama_folder),
            "--name",
            PARTITION,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert registered.returncode == 0, registered.stderr
    settings = (home / "dagster" / "dagster.yaml").read_text()
    assert "telemetry:\n  enabled: false" in settings and "nux:\n  enabled: false" in settings

    port, log = free_port(), tmp_path / "dagster-dev.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster")),
                "dev",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, log)
        yield url, home, log
    finally:
        stop_session(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # the whole process group is gone


def test_materialize_an_asset_by_clicking(dagster_dev, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, home, log = dagster_dev
    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: run .ci/setup-env.sh"
    with sync_playwright() as p:
        # (Playwright gives the browser a fresh, empty profile of its own)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        try:
            # the asset graph: expand the "source" group, select base_model
            page.goto(f"{url}/asset-groups", wait_until="networkidle")
            page.get_by_text("source", exact=True).first.dblclick()
            page.get_by_text("base_model", exact=True).first.click()
            # materialize it for the tiny partition
            page.get_by_role("button", name="Materialize selected").click()
            page.get_by_text("Select a partition or create one").click()
            page.get_by_role("menuitem", name=PARTITION).click()
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Launch 1 run").click()
            # the toast links to the run; its page shows the status
            expect(page.get_by_text("Launched run")).to_be_visible()
            page.get_by_role("button", name="View").or_(page.get_by_role("link", name="View")).first.click()
            page.wait_for_url("**/runs/**")
            status = (
                page.get_by_text("Success", exact=True).or_(page.get_by_text("Failure", exact=True)).first
            )
            status.wait_for(timeout=240_000)
            assert status.inner_text() == "Success", log.read_text()[-3000:]
            expect(page.get_by_text(f"partition: {PARTITION}")).to_be_visible()
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()

    with duckdb.connect(str(home / "lqlora.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT count(*) FROM matrices WHERE model = ?", [PARTITION]).fetchone()[0]
    assert rows == 14  # 2 layers x 7 projections of the tiny Llama
