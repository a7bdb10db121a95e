"""pytest plugin loaded (``-p peer_plugin``) into nbclient's and jupyter_client's own suites.

With ``PEER_MANAGER=ours`` it makes kernel-supervisor's managers the ones those
suites create and drive; with ``PEER_MANAGER=jupyter_client`` it changes nothing
(the baseline run). It is test scaffolding only: it runs inside the peers' pytest
process, started by ``run_peer_suites.py``, never inside our own suite.

What is substituted, in ours mode:

* nbclient: the default ``NotebookClient.kernel_manager_class`` (jupyter_client's
  ``AsyncKernelManager``) becomes ours, and the ``KernelManager`` that its test
  module builds by hand becomes our blocking one. nbclient's trait only accepts
  subclasses of jupyter_client's manager, so its class check is relaxed.
* jupyter_client: ``jupyter_client.KernelManager`` and ``.AsyncKernelManager``
  (so its test modules, and the recording subclasses in its tests/utils.py, get
  ours), the names its test modules imported from ``jupyter_client.manager``
  (``KernelManager``, ``start_new_kernel``, ``start_new_async_kernel``), and
  pytest-jupyter's ``jp_start_kernel`` helper. A traitlets ``config=`` is read for the one
  setting those tests put there (``KernelManager.transport``), because our
  managers take keyword arguments instead of traitlets configuration.

Excluded tests are deselected by the runner, not here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

MODE = os.environ.get("PEER_MANAGER", "ours")


def _transport_from_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    config = kwargs.pop("config", None)
    if config is not None and "KernelManager" in config:
        section = config.KernelManager
        if "transport" in section:
            kwargs.setdefault("transport", section.transport)
    return kwargs


if MODE == "ours":
    import supervisor.manager as ours

    # Named as jupyter_client's, so that parametrized test ids are the same in both runs.
    class KernelManager(ours.KernelManager):
        """Our blocking manager, reading ``config.KernelManager.transport``."""

        def __init__(self, kernel_name: str | None = None, **kwargs: Any) -> None:
            super().__init__(kernel_name, **_transport_from_config(kwargs))

    class AsyncKernelManager(ours.AsyncKernelManager):
        """Our async manager, reading ``config.KernelManager.transport``."""

        def __init__(self, kernel_name: str | None = None, **kwargs: Any) -> None:
            super().__init__(kernel_name, **_transport_from_config(kwargs))

    SUBSTITUTES: dict[str, Any] = {
        "KernelManager": KernelManager,
        "AsyncKernelManager": AsyncKernelManager,
        "start_new_kernel": ours.start_new_kernel,
        "start_new_async_kernel": ours.start_new_async_kernel,
    }

    def _patch_jupyter_client_package() -> None:
        # ``from jupyter_client import KernelManager`` (the suites' test modules and
        # helpers, nbclient's default manager class) gets ours; jupyter_client's own
        # modules import from jupyter_client.manager and keep theirs.
        import jupyter_client

        jupyter_client.KernelManager = KernelManager  # type: ignore[attr-defined]
        jupyter_client.AsyncKernelManager = AsyncKernelManager  # type: ignore[attr-defined]

    def _patch_nbclient() -> None:
        try:
            from nbclient.client import NotebookClient
        except ImportError:
            return
        # NotebookClient's trait accepts only subclasses of jupyter_client's manager.
        NotebookClient.class_traits()["kernel_manager_class"].klass = object

    def _patch_pytest_jupyter() -> None:
        try:
            import pytest_jupyter.jupyter_client as pjc
        except ImportError:
            return
        pjc.start_new_async_kernel = ours.start_new_async_kernel

    class _StartKernelFixture:
        """pytest-jupyter's ``jp_start_kernel`` for our managers.

        Same as the original (start with ``start_new_async_kernel``, stop the
        clients, ``shutdown_kernel(now=True)`` on the fixture's loop), except that
        its last check, that the manager destroyed the zmq Context it created
        (ours share one), becomes: the kernel process is gone.
        """

        @pytest.fixture
        def jp_start_kernel(self, jp_environ: Any, jp_asyncio_loop: Any) -> Any:
            started: list[tuple[Any, Any]] = []

            async def inner(kernel_name: str = "python3", **kwargs: Any) -> tuple[Any, Any]:
                km, kc = await ours.start_new_async_kernel(kernel_name=kernel_name, **kwargs)
                started.append((km, kc))
                return km, kc

            yield inner
            for _, kc in started:
                kc.stop_channels()
            for km, _ in started:
                jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))
                if km.has_kernel:
                    raise AssertionError("the kernel outlived shutdown_kernel")

    def pytest_configure(config: pytest.Config) -> None:
        _patch_jupyter_client_package()
        _patch_nbclient()
        _patch_pytest_jupyter()

    def pytest_sessionstart(session: pytest.Session) -> None:
        # Registered after pytest-jupyter (loaded by the suite's conftest), so it wins.
        session.config.pluginmanager.register(_StartKernelFixture(), "peer_jp_start_kernel")

    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        import jupyter_client.manager as jcm

        jc_classes = {jcm.KernelManager: KernelManager,
                      jcm.AsyncKernelManager: AsyncKernelManager}
        seen: set[int] = set()
        for item in items:
            module = getattr(item, "module", None)
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                for name, ours_obj in SUBSTITUTES.items():
                    theirs = getattr(module, name, None)
                    if theirs is not None and getattr(theirs, "__module__", "").startswith(
                            "jupyter_client"):
                        setattr(module, name, ours_obj)
            callspec = getattr(item, "callspec", None)
            if callspec is not None:
                for key, value in list(callspec.params.items()):
                    if isinstance(value, type) and value in jc_classes:
                        callspec.params[key] = jc_classes[value]
        sys.stderr.write(f"peer_plugin: kernel-supervisor managers substituted in "
                         f"{len(seen)} module(s)\n")
