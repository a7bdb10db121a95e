"""Peer tests not run against our managers, each with the reason.

Keys are pytest node-id prefixes inside the peer's sdist. Every one of them reads
something of jupyter_client's own implementation (a private attribute or method,
a traitlets trait, its zmq Context ownership, a class of its own we do not
provide) or exercises a deliberate difference listed in docs/differences.md.
The runner deselects them in the run with our managers and reports them as
"excluded"; every other test that passes with jupyter_client's manager must
pass with ours.
"""

from __future__ import annotations

_CONTEXT = ("asserts km.context.closed: jupyter_client's manager creates a zmq Context "
            "and destroys it at shutdown; ours creates none (its sockets use the "
            "process-wide context, or the one passed as context=) and closes none")
_RECV_REPLY = ("calls the client's private _recv_reply/_async_recv_reply to drain a reply "
               "before the part under test")
_SUBCLASS = ("counts calls of jupyter_client's private methods (_async_launch_kernel, "
             "_async_kill_kernel, _async_signal_kernel...) through a recording subclass")

EXCLUDED: dict[str, dict[str, str]] = {
    "nbclient": {
        "tests/test_client.py::test_start_new_kernel_client_cleans_up_kernel_on_failure":
            "sets km.client_factory, a jupyter_client traitlets trait, to inject a "
            "failing client class",
        "tests/test_client.py::test_start_new_kernel_history_file_setting":
            "calls start_kernel twice on one manager: jupyter_client launches a second "
            "kernel and loses the first (still running); ours refuses the second start "
            "with KernelStateError (a deliberate difference)",
    },
    "jupyter_client": {
        "tests/test_kernelmanager.py::TestKernelManagerShutDownGracefully":
            "asserts km._shutdown_status, a private enum of jupyter_client's shutdown steps",
        "tests/test_kernelmanager.py::TestKernelManager::test_lifecycle":
            "asserts km.ready (jupyter_client's start Future) and km.context.closed",
        "tests/test_kernelmanager.py::TestAsyncKernelManager::test_lifecycle":
            "asserts km.ready (jupyter_client's start Future) and km.context.closed",
        "tests/test_kernelmanager.py::TestKernelManager::test_start_new_kernel": _CONTEXT,
        "tests/test_kernelmanager.py::TestKernelManager::test_templated_kspec_env": _CONTEXT,
        "tests/test_kernelmanager.py::TestKernelManager::test_cleanup_context": _CONTEXT,
        "tests/test_kernelmanager.py::TestParallel": _CONTEXT,
        "tests/test_kernelmanager.py::TestKernelManager::test_subclass_callables": _SUBCLASS,
        "tests/test_kernelmanager.py::TestAsyncKernelManager::test_subclass_callables":
            _SUBCLASS,
        "tests/test_client.py::TestKernelClient::test_history": _RECV_REPLY,
        "tests/test_client.py::TestKernelClient::test_inspect": _RECV_REPLY,
        "tests/test_client.py::TestKernelClient::test_complete": _RECV_REPLY,
        "tests/test_client.py::TestKernelClient::test_kernel_info": _RECV_REPLY,
        "tests/test_client.py::TestKernelClient::test_comm_info": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_history": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_inspect": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_complete": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_is_complete": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_kernel_info": _RECV_REPLY,
        "tests/test_client.py::TestAsyncKernelClient::test_comm_info": _RECV_REPLY,
        "tests/test_client.py::TestThreadedKernelClient":
            "subclasses jupyter_client's KernelManager with its ThreadedKernelClient, a "
            "client class we do not provide (the test runs jupyter_client's code)",
        "tests/test_client.py::test_validate_string_dict":
            "tests jupyter_client.client.validate_string_dict, a helper, no manager",
    },
}
