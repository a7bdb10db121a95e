"""Benchmarks of kernel-supervisor against the raw floor and jupyter_client.

Run ``python -m benchmarks`` (``--quick`` by default, ``--full`` for the long
run); see :mod:`benchmarks.__main__` for the options. Modules:

* :mod:`benchmarks.floor`: the floor, the least any manager must do (raw pyzmq);
* :mod:`benchmarks.rows`: the rows, one coroutine per row and contender;
* :mod:`benchmarks.report`: statistics, the table, results.json, the chart.

Needs the ``bench`` extra (``pip install '.[bench]'``: jupyter_client,
ipykernel, psutil, tqdm, matplotlib); without tqdm or matplotlib it still runs
(plain progress lines, no chart).
"""
