"""JupyterLab with --gateway-url in a real headless Chromium: run a cell, restart from the UI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import pid_gone
from gateway_util import JS_TOKEN, gateway, notebook_server

from supervisor.events import KernelEvent

pytest.importorskip("jupyterlab")
playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
               "outputs": [], "source": []}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}
WAIT_MS = 90_000


async def kernel_idle(page: object) -> None:
    """Wait until JupyterLab's status bar says the notebook's kernel is idle."""
    status = page.locator(".jp-StatusBar-TextItem", has_text="| Idle")  # type: ignore[attr-defined]
    await status.first.wait_for(timeout=WAIT_MS)


async def run_cell(page: object, code: str, expect: str) -> None:
    """Type ``code`` into the last cell once the kernel is idle, run it, wait for ``expect``."""
    await kernel_idle(page)
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").last  # type: ignore[attr-defined]
    await editor.click()
    await page.keyboard.type(code)  # type: ignore[attr-defined]
    await page.keyboard.press("Shift+Enter")  # type: ignore[attr-defined]
    output = page.locator(".jp-OutputArea-output", has_text=expect)  # type: ignore[attr-defined]
    await output.first.wait_for(timeout=WAIT_MS)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
async def test_jupyterlab_runs_a_cell_and_restarts_through_our_gateway(tmp_path: Path) -> None:
    """In Chromium, JupyterLab (with --gateway-url) runs a cell on a kernel living in our gateway, and its Restart Kernel menu restarts that kernel."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "gw.ipynb").write_text(json.dumps(NOTEBOOK))
    async with gateway(default_kernel_name="python3") as gw:
        sup = gw.server.supervisor
        restarted = asyncio.Event()

        async def on_event(event: KernelEvent) -> None:
            if event.kind == "restarted":
                restarted.set()
        sup.subscribe(on_event)
        async with notebook_server(gw.url, tmp_path, module="jupyterlab") as base, \
                playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS,
                                               headless=True)
            try:
                page = await browser.new_page()
                await page.goto(f"{base}lab/tree/gw.ipynb?token={JS_TOKEN}", timeout=WAIT_MS)
                await run_cell(page, "print(6 * 7)", "42")
                kernels = sup.list_kernel_ids()
                assert len(kernels) == 1  # the notebook's kernel lives in our gateway
                pid = sup.actor_of(kernels[0]).pid
                await page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
                await page.locator(".lm-Menu-itemLabel",
                                   has_text="Restart Kernel…").first.click()
                await page.locator(".jp-Dialog-button.jp-mod-accept").click(timeout=WAIT_MS)
                await asyncio.wait_for(restarted.wait(), 60)
                assert sup.list_kernel_ids() == kernels
                assert sup.actor_of(kernels[0]).pid != pid
                assert pid is not None and pid_gone(pid)
                await run_cell(page, "print('after', 'restart')", "after restart")
            finally:
                await browser.close()
        sup.unsubscribe(on_event)
        assert sup.list_kernel_ids() == []  # JupyterLab shut its kernel down on exit
