"""Measuring and predicting: `bench` (tok/s, TTFT, load time, peak RSS per build), `fit` (the least memory
under a real cgroup limit, with memlimit), `eval` (what quantization costs) and its rows, `plan` (predictions
before a build exists), `hw` (the machine's fingerprint), the results `table` and the `claims` judged on it.

May import: the shared core and formats; never serve or cli.
"""
