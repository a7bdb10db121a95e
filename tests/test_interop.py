"""Interop with the Jupyter ecosystem: nbclient drives our AsyncKernelManager."""

from __future__ import annotations

from typing import Any

import nbformat
from nbclient import NotebookClient

from supervisor.manager import AsyncKernelManager

CELLS = [
    "print('stream out')\nimport sys; print('to stderr', file=sys.stderr)",
    "from IPython.display import display, HTML\ndisplay(HTML('<b>bold</b>'))",
    "21 * 2",
    "raise ValueError('expected failure')",
    "print('after the error')",
]


def notebook() -> Any:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def outputs(nb: Any) -> list[list[dict[str, Any]]]:
    """Outputs without the parts that legitimately differ between runs (tracebacks' colours)."""
    result = []
    for cell in nb.cells:
        cleaned = []
        for out in cell.outputs:
            out = dict(out)
            out.pop("traceback", None)
            cleaned.append(out)
        result.append(cleaned)
    return result


async def test_nbclient_executes_a_notebook_through_our_manager() -> None:
    """nbclient with km=<our AsyncKernelManager> gives the same outputs as with its own manager."""
    ours = notebook()
    km = AsyncKernelManager("python3", forward_stderr=False)
    client = NotebookClient(ours, km=km, allow_errors=True, timeout=60)
    await client.async_execute()
    assert await km.is_alive()  # nbclient leaves a kernel it does not own running
    await km.shutdown_kernel()
    assert not km.has_kernel

    theirs = notebook()
    await NotebookClient(theirs, allow_errors=True, timeout=60).async_execute()

    got, expected = outputs(ours), outputs(theirs)
    assert got == expected
    assert got[0][0]["text"] == "stream out\n"
    assert got[1][0]["output_type"] == "display_data"
    assert got[2][0]["data"]["text/plain"] == "42"
    assert got[3][0]["ename"] == "ValueError"
    assert got[4][0]["text"] == "after the error\n"
