"""edgeqwen's benchmarks: each module is one measurement that writes its raw data under bench/results/ and its
report beside this file. Run them from the repository's root as modules, e.g. `python -m bench.parity`
(the Makefile's targets do); `common` holds what they share, `harness` the child processes they start."""
